"""A grammar that takes too long to compile is stopped and refused: compiled first in a process that can be killed.

vLLM compiles a request's grammar (a JSON schema, an EBNF or Lark grammar, a
regex, a structural tag) in its engine core process, on a thread of its own,
with no time limit and no way to stop it: xgrammar took 4.9 s for one object of
1,000 properties on a 2-core CPU and 99 s for 2,000, CPU taken from the model's
forward passes meanwhile, and it runs on after its request went away. So before
a constrained request reaches the engine, ``GrammarGuard`` compiles its grammar
the same way (xgrammar, with the served model's tokenizer) in a worker process
of its own, under ``GRAMMAR_COMPILE_TIMEOUT`` seconds. Past that, the worker is
killed (SIGKILL: xgrammar's compile cannot be interrupted), a fresh one is
started, and the request is refused with 400 naming the field, in its API's
shape; the engine never sees it. docs/limits.md says why the bound is what it is.

- One worker, one compile at a time (a lock): a hostile caller's slow grammars
  wait behind each other, not beside the model. Started at the first constrained
  request (importing xgrammar takes seconds), kept between requests, and bound
  to the runner: the kernel kills it when the runner dies (``lifeline``), and
  the engine's stop ends it with the engine's own processes.
- Verdicts are kept by the grammar's hash (``CACHE_SIZE`` of each kind): a
  grammar that compiled in time is not compiled again here, and one that did
  not is refused at once, without a worker killed for it a second time.
- A grammar xgrammar refuses outright is passed on: vLLM's own checks then
  refuse it with their message (or hand it to another backend), as before.
- The compile time counts from the moment the worker takes the grammar; waiting
  for the lock or for a worker to start does not count. A request that goes
  away mid-compile leaves the compile to finish (within the limit) and its
  verdict is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from runner.pipeline import OperationError

if TYPE_CHECKING:
    from pipelines.llm.engine import Engine, Sampling

log = structlog.get_logger(__name__)

GRAMMAR_COMPILE_TIMEOUT_DEFAULT = 5.0  # seconds; GRAMMAR_COMPILE_TIMEOUT
WORKER_START_TIMEOUT = 120.0  # seconds a fresh worker may take to import xgrammar (torch with it) on a loaded machine
CACHE_SIZE = 1024  # grammars remembered, per verdict
COMPILE_THREADS = 8  # as vLLM's XgrammarBackend

# The request fields a constraint of each kind comes from, for the refusal: Sampling does not say which one it was.
FIELDS = {
    "json": ("response_format", "the JSON schema that constrains the answer (response_format, text.format, "
                                "structured_outputs.json / guided_json, or the parameters of a tool the answer "
                                "must call)"),
    "regex": ("structured_outputs.regex", "the regex that constrains the answer (structured_outputs.regex / "
                                          "guided_regex)"),
    "grammar": ("structured_outputs.grammar", "the grammar that constrains the answer (structured_outputs.grammar "
                                              "/ guided_grammar)"),
    "structural_tag": ("structured_outputs.structural_tag", "the structural tag that constrains the answer "
                                                            "(structured_outputs.structural_tag, or the tools the "
                                                            "answer may call)"),
}


def job_of(sampling: Sampling) -> tuple[str, str] | None:
    """What the engine would compile for ``sampling``: (kind, text), or None when it compiles nothing costly.

    As vLLM keys it (``get_structured_output_key``): a JSON schema as its
    ``json.dumps``. ``json_object`` compiles one fixed schema, and ``choice`` a
    plain list of alternatives: neither is checked.
    """
    if sampling.json_schema is not None:
        return "json", json.dumps(sampling.json_schema)
    if sampling.regex is not None:
        return "regex", sampling.regex
    if sampling.grammar is not None:
        return "grammar", sampling.grammar
    if sampling.structural_tag is not None:
        return "structural_tag", json.dumps(sampling.structural_tag)
    return None


class Verdict:
    ACCEPTED = "accepted"  # compiled within the limit
    REFUSED = "refused"  # did not compile within the limit
    PASSED_ON = "passed on"  # xgrammar refused it, or nothing could check it: vLLM's own checks decide


class Worker:
    """One compile worker process and this side of its pipe."""

    def __init__(self, process: multiprocessing.process.BaseProcess,
                 connection: multiprocessing.connection.Connection) -> None:
        self.process = process
        self.connection = connection

    async def receive(self, timeout: float) -> Any:
        """The worker's next message; TimeoutError past ``timeout`` seconds, EOFError if it died."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self.connection.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(fd)
        return self.connection.recv()  # the whole message is there or the pipe is closed: no wait

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        self.connection.close()

    async def reap(self) -> None:
        """Wait (off the loop) for the killed process to be gone, so no zombie is left."""
        await asyncio.to_thread(self.process.join, 5)


