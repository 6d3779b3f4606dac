"""A grammar past GRAMMAR_COMPILE_TIMEOUT (5 s by default), on the tiny runner over real HTTP: refused with 400 in
the API's shape, its compile killed, the engine never handed it, and /ready fast all the while
(pipelines/llm/grammar.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import psutil

from tests.support.http import SUBMITTED, metric

# 8 to 16 s to compile with the tiny model's tokenizer on this 2-core CPU, as busy as it gets, inside every size
# bound of docs/limits.md.
EMAIL = "[a-z0-9]{1,50}@[a-z]{1,50}\\.[a-z]{2,8}"
SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": EMAIL}
                                                for i in range(1000)}}
SMALL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
HELLO = [{"role": "user", "content": "Hello"}]


async def poll_ready(http: aiohttp.ClientSession, url: str, slowest: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        async with http.get(f"{url}/ready") as response:
            await response.read()
        slowest.append(time.monotonic() - started)
        await asyncio.sleep(0.1)


def grammar_workers(runner) -> list[psutil.Process]:
    """The runner's spawned children that are not vLLM's (whose processes name themselves VLLM::...)."""
    return [child for child in psutil.Process(runner.process.pid).children()
            if "multiprocessing.spawn" in " ".join(child.cmdline()) and not child.name().startswith("VLLM")
            and "VLLM::" not in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE]


async def test_a_grammar_that_compiles_too_long_is_refused_in_each_apis_shape_and_ready_stays_fast(tiny_runner):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.get(f"{tiny_runner.url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        # A small schema first: it starts the grammar check's worker, and is served.
        async with http.post(f"{tiny_runner.url}/v1/chat/completions", json={
                "model": model, "messages": HELLO, "max_tokens": 8, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "small", "schema": SMALL_SCHEMA}}}) as response:
            assert response.status == 200, await response.text()
        workers = grammar_workers(tiny_runner)
        assert len(workers) == 1
        submitted = await metric(http, tiny_runner, SUBMITTED)

        polls: list[float] = []
        stop = asyncio.Event()
        poller = asyncio.ensure_future(poll_ready(http, tiny_runner.url, polls, stop))
        started = time.monotonic()
        async with http.post(f"{tiny_runner.url}/v1/chat/completions", json={
                "model": model, "messages": HELLO, "max_tokens": 8, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "slow", "schema": SLOW_SCHEMA}}}) as response:
            status, body = response.status, await response.json()
        took = time.monotonic() - started
        stop.set()
        await poller
        assert status == 400, body
        assert body["error"]["param"] == "response_format"
        assert "GRAMMAR_COMPILE_TIMEOUT" in body["error"]["message"]
        assert 5 <= took < 7, took  # refused at the limit, not after the whole compile
        assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE  # its compile killed
        assert len(polls) > 20 and max(polls) < 1.0, max(polls)

        # The same schema as an Anthropic tool the answer must call: refused, in Anthropic's shape.
        started = time.monotonic()
        async with http.post(f"{tiny_runner.url}/v1/messages", json={
                "model": model, "max_tokens": 8, "messages": HELLO,
                "tools": [{"name": "f", "input_schema": SLOW_SCHEMA}], "tool_choice": {"type": "tool", "name": "f"}}) as response:
            status, body = response.status, await response.json()
        assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert time.monotonic() - started < 7
        assert await metric(http, tiny_runner, SUBMITTED) == submitted  # neither reached the engine
