"""``make bench-frontend``: the front end's ceiling with the engine taken out.

The real runner process (``python -m runner``, started as the tests start it)
serves the llm pipeline over an engine that emits tokens as fast as it is asked
(``tests/support/frontend_pipeline.py``: plugged in through an entry point on
``PYTHONPATH``, never through a setting a deployment could set). A lean load
client in this process (one uvloop, raw HTTP/1.1 on kept-alive loopback
connections, tokens counted as bytes, no JSON parsing) keeps ``c`` streams open
on one API: each stream that ends is replaced at once, and each slot's first
stream asks for a random length so that the streams' phases spread. After a
warm-up, one window measures:

- streamed tokens per second, and per API-process core (tokens over the runner
  process's CPU seconds: what one core of front end can carry);
- the API process's CPU per token and per SSE event (psutil ``cpu_times`` of the
  runner process, which has no engine processes here);
- the p50 and p99 gap between two token-bearing reads of one stream (with
  ``STREAM_INTERVAL`` 4, between bunches), as the client sees them under load;
- the client's own CPU (one process, to tell a client-bound run).

Then, separately (sampling perturbs), ``py-spy record --format raw`` samples the
runner process under the same load, and each sample is given to the innermost
layer on its stack: the socket write (aiohttp's ``StreamWriter._write``, or the
runner's ``PacedStreamWriter.to_socket`` for an event, whose ``transport.write``
is the system call), the rest of aiohttp, the runner's own
middlewares, routes and handlers (``runner/``), the llm pipeline's reply builders
(``pipelines/llm/api/``), its generation path (the rest of ``pipelines/``),
logging, the stand-in engine, and what is left (the event loop's own Python,
asyncio). A layer's µs per event is its share times the CPU per event of the
unprofiled window of the same case. Samples of the offload worker thread
waiting for its next job are left out (``idle_wait``): py-spy counts a runnable
thread as busy, and on a shared machine that gave ``runner/`` a wait's share.

Every STREAM_INTERVAL gets a runner process of its own. Knobs (flags):
``--quick`` (c = 64 and 256 on /v1/chat/completions, STREAM_INTERVAL 1 and 4,
short windows), ``--concurrency``, ``--apis``, ``--intervals``, ``--tokens``,
``--warm``, ``--window``, ``--profile-seconds`` (0: no profile), ``--profile-at``
(the concurrency profiled), ``--profiles DIR`` (keep py-spy's raw profiles),
``--write`` (the table into ``bench/results.md``'s front-end section).
``--against-vllm-serve`` runs instead the runner's ``/v1/chat/completions``
beside ``vllm serve``'s on the real model (``MODEL_ID``, ``MODEL_DIR``; float32,
c = 32, 64-token chat streams, both up, interleaved rounds): API-process CPU per
token of each and a py-spy profile of each API process folded into HTTP &
framing, detokenising and engine-client work (``api_share_of``); it starts two
engines, so run it under ``flock /tmp/engine.lock``; ``--write`` puts it in its
own section of ``bench/results.md``. Run it alone on the machine: figures are ratios and shares
of one run, and a shared machine moves absolute ones.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.frontend_pipeline import TOKEN_MARK, plug_in
from tests.support.runner_process import ROOT, RunnerProcess

CONCURRENCY = (64, 256, 1024)
INTERVALS = (1, 4)
APIS = {"llm": "/llm", "chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
TOKENS = 64  # per stream
RESULTS = ROOT / "bench" / "results.md"
SECTION_START, SECTION_END = "<!-- bench-frontend:start -->", "<!-- bench-frontend:end -->"
AGAINST_SECTION_START, AGAINST_SECTION_END = "<!-- bench-against-vllm-serve:start -->", "<!-- bench-against-vllm-serve:end -->"
LAYERS = ("socket write", "aiohttp", "runner/", "reply builders", "generation path", "logging", "engine",
          "loop & other")


def request_body(api: str, model: str, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": "Tell me a story about a runner."}]
    if api == "llm":
        return {"messages": messages, "max_tokens": max_tokens, "stream": True}
    if api == "responses":
        return {"model": model, "input": messages[0]["content"], "max_output_tokens": max_tokens, "stream": True,
                "store": False}
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}  # chat, messages


@dataclass
class Tally:
    """What the client counted while ``measuring``."""

    measuring: bool = False
    tokens: int = 0
    events: int = 0
    streams: int = 0
    gaps: list[float] = field(default_factory=list)


class Connection(asyncio.Protocol):
    """One kept-alive loopback connection carrying one stream after another; counts in raw bytes."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("the runner closed the connection mid-stream"))

    def send(self, request: bytes, max_tokens: int) -> asyncio.Future:
        self.done = asyncio.get_running_loop().create_future()
        self.max_tokens, self.tokens, self.last, self.head, self.tail = max_tokens, 0, None, b"", b""
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.done is None or self.done.done():
            return
        if self.head is not None:  # the response's head: its end is where the body's bytes start
            self.head += data
            if not self.head.startswith(b"HTTP/1.1 200"[:len(self.head)]):
                self.done.set_exception(RuntimeError(f"the runner answered {self.head[:300]!r}"))
                return
            head_end = self.head.find(b"\r\n\r\n")
            if head_end < 0:
                return
            data, self.head = self.head[head_end + 4:], None
        tally = self.tally
        tokens = min(data.count(TOKEN_MARK), self.max_tokens - self.tokens)  # summaries repeat the text: not counted
        if tokens:
            self.tokens += tokens
            if tally.measuring:
                tally.tokens += tokens
                if self.last is not None:
                    tally.gaps.append(now - self.last)
            self.last = now
        if tally.measuring:
            tally.events += data.count(b"\n\n") + (self.tail.endswith(b"\n") and data.startswith(b"\n"))
        self.tail = (self.tail + data)[-5:]
        if self.tail == b"0\r\n\r\n":  # the chunked body's end
            if self.tokens != self.max_tokens:
                self.done.set_exception(RuntimeError(f"a stream ended with {self.tokens} of {self.max_tokens} tokens"))
            else:
                tally.streams += tally.measuring
                self.done.set_result(None)


