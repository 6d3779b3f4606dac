"""Talking to a runner over HTTP in tests: the requests sent (and the bad ones refused), the contract's SSE framing,
/metrics readings."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp

from tests.support.runner_process import RunnerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a long story."}]
# /llm bodies its schema refuses (422), each with the place the refusal names
BAD_422 = [
    ({"max_tokens": 2}, ["body", "messages"]),
    ({"messages": "hello"}, ["body", "messages"]),
    ({"messages": [{"content": "hi"}]}, ["body", "messages", 0, "role"]),
    ({"messages": [{"role": "user"}]}, ["body", "messages", 0, "content"]),
    ({"messages": QUESTION, "temperature": "hot"}, ["body", "temperature"]),
    ({"messages": QUESTION, "temperature": -1}, ["body", "temperature"]),
    ({"messages": QUESTION, "top_p": 0}, ["body", "top_p"]),
    ({"messages": QUESTION, "top_p": 1.5}, ["body", "top_p"]),
    ({"messages": QUESTION, "max_tokens": 0}, ["body", "max_tokens"]),
    ({"messages": QUESTION, "top_k": -2}, ["body", "top_k"]),
]
# chat completions fields refused (400) whatever the model, each with the param its error names
REFUSED_CHAT_FIELDS = [
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"messages": []}, "messages"),
]
# bodies that are no JSON document (422 at ["body"]): cut short, or not sent as JSON; each with its Content-Type
NOT_JSON_BODIES = ((b'{"messages": [', "application/json"), (json.dumps({"messages": QUESTION}), "text/plain"))
UNFINISHED = "livepeer_runner_engine_requests_unfinished"
WAITING = "livepeer_runner_engine_requests_waiting"
IN_FLIGHT = "livepeer_runner_requests_in_flight"
SUBMITTED = "livepeer_runner_engine_requests_total"


async def post(http: aiohttp.ClientSession, runner: RunnerProcess, body: dict) -> tuple[int, dict]:
    async with http.post(f"{runner.url}/llm", json=body) as response:
        return response.status, await response.json()


async def read_stream(response: aiohttp.ClientResponse) -> tuple[list[dict], list[str]]:
    """Events and the raw lines, checking each line is a contract SSE line."""
    lines = []
    async for raw in response.content:
        lines.append(raw.decode().rstrip("\n"))
    assert lines[-2:] == ["data: [DONE]", ""], lines[-3:]
    blocks = lines[:-2]
    assert blocks[1::2] == [""] * (len(blocks) // 2), "each event is one data line then a blank line"
    events = []
    for line in blocks[0::2]:
        assert line.startswith("data: "), line
        events.append(json.loads(line.removeprefix("data: ")))
    return events, lines


async def metric(http: aiohttp.ClientSession, runner: RunnerProcess, name: str) -> float:
    async with http.get(f"{runner.url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def wait_for_metric(http: aiohttp.ClientSession, runner: RunnerProcess, name: str, value: float,
                          within: float) -> float:
    """Seconds until the metric reads `value`; fails after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await metric(http, runner, name) == value:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} did not reach {value} within {within} s")


async def hold_stream(session: aiohttp.ClientSession, runner: RunnerProcess, max_tokens: int = 4000) -> None:
    """One long /llm stream, read to its end: it holds a place in the runner until cancelled."""
    body = {"messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with session.post(f"{runner.url}/llm", json=body) as response:
        await response.read()


async def raw_request(host: str, port: int, method: str, path: str, headers: dict[str, bytes], body: bytes = b"",
                      timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 request written byte for byte (header values as given, e.g. not ASCII, which an HTTP client
    library would encode): the status, the raw head and the body of the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n".encode()
        for name, value in headers.items():
            head += name.encode() + b": " + value + b"\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            answer = await reader.read()
    finally:
        writer.close()
    answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
    return int(answer_head.split(b" ", 2)[1]), answer_head, answer_body
