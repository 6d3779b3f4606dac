"""The runner's listening sockets."""

from __future__ import annotations

import socket


def listening_sockets(host: str, port: int, send_buffer_bytes: int) -> list[socket.socket]:
    """The sockets to listen on, as aiohttp's TCPSite binds them (every address ``host`` has), with SO_SNDBUF set.

    Each connection accepted from them inherits the kernel send buffer of ``send_buffer_bytes`` (SEND_BUFFER_BYTES):
    set once here, not one system call per connection. Linux doubles the value (its bookkeeping), caps it at
    net.core.wmem_max, and no longer autotunes the buffer up to net.ipv4.tcp_wmem's maximum (4 MiB): what a client
    that stops reading holds is bounded, and its writes wait, so that WRITE_STALL_TIMEOUT counts, once that is full.
    """
    addresses = dict.fromkeys((family, address) for family, _, _, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    sockets = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: an IPv6 socket beside an IPv4 one on the same port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
