"""A client that stops reading its stream: the runner waits for it, holding
only what the socket buffers hold, and gives it every event once it reads again.

The app runs in-process on a real TCP port, with a pipeline that could
produce tens of megabytes of events in an instant. If the SSE writer did not
wait for the client (aiohttp's write() awaiting the transport's drain), every
event would pile up in the runner's memory at once; here we count how many
the pipeline was asked for while the client read nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pydantic
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipelines.llm import schema as llm_schema
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from runner.listening import listening_sockets
from runner.app import create_app
from runner import handlers
from runner.handlers import PacedStreamWriter
from runner.keys import METRICS, STATE
from runner.pipeline import EventStream, RequestContext, Serve
from runner.settings import RunnerSettings
from tests.support.stub_pipeline import StubPipeline

GEN_LLM = tuple(op for op in llm_schema.OPERATIONS if op.operation_id == "genLLM")  # /llm alone

EVENT_CONTENT_BYTES = 8 * 1024
EVENTS = 4000  # over 32 MiB of events
CLIENT_RECEIVE_BUFFER = 4096
# What a stalled connection may hold: the kernel's send buffer, which grows up
# to tcp_wmem's maximum (4 MiB by default), the client's small receive buffer
# and aiohttp's 64 KiB write buffer. Everything else must wait in the pipeline.
KERNEL_SEND_BUFFER_MAX = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
MAX_EVENTS_BUFFERED = (KERNEL_SEND_BUFFER_MAX + 4 * CLIENT_RECEIVE_BUFFER + 256 * 1024) // EVENT_CONTENT_BYTES
# How long the runner waits for a frozen client past its request's deadline (handlers.STALLED_CLIENT_GRACE, 5 s), in
# the tests that wait for one to be let go: still twice the 1 s timeout, so stopping the stream at the deadline and
# letting the client go at the grace's end stay a second apart.
SHORT_GRACE = 2.0


class FloodPipeline(StubPipeline):
    """Streams EVENTS large events as fast as they are asked for, counting them."""

    name = "flood"
    OPERATIONS = GEN_LLM

    def __init__(self, events: int = EVENTS, content_bytes: int = EVENT_CONTENT_BYTES) -> None:
        super().__init__("flood")
        self.events_wanted = events
        self.content_bytes = content_bytes
        self.produced = 0
        self.finished = asyncio.Event()
        self.closed = asyncio.Event()  # the stream was run to its end or stopped

    def operations(self) -> Mapping[str, Serve]:
        return {"genLLM": self.generate}

    async def generate(self, request: LLMRequest, context: RequestContext):
        def error_event(reason: str) -> bytes:
            context.finish_reason = "error"
            return self.event("", "error")

        return EventStream(events=self.events(), error_event=error_event)

    def event(self, content: str, finish_reason: str = "") -> bytes:
        usage = LLMTokenUsage(prompt_tokens=1, completion_tokens=self.produced, total_tokens=1 + self.produced)
        choice = LLMChoice(index=0, delta=LLMMessage(role="assistant", content=content), finish_reason=finish_reason)
        response = LLMResponse(id="chatcmpl-flood", model="flood", created=0, usage=usage, choices=[choice])
        return response.model_dump_json(exclude_none=True).encode()

    async def events(self):
        content = "x" * self.content_bytes
        try:
            for _ in range(self.events_wanted):
                self.produced += 1
                yield self.event(content)
            yield self.event("", "length")
            self.finished.set()
        finally:
            self.closed.set()


async def produced_when_settled(pipeline: FloodPipeline, quiet_for: float = 0.5, within: float = 20) -> int:
    """The pipeline's count once it has stopped growing for `quiet_for` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, last_change = pipeline.produced, loop.time()
    while loop.time() < deadline and not pipeline.finished.is_set():
        await asyncio.sleep(0.05)
        if pipeline.produced != last:
            last, last_change = pipeline.produced, loop.time()
        elif loop.time() - last_change >= quiet_for:
            break
    return pipeline.produced


