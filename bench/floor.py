"""Where the runner's per-token HTTP cost goes: CPU per streamed event of four servers, side by side.

The passes show the runner's API process spending more CPU per token than the
engine's in-process front end, which writes to no socket. This part splits that
cost in layers, each a server process on loopback fed by the same stand-in engine
(every open stream gets one token per step, as vLLM's scheduler gives them), so
that the engine's own work is the same in all and small:

- ``stand-in``: the stand-in engine's streams consumed in the server process,
  no socket per event (one request starts them all): the stand-in's own cost,
  as the engine row of the passes is the real engine's.
- ``socket``: a bare uvloop protocol writing each event as one HTTP chunk, one
  write each: what any HTTP server pays per event (system call, loopback TCP).
- ``aiohttp``: aiohttp's ``StreamResponse.write`` per event, on uvloop.
- ``runner``: the runner's own app and ``/llm`` path (middlewares, admission,
  ``LLMPipeline``'s reply builder, the paced stream writer) over the stand-in.
- ``runner-v1``, ``runner-responses``: the same runner's ``/v1/chat/completions``
  and ``/v1/responses``, whose per-token costs the report compares (those two
  are also given per output token, as their streams frame tokens differently).

Each serves FLOOR_STREAMS streams of FLOOR_TOKENS tokens at once, FLOOR_ROUNDS
times round robin; the report gives the medians in microseconds per event and the
layers' differences. A stand-in engine is no evidence of how the runner serves a
real one (the passes are); it only isolates the HTTP path's share.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import psutil
from aiohttp import web

from bench.systems import free_port

FLOOR_STREAMS = 64
FLOOR_TOKENS = 128
FLOOR_ROUNDS = 3
STEP_S = 0.02  # the stand-in engine's step: every open stream gets a token
KINDS = ("stand-in", "socket", "aiohttp", "runner", "runner-v1", "runner-responses")
FLOOR_MODEL = "floor-model"  # the id the stand-in runner serves
PATHS = {"runner-v1": "/v1/chat/completions", "runner-responses": "/v1/responses"}  # /llm otherwise
EVENT = b'data: {"id":"chatcmpl-0123456789abcdef0123456789abcdef","model":"HuggingFaceTB/SmolLM2-135M-Instruct",' \
        b'"created":1764771234,"usage":{"prompt_tokens":31,"completion_tokens":17,"total_tokens":48},"choices":' \
        b'[{"index":0,"finish_reason":"","delta":{"role":"assistant","content":" word"}}]}\n\n'  # the runner's size


class SteppedTokenizer:
    """Every conversation is the same 20-token prompt."""

    chat_template = None

    def apply_chat_template(self, conversation, **kwargs) -> str:
        return "prompt"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * 20


class SteppedEngine:
    """The llm pipeline's ``Engine`` protocol, one token per step and stream."""

    max_model_len = 8192
    vocab_size = 32000
    errored = False
    tokenizer = SteppedTokenizer()

    def __init__(self) -> None:
        self.waiting: set[asyncio.Queue] = set()
        self.stepper: asyncio.Future | None = None  # started by the first request, on the serving loop

    def tool_parser_names(self) -> list[str]:
        return []

    def metrics_registry(self):
        return None

    def shutdown(self) -> None:
        if self.stepper is not None:
            self.stepper.cancel()

    def unfinished_requests(self) -> int:
        return len(self.waiting)

    async def step(self) -> None:
        while True:
            await asyncio.sleep(STEP_S)
            for queue in list(self.waiting):
                queue.put_nowait(None)

    async def generate(self, prompt: list[int], params, request_id: str = "", adapter=None):
        if self.stepper is None:
            self.stepper = asyncio.ensure_future(self.step())
        queue: asyncio.Queue = asyncio.Queue()
        self.waiting.add(queue)
        try:
            for produced in range(1, params.max_tokens + 1):
                await queue.get()
                finished = produced == params.max_tokens
                completion = SimpleNamespace(index=0, logprobs=None, token_ids=[17], text=" word",
                                             finish_reason="length" if finished else None, stop_reason=None)
                yield SimpleNamespace(prompt_token_ids=prompt, prompt_logprobs=None, finished=finished,
                                      outputs=[completion])
        finally:
            self.waiting.discard(queue)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve_socket(port: int, tokens: int, started: asyncio.Event) -> None:
    engine = SteppedEngine()
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n")

    class Stream(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport, self.received = transport, b""

        def data_received(self, data: bytes) -> None:
            self.received += data
            if b"\r\n\r\n" in self.received and not hasattr(self, "task"):
                self.task = asyncio.ensure_future(self.stream())

        async def stream(self) -> None:
            self.transport.write(head)
            async for _ in engine.generate([0] * 20, SimpleNamespace(max_tokens=tokens)):
                self.transport.write(chunk(EVENT))
            self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            self.transport.close()

    await asyncio.get_running_loop().create_server(Stream, "127.0.0.1", port)
    started.set()


async def listen(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()


def one_route(handler) -> web.Application:
    app = web.Application()
    app.router.add_post("/llm", handler)
    return app


async def serve_stand_in(port: int, tokens: int, started: asyncio.Event) -> None:
    engine = SteppedEngine()

    async def consume() -> int:
        return sum([1 async for _ in engine.generate([0] * 20, SimpleNamespace(max_tokens=tokens))])

    async def streams(request: web.Request) -> web.Response:
        count = (await request.json())["streams"]
        return web.json_response({"events": sum(await asyncio.gather(*(consume() for _ in range(count))))})

    await listen(one_route(streams), port)
    started.set()


async def serve_aiohttp(port: int, tokens: int, started: asyncio.Event) -> None:
    engine = SteppedEngine()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for _ in engine.generate([0] * 20, SimpleNamespace(max_tokens=tokens)):
            await response.write(EVENT)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    await listen(one_route(stream), port)
    started.set()


class SteppedBackend:
    """The llm pipeline's engine host hands out the stepped engine: no model, no vLLM."""

    def platform(self) -> str:
        return "cpu"

    def engine_args(self, settings, model_path, served_name, model_config, gpu=None) -> SimpleNamespace:
        return SimpleNamespace(dtype="auto", quantization=None, enforce_eager=True, enable_prefix_caching=False,
                               stream_interval=1, kv_cache_memory_bytes=None, max_model_len=8192, tensor_parallel_size=1,
                               pipeline_parallel_size=1, nnodes=1, node_rank=0)

    def start_engine(self, args, environment) -> SteppedEngine:
        return SteppedEngine()

    def stop_engine_processes(self, grace: float) -> int:
        return 0


async def serve_runner(port: int, tokens: int, started: asyncio.Event) -> None:
    import json
    import tempfile

    from pipelines.llm.host import EngineHost
    from pipelines.llm.pipeline import LLMPipeline
    from pipelines.llm.settings import LLMSettings
    from runner.app import create_app
    from runner.keys import STATE
    from runner.settings import RunnerSettings

    model = Path(tempfile.mkdtemp(prefix="floor-model-"))
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 1, "num_hidden_layers": 1}))
    settings = LLMSettings.model_validate({})
    host = EngineHost(settings, str(model), model, backend=SteppedBackend, gpus=0)
    app = create_app(RunnerSettings(), pipeline=LLMPipeline(FLOOR_MODEL, model, settings, host=host))
    await listen(app, port)
    while not app[STATE].ready:  # loaded in the background, as the runner's pipeline is
        await asyncio.sleep(0.01)
    started.set()