class Load:
    """``concurrency`` streams kept open on one API of the runner at ``port``."""

    def __init__(self, port: int, api: str, model: str, concurrency: int, tokens: int) -> None:
        self.port, self.concurrency, self.tokens = port, concurrency, tokens
        self.tally = Tally()
        path = APIS[api]
        self.requests = {}
        for max_tokens in range(1, tokens + 1):
            body = json.dumps(request_body(api, model, max_tokens)).encode()
            self.requests[max_tokens] = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self.connections: list[Connection] = []
        self.slots: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for first in range(0, self.concurrency, 64):  # in batches: the listening socket's backlog is 128
            batch = range(first, min(self.concurrency, first + 64))
            opened = await asyncio.gather(*(loop.create_connection(lambda: Connection(self.tally), "127.0.0.1",
                                                                   self.port) for _ in batch))
            self.connections += [protocol for _, protocol in opened]
        self.slots = [asyncio.create_task(self.slot(connection)) for connection in self.connections]

    async def slot(self, connection: Connection) -> None:
        max_tokens = random.randint(1, self.tokens)  # the first stream's length spreads the streams' phases
        while True:
            await connection.send(self.requests[max_tokens], max_tokens)
            max_tokens = self.tokens

    def check(self) -> None:
        for slot in self.slots:
            if slot.done() and not slot.cancelled() and slot.exception() is not None:
                raise slot.exception()

    async def stop(self) -> None:
        for slot in self.slots:
            slot.cancel()
        for connection in self.connections:
            connection.transport.abort()
        await asyncio.gather(*self.slots, return_exceptions=True)