async def open_stalled_stream(server) -> socket.socket:
    """A client that asks for a stream and then reads nothing, with a small receive window."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (server.host, server.port))
    body = json.dumps({"messages": [{"role": "user", "content": "flood"}], "stream": True}).encode()
    await loop.sock_sendall(
        client,
        b"POST /llm HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    return client


async def flood_server(aiohttp_server, **settings):
    pipeline = FloodPipeline()
    server = await aiohttp_server(create_app(RunnerSettings(**settings), pipeline=pipeline))
    await asyncio.sleep(0)  # the pipeline's (instant) load
    return server, pipeline


async def served_requests(server) -> dict[tuple[str, str], float]:
    """livepeer_runner_requests_total by (outcome, code)."""
    counts = {}
    for metric in server.app[METRICS].registry.collect():
        for sample in metric.samples:
            if sample.name == "livepeer_runner_requests_total":
                counts[sample.labels["outcome"], sample.labels["code"]] = sample.value
    return counts


async def test_a_client_that_stops_reading_holds_back_the_stream_not_the_memory(aiohttp_server):
    server, pipeline = await flood_server(aiohttp_server)
    client = await open_stalled_stream(server)
    loop = asyncio.get_running_loop()
    try:
        # The client reads nothing: the writer must stop asking for events once the buffers are full.
        stalled_at = await produced_when_settled(pipeline)
        assert 0 < stalled_at <= MAX_EVENTS_BUFFERED, f"{stalled_at} events of {EVENTS} produced for a stalled client"

        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 16), timeout=20):
            received += chunk
            if received.endswith(b"\r\n0\r\n\r\n"):  # chunked encoding's last chunk
                break
    finally:
        client.close()
    assert pipeline.finished.is_set()
    *events, done, after_done = sse_blocks(received)
    assert (done, after_done) == ("data: [DONE]", "")
    assert len(events) == EVENTS + 1, "every event reaches the client once it reads again"
    assert json.loads(events[-1].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


async def test_a_stalled_client_that_hangs_up_stops_its_stream(aiohttp_server):
    server, pipeline = await flood_server(aiohttp_server)
    client = await open_stalled_stream(server)
    await produced_when_settled(pipeline)
    client.close()
    await asyncio.wait_for(pipeline.closed.wait(), timeout=5)
    assert not pipeline.finished.is_set()
    await wait_until(lambda: server.app[STATE].in_flight == 0, within=5)
    assert await served_requests(server) == {("cancelled", "499"): 1}


async def test_a_client_that_never_reads_again_is_let_go_after_the_request_timeout(aiohttp_server, monkeypatch):
    """Not reading and not hanging up (a frozen client, a connection a NAT dropped)
    must not hold the request, and its place in the admission bound, for ever."""
    monkeypatch.setattr(handlers, "STALLED_CLIENT_GRACE", SHORT_GRACE)
    server, pipeline = await flood_server(aiohttp_server, REQUEST_TIMEOUT=1)
    await frozen_client_is_let_go(server, pipeline)
    assert sum((await served_requests(server)).values()) == 1


async def test_a_client_that_reads_nothing_for_write_stall_timeout_is_cut_and_frees_its_slot(aiohttp_server):
    """REQUEST_TIMEOUT stays 600 s: the stall alone cuts the stream, the request's place in the admission bound is
    freed within a second of WRITE_STALL_TIMEOUT, and a client that reads again finds the in-band error ending."""
    server, pipeline = await flood_server(aiohttp_server, WRITE_STALL_TIMEOUT=1)
    client = await open_stalled_stream(server)
    loop = asyncio.get_running_loop()
    try:
        stalled_at = await produced_when_settled(pipeline, quiet_for=0.2)
        settled = loop.time()
        await asyncio.wait_for(pipeline.closed.wait(), timeout=3)
        await wait_until(lambda: server.app[STATE].in_flight == 0, within=3)
        freed_after = loop.time() - settled
        assert not pipeline.finished.is_set() and pipeline.produced == stalled_at
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 16), timeout=5):
            received += chunk
            if received.endswith(b"\r\n0\r\n\r\n"):
                break
    finally:
        client.close()
    assert freed_after < 1 + 1.5, f"the slot was held {freed_after:.1f} s after the client stopped reading"
    *events, done, after_done = sse_blocks(received)
    assert (done, after_done) == ("data: [DONE]", "")
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error" and last["choices"][0]["delta"]["content"] == ""
    assert len(events) == stalled_at + 1, "every event written before the cut, then the error"
    assert await served_requests(server) == {("cancelled", "499"): 1}


def test_a_stalled_client_holds_no_more_than_send_buffer_bytes_and_is_cut_soon():
    """The runner listens as ``python -m runner`` does (listening_sockets): every accepted connection's kernel send
    buffer is SEND_BUFFER_BYTES (doubled by Linux), not autotuned up to tcp_wmem's 4 MiB. So a client that stops
    reading holds that much of the kernel's memory, the stream's writes wait once it is full, and WRITE_STALL_TIMEOUT
    cuts the stream that long after the client stopped, not after megabytes more were produced for it."""
    send_buffer = 64 * 1024

    async def scenario() -> None:
        pipeline = FloodPipeline()
        settings = RunnerSettings(SEND_BUFFER_BYTES=send_buffer, WRITE_STALL_TIMEOUT=1)
        runner = web.AppRunner(create_app(settings, pipeline=pipeline), handler_cancellation=True)
        await runner.setup()
        try:
            sock, = listening_sockets("127.0.0.1", free_port(), settings.send_buffer_bytes)
            await web.SockSite(runner, sock).start()
            host, port = sock.getsockname()[:2]
            await asyncio.sleep(0)  # the pipeline's (instant) load
            loop = asyncio.get_running_loop()
            client = await open_stalled_stream(SimpleNamespace(host=host, port=port))
            started = loop.time()
            try:
                await asyncio.wait_for(pipeline.closed.wait(), timeout=1 + 3)
                cut_after = loop.time() - started
                accepted, = runner.server.connections
                kernel = accepted.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            finally:
                client.close()
        finally:
            await runner.cleanup()
        assert kernel == 2 * send_buffer, f"the accepted connection's SO_SNDBUF is {kernel} bytes"
        # The kernel's buffer, the client's small receive buffer, aiohttp's 64 KiB and one event in hand.
        bound = (2 * send_buffer + 4 * CLIENT_RECEIVE_BUFFER + 64 * 1024) // EVENT_CONTENT_BYTES + 2
        assert not pipeline.finished.is_set() and pipeline.produced <= bound, (
            f"{pipeline.produced} events of {EVENT_CONTENT_BYTES} bytes produced for a stalled client (bound {bound})")
        assert cut_after < 1 + 3, f"cut {cut_after:.1f} s after the client stopped reading"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_send_buffer_bytes_is_a_bounded_setting(monkeypatch):
    assert RunnerSettings().send_buffer_bytes == 256 * 1024
    for wrong in ("1024", str(128 * 1024 * 1024)):
        monkeypatch.setenv("SEND_BUFFER_BYTES", wrong)
        with pytest.raises(pydantic.ValidationError, match="SEND_BUFFER_BYTES"):
            RunnerSettings()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_write_stall_timeout_is_a_setting_with_nginx_send_timeout_as_its_default(monkeypatch):
    assert RunnerSettings().write_stall_timeout == 60
    monkeypatch.setenv("WRITE_STALL_TIMEOUT", "2.5")
    assert RunnerSettings().write_stall_timeout == 2.5


async def frozen_client_is_let_go(server, pipeline: FloodPipeline) -> None:
    """A client that stops reading a runner with REQUEST_TIMEOUT=1: its stream stops, its place is freed."""
    grace = handlers.STALLED_CLIENT_GRACE
    client = await open_stalled_stream(server)
    try:
        await asyncio.wait_for(pipeline.closed.wait(), timeout=1 + grace / 2)
        assert not pipeline.finished.is_set(), "the stream was stopped at the timeout"
        await wait_until(lambda: server.app[STATE].in_flight == 0, within=1 + grace + 5)
    finally:
        client.close()


async def test_a_slow_reader_past_the_request_timeout_still_gets_the_error_event(aiohttp_server):
    """The deadline comes while the writer waits for the client: the generation
    stops then, and the client, once it catches up, reads the contract's ending."""
    server, pipeline = await flood_server(aiohttp_server, REQUEST_TIMEOUT=1)
    client = await open_stalled_stream(server)
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        trickle_until = loop.time() + 2
        while loop.time() < trickle_until:  # about 20 KiB/s: far behind the pipeline
            received += await asyncio.wait_for(loop.sock_recv(client, 1024), timeout=5)
            await asyncio.sleep(0.05)
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(client, 1 << 16), timeout=5)
            assert chunk, f"the runner closed the stream without its ending: ...{bytes(received[-200:])!r}"
            received += chunk
    finally:
        client.close()
    assert pipeline.closed.is_set() and not pipeline.finished.is_set()
    *events, done, after_done = sse_blocks(received)
    assert (done, after_done) == ("data: [DONE]", "")
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error" and last["choices"][0]["delta"]["content"] == ""
    assert await served_requests(server) == {("failed", "200"): 1}


