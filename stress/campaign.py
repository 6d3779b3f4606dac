"""`make stress`: a bounded campaign of hostile traffic against a real runner.

One runner process with the tiny test model (tests/tiny_model.py) on loopback
gets, in order:

1. mixed traffic: valid plain and streamed calls, malformed calls of every
   kind, and clients that vanish at every stage of a call, on /llm and on
   Anthropic's /v1/messages;
2. a burst of four times its admission bound (MAX_NUM_SEQS + MAX_WAITING_REQUESTS)
   at once, half of it on /v1/messages;
3. an engine kill while streams and plain calls run.

Every call must end in a known way: a whole 200, a status its kind may get
(in the spec's error shape for its API), or a stream that ends with a finish
reason or the contract's error event (Anthropic's: message_stop or its error event). A call is lost when it got no status, or when a 200
stream ended with neither. The campaign prints a table and exits non-zero if
any call was lost or answered in a way its kind may not be.

Traffic goes to 127.0.0.1 only, and every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from tests.support.runner_process import RunnerProcess
from tests.support.tiny_model import build_tiny_llama

MAX_NUM_SEQS = 8
MAX_WAITING_REQUESTS = 8
ADMISSION_BOUND = MAX_NUM_SEQS + MAX_WAITING_REQUESTS
REQUEST_TIMEOUT = 30
MAX_MODEL_LEN = 4096
AUTH_TOKEN = "stress-token"
AUTH = {"Authorization": f"Bearer {AUTH_TOKEN}"}
CALL_TIMEOUT = 90  # seconds a client waits for any one call before calling it lost
START_TIMEOUT = 420
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
STORY = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a long story."}]


@dataclass
class Call:
    """One request of the campaign and what became of it."""

    phase: str
    kind: str
    expected: frozenset[int]  # statuses this kind may get; empty for a client that leaves by design
    streamed: bool = False
    status: int | None = None
    ending: str | None = None  # streams: "finish", "error" or "truncated"
    problem: str = ""  # a shape that breaks the spec or the contract
    seconds: float = 0.0

    @property
    def cut_by_client(self) -> bool:
        return not self.expected

    @property
    def lost(self) -> bool:
        if self.cut_by_client:
            return False
        return self.status is None or (self.streamed and self.status == 200 and self.ending not in ("finish", "error"))

    @property
    def unexpected(self) -> bool:
        return not self.cut_by_client and not self.lost and (self.status not in self.expected or bool(self.problem))

    def answer(self) -> str:
        if self.cut_by_client:
            return "cut"
        if self.status is None:
            return "none"
        return f"{self.status}{' ' + self.ending if self.streamed and self.status == 200 else ''}"


@dataclass
class Campaign:
    runner: RunnerProcess
    rng: random.Random
    calls: list[Call] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.runner.url}/llm"

    def record(self, call: Call) -> Call:
        self.calls.append(call)
        return call


def check_error_shape(call: Call, status: int, body: bytes, path: str = "/llm") -> None:
    """4xx/5xx bodies: HTTPError {"detail": {"msg"}}, or HTTPValidationError for 422; Anthropic's under /v1/messages."""
    try:
        document = json.loads(body)
        if path.startswith("/v1/messages"):
            ok = document["type"] == "error" and set(document["error"]) == {"type", "message"}
            if not ok:
                call.problem = f"error body not in Anthropic's shape: {body[:200]!r}"
            return
        detail = document["detail"]
        if status == 422:
            ok = isinstance(detail, list) and all({"loc", "msg", "type"} <= set(error) for error in detail)
        else:
            ok = isinstance(detail, dict) and isinstance(detail.get("msg"), str)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        call.problem = f"error body not in the spec's shape: {body[:200]!r}"


def check_reply(call: Call, body: bytes) -> None:
    try:
        reply = json.loads(body)
        [choice] = reply["choices"]
        if choice["finish_reason"] not in ("stop", "length") or "content" not in choice["message"]:
            raise ValueError(choice)
    except (ValueError, KeyError, TypeError) as exc:
        call.problem = f"200 that is not a whole reply: {exc}"