@dataclass
class Case:
    interval: int
    api: str
    concurrency: int
    seconds: float
    tokens: int
    events: int
    streams: int
    api_cpu_s: float
    client_cpu_s: float
    gaps: list[float]
    layers: dict[str, float] | None = None  # share of the profiled samples, by layer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def api_cores(self) -> float:
        return self.api_cpu_s / self.seconds

    @property
    def tokens_per_core_s(self) -> float:
        return self.tokens / self.api_cpu_s

    @property
    def us_per_token(self) -> float:
        return 1e6 * self.api_cpu_s / self.tokens

    @property
    def us_per_event(self) -> float:
        return 1e6 * self.api_cpu_s / self.events

    def gap_ms(self, quantile: float) -> float:
        ordered = sorted(self.gaps)
        return 1e3 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def wait_idle(runner: RunnerProcess, timeout: float = 30) -> None:
    """Until the runner has nothing in flight (its handlers saw the aborted streams go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(runner.health) == "IDLE":
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the runner still had requests in flight {timeout:g} s after the load stopped")


async def measure_case(runner: RunnerProcess, model: str, interval: int, api: str, concurrency: int, tokens: int,
                       warm: float, window: float) -> Case:
    load = Load(runner.port, api, model, concurrency, tokens)
    watched, me = psutil.Process(runner.process.pid), psutil.Process()
    await load.start()
    try:
        await asyncio.sleep(warm)
        load.check()
        load.tally.measuring = True
        api_before, client_before, started = cpu_seconds(watched), cpu_seconds(me), time.perf_counter()
        await asyncio.sleep(window)
        api_after, client_after, ended = cpu_seconds(watched), cpu_seconds(me), time.perf_counter()
        load.tally.measuring = False
        load.check()
    finally:
        await load.stop()
    await wait_idle(runner)
    tally = load.tally
    if tally.tokens == 0 or tally.events == 0:
        raise RuntimeError(f"{api} c={concurrency}: no tokens streamed in the window")
    return Case(interval, api, concurrency, ended - started, tally.tokens, tally.events, tally.streams,
                api_after - api_before, client_after - client_before, tally.gaps)


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


async def profile_case(runner: RunnerProcess, model: str, api: str, concurrency: int, tokens: int, warm: float,
                       seconds: float, folder: Path, keep: Path | None = None) -> dict[str, float]:
    """The share of the runner process's samples by layer, under the same load."""
    out = folder / f"profile-{api}-{concurrency}-{time.monotonic_ns()}.txt"
    load = Load(runner.port, api, model, concurrency, tokens)
    await load.start()
    try:
        await asyncio.sleep(warm)
        command = [py_spy(), "record", "--format", "raw", "--full-filenames", "--rate", "250", "--duration",
                   str(max(1, round(seconds))), "--pid", str(runner.process.pid), "--output", str(out)]
        recorder = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.PIPE)
        _, errors = await recorder.communicate()
        load.check()
    finally:
        await load.stop()
    await wait_idle(runner)
    if recorder.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({recorder.returncode}): {errors.decode()[-500:]}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / out.name)
    return layer_shares(out.read_text())


FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def idle_wait() -> tuple[str, str, str]:
    """The frame of the offload worker thread waiting for its next job: (function, file's ending, line).

    py-spy counts a thread as active when the OS reports it runnable, and on a
    busy machine it gave the one worker thread 10-14 % of the samples while it
    used 2.4 % of the process's CPU (its /proc task times, same load): nearly
    all of those samples stood on the blocking ``self.jobs.get()``, which holds
    no Python frame of its own. Such samples are waiting, not work: they are
    left out, not given to ``runner/``.
    """
    import inspect

    from runner.offload import Offload

    lines, first = inspect.getsourcelines(Offload.work)
    at = first + next(number for number, text in enumerate(lines) if "self.jobs.get()" in text)
    return "Offload.work", "runner/offload.py", str(at)


def layer_of(function: str, file: str) -> str | None:
    """The layer a frame belongs to, or None for the standard library, the loop and other glue."""
    path = file.replace("\\", "/")
    if "/aiohttp/" in path:
        writes = path.endswith("http_writer.py") and function.rpartition(".")[2] in ("_write", "_writelines")
        return "socket write" if writes else "aiohttp"
    if "frontend_pipeline.py" in path or "fake_engine.py" in path:
        return "engine"
    if "/structlog/" in path or "/logging/" in path or path.endswith("runner/log.py"):
        return "logging"
    if path.startswith(str(ROOT)) or not path.startswith("/"):
        relative = path[len(str(ROOT)) + 1:] if path.startswith(str(ROOT)) else path
        if relative == "runner/__main__.py":  # the process's entry, under the event loop: no layer of its own
            return None
        if relative == "runner/handlers.py" and function.endswith("PacedStreamWriter.to_socket"):
            return "socket write"  # the runner's own hand-over of an event's chunk to the transport
        if relative.startswith("runner/"):
            return "runner/"
        if relative.startswith("pipelines/llm/api/"):
            return "reply builders"
        if relative.startswith("pipelines/"):
            return "generation path"
    return None


