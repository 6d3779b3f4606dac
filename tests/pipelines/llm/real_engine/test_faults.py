"""Faults end to end: slow and vanishing clients, and an engine that dies under load.

Each request must end in a known way (a whole 200, an error in the spec's
shape, or the contract's in-band error event), the runner must keep serving,
and the engine must be left with nothing to do for clients that are gone.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import time

import aiohttp
import psutil
import pytest

from tests.support.http import (
    IN_FLIGHT,
    QUESTION,
    STORY,
    SUBMITTED,
    UNFINISHED,
    metric,
    post,
    read_stream,
    wait_for_metric,
)
from tests.support.runner_process import RunnerProcess

# Its last test kills the doomed runner's engine: it runs after the modules that use that runner alive.
pytestmark = pytest.mark.ends_runners("doomed")


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def long_stream(max_tokens: int) -> dict:
    return {"messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def small_window_socket(addr_info) -> socket.socket:
    """A client socket with a small receive buffer: the runner feels a stalled reader at once."""
    family, sock_type, proto, _, _ = addr_info
    sock = socket.socket(family, sock_type, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def event_gaps(http: aiohttp.ClientSession, runner: RunnerProcess, max_tokens: int) -> list[float]:
    """Seconds between the events of one stream that is read as fast as it comes."""
    async with http.post(f"{runner.url}/llm", json=long_stream(max_tokens)) as response:
        assert response.status == 200
        arrivals = []
        async for line in response.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    return [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]


async def test_a_stalled_reader_slows_no_other_stream_and_loses_nothing(http, tiny_runner):
    """Four clients stop reading their streams while the engine generates them;
    a fifth stream, read normally, keeps the pace it has beside four streams
    that are read. The runner's memory stays flat, and the stalled clients get
    every event once they read again."""
    stalled_count, stalled_tokens, normal_tokens = 4, 1000, 200
    api = psutil.Process(tiny_runner.process.pid)
    pace = await asyncio.to_thread(tiny_runner.pace)

    async def normal_beside(streams: list) -> list[float]:
        await wait_for_metric(http, tiny_runner, UNFINISHED, len(streams), within=10)
        return await event_gaps(http, tiny_runner, normal_tokens)

    # The same engine load, read: the pace to keep.
    async with aiohttp.ClientSession() as readers:
        reading = [
            asyncio.create_task(stream_events(readers, tiny_runner, long_stream(stalled_tokens)))
            for _ in range(stalled_count)
        ]
        paced_gaps = await normal_beside(reading)
        await asyncio.gather(*reading)
    await wait_for_metric(http, tiny_runner, IN_FLIGHT, 0, within=10)

    rss_before = api.memory_info().rss
    stalled_client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_window_socket), read_bufsize=1024
    )
    async with stalled_client:
        stalled = [
            await stalled_client.post(f"{tiny_runner.url}/llm", json=long_stream(stalled_tokens))
            for _ in range(stalled_count)
        ]
        gaps = await normal_beside(stalled)
        await wait_for_metric(http, tiny_runner, UNFINISHED, 0, within=60)  # their generations are done
        rss_growth = api.memory_info().rss - rss_before

        for response in stalled:
            assert response.status == 200
            events, _ = await asyncio.wait_for(read_stream(response), timeout=30)
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert events[-1]["usage"]["completion_tokens"] == stalled_tokens
            assert all(len(event["choices"]) == 1 for event in events)

    assert len(gaps) >= normal_tokens // 4, "a stream of events, not a few merged ones"
    # An engine or event loop paced by its slowest reader would freeze the normal
    # stream for seconds; the bounds leave room for a busy shared two-core machine.
    median, paced_median = statistics.median(gaps), statistics.median(paced_gaps)
    assert median <= 3 * paced_median + 0.02, f"median gap {median * 1000:.1f} ms, read beside readers {paced_median * 1000:.1f} ms"
    assert max(gaps) < max(2.0, 20 * pace), "no event of the normal stream waited on the stalled ones"
    # Four streams of a thousand events are under a megabyte; a leak or a pile-up would show.
    assert rss_growth < 64 * 1024**2, f"the runner grew by {rss_growth / 1024**2:.0f} MiB"


async def stream_events(http: aiohttp.ClientSession, runner: RunnerProcess, body: dict) -> list[dict]:
    async with http.post(f"{runner.url}/llm", json=body) as response:
        assert response.status == 200
        events, _ = await read_stream(response)
    return events


async def wait_for_idle_engine(http, runner: RunnerProcess, within: float) -> float:
    """Seconds until the runner holds no request and the engine none either."""
    started = time.monotonic()
    while True:
        if await metric(http, runner, IN_FLIGHT) == 0 and await metric(http, runner, UNFINISHED) == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"requests still held {within} s after their clients left"
        await asyncio.sleep(0.02)


async def cut_stream(runner: RunnerProcess, body: bytes, cut_after: int) -> int:
    """Send a streamed request over a raw connection, read `cut_after` bytes, and drop the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.port)
    writer.write(
        b"POST /llm HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    received = 0
    while received < cut_after:
        chunk = await reader.read(min(4096, cut_after - received))
        assert chunk, "the stream ended before the cut"
        received += len(chunk)
    writer.transport.abort()  # gone without a goodbye, as a closed tab or a dead proxy
    return received


async def test_streams_cut_at_random_points_leave_nothing_behind(http, tiny_runner):
    """100 clients drop their streams at random points: right after the request,
    inside the response header, inside an event or between events. Within a
    second of the last cut the engine runs and queues nothing, and the runner
    holds no request."""
    rng = random.Random(20251122)
    body = json.dumps(long_stream(4000)).encode()
    submitted = await metric(http, tiny_runner, SUBMITTED)
    cut_points = [0 if rng.random() < 0.1 else rng.randint(1, 24_000) for _ in range(100)]

    received = await asyncio.wait_for(
        asyncio.gather(*(cut_stream(tiny_runner, body, cut_after) for cut_after in cut_points)), timeout=120
    )
    bound = max(1.0, 10 * await asyncio.to_thread(tiny_runner.pace))
    seconds = await wait_for_idle_engine(http, tiny_runner, within=10 * bound)
    assert seconds < bound, f"requests were still held {seconds:.2f} s after the last cut"

    assert sum(1 for got in received if got > 1000) > 50, "most clients were cut inside the event stream"
    assert await metric(http, tiny_runner, SUBMITTED) - submitted >= 90, "the engine saw the requests"
    assert tiny_runner.health() == "IDLE"
    status, answer = await post(http, tiny_runner, {"messages": QUESTION, "max_tokens": 5})
    assert status == 200 and answer["usage"]["completion_tokens"] == 5


async def test_engine_death_under_load_ends_every_request_in_a_known_way(http, doomed_runner):
    """32 streams and 4 plain calls are running when the engine's process is
    killed: every stream ends with the contract's error event then [DONE],
    every plain call with a 500 in the spec's shape, within seconds; /health
    says ERROR and new calls get 503."""
    runner = doomed_runner
    url = f"{runner.url}/llm"
    plain_body = {"messages": STORY, "max_tokens": 4000, "temperature": 0}

    async def plain():
        async with http.post(url, json=plain_body) as response:
            return response.status, await response.json(), time.monotonic()

    async def streamed():
        async with http.post(url, json=long_stream(4000)) as response:
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data: {") and await response.content.readline() == b"\n"
            started.release()
            events, _ = await read_stream(response)
            return [json.loads(first.removeprefix(b"data: ")), *events], time.monotonic()

    started = asyncio.Semaphore(0)
    streams = [asyncio.create_task(streamed()) for _ in range(32)]
    plains = [asyncio.create_task(plain()) for _ in range(4)]
    for _ in streams:
        await asyncio.wait_for(started.acquire(), timeout=60)
    await wait_for_metric(http, runner, UNFINISHED, 36, within=30)

    [engine] = [p for p in runner.engine_processes() if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    killed_at = time.monotonic()
    engine.kill()

    for events, ended_at in await asyncio.wait_for(asyncio.gather(*streams), timeout=30):
        assert all(len(event["choices"]) == 1 for event in events)
        last = events[-1]["choices"][0]
        assert last["finish_reason"] == "error" and last["delta"]["content"] == ""
        assert not any(event["choices"][0]["finish_reason"] for event in events[:-1])
        assert ended_at - killed_at < 10
    for status, answer, ended_at in await asyncio.wait_for(asyncio.gather(*plains), timeout=30):
        assert status == 500 and answer["detail"]["msg"]
        assert ended_at - killed_at < 10

    assert runner.wait_until({"ERROR"}, timeout=5) == "ERROR"
    assert await metric(http, runner, IN_FLIGHT) == 0
    status, answer = await post(http, runner, {"messages": QUESTION, "max_tokens": 5})
    assert status == 503 and "engine" in answer["detail"]["msg"]
