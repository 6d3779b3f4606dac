"""The systems under test, each behind the same small interface.

A system starts (timed to its first answer), streams one chat request into a
``RequestRecord`` (the shared client code in ``bench.load`` owns the clock),
names the process whose CPU time is its API's cost, and stops.

- ``EngineSystem``: vLLM's ``AsyncLLM`` in this process, no HTTP: the ceiling.
- ``RunnerSystem``: ``python -m runner``, ``POST /llm`` with ``stream: true``.
- ``RunnerOpenAISystem``: the same runner process, ``POST /v1/chat/completions`` with ``stream: true``.
- ``RunnerResponsesSystem``: the same runner process, ``POST /v1/responses`` with ``stream: true``.
- ``RunnerMessagesSystem``: the same runner process, Anthropic's ``POST /v1/messages`` with ``stream: true``.
- ``VllmServeSystem``: ``vllm serve``, ``POST /v1/chat/completions`` with ``stream: true``.
- ``VllmServeMessagesSystem``: the same ``vllm serve`` process, ``POST /v1/messages`` with ``stream: true``.

The bench imports vLLM (through ``pipelines.llm.vllm_backend``) only to build the
engine arguments, and adds that import's time to the engine's start, since the
servers pay for theirs in their start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench.load import RequestRecord
from pipelines.llm.conversation import turn
from pipelines.llm.engine import Sampling
from pipelines.llm.generation import Generation

ROOT = Path(__file__).resolve().parent.parent
POLL_INTERVAL = 0.05  # seconds between readiness polls
STOP_TIMEOUT = 30  # seconds a server gets to exit after SIGTERM
WARM_UP_MESSAGES = [{"role": "user", "content": "Hello"}]


class StartFailed(RuntimeError):
    pass


@dataclass
class Startup:
    first_answer_s: float  # launch to the end of the first streamed answer
    first_health_s: float | None = None  # launch to the first answer on /health (servers only)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class System:
    name: str

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> Startup:
        raise NotImplementedError

    async def stream(self, session: aiohttp.ClientSession, messages: list[dict], max_tokens: int,
                     record: RequestRecord) -> None:
        """Send one request; call ``record.chunk()`` as each piece of text arrives, then ``record.finish``."""
        raise NotImplementedError

    def api_process(self) -> psutil.Process:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def answer_once(self, session: aiohttp.ClientSession) -> None:
        record = RequestRecord(sent=time.perf_counter())
        await self.stream(session, WARM_UP_MESSAGES, 4, record)
        if not record.chunk_times:
            raise StartFailed(f"{self.name}: the first answer had no text")


class EngineSystem(System):
    """The runner's engine adapter (AsyncLLM) in this process, with its engine arguments and chat-template step."""

    name = "engine"

    def __init__(self, vllm_backend, engine_args, import_s: float) -> None:
        """``vllm_backend`` is the imported ``pipelines.llm.vllm_backend``; importing it took ``import_s``."""
        self.vllm = vllm_backend
        self.engine_args = engine_args
        self.import_s = import_s
        self.engine = None
        self.generation = Generation()  # the runner's chat-template step (Generation.render_chat)

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> Startup:
        started = time.perf_counter()
        # The runner's engine environment is this process's already (bench.run), as the servers inherit it.
        self.engine = self.vllm.start_engine(self.engine_args, {})
        self.generation.use(self.engine, None)
        await asyncio.wait_for(self.answer_once(session), timeout)
        # The servers import vLLM as they start; this process did it before, so it is added here.
        return Startup(first_answer_s=self.import_s + time.perf_counter() - started)

    async def stream(self, session, messages, max_tokens, record) -> None:
        prompt = await self.generation.render_chat(
            [turn(index, message["role"], message["content"]) for index, message in enumerate(messages)]
        )
        outputs = self.engine.generate(prompt, Sampling(max_tokens=max_tokens, temperature=0), uuid.uuid4().hex)
        output_tokens = 0
        async for output in outputs:
            completion = output.outputs[0]
            output_tokens += len(completion.token_ids)
            if completion.text:
                record.chunk()
            if output.finished:
                record.finish(completion.finish_reason, output_tokens, len(output.prompt_token_ids or prompt))
        record.done = True  # the engine's stream has no [DONE] line; its end is the same thing

    def api_process(self) -> psutil.Process:
        # The engine's front end runs in this process, beside the (in-process) client adapter.
        return psutil.Process()

    async def stop(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()


@dataclass
class ServerProcess:
    """A server subprocess in a session of its own, so that it and its engine can be stopped together."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StartFailed(f"{self.name} exited with {self.process.returncode}; see {self.log_path}:\n"
                              f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            group = os.getpgid(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            # Engine processes left behind by the server: they are in the session we created for it.
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


class HttpSystem(System):
    server: ServerProcess
    health_path = "/health"

    async def wait_ready(self, session: aiohttp.ClientSession, launched: float, timeout: float) -> float | None:
        """Poll the health endpoint until the server is ready; return when it first answered at all."""
        first_health = None
        deadline = launched + timeout
        while time.perf_counter() < deadline:
            self.server.check_alive()
            try:
                async with session.get(self.server.url + self.health_path,
                                       timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if first_health is None:
                        first_health = time.perf_counter() - launched
                    if await self.is_ready(response):
                        return first_health
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(POLL_INTERVAL)
        raise StartFailed(f"{self.name} was not ready within {timeout:g} s:\n{self.server.log_tail()}")

    async def is_ready(self, response: aiohttp.ClientResponse) -> bool:
        return response.status == 200

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> Startup:
        launched = time.perf_counter()
        self.server.launch()
        first_health = await self.wait_ready(session, launched, timeout)
        await asyncio.wait_for(self.answer_once(session), timeout)
        return Startup(first_answer_s=time.perf_counter() - launched, first_health_s=first_health)

    async def events(self, session: aiohttp.ClientSession, path: str, body: dict,
                     record: RequestRecord) -> AsyncIterator[dict]:
        """POST a streaming request and yield each server-sent event's JSON; ``[DONE]`` marks the record done."""
        async with session.post(self.server.url + path, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    record.done = True
                    return
                yield json.loads(payload)

    def api_process(self) -> psutil.Process:
        return psutil.Process(self.server.process.pid)

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)


class RunnerSystem(HttpSystem):
    name = "runner"

    def __init__(self, model_id: str, model_dir: Path, env: dict[str, str], log_dir: Path,
                 name: str = "runner") -> None:
        self.name = name
        self.model_id = model_id
        port = free_port()
        server_env = {**env, "MODEL_ID": model_id, "MODEL_DIR": str(model_dir), "HOST": "127.0.0.1",
                      "PORT": str(port)}
        self.server = ServerProcess(name, [sys.executable, "-m", "runner"], server_env,
                                    log_dir / f"{name}.log", port)

    async def is_ready(self, response: aiohttp.ClientResponse) -> bool:
        status = (await response.json())["status"]
        if status == "ERROR":
            raise StartFailed(f"runner reports ERROR:\n{self.server.log_tail()}")
        return status == "IDLE"

    async def stream(self, session, messages, max_tokens, record) -> None:
        body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
        async for event in self.events(session, "/llm", body, record):
            choice = event["choices"][0]
            if choice["delta"]["content"]:
                record.chunk(choice["delta"]["content"])
            if choice["finish_reason"]:
                usage = event["usage"]
                record.finish(choice["finish_reason"], usage["completion_tokens"], usage["prompt_tokens"])


class OpenAIStreaming(HttpSystem):
    """A server's /v1/chat/completions, streamed, with the usage chunk: vllm serve and the runner's alike."""

    model_id: str

    async def stream(self, session, messages, max_tokens, record) -> None:
        # Greedy, and every sampling field spelled out, so that no model generation_config
        # default can make a server sample differently from the others.
        body = {
            "model": self.model_id, "messages": messages, "temperature": 0, "top_p": 1, "top_k": -1,
            "repetition_penalty": 1.0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
        }
        finish_reason = ""
        async for event in self.events(session, "/v1/chat/completions", body, record):
            if event["choices"]:
                choice = event["choices"][0]
                if choice["delta"].get("content"):
                    record.chunk(choice["delta"]["content"])
                finish_reason = choice.get("finish_reason") or finish_reason
            if event.get("usage"):  # the last chunk, with no choices
                usage = event["usage"]
                record.finish(finish_reason, usage["completion_tokens"], usage["prompt_tokens"])


class ResponsesStreaming(HttpSystem):
    """A server's /v1/responses, streamed: the runner's and vllm serve's alike.

    Both name each event (``event:`` lines) and send no ``[DONE]``: the
    stream's end is its terminal event.
    """

    model_id: str

    async def stream(self, session, messages, max_tokens, record) -> None:
        # As OpenAIStreaming's: greedy, every sampling field spelled out; nothing kept in a store.
        body = {
            "model": self.model_id, "input": messages, "temperature": 0, "top_p": 1, "top_k": -1,
            "repetition_penalty": 1.0, "max_output_tokens": max_tokens, "stream": True, "store": False,
        }
        async with session.post(self.server.url + "/v1/responses", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                kind = event["type"]
                if kind == "response.output_text.delta":
                    if event["delta"]:
                        record.chunk(event["delta"])
                elif kind in ("response.completed", "response.incomplete"):
                    answer = event["response"]
                    usage = answer["usage"]
                    record.finish("length" if answer["status"] == "incomplete" else "stop",
                                  usage["output_tokens"], usage["input_tokens"])
                    record.done = True
                elif kind in ("response.failed", "error"):
                    record.failure = f"{kind}: {json.dumps(event)[:200]}"


class MessagesStreaming(HttpSystem):
    """A server's Anthropic /v1/messages, streamed: the runner's and vllm serve's alike.

    The chat's system message is Anthropic's top-level ``system``; the text is
    each ``text_delta``, the finish and token counts are ``message_delta``'s, and
    ``message_stop`` ends the stream (Anthropic's streams have no ``[DONE]``).
    """

    model_id: str
    STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

    async def stream(self, session, messages, max_tokens, record) -> None:
        system = "".join(message["content"] for message in messages if message["role"] == "system")
        body = {
            "model": self.model_id, "messages": [message for message in messages if message["role"] != "system"],
            "max_tokens": max_tokens, "temperature": 0, "top_p": 1, "stream": True,
            **({"system": system} if system else {}),
        }
        async for event in self.events(session, "/v1/messages", body, record):
            kind = event["type"]
            if kind == "content_block_delta" and event["delta"].get("text"):
                record.chunk(event["delta"]["text"])
            elif kind == "message_delta":
                usage = event["usage"]
                record.finish(self.STOP_REASONS.get(event["delta"]["stop_reason"], event["delta"]["stop_reason"]),
                              usage["output_tokens"], usage["input_tokens"])
            elif kind == "message_stop":
                record.done = True
            elif kind == "error":
                raise RuntimeError(f"the stream failed: {event['error']}")


class SecondAPI(HttpSystem):
    """Another API of a server that another system starts and stops: it starts with it."""

    def __init__(self, host: HttpSystem) -> None:
        self.host = host
        self.model_id = host.model_id
        self.server = host.server

    async def start(self, session: aiohttp.ClientSession, timeout: float) -> Startup:
        if self.server.process is None:
            raise StartFailed(f"{self.name} runs on the {self.host.name} system's process: BENCH_SYSTEMS needs "
                              f"{self.host.name} before it")
        started = time.perf_counter()
        await asyncio.wait_for(self.answer_once(session), timeout)
        return Startup(first_answer_s=time.perf_counter() - started)

    async def stop(self) -> None:
        pass  # the host system stops the process


class RunnerOpenAISystem(SecondAPI, OpenAIStreaming):
    """The runner's OpenAI API: the runner system's own process, so it starts with it."""

    name = "runner-v1"


class RunnerResponsesSystem(SecondAPI, ResponsesStreaming):
    """The runner's OpenAI Responses API: the runner system's own process, so it starts with it."""

    name = "runner-responses"


class VllmServeResponsesSystem(SecondAPI, ResponsesStreaming):
    """vllm serve's /v1/responses, for the output parity check only (not a measured system)."""

    name = "vllm-serve-responses"


class RunnerMessagesSystem(SecondAPI, MessagesStreaming):
    """The runner's Anthropic Messages API, on the runner system's process."""

    name = "runner-messages"


class VllmServeSystem(OpenAIStreaming):
    name = "vllm-serve"

    def __init__(self, model_id: str, engine_flags: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.model_id = model_id
        port = free_port()
        command = [sys.executable, "-m", "bench.vllm_serve", *engine_flags, "--host", "127.0.0.1",
                   "--port", str(port), "--disable-uvicorn-access-log"]
        self.server = ServerProcess("vllm-serve", command, env, log_dir / "vllm-serve.log", port)


class VllmServeMessagesSystem(SecondAPI, MessagesStreaming):
    """vllm serve's Anthropic Messages API, on the vllm-serve system's process."""

    name = "vllm-serve-messages"