class GrammarGuard:
    """Compiles each grammar a request brings in a killable worker first, under ``timeout`` seconds."""

    def __init__(self, timeout: float = GRAMMAR_COMPILE_TIMEOUT_DEFAULT,
                 start_timeout: float = WORKER_START_TIMEOUT, cache_size: int = CACHE_SIZE) -> None:
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.cache_size = cache_size
        self.accepted: OrderedDict[str, None] = OrderedDict()
        self.refused: OrderedDict[str, None] = OrderedDict()
        self.lock = asyncio.Lock()
        self.worker: Worker | None = None
        self.tokenizer_info: str | None = None
        self.info_from: Engine | None = None  # the engine tokenizer_info was read from
        self.killed = 0  # workers killed for a compile past the limit, since the start
        self.judging: set[asyncio.Task] = set()

    async def check(self, sampling: Sampling, engine: Engine) -> None:
        """Return when ``sampling``'s grammar compiles within the limit (or there is none, or xgrammar refuses it
        outright, which vLLM's own checks then report); OperationError 400 naming its field when it does not."""
        job = job_of(sampling)
        if job is None:
            return
        kind, text = job
        key = hashlib.sha256(f"{kind}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
        verdict = self.remembered(key)
        if verdict is None:
            # Its own task: a request that goes away mid-compile does not leave the worker's answer unread.
            task = asyncio.ensure_future(self.judge(key, kind, text, engine))
            self.judging.add(task)
            task.add_done_callback(self.judging.discard)
            verdict = await asyncio.shield(task)
        if verdict == Verdict.REFUSED:
            param, what = FIELDS[kind]
            raise OperationError(
                f"{what} did not compile within {self.timeout:g} s (GRAMMAR_COMPILE_TIMEOUT): it is too large or too "
                "complex for this runner; send a smaller schema or grammar (docs/limits.md)", param=param)

    def remembered(self, key: str) -> str | None:
        for verdict, seen in ((Verdict.ACCEPTED, self.accepted), (Verdict.REFUSED, self.refused)):
            if key in seen:
                seen.move_to_end(key)
                return verdict
        return None

    def remember(self, key: str, seen: OrderedDict[str, None]) -> None:
        seen[key] = None
        while len(seen) > self.cache_size:
            seen.popitem(last=False)

    async def judge(self, key: str, kind: str, text: str, engine: Engine) -> str:
        async with self.lock:
            verdict = self.remembered(key)  # judged while this one waited for the lock
            if verdict is not None:
                return verdict
            worker = await self.ready_worker(engine)
            if worker is None:
                return Verdict.PASSED_ON
            started = time.monotonic()
            try:
                worker.connection.send((kind, text))
                answer, detail = await worker.receive(self.timeout)
            except (TimeoutError, asyncio.TimeoutError):
                self.retire(worker)
                self.remember(key, self.refused)
                self.killed += 1
                log.warning("grammar.compile_timeout", kind=kind, chars=len(text), timeout=self.timeout,
                            killed_workers=self.killed)
                return Verdict.REFUSED
            except (EOFError, OSError):  # the worker died on it (xgrammar crashed, or memory ran out)
                self.retire(worker)
                self.remember(key, self.refused)
                log.error("grammar.worker_died", kind=kind, chars=len(text),
                          exitcode=worker.process.exitcode)
                return Verdict.REFUSED
            seconds = time.monotonic() - started
            if answer == "ok":
                self.remember(key, self.accepted)
                log.debug("grammar.compiled", kind=kind, chars=len(text), seconds=round(seconds, 3))
                return Verdict.ACCEPTED
            log.info("grammar.not_compiled", kind=kind, chars=len(text), reason=detail)
            return Verdict.PASSED_ON

    def retire(self, worker: Worker) -> None:
        """Kill ``worker`` (its compile cannot be stopped any other way) and reap it in the background."""
        worker.kill()
        self.worker = None
        task = asyncio.ensure_future(worker.reap())
        self.judging.add(task)
        task.add_done_callback(self.judging.discard)

    async def ready_worker(self, engine: Engine) -> Worker | None:
        """The running worker, started (and awaited until it is ready) if there is none; None when this engine
        compiles no grammars (no tokenizer for xgrammar: nothing to check against)."""
        if self.worker is not None and self.worker.process.is_alive():
            return self.worker
        if self.worker is not None:  # died between two compiles
            self.retire(self.worker)
        if self.info_from is not engine:
            self.tokenizer_info = await asyncio.to_thread(engine.grammar_tokenizer_info)
            self.info_from = engine
        if self.tokenizer_info is None:
            return None
        worker = await asyncio.to_thread(start_worker, self.tokenizer_info)
        try:
            message = await worker.receive(self.start_timeout)
        except (TimeoutError, asyncio.TimeoutError, EOFError, OSError):
            worker.kill()
            await worker.reap()
            log.error("grammar.worker_not_started", timeout=self.start_timeout, exitcode=worker.process.exitcode)
            raise OperationError("the grammar check is not running: this runner cannot take a constrained request "
                                 "now; try again later", status=503) from None
        if message != "ready":
            worker.kill()
            await worker.reap()
            log.error("grammar.worker_not_started", reason=str(message)[:500])
            raise OperationError("the grammar check is not running: this runner cannot take a constrained request "
                                 "now; try again later", status=503)
        self.worker = worker
        return worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker.process.join(1)
            self.worker = None


def start_worker(tokenizer_info: str) -> Worker:
    """A fresh compile worker (spawned: a clean process, not a fork of this threaded one). Blocks while it starts;
    call it off the loop. Bound to this process by ``lifeline`` wherever the engine's processes are."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=serve, args=(theirs, tokenizer_info), name="grammar-check", daemon=True)
    process.start()
    theirs.close()
    return Worker(process, ours)


def serve(connection: multiprocessing.connection.Connection, tokenizer_info: str) -> None:
    """The worker: compile each (kind, text) it is sent as vLLM's XgrammarBackend would, and answer
    ("ok", seconds) or ("error", reason). Ends when the pipe closes."""
    import xgrammar  # here only: it imports torch, seconds the runner's own process never spends on it

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.deserialize_json(tokenizer_info),
                                        max_threads=COMPILE_THREADS, cache_enabled=False)
    connection.send("ready")
    while True:
        try:
            kind, text = connection.recv()
        except EOFError:
            return
        started = time.monotonic()
        try:
            COMPILERS[kind](compiler, text)
        except Exception as exc:  # xgrammar's refusal, whatever its type: its reason goes to the log
            connection.send(("error", str(exc)[:500]))
        else:
            connection.send(("ok", time.monotonic() - started))


def compile_json(compiler: Any, text: str) -> None:
    compiler.compile_json_schema(text, any_whitespace=True)


def compile_grammar(compiler: Any, text: str) -> None:
    try:
        compiler.compile_grammar(text)  # EBNF
    except Exception:  # vLLM tells Lark from EBNF by a guess: both are tried
        compiler.compile_lark(text)


def compile_structural_tag(compiler: Any, text: str) -> None:
    import xgrammar

    tag = json.loads(text)
    if "structures" in tag:  # the older form, as vLLM still takes it
        items = [xgrammar.StructuralTagItem(begin=item["begin"], schema=json.dumps(item["schema"]), end=item["end"])
                 for item in tag["structures"]]
        compiler.compile_structural_tag(items, tag["triggers"])
    else:
        compiler.compile_structural_tag(text)


COMPILERS: dict[str, Callable[[Any, str], None]] = {
    "json": compile_json,
    "regex": lambda compiler, text: compiler.compile_regex(text),
    "grammar": compile_grammar,
    "structural_tag": compile_structural_tag,
}