SERVERS = {"stand-in": serve_stand_in, "socket": serve_socket, "aiohttp": serve_aiohttp, "runner": serve_runner,
           "runner-v1": serve_runner, "runner-responses": serve_runner}


def serve(kind: str, port: int, tokens: int, ready) -> None:
    """The server child's main: one kind of server on ``port``, until killed."""
    import uvloop

    from runner.log import configure_logging

    sys.stderr = open(os.devnull, "w")  # the runner's request.done lines are made, as in service, but not shown
    configure_logging(False)

    async def main() -> None:
        started = asyncio.Event()
        await SERVERS[kind](port, tokens, started)
        await started.wait()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


@dataclass
class FloorResult:
    kind: str
    cpu_us_per_event: list[float]
    cpu_us_per_token: list[float] = field(default_factory=list)


async def read_streams(session: aiohttp.ClientSession, kind: str, url: str, streams: int, tokens: int) -> int:
    """Every stream of one round, read to its end; the number of events they held."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    if kind == "runner-v1":
        body["model"] = FLOOR_MODEL
    elif kind == "runner-responses":
        body = {"model": FLOOR_MODEL, "input": "hi", "max_output_tokens": tokens, "stream": True, "store": False}
    if kind == "stand-in":
        async with session.post(url, json={"streams": streams}) as response:
            return (await response.json())["events"]

    async def one() -> int:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            return sum([line.startswith(b"data: {") async for line in response.content])

    return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def measure(rounds: int = FLOOR_ROUNDS, streams: int = FLOOR_STREAMS,
                  tokens: int = FLOOR_TOKENS) -> dict[str, FloorResult]:
    """Start the servers, then measure them round robin; CPU time of each server process per event."""
    context = multiprocessing.get_context("spawn")
    servers = {}
    try:
        for kind in KINDS:
            ready, port = context.Event(), free_port()
            process = context.Process(target=serve, args=(kind, port, tokens, ready), daemon=True)
            process.start()
            servers[kind] = (process, f"http://127.0.0.1:{port}{PATHS.get(kind, '/llm')}")
            if not await asyncio.to_thread(ready.wait, 60):
                raise RuntimeError(f"the {kind} floor server did not start within 60 s")
        found = {kind: FloorResult(kind, []) for kind in KINDS}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for kind in KINDS:
                await read_streams(session, kind, servers[kind][1], streams, tokens)  # warm
            for _ in range(rounds):
                for kind in KINDS:
                    process, url = servers[kind]
                    watched = psutil.Process(process.pid)
                    before = watched.cpu_times()
                    events = await read_streams(session, kind, url, streams, tokens)
                    after = watched.cpu_times()
                    if events < streams * tokens:  # the runner sends one more a stream, its final one
                        raise RuntimeError(f"{kind}: {events} events, not the {streams * tokens} asked for")
                    cpu = (after.user - before.user) + (after.system - before.system)
                    found[kind].cpu_us_per_event.append(1e6 * cpu / events)
                    found[kind].cpu_us_per_token.append(1e6 * cpu / (streams * tokens))
        return found
    finally:
        for process, _ in servers.values():
            process.kill()
            process.join(5)


def median_us(result: FloorResult) -> float:
    return statistics.median(result.cpu_us_per_event)


def median_token_us(result: FloorResult) -> float:
    return statistics.median(result.cpu_us_per_token)


OWN_TOKENS = 64  # events a stream: the runner's per-request work is spread over them, as in the front-end bench
OWN_STREAMS = 64
OWN_REPEATS = 7
OWN_DOCUMENT = EVENT[len(b"data: "):-2]


def instant_pipeline():
    """A pipeline whose stream is ``OWN_TOKENS`` ready documents, one a loop turn (as an engine's steps come)."""
    from pipelines.llm import schema as llm_schema
    from runner.pipeline import EngineLoad, EventStream, Pipeline

    class Instant(Pipeline):
        name = "instant"
        OPERATIONS = tuple(op for op in llm_schema.OPERATIONS if op.operation_id == "genLLM")

        def __init__(self) -> None:
            super().__init__("instant", Path("."))

        def operations(self):
            return {"genLLM": self.generate}

        async def load(self) -> None:
            pass

        def failure(self) -> None:
            return None

        def engine_load(self) -> EngineLoad:
            return EngineLoad(0, 0, 1)

        async def close(self) -> None:
            pass

        async def generate(self, request, context):
            return EventStream(events=self.events(context), error_event=lambda reason: OWN_DOCUMENT)

        async def events(self, context):
            for _ in range(OWN_TOKENS):
                await asyncio.sleep(0)
                context.count_tokens(1)
                yield OWN_DOCUMENT
            yield OWN_DOCUMENT  # the final event, made with the last token

    return Instant()


def bare_app() -> web.Application:
    """The same stream from a bare aiohttp handler: the events, the final one and [DONE], one write each."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(OWN_TOKENS):
            await asyncio.sleep(0)
            await response.write(EVENT)
        await response.write(EVENT)
        await response.write_eof(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/llm", handle)
    return app


async def own_layers_us(bare: bool) -> float:
    """CPU per streamed event of this process (server and raw client together), the least of OWN_REPEATS rounds."""
    from aiohttp.test_utils import TestServer

    from runner.app import create_app
    from runner.settings import RunnerSettings

    app = bare_app() if bare else create_app(RunnerSettings(), pipeline=instant_pipeline())
    body = b'{"messages": [{"role": "user", "content": "x"}], "stream": true}'
    request = (b"POST /llm HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nConnection: close\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async def one_stream(host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        answer = await reader.read(-1)
        writer.close()
        if answer.count(b"data: ") != OWN_TOKENS + 2:  # the tokens' events, the final one and [DONE]
            raise RuntimeError(f"the stream was not served whole: {answer[:300]!r}")

    async with TestServer(app, host="127.0.0.1") as server:
        await asyncio.sleep(0.05)  # the pipeline's (instant) load
        rounds = []
        for _ in range(OWN_REPEATS):
            started = time.process_time()
            await asyncio.gather(*(one_stream(server.host, server.port) for _ in range(OWN_STREAMS)))
            rounds.append((time.process_time() - started) / (OWN_STREAMS * (OWN_TOKENS + 2)) * 1e6)
    return min(rounds)


def own_layers_main(bare: bool) -> None:
    """``python -m bench.floor --own-layers [--bare]``: the runner's own layers per event, in one process.

    The runner's app (middlewares, routes, admission, the deadline, the paced writer, metrics and the request's
    log line) over a pipeline that only hands out ready documents, against a bare aiohttp handler writing the same
    bytes; the difference of the two is what the runner's own layers cost per event (with ``OWN_TOKENS`` events a
    stream to spread its per-request work over). Run each side in a process of its own, alternating, and compare
    the least figures: the least of several rounds is the one a busy machine disturbed least. A checkout's figure
    against another's (before and after a change) is measured the same way, from each checkout.
    """
    import uvloop

    from runner.log import configure_logging

    sys.stderr = open(os.devnull, "w")  # the request.done lines are made, as in service, but not shown
    configure_logging(False)
    print(f"{'bare aiohttp' if bare else 'runner'} {uvloop.run(own_layers_us(bare)):.2f} us/event")


API_REPEATS = 5


def api_app():
    """The runner's app over the llm pipeline itself, on the front-end bench's stand-in engine (a step a loop turn)."""
    import tempfile

    from pipelines.llm.settings import LLMSettings
    from runner.app import create_app
    from runner.settings import RunnerSettings
    from tests.support.fake_engine import fake_model_dir
    from tests.support.frontend_pipeline import FrontendBenchPipeline

    model = fake_model_dir(Path(tempfile.mkdtemp(prefix="floor-apis-")) / "model")
    pipeline = FrontendBenchPipeline(str(model), model.parent, LLMSettings.model_validate({}))
    return create_app(RunnerSettings(), pipeline=pipeline), str(model)


API_PATHS = {"llm": "/llm", "chat": "/v1/chat/completions", "completions": "/v1/completions",
             "responses": "/v1/responses", "messages": "/v1/messages"}


def api_request(api: str, model: str) -> bytes:
    """One streamed request of ``api``, as the front-end bench asks (text completions: the same story's prompt)."""
    import json

    from bench.frontend import request_body

    body = request_body(api, model, OWN_TOKENS) if api != "completions" else \
        {"model": model, "prompt": "Tell me a story about a runner.", "max_tokens": OWN_TOKENS, "stream": True}
    body = json.dumps(body).encode()
    return (f"POST {API_PATHS[api]} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def unchunked(answer: bytes) -> bytes:
    """An HTTP/1.1 answer's body, its chunks joined."""
    body, rest = b"", answer.partition(b"\r\n\r\n")[2]
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        body, rest = body + rest[:length], rest[length + 2:]
    return body


def replaying_app(events: list[bytes]) -> web.Application:
    """A bare aiohttp handler writing ``events`` (one API's stream, as the runner wrote it), one a loop turn."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events[:-1]:
            await asyncio.sleep(0)
            await response.write(event)
        await response.write_eof(events[-1])
        return response

    app = web.Application()
    for path in API_PATHS.values():
        app.router.add_post(path, handle)
    return app


async def api_us(api: str, bare: bool, profile: Path | None = None) -> tuple[float, int]:
    """CPU per streamed event of one API (server and raw client in this process), the least of API_REPEATS rounds;
    and the events a stream. ``bare``: a bare handler replaying the runner's stream of that API instead."""
    import cProfile

    from aiohttp.test_utils import TestServer

    app, model = api_app()
    request = api_request(api, model)

    async def one_stream(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        answer = await reader.read(-1)
        writer.close()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{api}: {answer[:300]!r}")
        return answer

    async with TestServer(app, host="127.0.0.1") as server:
        for _ in range(100):  # the pipeline's (instant) load
            if (await asyncio.gather(one_stream(server.host, server.port), return_exceptions=True))[0].__class__ \
                    is bytes:
                break
            await asyncio.sleep(0.05)
        sample = await one_stream(server.host, server.port)
    body = unchunked(sample)
    events = [event + b"\n\n" for event in body.split(b"\n\n") if event]
    if bare:
        app = replaying_app(events)
    async with TestServer(app, host="127.0.0.1") as server:
        await one_stream(server.host, server.port)
        rounds = []
        profiler = cProfile.Profile() if profile is not None else None
        for _ in range(API_REPEATS):
            if profiler is not None:
                profiler.enable()
            started = time.process_time()
            await asyncio.gather(*(one_stream(server.host, server.port) for _ in range(OWN_STREAMS)))
            rounds.append((time.process_time() - started) / (OWN_STREAMS * len(events)) * 1e6)
            if profiler is not None:
                profiler.disable()
        if profiler is not None:
            profiler.dump_stats(profile)
    return min(rounds), len(events)


def profile_layers(path: Path, events: int) -> dict[str, float]:
    """A cProfile dump's own time by bench.frontend's layers, and by the reply builders' and generation path's
    functions: µs per event (cProfile's, inflated by its own per-call cost: read the shares)."""
    import pstats

    from bench.frontend import layer_of

    stats = pstats.Stats(str(path)).stats  # (file, line, function) -> (calls, primitive, tottime, cumtime, callers)
    by_layer: dict[str, float] = {}
    by_function: dict[str, float] = {}
    for (file, line, function), (_, _, own, _, _) in stats.items():
        layer = layer_of(function, file) or ("loop & other" if file != "~" else "C calls")
        by_layer[layer] = by_layer.get(layer, 0.0) + own
        if layer in ("reply builders", "generation path", "runner/"):
            name = f"{layer}: {Path(file).name}:{line} {function}"
            by_function[name] = by_function.get(name, 0.0) + own
    scale = 1e6 / (API_REPEATS * OWN_STREAMS * events)
    return {key: value * scale for key, value in sorted({**by_layer, **by_function}.items(), key=lambda kv: -kv[1])}


async def replies_us(api: str) -> tuple[float, float, int]:
    """The llm pipeline's own per-event work for one API, no HTTP: OWN_STREAMS streams of the operation itself
    (request model in, ``EventStream`` out, its events read to the end) over the front-end bench's stand-in engine,
    against the stand-in's steps read alone; CPU µs per event of each, the least of API_REPEATS rounds, and the
    events a stream. The difference is the reply builders and the generation path (``Reply``'s read loop, the
    tracker, the answer reader and the API's writer hooks), with the per-request work (the request's checks, the
    chat template on the offload thread, the opening and closing events) spread over the stream's events."""
    import json
    import tempfile

    from pipelines.llm import schema
    from pipelines.llm.engine import Sampling
    from pipelines.llm.settings import LLMSettings
    from runner.pipeline import RequestContext
    from tests.support.fake_engine import fake_model_dir
    from tests.support.frontend_pipeline import FrontendBenchPipeline

    model = fake_model_dir(Path(tempfile.mkdtemp(prefix="floor-replies-")) / "model")
    pipeline = FrontendBenchPipeline(str(model), model.parent, LLMSettings.model_validate({}))
    await pipeline.load()
    try:
        operation = next(op for op in schema.OPERATIONS if op.path == API_PATHS[api])
        serve = pipeline.operations()[operation.operation_id]
        request = operation.request_model.model_validate_json(api_request(api, str(model)).partition(b"\r\n\r\n")[2])
        engine = pipeline.generation.engine

        async def stream() -> int:
            events = (await serve(request, RequestContext(os.urandom(16).hex()))).events
            return sum([1 async for _ in events])

        async def steps_alone() -> int:
            return sum([1 async for _ in engine.generate([0] * 20, Sampling(max_tokens=OWN_TOKENS), "alone")])

        whole, alone = [], []
        for _ in range(API_REPEATS):
            started = time.process_time()
            events = sum(await asyncio.gather(*(stream() for _ in range(OWN_STREAMS))))
            whole.append((time.process_time() - started) / events * 1e6)
            started = time.process_time()
            await asyncio.gather(*(steps_alone() for _ in range(OWN_STREAMS)))
            alone.append((time.process_time() - started) / events * 1e6)
        return min(whole), min(alone), events // OWN_STREAMS
    finally:
        await pipeline.close()


def apis_main(argv: list[str]) -> None:
    """``python -m bench.floor --apis [--bare | --replies] [--profile] [API ...]``: per API, µs of CPU per event.

    By default the runner's whole stream path in one process (the app, the llm pipeline's reply builders and
    generation path, over the front-end bench's stand-in engine, 64 tokens a stream, server and raw client), the
    least of API_REPEATS rounds; ``--bare``: a bare aiohttp handler writing the same events (the difference is the
    runner's own layers, reply builders included); ``--replies``: the llm pipeline's own part alone, no HTTP
    (``replies_us``); ``--profile``: cProfile's own time by layer and the costliest functions of the runner's own
    layers. As with ``--own-layers``, run each side (and each checkout) in a process of its own, alternating."""
    import tempfile

    import uvloop

    from runner.log import configure_logging

    sys.stderr = open(os.devnull, "w")
    configure_logging(False)
    apis = [arg for arg in argv if arg in API_PATHS] or list(API_PATHS)
    if "--replies" in argv:
        for api in apis:
            whole, alone, events = uvloop.run(replies_us(api))
            print(f"{api:11} replies {whole - alone:5.2f} us/event (with the stand-in's steps {whole:.2f}, "
                  f"they alone {alone:.2f}; {events} events a stream)", flush=True)
        return
    for api in apis:
        profile = Path(tempfile.mkdtemp(prefix="floor-profile-")) / f"{api}.prof" if "--profile" in argv else None
        us, events = uvloop.run(api_us(api, "--bare" in argv, profile))
        print(f"{api:10} {'bare' if '--bare' in argv else 'runner'} {us:.2f} us/event ({events} events a stream)",
              flush=True)
        if profile is not None:
            for name, value in list(profile_layers(profile, events).items())[:40]:
                print(f"    {value:7.2f}  {name}")


if __name__ == "__main__":
    if "--apis" in sys.argv:
        apis_main(sys.argv[1:])
        sys.exit(0)

    if "--own-layers" in sys.argv:
        own_layers_main(bare="--bare" in sys.argv)
        sys.exit(0)
    started = time.perf_counter()
    for kind, result in asyncio.run(measure()).items():
        print(f"{kind:16} {median_us(result):6.1f} us/event {median_token_us(result):6.1f} us/token  "
              f"({', '.join(f'{v:.1f}' for v in result.cpu_us_per_event)})")
    print(f"{time.perf_counter() - started:.1f} s; pid {os.getpid()}")
