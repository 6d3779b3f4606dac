"""The hostile campaign: what a hostile or careless caller sends, on every API, from outside.

``python -m stress.hostile`` (run by ``make stress``) starts one runner with
the tiny test model, a bearer token and run-time LoRA adapter changes, and
sends it, on loopback only and bounded in count and time:

- odd bytes: Authorization, x-api-key and X-Request-ID headers that are not
  ASCII, bodies that are not UTF-8, JSON nested 5,000 deep (as the body, in
  tool-call arguments, in structured outputs and schemas);
- bounds: over-long lists and strings (stop strings, tools, enums,
  logit_bias, bad_words, metadata, messages, content parts, names, request ids);
- adapter abuse: lora_path /etc, ``../``, /proc, a folder outside LORA_ROOT, a
  Hub download past LORA_MAX_BYTES, many adapter names, the unload of an
  adapter loaded at start;
- floods: many valid calls on every API at once, four 900 KB /tokenize calls,
  a batch past the admission bound, and one /v1/completions call of 20,000
  prompts with n 16;
- stalled readers: streams whose reader stops reading (see ``stall_probes``).

Each call is refused (4xx in its API's own error shape, or 503 with
Retry-After), served (2xx) or failed (any other 5xx, a broken connection, no
answer in time, an error body in the wrong shape, Python exception text in a
body). Each kind of call also says what it expects (refused, served, either);
a failed call, or one refused where it should be served or served where it
should be refused, fails the campaign. /ready is polled all along (from a thread
of its own); the slowest answer must be within 1 s. The runner's RSS (its
process tree) is measured before and after; it may grow by MAX_RSS_GROWTH_MIB.
A stalled stream must give its slot back within WRITE_STALL_TIMEOUT plus
STALL_SLACK; adapter names must be bounded, and a refused download must leave
nothing past LORA_MAX_BYTES in the store; the log must hold no traceback. The
campaign prints a table and exits non-zero on any of these.

``--against vllm-serve`` runs the same calls against ``vllm serve``
(bench/vllm_serve.py) with the default model and the runner's engine arguments
for the same settings; ``--against both`` runs a runner with the default model,
then ``vllm serve``, and prints side by side what each made of every kind of
call ("absent" where a server has no such endpoint). ``--save`` and
``--compare`` do the same across two runs (each fits the machine's engine lock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOST = "127.0.0.1"
AUTH_TOKEN = "hostile-token"
MAX_NUM_SEQS = 4
MAX_WAITING_REQUESTS = 4
REQUEST_TIMEOUT = 60  # the runner's; longer than the stall window, so that only WRITE_STALL_TIMEOUT frees a stall
WRITE_STALL_TIMEOUT = 3  # the runner's
SEND_BUFFER_BYTES = 256 * 1024  # the runner's (its default): the kernel send buffer a stalled reader fills
# Seconds past WRITE_STALL_TIMEOUT a stalled stream may hold its slot: a write waits only once the connection's
# kernel send buffer is full. Autotuned up to net.ipv4.tcp_wmem's 4 MiB, three streams of the tiny model with their
# logprobs had not filled it 43 s after their readers stopped (2 busy cores). With SEND_BUFFER_BYTES (512 KiB in
# the kernel) it takes the chat streams about 280 tokens and the completion stream (n 2, 560 bytes a token) about
# 1,030: filled in 2.9 and 5.5 s in one run, 6.0 and 10.8 s in the next (load average 4 on 2 cores), each cut 3 s
# later. About three times the slower: tokens come slower still while the rest of the campaign's load drains.
STALL_SLACK = 30
LORA_MAX_BYTES = 16 * 1024 * 1024  # the runner's
HUGE_ADAPTER_BYTES = 48 * 1024 * 1024  # what the "huge" Hub adapter weighs: three times the cap
RESPONSES_STORE_BYTES = 8 * 1024 * 1024  # the runner's
ADAPTER_NAMES = 100  # distinct names loaded one after the other: more than any adapter bound should allow
CALL_TIMEOUT = 30.0  # seconds a call may take before it counts as a hang
READY_LIMIT = 1.0  # seconds: the slowest /ready answer allowed (go-livepeer's Live Runner allows 3)
READY_INTERVAL = 0.2
MAX_RSS_GROWTH_MIB = 256  # the runner's process tree may grow by this much over the campaign
START_TIMEOUT = 420
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
DEEP = 5000  # nesting depth of the deep JSON
# A JSON schema inside the size bounds whose grammar takes long to compile: optional properties with a pattern
# each. 1,000 of them: 8 to 16 s with the tiny model's 768-token vocabulary on 2 cores, past GRAMMAR_COMPILE_TIMEOUT
# (5 s); with the default model's 49k tokens 300 simpler ones ([a-z]{1,50}) already took 55 to 82 s.
EMAIL = "[a-z0-9]{1,50}@[a-z]{1,50}\\.[a-z]{2,8}"
SLOW_SCHEMA = {"type": "object", "properties": {f"p{index}": {"type": "string", "pattern": EMAIL}
                                                for index in range(1000)}}

REFUSED, SERVED, FAILED, ABSENT = "refused", "served", "failed", "absent"
REFUSE, SERVE, EITHER = "refuse", "serve", "either"  # what a kind of call expects

# Python's exception text in a body: a traceback, a frame line, a builtin exception's name, int()'s message.
EXCEPTION_TEXT = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|invalid literal for int\(\)"
    r"|object has no attribute|\b(?:Value|Type|Key|Index|Attribute|Recursion|Unicode(?:Decode|Encode)?|Runtime"
    r"|Assertion|Overflow|ZeroDivision|JSONDecode|Name|OS|FileNotFound|Permission|NotADirectory|IsADirectory"
    r"|Lookup|Memory)Error\b"
)


# ---------------------------------------------------------------- the classifier


@dataclass
class Answer:
    """What one call got: a status, headers and body, or the reason it got none."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""
    error: str | None = None  # no answer: a broken connection, no answer in time
    seconds: float = 0.0


def error_shape(path: str) -> str:
    """The error shape of the API a path belongs to: Livepeer's /llm, Anthropic's /v1/messages, else OpenAI's."""
    if path.split("?")[0] == "/llm":
        return "livepeer"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


def in_shape(shape: str, status: int, body: bytes) -> bool:
    try:
        document = json.loads(body)
        if shape == "anthropic":
            return (document["type"] == "error" and isinstance(document["error"]["type"], str)
                    and isinstance(document["error"]["message"], str))
        if shape == "openai":
            return isinstance(document["error"]["message"], str) and isinstance(document["error"]["type"], str)
        detail = document["detail"]
        if status == 422:
            return isinstance(detail, list) and all({"loc", "msg", "type"} <= set(error) for error in detail)
        return isinstance(detail["msg"], str)
    except (ValueError, KeyError, TypeError):
        return False