def fold_samples(raw: str, share_of: Callable[[str, str], str | None], shares: tuple[str, ...],
                 skip: Callable[[re.Match[str]], bool], process: str) -> dict[str, float]:
    """py-spy's raw (collapsed) stacks folded into ``shares``, summing to 1: each sample given to the innermost frame
    that ``share_of(function, file)`` names a share of ("loop & other" where none does); a sample whose innermost
    frame ``skip`` takes is left out."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        innermost = FRAME.match(stack.rpartition(";")[2].strip())
        if innermost and skip(innermost):
            continue
        share = "loop & other"
        for frame in reversed(stack.split(";")):
            match = FRAME.match(frame.strip())
            if match and (found := share_of(match["function"], match["file"])) is not None:
                share = found
                break
        counts[share] += int(count)
    total = sum(counts.values())
    if total == 0:
        raise RuntimeError(f"py-spy recorded no samples of the {process}")
    return {share: counts[share] / total for share in shares}


def layer_shares(raw: str) -> dict[str, float]:
    """py-spy's raw (collapsed) stacks, each sample given to the innermost frame's layer; shares summing to 1.
    A worker thread waiting for work (``idle_wait``) is left out."""
    function, file, line = idle_wait()

    def waiting(innermost: re.Match[str]) -> bool:
        return (innermost["function"], innermost["line"]) == (function, line) and innermost["file"].endswith(file)

    return fold_samples(raw, layer_of, LAYERS, waiting, "runner process")


@dataclass
class Settings:
    concurrency: tuple[int, ...] = CONCURRENCY
    apis: tuple[str, ...] = tuple(APIS)
    intervals: tuple[int, ...] = INTERVALS
    tokens: int = TOKENS
    warm: float = 1.0
    window: float = 3.0
    profile_seconds: float = 3.0
    profile_at: int | None = None  # the concurrency profiled; None: the middle one
    profiles: Path | None = None  # where to keep py-spy's raw profiles; None: not kept
    against_vllm_serve: bool = False  # instead of the grid: the runner beside vllm serve on the real model


async def run(settings: Settings, log_folder: Path) -> list[Case]:
    cases: list[Case] = []
    profile_at = settings.profile_at or settings.concurrency[len(settings.concurrency) // 2]
    for interval in settings.intervals:
        site = Path(tempfile.mkdtemp(prefix="frontend-site-", dir=log_folder))
        env = plug_in(site) | {"STREAM_INTERVAL": str(interval), "MAX_NUM_SEQS": str(max(settings.concurrency))}
        runner = RunnerProcess(f"frontend-{interval}", env, log_folder / f"runner-interval-{interval}.log")
        runner.start()
        try:
            if runner.wait_until({"IDLE", "ERROR"}, timeout=120) != "IDLE":
                raise RuntimeError(f"the runner did not load:\n{runner.log_tail()}")
            model = env["MODEL_ID"]
            await measure_case(runner, model, interval, settings.apis[0], 8, settings.tokens, 0.2, 0.3)  # warm
            for api in settings.apis:
                for concurrency in settings.concurrency:
                    case = await measure_case(runner, model, interval, api, concurrency, settings.tokens,
                                              settings.warm, settings.window)
                    print(row(case), flush=True)
                    cases.append(case)
                if settings.profile_seconds > 0 and profile_at in settings.concurrency:
                    profiled = next(case for case in cases if (case.interval, case.api, case.concurrency)
                                    == (interval, api, profile_at))
                    profiled.layers = await profile_case(runner, model, api, profile_at, settings.tokens,
                                                         settings.warm, settings.profile_seconds, log_folder,
                                                         settings.profiles)
                    print(layer_row(profiled), flush=True)
        finally:
            runner.stop()
    return cases


HEADER = ("| STREAM_INTERVAL | API | c | tok/s | API cores busy | tok/s per API core | API CPU µs/token | "
          "API CPU µs/event | events/token | gap p50 / p99 ms | client cores busy |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(case: Case) -> str:
    return (f"| {case.interval} | {APIS[case.api]} | {case.concurrency} | {case.tokens_per_s:,.0f} | "
            f"{case.api_cores:.2f} | {case.tokens_per_core_s:,.0f} | {case.us_per_token:.1f} | "
            f"{case.us_per_event:.1f} | {case.events / case.tokens:.2f} | "
            f"{case.gap_ms(0.5):.1f} / {case.gap_ms(0.99):.1f} | {case.client_cpu_s / case.seconds:.2f} |")


LAYER_HEADER = ("| STREAM_INTERVAL | API | c | " + " | ".join(LAYERS) + " | runner's own layers |\n"
                "| --- | --- | --- | " + " | ".join("---" for _ in LAYERS) + " | --- |")
OWN_LAYERS = ("runner/", "reply builders", "generation path", "logging")


def layer_row(case: Case) -> str:
    """Each layer's share of the samples and its µs per event (share x the unprofiled CPU per event)."""
    cells = [f"{100 * case.layers[layer]:.0f} % · {case.layers[layer] * case.us_per_event:.1f}" for layer in LAYERS]
    own = sum(case.layers[layer] for layer in OWN_LAYERS)
    return (f"| {case.interval} | {APIS[case.api]} | {case.concurrency} | " + " | ".join(cells)
            + f" | {100 * own:.0f} % · {own * case.us_per_event:.1f} |")