def test_on_uvloop_a_reading_client_is_written_to_directly_and_a_frozen_one_is_let_go(monkeypatch):
    """The runner serves on uvloop, whose transports' low-water mark is 16 bytes
    (asyncio's is 16 KiB). A client that keeps up must get every event by the
    direct write (one chunk handed to the transport, nothing awaited), not the
    waiting path meant for clients that are behind (a task and a shield per
    token); a client that stops reading must still be let go."""
    lanes = {"direct": 0, "waiting": 0}
    to_socket, write_when_caught_up = PacedStreamWriter.to_socket, PacedStreamWriter.write_when_caught_up

    def direct(writer, chunk: bytes) -> None:
        lanes["direct"] += 1
        to_socket(writer, chunk)

    def waiting(writer, data: bytes):
        lanes["waiting"] += 1
        return write_when_caught_up(writer, data)

    monkeypatch.setattr(PacedStreamWriter, "to_socket", direct)
    monkeypatch.setattr(PacedStreamWriter, "write_when_caught_up", waiting)
    monkeypatch.setattr(handlers, "STALLED_CLIENT_GRACE", SHORT_GRACE)

    async def scenario() -> None:
        # 200 events of 300 bytes: all of it fits the client's receive buffer, so nothing waits in the runner's.
        pipeline = FloodPipeline(events=200, content_bytes=300)
        async with TestServer(create_app(RunnerSettings(), pipeline=pipeline), host="127.0.0.1") as server:
            await asyncio.sleep(0)  # the pipeline's (instant) load
            body = {"messages": [{"role": "user", "content": "flood"}], "stream": True}
            async with aiohttp.ClientSession() as session, session.post(server.make_url("/llm"), json=body) as response:
                events = [line async for line in response.content if line.startswith(b"data: ")]
        assert len(events) == 200 + 2  # every event, the final one and [DONE]
        assert lanes == {"direct": 200 + 1, "waiting": 0}, lanes  # the ending goes with the body's end

        pipeline = FloodPipeline()
        async with TestServer(create_app(RunnerSettings(REQUEST_TIMEOUT=1), pipeline=pipeline),
                              host="127.0.0.1") as server:
            await asyncio.sleep(0)
            await frozen_client_is_let_go(server, pipeline)
        assert lanes["waiting"], "the frozen client's writes took the waiting path"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_a_directly_written_stream_is_exact_chunked_sse_and_counted_as_aiohttp_counts_it():
    """The direct lane frames each event as an HTTP/1.1 chunk itself: the raw body must be exactly the chunks of
    the events, the ending and the body's end in one last write, and aiohttp's count of the body's bytes (its
    access log's size) must be what went out."""
    prepared = []

    async def scenario() -> None:
        pipeline = FloodPipeline(events=30, content_bytes=100)
        app = create_app(RunnerSettings(), pipeline=pipeline)

        async def keep(request, response) -> None:
            prepared.append(response)

        app.on_response_prepare.append(keep)
        async with TestServer(app, host="127.0.0.1") as server:
            await asyncio.sleep(0)
            reader, writer = await asyncio.open_connection(server.host, server.port)
            body = json.dumps({"messages": [{"role": "user", "content": "flood"}], "stream": True}).encode()
            writer.write(b"POST /llm HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            raw = await asyncio.wait_for(reader.read(-1), 20)
            writer.close()
        head, _, chunked = raw.partition(b"\r\n\r\n")
        *events, done, after = sse_blocks(raw)
        assert len(events) == 31 and (done, after) == ("data: [DONE]", "")
        expected = b"".join(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event.encode()) for event in events)
        assert chunked == expected + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        assert prepared[-1].body_length == len(raw)  # aiohttp counts the head too

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def sse_blocks(raw: bytes) -> list[str]:
    """The SSE body of a raw chunked HTTP response, split at its blank lines."""
    raw = bytes(raw)
    at = raw.index(b"\r\n\r\n") + 4
    head = raw[:at]
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, head
    body = bytearray()
    while True:
        line_end = raw.index(b"\r\n", at)
        size = int(raw[at:line_end], 16)
        at = line_end + 2
        if size == 0:
            break
        body += raw[at : at + size]
        assert raw[at + size : at + size + 2] == b"\r\n"
        at += size + 2
    return body.decode().split("\n\n")


async def wait_until(condition, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not true within {within} s"
        await asyncio.sleep(0.05)
