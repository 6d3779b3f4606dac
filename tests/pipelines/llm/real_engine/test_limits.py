"""The runner's limits end to end, on the guarded runner (tests/conftest.py):
MAX_NUM_SEQS=2 running, MAX_WAITING_REQUESTS=2 waiting, REQUEST_TIMEOUT=4 s.

Beyond the running and waiting engine sequences a call gets 503 with
Retry-After at once, instead of a queue that grows without end; a request
counts as the sequences it becomes (prompts x n). A request that outlives
REQUEST_TIMEOUT is stopped in the engine and ends in a known way (a 500 that
names REQUEST_TIMEOUT, or the contract's in-band error event). Past a bound of
docs/limits.md a request is a 400 in its API's shape, never a 500.
"""

from __future__ import annotations

import asyncio
import json
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
    raw_request,
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


ADMITTED = "livepeer_runner_admitted_sequences"
CAPACITY = "livepeer_runner_admission_capacity"


async def test_admission_counts_engine_sequences(http, idle_guarded_runner):
    """One request of 20,000 prompts with n 16 is refused at once (vLLM's own server answers it so); one of three
    prompts takes three of the four places, so a chat with n 2 gets 503 at once and /llm's one sequence is served."""
    runner, url = idle_guarded_runner, idle_guarded_runner.url
    model = runner.env["MODEL_ID"]
    assert await metric(http, runner, CAPACITY) == GUARDED_MAX_IN_FLIGHT
    submitted = await metric(http, runner, SUBMITTED)
    started = time.monotonic()
    async with http.post(f"{url}/v1/completions", json={"model": model, "prompt": ["Hello"] * 20_000, "n": 16,
                                                        "temperature": 1, "max_tokens": 4}) as response:
        answer = await response.json()
    assert response.status == 400 and answer["error"]["param"] == "prompt", answer
    assert "MAX_PROMPTS_PER_REQUEST" in answer["error"]["message"]
    assert time.monotonic() - started < 2
    async with http.post(f"{url}/v1/completions", json={"model": model, "prompt": ["Hello"] * 5,
                                                        "max_tokens": 4}) as response:
        answer = await response.json()
    assert response.status == 400 and answer["error"]["param"] == "prompt", "5 sequences never fit in 4"
    assert await metric(http, runner, SUBMITTED) == submitted, "the refused calls never reached the engine"

    holder_body = {"model": model, "prompt": ["Once upon a time", "In a land far away", "The end"],
                   "max_tokens": 4000, "temperature": 0, "stream": True}
    async with http.post(f"{url}/v1/completions", json=holder_body) as holder:
        assert holder.status == 200
        await holder.content.readline()
        assert await metric(http, runner, ADMITTED) == 3
        assert await metric(http, runner, IN_FLIGHT) == 1
        started = time.monotonic()
        async with http.post(f"{url}/v1/chat/completions", json={"model": model, "messages": QUESTION, "n": 2,
                                                                 "temperature": 1, "max_tokens": 2}) as response:
            answer = await response.json()
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1, answer
        assert time.monotonic() - started < GUARDED_REQUEST_TIMEOUT / 2
        assert "engine sequences" in answer["error"]["message"]
        async with http.post(f"{url}/llm", json={"messages": QUESTION, "max_tokens": 2}) as response:
            assert response.status == 200, "the fourth place is one sequence"
    await wait_for_metric(http, runner, ADMITTED, 0, within=GUARDED_REQUEST_TIMEOUT + 2)
    await wait_for_metric(http, runner, UNFINISHED, 0, within=GUARDED_REQUEST_TIMEOUT + 2)


DEEP = "[" * 5000


async def test_client_mistakes_are_4xx_in_each_apis_shape_never_500(http, idle_guarded_runner):
    runner, url = idle_guarded_runner, idle_guarded_runner.url
    model = runner.env["MODEL_ID"]
    submitted = await metric(http, runner, SUBMITTED)
    openai_cases = [
        ("/v1/chat/completions", {"messages": QUESTION, "logit_bias": {"--1": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "Hello", "logit_bias": {"--1": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]}, "messages.[1].tool_calls"),
        ("/v1/chat/completions", {"messages": QUESTION, "structured_outputs": {"json": DEEP}},
         "structured_outputs.json"),
        # 100 words are about 200 token sequences with their space-led forms: past vLLM's VLLM_MAX_NUM_BAD_WORDS
        # (128), which its engine checks only once it takes the request.
        ("/v1/chat/completions", {"messages": QUESTION, "bad_words": [f"word{index}" for index in range(100)]},
         "bad_words"),
        ("/v1/responses", {"input": "Hello", "metadata": {"k": "v" * 513}}, "metadata.k"),
        ("/v1/chat/completions", {"messages": QUESTION, "seed": 2**64, "temperature": 1}, "seed"),
    ]
    for path, body, param in openai_cases:
        async with http.post(f"{url}{path}", json={"model": model, "max_tokens": 2, **body}) as response:
            answer = await response.json()
        assert response.status == 400 and answer["error"]["param"] == param, (path, answer)
        assert "Traceback" not in json.dumps(answer) and "invalid literal" not in json.dumps(answer)
    # Anthropic's stop_sequences: 40,000 of them were served (12.5 s of /ready held); now at most 4.
    started = time.monotonic()
    async with http.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 200, "messages": QUESTION,
                                                     "stop_sequences": [f"s{i}" for i in range(40_000)]}) as response:
        answer = await response.json()
    assert response.status == 400 and answer["type"] == "error", answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"].startswith("stop_sequences")
    assert time.monotonic() - started < 2
    assert await metric(http, runner, SUBMITTED) == submitted, "no refused call reached the engine"
    # Header bytes that are not ASCII: 401 in each API's shape, not a text/plain 500.
    body = json.dumps({"model": model, "max_tokens": 2, "messages": QUESTION}).encode()
    host, port = url.removeprefix("http://").split(":")
    for path, header, value in (("/llm", "Authorization", b"Bearer \xff"), ("/v1/messages", "x-api-key", b"\xff"),
                                ("/v1/chat/completions", "Authorization", b"Bearer \xff")):
        status, head, answer = await raw_request(host, int(port), "POST", path,
                                                 {header: value, "Content-Type": b"application/json"}, body)
        assert status == 401 and b"application/json" in head, (path, answer)
        document = json.loads(answer)
        assert {"/llm": "detail", "/v1/messages": "type", "/v1/chat/completions": "error"}[path] in document
    # A request id that is not printable ASCII is replaced.
    status, head, _ = await raw_request(host, int(port), "POST", "/llm",
                                        {"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}".encode(),
                                         "X-Request-ID": b"caf\xc3\xa9", "Content-Type": b"application/json"},
                                        json.dumps({"messages": QUESTION, "max_tokens": 2}).encode())
    assert status == 200 and b"X-Request-ID: caf" not in head