def cpu_flags() -> str:
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = [flag for flag in flags if flag.startswith(("avx", "amx")) or flag in ("fma", "f16c", "sse4_2")]
    return " ".join(sorted(wanted)) or "none of avx*, amx*, fma, f16c, sse4_2"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def report(cases: list[Case], settings: Settings) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        "## The front end's ceiling, engine taken out (`make bench-frontend`, `bench/frontend.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; code {commit.stdout.strip()}",
        f"- CPU: {cpu_model()}, nproc {os.cpu_count()}; flags: {cpu_flags()}",
        f"- load average at the end: {' '.join(f'{value:.2f}' for value in os.getloadavg())} "
        "(the machine may be shared: read ratios and shares within this run, not absolute figures)",
        f"- grid: c = {', '.join(map(str, settings.concurrency))}; APIs "
        f"{', '.join(APIS[api] for api in settings.apis)}; STREAM_INTERVAL {', '.join(map(str, settings.intervals))}",
        f"- workload: the real runner process over a stand-in engine that emits tokens as fast as asked "
        f"(`tests/support/frontend_pipeline.py`), {settings.tokens} tokens a stream, each ended stream replaced at "
        f"once; {settings.warm:g} s warm-up, then a {settings.window:g} s window per case; one client process "
        "(raw HTTP/1.1, uvloop)",
        "",
        HEADER,
        *(row(case) for case in cases),
    ]
    profiled = [case for case in cases if case.layers]
    if profiled:
        lines += [
            "",
            f"Where the API process's CPU goes (py-spy, {settings.profile_seconds:g} s at 250 Hz per case, each "
            "sample given to the innermost layer on its stack): share of the samples · µs per event. "
            "\"runner's own layers\" = runner/ + reply builders + generation path + logging.",
            "",
            LAYER_HEADER,
            *(layer_row(case) for case in profiled),
        ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, start: str, end: str, path: Path = RESULTS) -> None:
    """``path``'s section between the markers ``start`` and ``end``, replaced where it is, appended where it is not."""
    old = path.read_text() if path.exists() else ""
    section = f"{start}\n{text}{end}\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + section
    path.write_text(new)


def write_section(text: str, path: Path = RESULTS) -> None:
    """The front-end section of ``path``, replaced where it is, appended where it is not."""
    replace_section(text, SECTION_START, SECTION_END, path)


SECTION = re.compile(r"<!-- (bench-[\w-]+):start -->.*?<!-- \1:end -->", re.DOTALL)


def kept_section(path: Path) -> str:
    """The sections of ``path`` that other commands wrote (markers included: this one's, the one beside ``vllm
    serve``, bench/processes.py's), as they are, to keep when ``make bench`` rewrites the file."""
    old = path.read_text() if path.exists() else ""
    return "".join(f"\n{match.group(0)}\n" for match in SECTION.finditer(old))