def check_message(call: Call, body: bytes) -> None:
    try:
        message = json.loads(body)
        if message["type"] != "message" or message["stop_reason"] not in ("end_turn", "max_tokens") \
                or not message["content"]:
            raise ValueError(message)
    except (ValueError, KeyError, TypeError) as exc:
        call.problem = f"200 that is not a whole message: {exc}"


async def read_anthropic_events(call: Call, response: aiohttp.ClientResponse) -> None:
    """Follow an Anthropic stream to its end: message_stop, an error event, or neither."""
    call.ending = "truncated"
    name = None
    try:
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
                continue
            if not line.startswith("data: ") or name is None:
                call.problem = f"not an event line then a data line: {line[:80]!r}"
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("type") != name:
                call.problem = f"event {name!r} holds data of type {event.get('type')!r}"
            if name == "message_stop":
                call.ending = "finish"
            elif name == "error":
                call.ending = "error"
            name = None
    except (aiohttp.ClientError, ValueError) as exc:
        call.problem = call.problem or f"stream broke off: {type(exc).__name__}"


async def read_events(call: Call, response: aiohttp.ClientResponse) -> None:
    """Follow a stream to its end: finish reason, error event, or neither."""
    call.ending = "truncated"
    done = False
    try:
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            if not line.startswith("data: "):
                call.problem = f"a line that is not data: {line[:80]!r}"
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line.removeprefix("data: "))
            if len(event.get("choices", [])) != 1:
                call.problem = "an event without exactly one choice"
                continue
            reason = event["choices"][0].get("finish_reason", "")
            if reason in ("stop", "length"):
                call.ending = "finish"
            elif reason == "error":
                call.ending = "error"
    except (aiohttp.ClientError, ValueError) as exc:
        call.problem = call.problem or f"stream broke off: {type(exc).__name__}"
    if call.ending != "truncated" and not done:
        call.ending = "truncated"  # a finish without [DONE] is not the contract's end


async def http_call(
    campaign: Campaign,
    session: aiohttp.ClientSession,
    call: Call,
    *,
    method: str = "POST",
    path: str = "/llm",
    json_body: object = None,
    data: bytes | None = None,
    headers: dict | None = None,
) -> Call:
    campaign.record(call)
    started = time.monotonic()
    kwargs = {"json": json_body} if data is None else {"data": data}
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            async with session.request(
                method, f"{campaign.runner.url}{path}", headers={**AUTH, **(headers or {})}, **kwargs
            ) as response:
                call.status = response.status
                if response.status == 200 and response.content_type == "text/event-stream":
                    call.streamed = True
                    await (read_anthropic_events if path == MESSAGES else read_events)(call, response)
                else:
                    body = await response.read()
                    if response.status >= 400:
                        check_error_shape(call, response.status, body, path)
                        if response.status == 503 and "Retry-After" not in response.headers:
                            call.problem = "503 without Retry-After"
                    elif response.status == 200 and path == "/llm":
                        check_reply(call, body)
                    elif response.status == 200 and path == MESSAGES:
                        check_message(call, body)
    except (TimeoutError, aiohttp.ClientError) as exc:
        call.problem = call.problem or f"{type(exc).__name__}: {exc}"
    call.seconds = time.monotonic() - started
    return call


def valid_body(rng: random.Random, stream: bool) -> dict:
    return {
        "messages": rng.choice([HELLO, STORY]),
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.choice([0, 0.7, 1.3]),
        "top_p": rng.choice([1, 0.9]),
        "top_k": rng.choice([-1, 0, 40]),
        "stream": stream,
    }