def classify(path: str, answer: Answer) -> tuple[str, str]:
    """Refused, served or failed, and why it failed."""
    if answer.error is not None:
        return FAILED, answer.error
    status = answer.status
    text = answer.body.decode("utf-8", "replace")
    if leak := EXCEPTION_TEXT.search(text):
        return FAILED, f"{status} with Python exception text ({leak.group(0)!r})"
    if 200 <= status < 300:
        return SERVED, ""
    shape = error_shape(path)
    json_body = answer.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    if status >= 400 and not (json_body and in_shape(shape, status, answer.body)):
        return FAILED, f"{status} not in {shape}'s error shape: {answer.body[:80]!r}"
    if status == 503 and "retry-after" in answer.headers:
        return REFUSED, ""
    if 400 <= status < 500:
        return REFUSED, ""
    return FAILED, f"{status}" + (" without Retry-After" if status == 503 else "")


# ---------------------------------------------------------------- HTTP, byte for byte


def http_request(method: str, path: str, port: int, body: bytes | None, headers: list[tuple[bytes, bytes]]) -> bytes:
    """One HTTP/1.1 request as bytes: any header bytes at all, one request per connection."""
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {HOST}:{port}".encode(), b"Connection: close"]
    names = {name.lower() for name, _ in headers}
    if body is not None:
        if b"content-type" not in names:
            lines.append(b"Content-Type: application/json")
        lines.append(b"Content-Length: %d" % len(body))
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, headers, bytes(body)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


async def exchange(port: int, request: bytes, timeout: float = CALL_TIMEOUT) -> Answer:
    answer = Answer()
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port, limit=8 * 1024 * 1024)
            try:
                writer.write(request)
                await writer.drain()
                answer.status, answer.headers, answer.body = await read_answer(reader)
            finally:
                writer.close()
    except TimeoutError:
        answer.error = f"no answer within {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
        answer.error = f"connection broke: {type(exc).__name__}"
    answer.seconds = time.monotonic() - started
    return answer


# ---------------------------------------------------------------- the servers under test