API_SHARES = ("HTTP & framing", "detokenising", "engine client", "logging", "loop & other")


def api_share_of(function: str, file: str) -> str | None:
    """What a frame of an API process (the runner's or ``vllm serve``'s) does, or None for glue (stdlib, asyncio).

    HTTP & framing: the HTTP servers (aiohttp; uvicorn, starlette, fastapi, h11 / httptools), the runner's
    routes, handlers, reply builders and generation path, vLLM's OpenAI entrypoints, pydantic and JSON.
    Detokenising: vLLM's detokenizer and the tokenizers. Engine client: vLLM's ``AsyncLLM``, its output
    processor, the engine-core client and its IPC (zmq, msgspec), its stat loggers.
    """
    path = file.replace("\\", "/")
    if "/structlog/" in path or "/logging/" in path or path.endswith("runner/log.py"):
        return "logging"
    if "detokenizer" in path or "/tokenizers/" in path or "/transformers/tokenization" in path \
            or "/vllm/tokenizers/" in path or "/vllm/transformers_utils/tokenizer" in path:
        return "detokenising"
    if "/vllm/v1/" in path or "/zmq/" in path or "/msgspec/" in path or path.endswith("vllm/outputs.py") \
            or "/vllm/engine/" in path or "/vllm/sampling_params.py" in path:
        return "engine client"
    if any(part in path for part in ("/aiohttp/", "/uvicorn/", "/starlette/", "/fastapi/", "/h11/", "/httptools/",
                                     "/pydantic/", "/pydantic_core/", "/json/", "/vllm/entrypoints/", "/anyio/")):
        return "HTTP & framing"
    if path.startswith(str(ROOT)) or not path.startswith("/"):
        relative = path[len(str(ROOT)) + 1:] if path.startswith(str(ROOT)) else path
        if relative == "runner/__main__.py":
            return None
        if relative.startswith(("runner/", "pipelines/")):
            return "HTTP & framing"
    return None


# Innermost frames of a thread blocked in C (function, file's ending): a worker's queue wait, a selector's poll,
# the event loop's own run call (uvloop polls in C under it). py-spy counted them as active on this machine.
BLOCKED = (("_worker", "concurrent/futures/thread.py"), ("Starter.serve", "pipelines/llm/lifeline.py"),
           ("Offload.work", "runner/offload.py"), ("_PollLikeSelector.select", "selectors.py"),
           ("EpollSelector.select", "selectors.py"), ("Runner.run", "asyncio/runners.py"),
           ("Condition.wait", "threading.py"))


def api_shares(raw: str) -> dict[str, float]:
    """py-spy's raw stacks of an API process, each sample given to the innermost frame ``api_share_of`` names;
    samples of a thread blocked in C (``BLOCKED``, innermost frame only) are left out."""

    def blocked(innermost: re.Match[str]) -> bool:
        return any(innermost["function"] == function and innermost["file"].endswith(file)
                   for function, file in BLOCKED)

    return fold_samples(raw, api_share_of, API_SHARES, blocked, "API process")


