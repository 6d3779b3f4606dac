"""What the tests of several nodes share: the engine's NODE_SECRET, and a stranger at the serving node's line port."""

from __future__ import annotations

import json
import socket
import time

NODE_SECRET = "nodes-of-the-test-engine-0123456789"  # every node of one test engine is given it


def stranger_claims_node(port: int, node: int = 1, timeout: float = 5.0) -> dict | None:
    """Connect to NODE_LINE_PORT as a stranger would: claim to be worker node ``node`` without proof, hang up.

    Returns what the serving node answered after the challenge (its refusal), or None if it said nothing more.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        lines = sock.makefile("rb")
        json.loads(lines.readline())  # the challenge: a stranger cannot answer it
        sock.sendall(json.dumps({"node": node, "joined": True, "proof": "0" * 64}).encode() + b"\n")
        answer = lines.readline()
        return json.loads(answer) if answer else None


def stranger_hangs_up(port: int, node: int = 1, timeout: float = 120.0) -> float:
    """The issue's stranger: once NODE_LINE_PORT listens, connect, say ``{"node": node}`` and hang up.

    Retries until the port listens (a serving node opens it once vLLM is
    imported); returns the monotonic time it hung up.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(json.dumps({"node": node}).encode() + b"\n")
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