def valid_message_body(rng: random.Random, stream: bool) -> dict:
    """Anthropic's Messages request: the chat's system message is its top-level system."""
    messages = rng.choice([HELLO, STORY])
    return {
        "model": "", "messages": [message for message in messages if message["role"] != "system"],
        **({"system": messages[0]["content"]} if messages[0]["role"] == "system" else {}),
        "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1]), "top_k": rng.choice([0, 40]),
        "stream": stream,
    }


MESSAGES = "/v1/messages"
Q = {"messages": HELLO, "max_tokens": 4}
ROLE_LESS = {"messages": [{"content": "hi"}]}
# (kind, expected statuses, call arguments): every way a call can be wrong, and a few
# odd ones that are right.
MALFORMED: list[tuple[str, set[int], dict]] = [
    ("not JSON", {422}, {"data": b'{"messages": [', "headers": {"Content-Type": "application/json"}}),
    ("JSON array", {422}, {"json_body": [Q]}),
    ("JSON null", {422}, {"data": b"null", "headers": {"Content-Type": "application/json"}}),
    ("empty body", {422}, {"data": b"", "headers": {"Content-Type": "application/json"}}),
    ("text/plain body", {422}, {"data": json.dumps(Q).encode(), "headers": {"Content-Type": "text/plain"}}),
    ("invalid UTF-8", {422}, {"data": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                              "headers": {"Content-Type": "application/json"}}),
    ("lone surrogate", {422}, {"data": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                               "headers": {"Content-Type": "application/json"}}),
    ("NaN literal", {422}, {"data": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                            "headers": {"Content-Type": "application/json"}}),
    ("Infinity literal", {400, 422}, {"data": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
                                      "headers": {"Content-Type": "application/json"}}),
    ("nested 10000 deep", {422}, {"data": b'{"messages": ' + b"[" * 10000 + b"]" * 10000 + b"}",
                                  "headers": {"Content-Type": "application/json"}}),
    ("no messages", {422}, {"json_body": {"max_tokens": 4}}),
    ("messages a string", {422}, {"json_body": {"messages": "hi"}}),
    ("message without role", {422}, {"json_body": ROLE_LESS}),
    ("message without content", {422}, {"json_body": {"messages": [{"role": "user"}]}}),
    ("content a number", {422}, {"json_body": {"messages": [{"role": "user", "content": 5}]}}),
    ("temperature a string", {422}, {"json_body": {**Q, "temperature": "hot"}}),
    ("temperature negative", {422}, {"json_body": {**Q, "temperature": -1}}),
    ("top_p zero", {422}, {"json_body": {**Q, "top_p": 0}}),
    ("top_p above 1", {422}, {"json_body": {**Q, "top_p": 1.5}}),
    ("max_tokens zero", {422}, {"json_body": {**Q, "max_tokens": 0}}),
    ("max_tokens 2.5", {422}, {"json_body": {**Q, "max_tokens": 2.5}}),
    ("max_tokens a string", {422}, {"json_body": {**Q, "max_tokens": "4"}}),
    ("top_k below -1", {422}, {"json_body": {**Q, "top_k": -2}}),
    ("stream a string", {422}, {"json_body": {**Q, "stream": "yes"}}),
    ("empty messages", {400}, {"json_body": {"messages": [], "max_tokens": 4}}),
    ("unknown role", {400}, {"json_body": {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}}),
    ("another model", {400}, {"json_body": {**Q, "model": "other/model"}}),
    ("too long for the model", {400}, {"json_body": {**Q, "max_tokens": MAX_MODEL_LEN}}),
    ("temperature above 2", {400}, {"json_body": {**Q, "temperature": 3}}),
    ("body over 1 MiB", {413}, {"json_body": {"messages": [{"role": "user", "content": "x" * 1_100_000}]}}),
    ("no bearer token", {401}, {"json_body": Q, "headers": {"Authorization": ""}}),
    ("wrong bearer token", {401}, {"json_body": Q, "headers": {"Authorization": "Bearer wrong"}}),
    ("GET /llm", {405}, {"method": "GET"}),
    ("POST /nope", {404}, {"path": "/nope", "json_body": Q}),
    ("top_k 1e29 (valid)", {200}, {"json_body": {**Q, "top_k": 10**29}}),
    ("max_tokens 3.0 (valid)", {200}, {"json_body": {**Q, "max_tokens": 3.0}}),
    ("duplicate keys (valid)", {200}, {"data": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, '
                                               b'"max_tokens": 2}', "headers": {"Content-Type": "application/json"}}),
    ("200 messages (valid)", {200}, {"json_body": {"messages": [HELLO[0]] * 200, "max_tokens": 2}}),
]
# The same for Anthropic's Messages API (the model is filled in with the served id): 400, not 422.
M = {"messages": HELLO, "max_tokens": 4}
JSON = {"Content-Type": "application/json"}
MESSAGES_MALFORMED: list[tuple[str, set[int], dict]] = [
    ("not JSON", {400}, {"data": b'{"model": ', "headers": JSON}),
    ("JSON array", {400}, {"json_body": [M]}),
    ("invalid UTF-8", {400}, {"data": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "headers": JSON}),
    ("no max_tokens", {400}, {"json_body": {"messages": HELLO}}),
    ("temperature above 1", {400}, {"json_body": {**M, "temperature": 1.5}}),
    ("unknown field", {400}, {"json_body": {**M, "thinking": {"type": "enabled", "budget_tokens": 2048}}}),
    ("image block", {400}, {"json_body": {**M, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/x.png"}}]}]}}),
    ("tool_choice without tools", {400}, {"json_body": {**M, "tool_choice": {"type": "any"}}}),
    ("too long for the model", {400}, {"json_body": {**M, "max_tokens": MAX_MODEL_LEN}}),
    ("another model", {404}, {"json_body": {**M, "model": "claude-sonnet-4-5"}}),
    ("body over 1 MiB", {413}, {"json_body": {**M, "messages": [{"role": "user", "content": "x" * 1_100_000}]}}),
    ("wrong x-api-key", {401}, {"json_body": M, "headers": {"Authorization": "", "x-api-key": "wrong"}}),
    ("GET /v1/messages", {405}, {"method": "GET"}),
    ("POST /v1/messages/batches", {404}, {"path": "/v1/messages/batches", "json_body": M}),
    ("x-api-key (valid)", {200}, {"json_body": M, "headers": {"Authorization": "", "x-api-key": AUTH_TOKEN}}),
    ("count_tokens (valid)", {200}, {"path": "/v1/messages/count_tokens", "json_body": {"messages": HELLO}}),
]


async def raw_cut(campaign: Campaign, call: Call, request: bytes, cut_after: int | None) -> Call:
    """Send raw bytes, read `cut_after` bytes of the answer (None: none at all), drop the connection."""
    campaign.record(call)
    started = time.monotonic()
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", campaign.runner.port)
            writer.write(request)
            await writer.drain()
            received = 0
            while cut_after is not None and received < cut_after:
                chunk = await reader.read(min(4096, cut_after - received))
                if not chunk:
                    break
                received += len(chunk)
            writer.transport.abort()
    except (OSError, TimeoutError) as exc:
        call.problem = f"{type(exc).__name__}: {exc}"
    call.seconds = time.monotonic() - started
    return call


def http_request(body: dict, content_length: int | None = None, headers_only: bool = False, path: str = "/llm") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {AUTH_TOKEN}\r\nContent-Length: {content_length or len(payload)}\r\n\r\n"
    ).encode()
    return head if headers_only else head + payload


async def vanishing_client(campaign: Campaign, session: aiohttp.ClientSession, phase: str) -> Call:
    rng = campaign.rng
    path = rng.choice(["/llm", MESSAGES])
    long_stream = {"messages": STORY, "max_tokens": 2000, "temperature": 0, "stream": True}
    if path == MESSAGES:
        long_stream = {**long_stream, "model": campaign.runner.env["MODEL_ID"], "messages": STORY[1:],
                       "system": STORY[0]["content"]}
    how = rng.choice(["before the answer", "inside the header", "mid-stream", "half a body", "plain, mid-generation"])
    call = Call(phase, f"vanishes {how}" + (" (messages)" if path == MESSAGES else ""), frozenset())
    if how == "before the answer":
        return await raw_cut(campaign, call, http_request(long_stream, path=path), None)
    if how == "inside the header":
        return await raw_cut(campaign, call, http_request(long_stream, path=path), rng.randint(1, 60))
    if how == "mid-stream":
        return await raw_cut(campaign, call, http_request(long_stream, path=path), rng.randint(200, 30_000))
    if how == "half a body":
        request = http_request(long_stream, path=path)
        return await raw_cut(campaign, call, request[: len(request) - 20], None)
    campaign.record(call)
    started = time.monotonic()
    body = {**long_stream, "stream": False}
    try:
        async with asyncio.timeout(rng.uniform(0.05, 1.5)):
            async with session.post(f"{campaign.runner.url}{path}", json=body, headers=AUTH) as response:
                await response.read()
                call.status = response.status  # finished before the client gave up: fine too
    except TimeoutError:
        pass
    call.seconds = time.monotonic() - started
    return call


async def mixed_phase(campaign: Campaign, count: int, concurrency: int, deadline: float) -> None:
    rng = campaign.rng
    gate = asyncio.Semaphore(concurrency)
    malformed = iter(MALFORMED * math.ceil(count / len(MALFORMED)))
    messages_malformed = iter(MESSAGES_MALFORMED * math.ceil(count / len(MESSAGES_MALFORMED)))
    model = campaign.runner.env["MODEL_ID"]

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        async with gate:
            if time.monotonic() > deadline:
                return
            roll = rng.random()
            if index % 3 == 2:  # a third of the calls: Anthropic's Messages API, the same mix
                await messages_call(session, roll)
            elif roll < 0.30:
                await http_call(campaign, session, Call("mixed", "valid plain", frozenset({200})),
                                json_body=valid_body(rng, stream=False))
            elif roll < 0.55:
                await http_call(campaign, session, Call("mixed", "valid stream", frozenset({200})),
                                json_body=valid_body(rng, stream=True))
            elif roll < 0.85:
                kind, expected, arguments = next(malformed)
                await http_call(campaign, session, Call("mixed", f"malformed: {kind}", frozenset(expected)),
                                **arguments)
            else:
                await vanishing_client(campaign, session, "mixed")

    async def messages_call(session: aiohttp.ClientSession, roll: float) -> None:
        if roll < 0.55:
            stream = roll >= 0.30
            body = {**valid_message_body(rng, stream), "model": model}
            kind = f"valid {'stream' if stream else 'plain'} (messages)"
            await http_call(campaign, session, Call("mixed", kind, frozenset({200})), path=MESSAGES, json_body=body)
        elif roll < 0.85:
            kind, expected, arguments = next(messages_malformed)
            arguments = {"path": MESSAGES, **arguments}
            if isinstance(arguments.get("json_body"), dict):
                arguments["json_body"] = {"model": model, **arguments["json_body"]}
            await http_call(campaign, session, Call("mixed", f"malformed (messages): {kind}", frozenset(expected)),
                            **arguments)
        else:
            await vanishing_client(campaign, session, "mixed")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
        await asyncio.gather(*(one(session, index) for index in range(count)))


async def burst_phase(campaign: Campaign, size: int) -> None:
    body = {"messages": STORY, "max_tokens": 64, "temperature": 0, "stream": True}
    message = {"model": campaign.runner.env["MODEL_ID"], "system": STORY[0]["content"], "messages": STORY[1:],
               "max_tokens": 64, "temperature": 0, "stream": True}
    start = asyncio.Event()

    async def one(session, index: int):
        await start.wait()
        if index % 2:
            await http_call(campaign, session, Call("burst", "burst stream (messages)", frozenset({200, 503})),
                            path=MESSAGES, json_body=message)
        else:
            await http_call(campaign, session, Call("burst", "burst stream", frozenset({200, 503})), json_body=body)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=size)) as session:
        tasks = [asyncio.create_task(one(session, index)) for index in range(size)]
        await asyncio.sleep(0.1)
        start.set()
        await asyncio.gather(*tasks)