async def against_vllm_serve(concurrency: int = 32, tokens: int = 64, rounds: int = 2,
                             profile_seconds: float = 10.0) -> str:
    """The runner's /v1/chat/completions and ``vllm serve``'s, both up on the real model (float32), side by side.

    ``rounds`` interleaved rounds (the order alternating) of ``make bench``'s workload at ``concurrency``: API-process
    CPU per output token of each; then a py-spy profile of each API process under the same load, folded by
    ``api_share_of``. Uses ``bench.run``'s engine arguments, so both engines get the same flags.
    """
    import aiohttp

    from bench.load import run_level
    from bench.run import BenchConfig, runner_engine_args, serve_flags, server_env, warm_up
    from bench.systems import RunnerOpenAISystem, RunnerSystem, VllmServeSystem

    os.environ.setdefault("DTYPE", "float32")  # AVX2 has no native bfloat16: greedy answers hold in float32 only
    config = dataclasses.replace(BenchConfig.from_env(), concurrency=[concurrency], max_tokens=tokens,
                                 rounds=max(1, BenchConfig.from_env().rounds))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-against-"))
    vllm_backend, engine_args, _ = runner_engine_args(config)
    env = server_env(config)
    runner = RunnerSystem(config.model_id, config.model_dir, env, log_dir)
    runner_v1 = RunnerOpenAISystem(runner)
    serve = VllmServeSystem(config.model_id, serve_flags(engine_args), env, log_dir)
    results: dict[str, list] = {"runner /v1": [], "vllm serve": []}
    shares: dict[str, dict[str, float]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            for system in (runner, serve):  # one after the other: two engines starting at once share 2 cores
                print(f"starting {system.name} ...", flush=True)
                await system.start(session, config.start_timeout)
            systems = {"runner /v1": runner_v1, "vllm serve": serve}
            await warm_up(config, list(systems.values()), session)
            workload = config.workload(concurrency)
            for index in range(rounds):
                order = list(systems) if index % 2 == 0 else list(reversed(systems))
                for name in order:
                    await asyncio.sleep(config.settle)
                    result = await run_level(systems[name], session, workload, concurrency, tokens,
                                             config.request_timeout, index)
                    if result.errors:
                        raise RuntimeError(f"{name}: {result.errors} requests failed: {result.first_error}")
                    results[name].append(result)
                    print(f"round {index + 1} {name}: {result.tokens_per_s:.1f} tok/s, API CPU "
                          f"{result.api_cpu_ms_per_token:.3f} ms/token", flush=True)
            for name, system in systems.items() if profile_seconds > 0 else ():
                out = log_dir / f"profile-{name.replace(' ', '-').replace('/', '')}.txt"
                await asyncio.sleep(config.settle)
                level = asyncio.create_task(run_level(system, session, workload * 4, concurrency, tokens,
                                                      config.request_timeout, -1))
                await asyncio.sleep(2)  # past the first prefill
                # Not --gil: tried, it kept 38 and 140 samples of 10 s on this machine. Blocked threads, which py-spy
                # counted as active here, are left out by api_shares (BLOCKED).
                command = [py_spy(), "record", "--format", "raw", "--full-filenames", "--rate", "100",
                           "--duration",
                           str(max(1, round(profile_seconds))), "--pid", str(system.api_process().pid),
                           "--output", str(out)]
                recorder = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE)
                _, errors = await recorder.communicate()
                level.cancel()
                await asyncio.gather(level, return_exceptions=True)
                if recorder.returncode != 0 or not out.exists():
                    raise RuntimeError(f"py-spy failed on {name} ({recorder.returncode}): {errors.decode()[-500:]}")
                shares[name] = api_shares(out.read_text())
                print(f"{name}: " + ", ".join(f"{share} {100 * value:.0f} %" for share, value in shares[name].items()),
                      flush=True)
        finally:
            for system in (runner, serve):
                await system.stop()
    return against_report(results, shares, concurrency, tokens, config.model_id, engine_args.dtype)


