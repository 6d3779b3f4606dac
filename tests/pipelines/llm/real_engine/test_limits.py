"""The runner's limits end to end, on the guarded runner (tests/conftest.py):
MAX_NUM_SEQS=2 running, MAX_WAITING_REQUESTS=2 waiting, REQUEST_TIMEOUT=4 s.

Beyond the running and waiting requests a call gets 503 with Retry-After at
once, instead of a queue that grows without end; a request that outlives
REQUEST_TIMEOUT is stopped in the engine and ends in a known way (a 500 that
names REQUEST_TIMEOUT, or the contract's in-band error event).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.support.http import (
    IN_FLIGHT,
    QUESTION,
    STORY,
    SUBMITTED,
    UNFINISHED,
    WAITING,
    hold_stream,
    metric,
    read_stream,
    wait_for_metric,
)
from tests.support.runners import (
    GUARDED_AUTH_TOKEN,
    GUARDED_MAX_IN_FLIGHT,
    GUARDED_MAX_WAITING_REQUESTS,
    GUARDED_REQUEST_TIMEOUT,
)

# 4000 tokens take the tiny model well over REQUEST_TIMEOUT on this machine's CPUs.
LONG = {"messages": STORY, "max_tokens": 4000, "temperature": 0}


@pytest.fixture
async def http():
    headers = {"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def test_a_call_beyond_running_and_waiting_requests_gets_503_at_once(http, idle_guarded_runner):
    async with aiohttp.ClientSession(headers=http.headers) as holders_session:
        holders = [asyncio.create_task(hold_stream(holders_session, idle_guarded_runner))
                   for _ in range(GUARDED_MAX_IN_FLIGHT)]
        await wait_for_metric(http, idle_guarded_runner, UNFINISHED, GUARDED_MAX_IN_FLIGHT,
                              within=GUARDED_REQUEST_TIMEOUT - 1)
        assert await metric(http, idle_guarded_runner, IN_FLIGHT) == GUARDED_MAX_IN_FLIGHT
        assert await metric(http, idle_guarded_runner, WAITING) == GUARDED_MAX_WAITING_REQUESTS
        submitted = await metric(http, idle_guarded_runner, SUBMITTED)

        started = time.monotonic()
        async with http.post(f"{idle_guarded_runner.url}/llm",
                             json={"messages": QUESTION, "max_tokens": 2}) as response:
            refused_after = time.monotonic() - started
            answer = await response.json()
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert set(answer) == {"detail"} and str(GUARDED_MAX_IN_FLIGHT) in answer["detail"]["msg"]
        # Queued, it would have waited for a slot, then for REQUEST_TIMEOUT.
        assert refused_after < GUARDED_REQUEST_TIMEOUT / 2
        assert await metric(http, idle_guarded_runner, SUBMITTED) == submitted, (
            "the refused call never reached the engine")
        assert not any(holder.done() for holder in holders), "the held requests go on"
        for holder in holders:
            holder.cancel()
    # Their clients gone, the held requests free the engine, and the next call is served.
    await wait_for_metric(http, idle_guarded_runner, UNFINISHED, 0, within=2)
    await wait_for_metric(http, idle_guarded_runner, IN_FLIGHT, 0, within=2)
    async with http.post(f"{idle_guarded_runner.url}/llm", json={"messages": QUESTION, "max_tokens": 2}) as response:
        assert response.status == 200



async def test_requests_past_request_timeout_end_in_known_ways_and_free_the_engine(http, idle_guarded_runner):
    """Two requests run and one waits behind them when REQUEST_TIMEOUT passes:
    the plain ones get a 500 naming REQUEST_TIMEOUT, the streamed one its
    error event then [DONE], and the engine drops all three."""
    url = f"{idle_guarded_runner.url}/llm"
    started = time.monotonic()

    async def plain():
        async with http.post(url, json=LONG) as response:
            return response.status, await response.json(), time.monotonic() - started

    async def streamed():
        async with http.post(url, json={**LONG, "stream": True}) as response:
            assert response.status == 200
            events, _ = await read_stream(response)
            return events, time.monotonic() - started

    running_plain = asyncio.create_task(plain())
    running_stream = asyncio.create_task(streamed())
    await wait_for_metric(http, idle_guarded_runner, UNFINISHED, 2, within=GUARDED_REQUEST_TIMEOUT / 2)
    waiting_plain = asyncio.create_task(plain())  # MAX_NUM_SEQS=2: this one waits for a slot

    bound = GUARDED_REQUEST_TIMEOUT + 10  # generous: two cores shared with other runners
    for status, answer, seconds in await asyncio.wait_for(asyncio.gather(running_plain, waiting_plain), bound):
        assert status == 500 and "REQUEST_TIMEOUT" in answer["detail"]["msg"]
        assert GUARDED_REQUEST_TIMEOUT - 0.5 <= seconds < bound
    events, seconds = await asyncio.wait_for(running_stream, bound)
    assert GUARDED_REQUEST_TIMEOUT - 0.5 <= seconds < bound
    assert all(len(event["choices"]) == 1 for event in events)
    last = events[-1]["choices"][0]
    assert last["finish_reason"] == "error" and last["delta"]["content"] == ""
    assert len(events) > 2, "it streamed before the deadline"

    await wait_for_metric(http, idle_guarded_runner, UNFINISHED, 0, within=2)
    await wait_for_metric(http, idle_guarded_runner, IN_FLIGHT, 0, within=2)
    async with http.post(url, json={"messages": QUESTION, "max_tokens": 2}) as response:
        assert response.status == 200, "the runner keeps serving"