async def metric(session: aiohttp.ClientSession, runner: RunnerProcess, name: str) -> float:
    async with session.get(f"{runner.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise LookupError(name)


async def seconds_until_idle(runner: RunnerProcess, within: float) -> float | None:
    """Seconds until the runner holds no request and the engine runs and queues none."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < within:
            in_flight = await metric(session, runner, "livepeer_runner_requests_in_flight")
            unfinished = await metric(session, runner, "livepeer_runner_engine_requests_unfinished")
            if in_flight == 0 and unfinished == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.02)
    return None


async def engine_kill_phase(campaign: Campaign, streams: int, plains: int) -> str:
    runner = campaign.runner
    body = {"messages": STORY, "max_tokens": 3000, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(http_call(campaign, session, Call("engine kill", "stream at the kill", frozenset({200})),
                                          json_body={**body, "stream": True}))
            for _ in range(streams)
        ] + [
            asyncio.create_task(http_call(campaign, session, Call("engine kill", "plain at the kill", frozenset({500})),
                                          json_body=body))
            for _ in range(plains)
        ]
        deadline = time.monotonic() + 60
        while await metric(session, runner, "livepeer_runner_engine_requests_unfinished") < streams + plains:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a few tokens in
        [engine] = [p for p in runner.engine_processes() if "EngineCore" in " ".join(p.cmdline()) + p.name()]
        killed_at = time.monotonic()
        engine.kill()
        await asyncio.gather(*tasks)
        ended_within = time.monotonic() - killed_at
        health = await asyncio.to_thread(runner.wait_until, {"ERROR"}, 10)
        after = await http_call(campaign, session, Call("engine kill", "call after the kill", frozenset({503})),
                                json_body=Q)
    return (
        f"engine kill: {streams} streams and {plains} plain calls running; all ended within {ended_within:.1f} s "
        f"of the kill; /health then said {health}, and a new call got {after.status}"
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def report(campaign: Campaign, rss_before: int, rss_after: int) -> bool:
    rows: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in campaign.calls:
        rows[call.phase, call.kind].append(call)
    header = f"{'phase':<12} {'kind':<38} {'sent':>5}  {'answers':<32} {'lost':>4} {'unexpected':>10}"
    print("\n" + header)
    print("-" * len(header))
    for (phase, kind), calls in rows.items():
        answers = Counter(call.answer() for call in calls)
        text = ", ".join(f"{answer}×{count}" for answer, count in sorted(answers.items()))
        lost = sum(call.lost for call in calls)
        unexpected = sum(call.unexpected for call in calls)
        print(f"{phase:<12} {kind:<38} {len(calls):>5}  {text:<32} {lost:>4} {unexpected:>10}")
    total_lost = sum(call.lost for call in campaign.calls)
    total_unexpected = sum(call.unexpected for call in campaign.calls)
    print("-" * len(header))
    print(f"{'all':<12} {'':<38} {len(campaign.calls):>5}  {'':<32} {total_lost:>4} {total_unexpected:>10}")

    outcomes = Counter()
    for call in campaign.calls:
        if call.cut_by_client:
            outcomes["client vanished (by design)"] += 1
        elif call.lost:
            outcomes["LOST"] += 1
        elif call.status == 200:
            outcomes[f"200 {'stream, ' + call.ending if call.streamed else 'plain'}"] += 1
        else:
            outcomes[f"{call.status}"] += 1
    print("\noutcomes: " + ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items())))
    rejections = {
        "503 at the admission bound (burst)": [
            call.seconds for call in campaign.calls if call.phase == "burst" and call.status == 503
        ],
        "4xx for bad input": [
            call.seconds for call in campaign.calls if call.status is not None and 400 <= call.status < 500
        ],
    }
    for label, seconds in rejections.items():
        if seconds:
            print(f"rejections, {label}: n={len(seconds)}, p50 {percentile(seconds, 0.5) * 1000:.1f} ms, "
                  f"p99 {percentile(seconds, 0.99) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms")
    print(f"API process memory (RSS): before {rss_before / 1024**2:.0f} MiB, after {rss_after / 1024**2:.0f} MiB "
          f"({(rss_after - rss_before) / 1024**2:+.0f} MiB)")
    for note in campaign.notes:
        print(note)
    for call in campaign.calls:
        if call.lost or call.unexpected:
            print(f"  ! {call.phase} / {call.kind}: {call.answer()} {call.problem}")
    return total_lost == 0 and total_unexpected == 0


async def run(args: argparse.Namespace, runner: RunnerProcess) -> bool:
    campaign = Campaign(runner, random.Random(args.seed))
    api = psutil.Process(runner.process.pid)
    rss_before = api.memory_info().rss
    deadline = time.monotonic() + args.max_seconds

    started = time.monotonic()
    await mixed_phase(campaign, args.calls, concurrency=ADMISSION_BOUND - 4, deadline=deadline)
    idle = await seconds_until_idle(runner, within=10)
    campaign.notes.append(
        f"mixed: {len([c for c in campaign.calls if c.phase == 'mixed'])} calls in {time.monotonic() - started:.0f} s; "
        + (f"runner and engine idle {idle:.2f} s after the last call" if idle is not None else "STILL BUSY 10 s after")
    )

    await burst_phase(campaign, 4 * ADMISSION_BOUND)
    burst = [call for call in campaign.calls if call.phase == "burst"]
    admitted = sum(call.status == 200 for call in burst)
    idle_after_burst = await seconds_until_idle(runner, within=30)
    campaign.notes.append(
        f"burst: {len(burst)} streams at once against a bound of {ADMISSION_BOUND}: {admitted} admitted"
        + ("" if admitted <= ADMISSION_BOUND else " (MORE THAN THE BOUND)")
    )
    rss_after = api.memory_info().rss

    campaign.notes.append(await engine_kill_phase(campaign, streams=8, plains=2))
    ok = report(campaign, rss_before, rss_after)
    return ok and idle is not None and idle_after_burst is not None and admitted <= ADMISSION_BOUND


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls in the mixed phase")
    parser.add_argument("--max-seconds", type=float, default=180, help="the mixed phase stops starting calls after this")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny-llama")
        env = {
            "MODEL_ID": str(model),
            "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            "KV_CACHE_GIB": "0.25",
            "AUTH_TOKEN": AUTH_TOKEN,
            "MAX_NUM_SEQS": str(MAX_NUM_SEQS),
            "MAX_WAITING_REQUESTS": str(MAX_WAITING_REQUESTS),
            "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        }
        runner = RunnerProcess("stress", env, tmp / "runner.log")
        print(f"starting a runner with the tiny test model on {runner.url} ...", flush=True)
        runner.start()
        try:
            status = runner.wait_until({"IDLE", "ERROR"}, timeout=START_TIMEOUT)
            if status != "IDLE":
                print(f"the runner failed to load:\n{runner.log_tail()}")
                return 1
            print(
                f"campaign: {args.calls} mixed calls, a burst of {4 * ADMISSION_BOUND}, one engine kill "
                f"(MAX_NUM_SEQS={MAX_NUM_SEQS}, MAX_WAITING_REQUESTS={MAX_WAITING_REQUESTS}, "
                f"REQUEST_TIMEOUT={REQUEST_TIMEOUT})",
                flush=True,
            )
            ok = asyncio.run(run(args, runner))
        finally:
            runner.stop()
    print("\nPASS: nothing lost, every answer as expected" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