def against_report(results: dict[str, list], shares: dict[str, dict[str, float]], concurrency: int, tokens: int,
                   model_id: str, dtype: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    runner_ms = [result.api_cpu_ms_per_token for result in results["runner /v1"]]
    serve_ms = [result.api_cpu_ms_per_token for result in results["vllm serve"]]
    lines = [
        "## The API process beside `vllm serve`'s (`python -m bench.frontend --against-vllm-serve`)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; code {commit.stdout.strip()}",
        f"- CPU: {cpu_model()}, nproc {os.cpu_count()}; flags: {cpu_flags()}; no GPU",
        f"- load average at the end: {' '.join(f'{value:.2f}' for value in os.getloadavg())} (a shared machine: "
        "read the ratios of this run)",
        f"- model {model_id}, dtype {dtype}; both servers up, "
        f"the same engine flags; `make bench`'s chat prompts, c = {concurrency}, {tokens} tokens a stream, "
        f"{len(runner_ms)} interleaved rounds; the runner's `/v1/chat/completions` against `vllm serve`'s",
        "",
        "| round | runner tok/s | vllm serve tok/s | runner API CPU ms/token | vllm serve API CPU ms/token | "
        "runner / vllm serve |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for index, (mine, theirs) in enumerate(zip(results["runner /v1"], results["vllm serve"])):
        lines.append(f"| {index + 1} | {mine.tokens_per_s:.1f} | {theirs.tokens_per_s:.1f} | "
                     f"{mine.api_cpu_ms_per_token:.3f} | {theirs.api_cpu_ms_per_token:.3f} | "
                     f"{mine.api_cpu_ms_per_token / theirs.api_cpu_ms_per_token:.2f}x |")
    if shares:
        lines += [
            "",
            "Where each API process's CPU goes (py-spy at 100 Hz under the same load, samples of threads blocked "
            "in C left out (`BLOCKED`); each sample given to the "
            "innermost frame that names a share; the runner's own code, routes to generation path, is HTTP & "
            "framing): share of the samples · ms per token (share x that server's median API CPU per token).",
            "",
            "| server | " + " | ".join(API_SHARES) + " |",
            "| --- | " + " | ".join("---" for _ in API_SHARES) + " |",
        ]
        for name, per_token in (("runner /v1", runner_ms), ("vllm serve", serve_ms)):
            if name in shares:
                median = sorted(per_token)[len(per_token) // 2]
                lines.append(f"| {name} | " + " | ".join(
                    f"{100 * shares[name][share]:.0f} % · {shares[name][share] * median:.3f}" for share in API_SHARES)
                    + " |")
    return "\n".join(lines) + "\n"


def write_against_section(text: str, path: Path = RESULTS) -> None:
    replace_section(text, AGAINST_SECTION_START, AGAINST_SECTION_END, path)


def parse(argv: list[str]) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="c = 64 and 256 on /v1/chat/completions, short")
    parser.add_argument("--concurrency", help="comma-separated (default 64,256,1024)")
    parser.add_argument("--apis", help=f"comma-separated of {', '.join(APIS)} (default all)")
    parser.add_argument("--intervals", help="STREAM_INTERVAL values, comma-separated (default 1,4)")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--warm", type=float)
    parser.add_argument("--window", type=float)
    parser.add_argument("--profile-seconds", type=float)
    parser.add_argument("--profile-at", type=int)
    parser.add_argument("--profiles", type=Path, help="keep py-spy's raw profiles in this folder")
    parser.add_argument("--write", action="store_true", help="write the table into bench/results.md")
    parser.add_argument("--against-vllm-serve", action="store_true",
                        help="instead: the runner's /v1/chat/completions beside vllm serve's on the real model "
                             "(MODEL_ID, MODEL_DIR), c=32, float32, API CPU per token and its profile (start engines: "
                             "run it under flock /tmp/engine.lock)")
    args = parser.parse_args(argv)
    settings = Settings(tokens=args.tokens)
    if args.quick:
        settings = Settings(concurrency=(64, 256), apis=("chat",), tokens=args.tokens, warm=0.7, window=2.0,
                            profile_seconds=2.0, profile_at=256)
    if args.concurrency:
        settings.concurrency = tuple(int(value) for value in args.concurrency.split(","))
    if args.apis:
        settings.apis = tuple(args.apis.split(","))
        unknown = set(settings.apis) - set(APIS)
        if unknown:
            parser.error(f"unknown APIs {sorted(unknown)}: choose among {', '.join(APIS)}")
    if args.intervals:
        settings.intervals = tuple(int(value) for value in args.intervals.split(","))
    settings.against_vllm_serve = args.against_vllm_serve
    if args.against_vllm_serve:
        settings.profile_seconds = 10.0
    for name in ("warm", "window", "profile_seconds", "profile_at", "profiles"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings, args.write


def main(argv: list[str] | None = None) -> None:
    import uvloop

    settings, write = parse(sys.argv[1:] if argv is None else argv)
    if settings.profile_seconds > 0 and py_spy() is None:
        sys.exit("py-spy is not installed: install it (pip install py-spy) or pass --profile-seconds 0")
    started = time.perf_counter()
    if settings.against_vllm_serve:
        text = asyncio.run(against_vllm_serve(profile_seconds=settings.profile_seconds or 0))
        print("\n" + text)
        if write:
            write_against_section(text)
            print(f"written to {RESULTS}")
        print(f"{time.perf_counter() - started:.0f} s")
        return
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as folder:
        cases = uvloop.run(run(settings, Path(folder)))
    text = report(cases, settings)
    print("\n" + text)
    if write:
        write_section(text)
        print(f"written to {RESULTS}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