@dataclass
class Target:
    """A server under test: where it listens, its token, what it serves, how busy it is."""

    name: str
    port: int
    pid: int
    model: str = ""  # the served model id, from /v1/models
    paths: set[str] | None = None  # the paths it serves; None: all
    ready_path: str = "/ready"
    busy_series: tuple[str, ...] = ("livepeer_runner_requests_in_flight",)
    store: Path | None = None  # where a Hub download lands
    adapters: dict[str, Path] = field(default_factory=dict)  # "inside", "outside" (LORA_ROOT), "start"

    def serves(self, path: str) -> bool:
        if self.paths is None:
            return True
        bare = path.split("?")[0]
        return any(re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", known), bare) for known in self.paths)

    def rss(self) -> int:
        """The server's process tree's resident memory (the engine's processes included)."""
        total = 0
        try:
            root = psutil.Process(self.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
        except psutil.Error:
            pass
        return total

    async def busy(self) -> float | None:
        """Requests the server holds now (its own series of them), or None when it cannot say."""
        auth = [(b"Authorization", f"Bearer {AUTH_TOKEN}".encode())]  # /metrics is open on both; harmless
        answer = await exchange(self.port, http_request("GET", "/metrics", self.port, None, auth), 10)
        if answer.status != 200:
            return None
        total, found = 0.0, False
        for line in answer.body.decode("utf-8", "replace").splitlines():
            for series in self.busy_series:
                if line.startswith(series + " ") or line.startswith(series + "{"):
                    total += float(line.rsplit(" ", 1)[1])
                    found = True
        return total if found else None

    async def settle(self, within: float = 30) -> float | None:
        """Seconds until the server holds no request, or None if it still does after ``within``."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if (await self.busy() or 0) == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None


# ---------------------------------------------------------------- what is sent


@dataclass(frozen=True)
class Probe:
    """One kind of call: its request, how many copies go at once, and what it expects."""

    family: str
    kind: str
    method: str
    path: str
    body: bytes | None
    expect: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    auth: bool = True  # send the target's bearer token (False: the headers carry the credential under test)
    copies: int = 1
    check: Callable[[Answer], str | None] | None = None  # a further check of an answer: why it fails, or None
    timeout: float = CALL_TIMEOUT


def dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_schema(depth: int) -> bytes:
    """A JSON schema ``depth`` objects deep, as bytes (json.dumps would recurse that deep)."""
    return b'{"type":"object","properties":{"a":' * depth + b'{"type":"string"}' + b"}}" * depth


def splice(body: dict, key_path: list[str], raw: bytes) -> bytes:
    """The body as JSON with the raw JSON ``raw`` at ``key_path`` (for values too deep for json.dumps)."""
    marker = "\u2603SPLICE\u2603"
    document = json.loads(json.dumps(body))
    holder = document
    for key in key_path[:-1]:
        holder = holder[key]
    holder[key_path[-1]] = marker
    return dumps(document).replace(json.dumps(marker).encode(), raw)


def request_id_is_safe(answer: Answer) -> str | None:
    echoed = answer.headers.get("x-request-id")
    if echoed is None:
        return None
    if len(echoed) > 128 or not all(32 < ord(char) < 127 for char in echoed):
        return f"X-Request-ID echoed as {len(echoed)} characters, not all printable ASCII: {echoed[:40]!r}"
    return None


def reveals(secrets: list[str]) -> Callable[[Answer], str | None]:
    """An answer must name none of ``secrets`` (a folder's entries, the token)."""

    def check(answer: Answer) -> str | None:
        text = answer.body.decode("utf-8", "replace")
        found = [secret for secret in secrets if secret in text]
        return f"the answer reveals {found[:3]}" if found else None

    return check


def valid_bodies(model: str) -> dict[tuple[str, str], bytes | None]:
    """A small valid call on every API: (method, path) -> body."""
    return {
        ("POST", "/llm"): dumps({"messages": HELLO, "max_tokens": 4}),
        ("POST", "/v1/chat/completions"): dumps({"model": model, "messages": HELLO, "max_tokens": 4}),
        ("POST", "/v1/completions"): dumps({"model": model, "prompt": "Hello", "max_tokens": 4}),
        ("POST", "/v1/responses"): dumps({"model": model, "input": "Hello", "max_output_tokens": 4}),
        ("POST", "/v1/messages"): dumps({"model": model, "messages": HELLO, "max_tokens": 4}),
        ("POST", "/v1/messages/count_tokens"): dumps({"model": model, "messages": HELLO}),
        ("POST", "/tokenize"): dumps({"model": model, "prompt": "Hello"}),
        ("POST", "/detokenize"): dumps({"model": model, "tokens": [1, 2, 3]}),
        ("GET", "/v1/models"): None,
    }


def not_utf8(body: bytes) -> bytes:
    """The body with bytes that are not UTF-8 inside one of its strings."""
    if b"Hello" in body:
        return body.replace(b"Hello", b"\xff\xfeHello\xc3", 1)
    return body.replace(b'"model":"', b'"model":"\xff\xfe', 1)


def odd_bytes_probes(target: Target) -> list[Probe]:
    model = target.model
    valid = valid_bodies(model)
    probes = []
    for (method, path), body in valid.items():
        probes.append(Probe("odd bytes", "Authorization: Bearer \\xff", method, path, body, REFUSE,
                            headers=((b"Authorization", b"Bearer \xff"),), auth=False))
        probes.append(Probe("odd bytes", "Authorization: Bearer <UTF-8>", method, path, body, REFUSE,
                            headers=((b"Authorization", "Bearer t\u00f6k\u00e9n".encode()),), auth=False))
        if method == "POST":
            probes.append(Probe("odd bytes", "body not UTF-8", method, path, not_utf8(body), REFUSE))
            probes.append(Probe("odd bytes", f"body nested {DEEP} deep", method, path,
                                b'{"model":' + nested(DEEP).encode() + b"}", REFUSE))
    probes.append(Probe("odd bytes", "x-api-key: \\xff", "POST", "/v1/messages", valid["POST", "/v1/messages"],
                        REFUSE, headers=((b"x-api-key", b"\xff"),), auth=False))
    for path in ("/llm", "/v1/chat/completions", "/v1/messages"):
        body = valid["POST", path]
        probes.append(Probe("odd bytes", "X-Request-ID not ASCII", "POST", path, body, SERVE,
                            headers=((b"X-Request-ID", b"\xff\xfe-\xc3\xa9t\xc3\xa9"),), check=request_id_is_safe))
        probes.append(Probe("odd bytes", "X-Request-ID 4,000 characters", "POST", path, body, SERVE,
                            headers=((b"X-Request-ID", b"r" * 4000),), check=request_id_is_safe))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": nested(DEEP)}}]}
    chat = {"model": model, "max_tokens": 4}
    probes += [
        Probe("odd bytes", f"tool-call arguments {DEEP} '['", "POST", "/v1/chat/completions",
              dumps({**chat, "tools": tools, "messages": [HELLO[0], call,
                                                          {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
              REFUSE),
        Probe("odd bytes", f"structured_outputs.json {DEEP} '['", "POST", "/v1/chat/completions",
              dumps({**chat, "messages": HELLO, "structured_outputs": {"json": nested(DEEP)}}), REFUSE),
        Probe("odd bytes", f"structured_outputs.json schema {DEEP} deep", "POST", "/v1/completions",
              splice({"model": model, "prompt": "Hello", "max_tokens": 4, "structured_outputs": {"json": 0}},
                     ["structured_outputs", "json"], nested_schema(DEEP)), REFUSE),
        Probe("odd bytes", f"response_format schema {DEEP} deep", "POST", "/v1/chat/completions",
              splice({**chat, "messages": HELLO,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 0}}},
                     ["response_format", "json_schema", "schema"], nested_schema(DEEP)), REFUSE),
        Probe("odd bytes", f"function_call arguments {DEEP} '['", "POST", "/v1/responses",
              dumps({"model": model, "max_output_tokens": 4, "input": [
                  {"role": "user", "content": "hi"},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": nested(DEEP)},
                  {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
                  "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}), REFUSE),
        Probe("odd bytes", f"tool input schema {DEEP} deep", "POST", "/v1/messages",
              splice({"model": model, "max_tokens": 4, "messages": HELLO, "tools": [{"name": "f", "input_schema": 0}]},
                     ["tools", 0, "input_schema"], nested_schema(DEEP)), REFUSE),
    ]
    return probes


def bounds_probes(target: Target) -> list[Probe]:
    model = target.model
    chat = {"model": model, "messages": HELLO, "max_tokens": 4}
    completion = {"model": model, "prompt": "Hello", "max_tokens": 4}
    responses = {"model": model, "input": "Hello", "max_output_tokens": 4}
    messages = {"model": model, "messages": HELLO, "max_tokens": 4}
    many_tools = [{"type": "function", "function": {"name": f"f{index}", "parameters": {"type": "object"}}}
                  for index in range(5000)]
    enum_tool = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "enum": [f"v{i}" for i in range(50_000)]}}}}}]
    chat_path, completions, responses_path, messages_path = (
        "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
    cases = [
        (chat_path, "stop: 5 strings", {**chat, "stop": ["a", "b", "c", "d", "e"]}),
        (chat_path, "stop: one of 50,000 characters", {**chat, "stop": "s" * 50_000}),
        (chat_path, "tools: 5,000", {**chat, "tools": many_tools}),
        (chat_path, "tool enum: 50,000 values", {**chat, "tools": enum_tool}),
        (chat_path, "tool name: 100,000 characters", {**chat, "tools": [
            {"type": "function", "function": {"name": "f" * 100_000, "parameters": {"type": "object"}}}]}),
        (chat_path, "logit_bias: 50,000 keys", {**chat, "logit_bias": {str(index): 1 for index in range(50_000)}}),
        (chat_path, "logit_bias key '--1'", {**chat, "logit_bias": {"--1": 1}}),
        (chat_path, "logit_bias key past the vocabulary", {**chat, "logit_bias": {"99999999": 1}}),
        (chat_path, "bad_words: 10,000", {**chat, "bad_words": [f"w{index}" for index in range(10_000)]}),
        (chat_path, "allowed_token_ids: 50,000", {**chat, "allowed_token_ids": list(range(50_000))}),
        (chat_path, "messages: 20,000", {**chat, "messages": [{"role": "user", "content": "a"}] * 20_000}),
        (chat_path, "content parts: 20,000", {**chat, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}] * 20_000}]}),
        (chat_path, "message name: 100,000 characters", {**chat, "messages": [
            {"role": "user", "content": "hi", "name": "n" * 100_000}]}),
        (chat_path, "model: 100,000 characters", {**chat, "model": "m" * 100_000}),
        (completions, "prompts: 2,000 (n 1)", {**completion, "prompt": ["x"] * 2000}),
        (completions, "stop: 5 strings", {**completion, "stop": ["a", "b", "c", "d", "e"]}),
        (completions, "logit_bias key '--1'", {**completion, "logit_bias": {"--1": 1}}),
        (completions, "bad_words: 10,000", {**completion, "bad_words": [f"w{index}" for index in range(10_000)]}),
        (responses_path, "metadata: 17 keys", {**responses, "metadata": {f"k{index}": "v" for index in range(17)}}),
        (responses_path, "metadata key: 65 characters", {**responses, "metadata": {"k" * 65: "v"}}),
        (responses_path, "metadata value: 200,000 characters", {**responses, "metadata": {"k": "v" * 200_000}}),
        (responses_path, "input items: 20,000", {**responses, "input": [{"role": "user", "content": "a"}] * 20_000}),
        (responses_path, "tools: 5,000", {**responses, "tools": [
            {"type": "function", "name": f"f{index}", "parameters": {"type": "object"}} for index in range(5000)]}),
        (messages_path, "stop_sequences: 40,000", {**messages, "stop_sequences": [f"s{i}" for i in range(40_000)]}),
        (messages_path, "tools: 5,000", {**messages, "tools": [
            {"name": f"f{index}", "input_schema": {"type": "object"}} for index in range(5000)]}),
        (messages_path, "messages: 20,000", {**messages, "messages": [{"role": "user", "content": "a"}] * 20_000}),
        (messages_path, "content blocks: 20,000", {**messages, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}] * 20_000}]}),
        ("/llm", "messages: 20,000", {"messages": [{"role": "user", "content": "a"}] * 20_000, "max_tokens": 4}),
        ("/tokenize", "messages: 20,000", {"model": model, "messages": [{"role": "user", "content": "a"}] * 20_000}),
        ("/v1/load_lora_adapter", "lora_name: 100,000 characters",
         {"lora_name": "n" * 100_000, "lora_path": str(target.adapters.get("inside", "x"))}),
    ]
    probes = [Probe("bounds", kind, "POST", path, dumps(body), REFUSE) for path, kind, body in cases]
    # Inside every size bound, yet its compile takes longer than GRAMMAR_COMPILE_TIMEOUT: stopped there. The first
    # constrained call also waits for the grammar check's worker to start.
    probes += [
        Probe("bounds", "response_format schema: 1,000 patterned properties (slow compile)", "POST", chat_path,
              dumps({**chat, "response_format": {"type": "json_schema", "json_schema": {
                  "name": "slow", "schema": SLOW_SCHEMA}}}), REFUSE, timeout=90),
        Probe("bounds", "forced tool schema: 1,000 patterned properties (slow compile)", "POST", messages_path,
              dumps({**messages, "tools": [{"name": "f", "input_schema": SLOW_SCHEMA}],
                     "tool_choice": {"type": "tool", "name": "f"}}), REFUSE, timeout=90),
        Probe("bounds", "response_format schema: 1 property", "POST", chat_path,
              dumps({**chat, "response_format": {"type": "json_schema", "json_schema": {
                  "name": "small", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}),
              SERVE, timeout=90),
    ]
    probes.append(Probe("bounds", "model id: 4,000 characters", "GET", "/v1/models/" + "m" * 4000, None, REFUSE))
    # At the bounds, not past them: served.
    at_bound = {"model": model, "input": "Hello", "max_output_tokens": 2,
                "metadata": {f"k{index:02d}" + "k" * 60: "v" * 512 for index in range(16)}}
    probes += [Probe("bounds", "metadata at OpenAI's bounds (16 x 64 x 512)", "POST", responses_path,
                     dumps(at_bound), SERVE) for _ in range(24)]
    return probes


def adapter_probes(target: Target, secrets: list[str]) -> list[Probe]:
    load = "/v1/load_lora_adapter"
    leak = reveals(secrets)

    def loading(kind: str, path: str | Path, expect: str, name: str = "abuse", **kwargs) -> Probe:
        return Probe("adapters", kind, "POST", load, dumps({"lora_name": name, "lora_path": str(path)}), expect,
                     check=leak, **kwargs)

    return [
        loading("lora_path /etc", "/etc", REFUSE),
        loading("lora_path ../../../../etc", "../../../../../../etc", REFUSE),
        loading("lora_path /proc/self/environ", "/proc/self/environ", REFUSE),
        loading("lora_path /proc/self/cwd", "/proc/self/cwd", REFUSE),
        loading("lora_path outside LORA_ROOT", target.adapters["outside"], REFUSE),
        loading("Hub download past LORA_MAX_BYTES", "stress/huge-adapter", REFUSE, name="huge", timeout=60),
        Probe("adapters", "8 missing Hub ids at once", "POST", load,
              dumps({"lora_name": "missing", "lora_path": "stress/no-such-adapter"}), REFUSE, copies=8, check=leak),
        Probe("adapters", "unload an adapter loaded at start", "POST", "/v1/unload_lora_adapter",
              dumps({"lora_name": "start"}), REFUSE),
    ]


def flood_probes(target: Target) -> list[Probe]:
    model = target.model
    probes = [Probe("floods", "12 valid calls at once", method, path, body, EITHER, copies=12)
              for (method, path), body in valid_bodies(model).items()]
    probes += [
        Probe("floods", "900 KB /tokenize, 4 at once", "POST", "/tokenize",
              dumps({"model": model, "prompt": "Hello there. " * 70_000}), EITHER, copies=4),
        Probe("floods", "100,000 token ids /detokenize, 2 at once", "POST", "/detokenize",
              dumps({"model": model, "tokens": [1 + index % 200 for index in range(100_000)]}), EITHER, copies=2),
    ]
    return probes


def admission_probes(target: Target) -> list[Probe]:
    """Sent to an idle server: one request of more sequences than it admits, and one of fewer."""
    return [
        Probe("floods", "64 prompts x n 16 to an idle server", "POST", "/v1/completions",
              dumps({"model": target.model, "prompt": ["Hello"] * 64, "n": 16, "max_tokens": 4}), REFUSE),
        Probe("floods", "2 prompts x n 2 to an idle server", "POST", "/v1/completions",
              dumps({"model": target.model, "prompt": ["Hello"] * 2, "n": 2, "max_tokens": 4}), SERVE),
    ]


def big_flood_probe(target: Target) -> Probe:
    return Probe("floods", "20,000 prompts x n 16", "POST", "/v1/completions",
                 dumps({"model": target.model, "prompt": ["x"] * 20_000, "n": 16, "max_tokens": 4}), REFUSE)


# ---------------------------------------------------------------- running it


@dataclass
class Call:
    probe: Probe
    outcome: str
    reason: str
    answer: Answer | None = None

    @property
    def unexpected(self) -> bool:
        if self.outcome in (FAILED, ABSENT):
            return False
        return (self.probe.expect == REFUSE and self.outcome != REFUSED) or (
            self.probe.expect == SERVE and self.outcome != SERVED)


class ReadyWatch:
    """Polls the ready path from a thread of its own (the campaign's loop may be busy) and keeps every latency."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.polls: list[tuple[float, int | None, str]] = []  # seconds, status, the campaign's phase then
        self.phase = "start"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="ready-watch", daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            status = None
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=5)
                connection.request("GET", self.path)
                response = connection.getresponse()
                response.read()
                status = response.status
                connection.close()
            except OSError:
                pass
            self.polls.append((time.monotonic() - started, status, self.phase))
            self.stopped.wait(READY_INTERVAL)

    def __enter__(self) -> ReadyWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    @property
    def slowest(self) -> float:
        return max((seconds for seconds, *_ in self.polls), default=0.0)

    def by_phase(self) -> str:
        slowest: dict[str, float] = {}
        for seconds, _, phase in self.polls:
            slowest[phase] = max(slowest.get(phase, 0.0), seconds)
        return ", ".join(f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in slowest.items())


@dataclass
class Campaign:
    target: Target
    calls: list[Call] = field(default_factory=list)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # name -> (passed, what was seen)
    rss_before: int = 0
    rss_after: int = 0
    ready: ReadyWatch | None = None
    phases: list[tuple[str, float, int]] = field(default_factory=list)  # name, seconds, RSS after it
    timings: str = ""

    @contextlib.contextmanager
    def phase(self, name: str, log: Callable[[str], None]):
        log(f"  {name}")
        if self.ready is not None:
            self.ready.phase = name
        started = time.monotonic()
        yield
        self.phases.append((name, time.monotonic() - started, self.target.rss()))

    async def send(self, probe: Probe) -> list[Call]:
        target = self.target
        if not target.serves(probe.path):
            calls = [Call(probe, ABSENT, "no such endpoint") for _ in range(probe.copies)]
            self.calls.extend(calls)
            return calls
        headers = list(probe.headers)
        if probe.auth:
            headers.append((b"Authorization", f"Bearer {AUTH_TOKEN}".encode()))
        request = http_request(probe.method, probe.path, target.port, probe.body, headers)
        answers = await asyncio.gather(*(exchange(target.port, request, probe.timeout) for _ in range(probe.copies)))
        calls = []
        for answer in answers:
            outcome, reason = classify(probe.path, answer)
            if outcome != FAILED and probe.check is not None and (problem := probe.check(answer)):
                outcome, reason = FAILED, problem
            calls.append(Call(probe, outcome, reason, answer))
        self.calls.extend(calls)
        return calls

    async def send_all(self, probes: list[Probe], concurrency: int) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(probe: Probe) -> None:
            async with gate:
                await self.send(probe)

        await asyncio.gather(*(one(probe) for probe in probes))

    def check(self, name: str, passed: bool, seen: str) -> None:
        self.checks[name] = (passed, seen)


async def adapter_phase(campaign: Campaign, secrets: list[str]) -> None:
    target = campaign.target
    await campaign.send_all(adapter_probes(target, secrets), concurrency=4)
    load = "/v1/load_lora_adapter"
    if not target.serves(load):
        campaign.check("adapters: names bounded", True, "absent")
        return
    inside = target.adapters["inside"]
    served = 0
    for index in range(ADAPTER_NAMES):
        body = dumps({"lora_name": f"name-{index}", "lora_path": str(inside)})
        [call] = await campaign.send(Probe("adapters", f"{ADAPTER_NAMES} adapter names, one by one", "POST", load,
                                           body, EITHER))
        served += call.outcome == SERVED
    campaign.check("adapters: names bounded", served < ADAPTER_NAMES,
                   f"{served} of {ADAPTER_NAMES} distinct names loaded")
    for index in range(ADAPTER_NAMES):  # the served ones go again, so that later phases see the base alone
        request = http_request("POST", "/v1/unload_lora_adapter", target.port, dumps({"lora_name": f"name-{index}"}),
                               [(b"Authorization", f"Bearer {AUTH_TOKEN}".encode())])
        await exchange(target.port, request)
    if target.store is not None:
        kept = sum(path.stat().st_size for path in target.store.rglob("*")
                   if path.is_file() and "huge-adapter" in str(path))
        campaign.check("adapters: no download past LORA_MAX_BYTES kept", kept <= LORA_MAX_BYTES,
                       f"{kept / 2**20:.1f} MiB of the huge adapter kept in the store")


async def stalled_reader(port: int, request: bytes) -> tuple[socket.socket | None, bytes]:
    """Send a streaming call, read the first bytes of its answer, and read no more."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), 10)
        await loop.sock_sendall(sock, request)
        head = await asyncio.wait_for(loop.sock_recv(sock, 2048), CALL_TIMEOUT)
        return sock, head
    except (OSError, TimeoutError):
        sock.close()
        return None, b""


def stall_probes(target: Target) -> list[Probe]:
    """Streams that write much per token: a stalled reader's buffers fill within seconds.

    Loopback's socket buffers take a few MB before a write blocks: the events of
    /llm, /v1/responses and /v1/messages (a few hundred bytes a token) cannot
    fill them within the model's context. Chat with 20 top logprobs a token and
    completions with two choices and their logprobs can; every API's stream goes
    through the same writer (runner/handlers.py, send_event_stream).
    """
    model, tokens = target.model, 3000
    chat = Probe("stalled readers", "stream, reader stops", "POST", "/v1/chat/completions",
                 dumps({"model": model, "messages": HELLO, "max_tokens": tokens, "stream": True, "ignore_eos": True,
                        "logprobs": True, "top_logprobs": 20}), EITHER)
    completion = Probe("stalled readers", "stream, reader stops", "POST", "/v1/completions",
                       dumps({"model": model, "prompt": "Hello", "max_tokens": tokens, "stream": True,
                              "ignore_eos": True, "logprobs": 5, "n": 2}), EITHER)
    return [chat, chat, completion]


STREAM_ENDINGS = (b"[DONE]", b'"finish_reason":"error"', b"event: error", b"response.failed")


async def read_on(sock: socket.socket | None) -> tuple[bytes, bool]:
    """What a stalled stream holds a second later, and whether it has ended (closed, or an ending written)."""
    data, closed = b"", False
    if sock is not None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1):
                while len(data) < 16 * 2**20:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        closed = True
                        break
                    data += chunk
    return data, closed or any(ending in data[-400:] for ending in STREAM_ENDINGS)


async def stall_phase(campaign: Campaign) -> None:
    """Streams whose readers stop: within the window the server must free their slots and end them.

    Both are checked from outside: the server's own count of what it holds
    (/metrics), and each stream, read on once that count is 0 (or the window is
    over): a stream still sending tokens then was not cut (vllm serve's running
    count reads 0 while its streams go on).
    """
    target = campaign.target
    await target.settle()
    probes = [probe for probe in stall_probes(target) if target.serves(probe.path)]
    auth = [(b"Authorization", f"Bearer {AUTH_TOKEN}".encode())]
    readers = await asyncio.gather(*(
        stalled_reader(target.port, http_request(probe.method, probe.path, target.port, probe.body, auth))
        for probe in probes))
    started = time.monotonic()
    window = WRITE_STALL_TIMEOUT + STALL_SLACK
    freed_after, trace = None, []
    while time.monotonic() - started < window:
        busy = await target.busy()
        trace.append(busy)
        if busy == 0:
            freed_after = time.monotonic() - started
            break
        await asyncio.sleep(0.25)
    seen = f"held at each poll: {trace[:3]}...{trace[-3:]}" if len(trace) > 6 else f"held at each poll: {trace}"
    endings = await asyncio.gather(*(read_on(sock) for sock, _ in readers))
    for probe, (sock, head), (tail, ended) in zip(probes, readers, endings):
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        answer = Answer(status, body=head, seconds=time.monotonic() - started)
        if status is None:
            call = Call(probe, FAILED, "no answer to a stream", answer)
        elif status != 200:
            call = Call(probe, REFUSED if status in (400, 503) else FAILED, f"{status}", answer)
        elif freed_after is None:
            call = Call(probe, FAILED, f"slot still held {window:g} s after the reader stopped", answer)
        elif not ended:
            call = Call(probe, FAILED, f"stream still going {answer.seconds:.0f} s after the reader stopped, though "
                                       "the server counts it done", answer)
        else:
            call = Call(probe, SERVED, f"slot free {freed_after:.1f} s after the reader stopped, stream ended", answer)
        campaign.calls.append(call)
        if sock is not None:
            sock.close()
    ok = freed_after is not None and all(ended for _, ended in endings)
    tails = " | ".join(f"{'ended' if ended else 'going'}: {tail[-80:]!r}" for tail, ended in endings)
    campaign.check("stalled readers: slots freed, streams ended", ok,
                   (f"busy count 0 after {freed_after:.1f} s" if freed_after is not None
                    else f"still busy after {window:g} s") + f" ({seen}); each stream read on: {tails}")


PHASES = ("odd bytes", "bounds", "adapters", "floods", "admission", "stalled readers", "20,000 prompts x n 16")


async def run_campaign(target: Target, secrets: list[str], log: Callable[[str], None] = print,
                       only: frozenset[str] | None = None) -> Campaign:
    """The campaign's phases in turn (``only``: just these of PHASES), /ready polled all along, then its checks."""
    campaign = Campaign(target)

    def wanted(name: str) -> bool:
        return only is None or name in only

    answer = await exchange(target.port, http_request(
        "GET", "/v1/models", target.port, None, [(b"Authorization", f"Bearer {AUTH_TOKEN}".encode())]))
    target.model = json.loads(answer.body)["data"][0]["id"]
    # Bodies are built before the clock starts: the campaign's own JSON work is not the server's latency.
    phases = [
        ("odd bytes", odd_bytes_probes(target), 8),
        ("bounds", bounds_probes(target), 4),
    ]
    floods = flood_probes(target)
    big = big_flood_probe(target)
    # One constrained call first, uncounted: it starts what a server starts once for every constrained request to
    # come (the runner's grammar check worker, about 300 MiB with xgrammar and torch), so RSS growth is what the
    # campaign leaves behind, not that fixed cost.
    await exchange(target.port, http_request("POST", "/v1/chat/completions", target.port, dumps(
        {"model": target.model, "messages": HELLO, "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "warm", "schema": {"type": "object"}}}}),
        [(b"Authorization", f"Bearer {AUTH_TOKEN}".encode())]), timeout=120)
    await target.settle()
    campaign.rss_before = target.rss()
    with ReadyWatch(target.port, target.ready_path) as ready:
        campaign.ready = ready
        for name, probes, concurrency in phases:
            if wanted(name):
                with campaign.phase(name, log):
                    await campaign.send_all(probes, concurrency)
        if wanted("adapters"):
            with campaign.phase("adapters", log):
                await adapter_phase(campaign, secrets)
        if wanted("floods"):
            with campaign.phase("floods", log):
                await target.settle()
                await campaign.send_all(floods, concurrency=len(floods))
        if wanted("admission"):
            with campaign.phase("admission", log):
                for probe in admission_probes(target):
                    await target.settle()
                    await campaign.send(probe)
        if wanted("stalled readers"):
            with campaign.phase("stalled readers", log):
                await stall_phase(campaign)
        if wanted("20,000 prompts x n 16"):
            with campaign.phase("20,000 prompts x n 16", log):
                await campaign.send(big)
        settled = await target.settle(within=CALL_TIMEOUT)
        campaign.check("idle after the campaign", settled is not None,
                       f"idle {settled:.1f} s after the last call" if settled is not None
                       else f"still busy {CALL_TIMEOUT:g} s after the last call")
    campaign.rss_after = target.rss()
    slow = sum(seconds > READY_LIMIT for seconds, *_ in ready.polls)
    campaign.check(f"readiness within {READY_LIMIT:g} s", ready.slowest <= READY_LIMIT,
                   f"{target.ready_path}: slowest {ready.slowest * 1000:.0f} ms of {len(ready.polls)} polls, {slow} over {READY_LIMIT:g} s "
                   f"(slowest per phase: {ready.by_phase()})")
    growth = (campaign.rss_after - campaign.rss_before) / 2**20
    campaign.check(f"RSS growth within {MAX_RSS_GROWTH_MIB} MiB", growth <= MAX_RSS_GROWTH_MIB,
                   f"{campaign.rss_before / 2**20:.0f} MiB before, {campaign.rss_after / 2**20:.0f} MiB after "
                   f"({growth:+.0f} MiB; after each phase: "
                   + ", ".join(f"{name} {rss / 2**20:.0f} MiB" for name, _, rss in campaign.phases) + ")")
    campaign.timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds, _ in campaign.phases)
    return campaign


# ---------------------------------------------------------------- reports


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def rows(campaign: Campaign) -> dict[tuple[str, str, str], list[Call]]:
    grouped: dict[tuple[str, str, str], list[Call]] = defaultdict(list)
    for call in campaign.calls:
        grouped[call.probe.family, call.probe.path.split("?")[0][:40], call.probe.kind].append(call)
    return grouped


def passed(campaign: Campaign) -> bool:
    return (not any(call.outcome == FAILED or call.unexpected for call in campaign.calls)
            and all(ok for ok, _ in campaign.checks.values()))


def report(campaign: Campaign) -> str:
    lines = []
    header = (f"{'family':<15} {'api':<26} {'kind':<46} {'calls':>5} {'refused':>7} {'served':>6} {'failed':>6} "
              f"{'unexp.':>6} {'p99 refusal':>11}")
    lines += [header, "-" * len(header)]
    for (family, path, kind), calls in rows(campaign).items():
        count = {outcome: sum(call.outcome == outcome for call in calls) for outcome in (REFUSED, SERVED, FAILED)}
        refusals = [call.answer.seconds for call in calls if call.outcome == REFUSED and call.answer]
        p99 = f"{percentile(refusals, 0.99) * 1000:.0f} ms" if refusals else "-"
        if all(call.outcome == ABSENT for call in calls):
            p99 = "absent"
        lines.append(f"{family:<15} {path:<26} {kind[:46]:<46} {len(calls):>5} {count[REFUSED]:>7} "
                     f"{count[SERVED]:>6} {count[FAILED]:>6} {sum(call.unexpected for call in calls):>6} {p99:>11}")
    lines.append("-" * len(header))
    calls = campaign.calls
    refusals = [call.answer.seconds for call in calls if call.outcome == REFUSED and call.answer]
    lines.append(f"{'all':<15} {'':<26} {'':<46} {len(calls):>5} {sum(c.outcome == REFUSED for c in calls):>7} "
                 f"{sum(c.outcome == SERVED for c in calls):>6} {sum(c.outcome == FAILED for c in calls):>6} "
                 f"{sum(c.unexpected for c in calls):>6} "
                 f"{(f'{percentile(refusals, 0.99) * 1000:.0f} ms' if refusals else '-'):>11}")
    lost = sum(call.outcome == FAILED and call.answer is not None and call.answer.status is None for call in calls)
    errors = sum(call.answer is not None and call.answer.status is not None and call.answer.status >= 500
                 and call.outcome == FAILED for call in calls)
    lines.append(f"lost (no answer, or a broken connection): {lost}; 5xx other than 503 with Retry-After: {errors}")
    lines.append("")
    for name, (ok, seen) in campaign.checks.items():
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name}: {seen}")
    seen_problems = set()
    for call in calls:
        if call.outcome == FAILED or call.unexpected:
            problem = call.reason if call.outcome == FAILED else f"{call.outcome}, expected to {call.probe.expect}"
            if call.answer and call.outcome != FAILED:
                problem += f" ({call.answer.status}: {call.answer.body[:100]!r})"
            key = (call.probe.path, call.probe.kind, problem)
            if key not in seen_problems:
                seen_problems.add(key)
                lines.append(f"  ! {call.probe.path} / {call.probe.kind}: {problem}")
    return "\n".join(lines)


def cell(calls: list[Call]) -> str:
    outcomes = defaultdict(int)
    for call in calls:
        outcomes[call.outcome] += 1
    if len(outcomes) == 1:
        [outcome] = outcomes
        text = outcome
    else:
        text = ", ".join(f"{outcome} {count}" for outcome, count in sorted(outcomes.items()))
    reasons = sorted({call.reason.split(":")[0][:28] for call in calls if call.outcome == FAILED})
    if reasons:
        text += f" ({'; '.join(reasons)})"
    if any(call.unexpected for call in calls):
        text += " !"
    return text


def side_by_side(left: Campaign, right: Campaign) -> str:
    left_rows, right_rows = rows(left), rows(right)
    width = 44
    header = (f"{'family':<15} {'api':<26} {'kind':<44} {left.target.name:<{width}} {right.target.name:<{width}}")
    lines = [header, "-" * len(header)]
    for key in list(left_rows) + [key for key in right_rows if key not in left_rows]:
        family, path, kind = key
        lines.append(f"{family:<15} {path:<26} {kind[:44]:<44} {cell(left_rows.get(key, []))[:width]:<{width}} "
                     f"{cell(right_rows.get(key, []))[:width]:<{width}}")
    lines.append("")
    for name in list(left.checks) + [name for name in right.checks if name not in left.checks]:
        left_seen = left.checks.get(name, (True, "-"))
        right_seen = right.checks.get(name, (True, "-"))
        lines.append(f"{name}:\n    {left.target.name}: {'ok' if left_seen[0] else 'FAIL'} {left_seen[1]}\n"
                     f"    {right.target.name}: {'ok' if right_seen[0] else 'FAIL'} {right_seen[1]}")
    for campaign in (left, right):
        calls = campaign.calls
        lines.append(f"{campaign.target.name}: {len(calls)} calls, refused {sum(c.outcome == REFUSED for c in calls)}, "
                     f"served {sum(c.outcome == SERVED for c in calls)}, failed {sum(c.outcome == FAILED for c in calls)}, "
                     f"absent {sum(c.outcome == ABSENT for c in calls)}, unexpected {sum(c.unexpected for c in calls)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- setting up


class Setup:
    """What a campaign needs around the server: adapters, a Hub stand-in, the secrets it must not reveal."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        from tests.support.hub_standin import HubRepo, HubStandin
        from tests.support.lora_adapters import make_adapter

        self.root = root
        self.lora_root = root / "adapters"
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.adapters = {
            "inside": make_adapter(self.lora_root / "inside", model_dir),
            "start": make_adapter(self.lora_root / "start", model_dir, seed=2),
            "outside": make_adapter(root / "outside" / "adapter", model_dir, seed=3),
        }
        config = (self.adapters["inside"] / "adapter_config.json").read_bytes()
        huge = HubRepo.from_contents("stress/huge-adapter", {
            "adapter_config.json": config, "adapter_model.safetensors": b"\0" * HUGE_ADAPTER_BYTES})
        self.hub = HubStandin([huge]).start()

    def secrets(self) -> list[str]:
        """Words an answer must never hold: /etc's entries (the longer names) and the token."""
        entries = [name for name in os.listdir("/etc") if len(name) >= 6 and name.isascii()]
        return sorted(entries)[:200] + [AUTH_TOKEN]

    def runner_env(self) -> dict[str, str]:
        """The runner's settings for the campaign (its bounds named as issue 32 names them)."""
        return {
            "AUTH_TOKEN": AUTH_TOKEN,
            "MAX_NUM_SEQS": str(MAX_NUM_SEQS),
            "MAX_WAITING_REQUESTS": str(MAX_WAITING_REQUESTS),
            "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
            "WRITE_STALL_TIMEOUT": str(WRITE_STALL_TIMEOUT),
            "SEND_BUFFER_BYTES": str(SEND_BUFFER_BYTES),
            "LORA_RUNTIME_UPDATES": "true",
            "LORA_ADAPTERS": f"start={self.adapters['start']}",
            "LORA_ROOT": str(self.lora_root),
            "LORA_MAX_BYTES": str(LORA_MAX_BYTES),
            "RESPONSES_STORE_BYTES": str(RESPONSES_STORE_BYTES),
            "MODEL_DIR": str(self.store),
            "HF_ENDPOINT": self.hub.url,
            "HF_HUB_DISABLE_XET": "1",
        }

    def close(self) -> None:
        self.hub.stop()


def count_tracebacks(campaign: Campaign, log_path: Path) -> None:
    tracebacks = log_path.read_text(errors="replace").count("Traceback (most recent call last)")
    campaign.check("no traceback in the log", tracebacks == 0, f"{tracebacks} tracebacks in {log_path}")


async def run_against_runner(env: dict[str, str], setup: Setup, log_path: Path,
                             only: frozenset[str] | None = None) -> Campaign:
    from tests.support.runner_process import RunnerProcess

    runner = RunnerProcess("runner", {**env, **setup.runner_env()}, log_path)
    runner.offline = False  # the Hub stand-in on loopback is its Hub
    print(f"starting the runner on {runner.url} ...", flush=True)
    runner.start()
    try:
        status = await asyncio.to_thread(runner.wait_until, {"IDLE", "ERROR"}, START_TIMEOUT)
        if status != "IDLE":
            raise SystemExit(f"the runner failed to load:\n{runner.log_tail()}")
        target = Target("runner", runner.port, runner.process.pid, store=setup.store, adapters=setup.adapters)
        campaign = await run_campaign(target, setup.secrets(), only=only)
        count_tracebacks(campaign, log_path)
        return campaign
    finally:
        await asyncio.to_thread(runner.stop)


def vllm_serve_command(setup: Setup, model_path: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` with the runner's engine arguments and engine environment for the same settings.

    Its token is ``--api-key``; run-time adapters need VLLM_ALLOW_RUNTIME_LORA_UPDATING; the adapter the
    runner loads at start is ``--lora-modules``. Its Hub downloads land in the campaign's store.
    """
    from bench.run import serve_flags

    saved = dict(os.environ)
    os.environ.update({**setup.runner_env(), "KV_CACHE_GIB": "1", "DTYPE": "float32"})
    try:
        import pipelines.llm.vllm_backend as vllm_backend
        from pipelines.llm.layout import engine_environment
        from pipelines.llm.settings import LLMSettings

        settings = LLMSettings()
        config = json.loads((model_path / "config.json").read_text())
        arguments = vllm_backend.engine_args(settings, model_path, str(model_path), config)
        engine_env = engine_environment(settings, setup.store, vllm_backend.platform() == "cpu",
                                        os.sched_getaffinity(0))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    env = {**os.environ, **engine_env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_ENDPOINT": setup.hub.url,
           "HF_HUB_CACHE": str(setup.store), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "bench.vllm_serve", *serve_flags(arguments), "--host", HOST, "--port", str(port),
               "--api-key", AUTH_TOKEN, "--lora-modules", f"start={setup.adapters['start']}",
               "--disable-uvicorn-access-log"]
    return command, env


async def run_against_vllm_serve(setup: Setup, model_path: Path, log_path: Path,
                                 only: frozenset[str] | None = None) -> Campaign:
    from bench.systems import ServerProcess

    port = free_port()
    command, env = vllm_serve_command(setup, model_path, port)
    server = ServerProcess("vllm-serve", command, env, log_path, port)
    print(f"starting vllm serve on {server.url} ...", flush=True)
    server.launch()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while (await exchange(port, http_request("GET", "/health", port, None, []), 5)).status != 200:
            server.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"vllm serve was not ready within {START_TIMEOUT} s:\n{server.log_tail()}")
            await asyncio.sleep(0.5)
        answer = await exchange(port, http_request("GET", "/openapi.json", port, None, []))
        paths = set(json.loads(answer.body)["paths"])
        target = Target("vllm serve", port, server.process.pid, paths=paths,
                        ready_path="/ready" if "/ready" in paths else "/health",
                        busy_series=("vllm:num_requests_running", "vllm:num_requests_waiting"),
                        store=setup.store, adapters=setup.adapters)
        campaign = await run_campaign(target, setup.secrets(), only=only)
        count_tracebacks(campaign, log_path)
        return campaign
    finally:
        await asyncio.to_thread(server.stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def campaign_against(against: str, model: str, model_id: str, model_dir: Path, logs: Path,
                     only: frozenset[str] | None = None) -> Campaign:
    """One server, started here with the campaign's settings, attacked, stopped."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        tmp = Path(tmp)
        if model == "tiny":
            from tests.support.runners import tiny_engine_env
            from tests.support.tiny_model import build_tiny_llama

            model_path = build_tiny_llama(tmp / "tiny-llama")
            env = tiny_engine_env(model_path, core=None)
        else:
            from pipelines.model_store import resolve_model

            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is in the store already (make models)
            model_path = resolve_model(model_id, model_dir)
            env = {"MODEL_ID": str(model_path), "KV_CACHE_GIB": "1", "DTYPE": "float32"}
        setup = Setup(tmp, model_path)
        try:
            if against == "runner":
                return asyncio.run(run_against_runner(env, setup, logs / "runner.log", only))
            return asyncio.run(run_against_vllm_serve(setup, model_path, logs / "vllm-serve.log", only))
        finally:
            setup.close()


def save(campaign: Campaign, path: Path) -> None:
    """The campaign's calls and checks as JSON, for --compare."""
    calls = [{"family": call.probe.family, "path": call.probe.path, "kind": call.probe.kind,
              "expect": call.probe.expect, "outcome": call.outcome, "reason": call.reason,
              "status": call.answer.status if call.answer else None,
              "seconds": call.answer.seconds if call.answer else None} for call in campaign.calls]
    path.write_text(json.dumps({"target": campaign.target.name, "calls": calls, "checks": campaign.checks,
                                "timings": campaign.timings}, indent=1))


def load(path: Path) -> Campaign:
    document = json.loads(path.read_text())
    campaign = Campaign(Target(document["target"], 0, 0), timings=document["timings"])
    for call in document["calls"]:
        probe = Probe(call["family"], call["kind"], "", call["path"], None, call["expect"])
        answer = Answer(call["status"], seconds=call["seconds"]) if call["seconds"] is not None else None
        campaign.calls.append(Call(probe, call["outcome"], call["reason"], answer))
    campaign.checks = {name: tuple(check) for name, check in document["checks"].items()}
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", choices=["runner", "vllm-serve", "both"], default="runner",
                        help="the server(s) to attack; both: the runner, then vllm serve, then side by side")
    parser.add_argument("--model", choices=["tiny", "default"], default=None,
                        help="tiny: the tiny test model (the runner's default, make stress); default: MODEL_ID "
                             "from MODEL_DIR (vllm serve's, always)")
    parser.add_argument("--model-id", default=os.environ.get("MODEL_ID", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "models")))
    parser.add_argument("--only", action="append", choices=PHASES, metavar="PHASE",
                        help="run just this phase (repeat for more), e.g. --only 'stalled readers'; the checks of "
                             "the whole run still apply. Phases: " + ", ".join(PHASES))
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    parser.add_argument("--save", type=Path, default=None, help="write the campaign's calls as JSON here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("LEFT", "RIGHT"),
                        help="print two saved campaigns side by side, and nothing else")
    args = parser.parse_args(argv)
    if args.compare:
        print(side_by_side(load(args.compare[0]), load(args.compare[1])))
        return 0
    model = args.model or ("tiny" if args.against == "runner" else "default")
    with tempfile.TemporaryDirectory(prefix="hostile-logs-") as tmp_logs:
        logs = args.logs or Path(tmp_logs)
        logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        campaigns = [campaign_against(against, model if against == "runner" else "default", args.model_id,
                                      args.model_dir.resolve(), logs, frozenset(args.only) if args.only else None)
                     for against in (["runner", "vllm-serve"] if args.against == "both" else [args.against])]
        for campaign in campaigns:
            print(f"\n== {campaign.target.name} ({campaign.timings})\n" + report(campaign))
        if args.save:
            save(campaigns[-1], args.save)
        if len(campaigns) == 2:
            print("\n== side by side\n" + side_by_side(*campaigns))
        print(f"\n{time.monotonic() - started:.0f} s in all")
    if campaigns[0].target.name != "runner":
        print("vllm serve's outcomes are for comparison: the exit status judges a runner only")
        return 0
    ok = passed(campaigns[0])
    print("PASS: nothing failed, every bound held" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
