"""``API_PROCESSES=N``: N HTTP processes over one engine, one server to the outside.

The runner started by ``python -m runner`` is the *primary* (process 0). It
opens the one listening socket, loads the pipeline (which starts the engine
with room for N clients: vLLM's own multi-API-server addresses, see
``Pipeline.share_engine``), and once loaded starts N-1 *extra* API processes.
Each is handed the listening socket, the pipeline's ``engine_share(i)`` (opaque
here) and this module's shared counters; it builds the same pipeline, joins the
engine (``Pipeline.join_engine``), and only then accepts connections on the
shared socket: the kernel hands each connection to whichever process accepts
first.

What stays one server's:

- Admission: one bound (the pipeline's ``max_in_flight``) over every process,
  checked under one lock against counters in shared memory (``SharedState``).
- ``/health`` and ``/ready``: the primary's; an extra asks the primary over a
  private Unix socket. The primary counts every process's requests in flight.
- ``/metrics``: the primary's, with each extra's series summed in (counters and
  histograms, and the in-flight gauges), plus per-process series labelled
  ``process``.
- The Live Runner registration: the primary's only; its capacity is the one
  admission bound.
- The drain: on SIGTERM the primary leaves the network, then it and every extra
  refuse new work and drain at once, to one deadline; the primary waits for the
  extras to be gone before it closes the engine.

No extra outlives the primary: each asks the kernel to SIGKILL it when the
primary ends (``die_with_parent``), and the primary ends any left at its stop.
An extra that ends on its own makes the runner ERROR, with the reason.

The engine's death is seen by the primary alone (its client launched the engine
core and watches its processes; an extra's client only has sockets, which a
killed peer leaves silent). The primary then raises ``ENGINE_LOST`` in the
shared counters, and each extra ends its own requests in flight as the
primary's end (``Pipeline.lose_engine``: a stream's in-band error event, a 5xx,
a log line), then serves 503 and a /health of ERROR until the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from runner.keys import STATE
from runner.listening import listening_sockets
from runner.pipeline import Pipeline
from runner.settings import RunnerSettings
from runner.state import CUT_GRACE, AtCapacity, NotReady, RunnerState

log = structlog.get_logger(__name__)

PROCESS_HEADER = "X-API-Process"  # which process answered, on every answer when API_PROCESSES > 1
PRIMARY_TIMEOUT = 5.0  # seconds an extra waits for the primary's /health, /ready or /metrics (go-livepeer's poll: 5 s)
WATCH_INTERVAL = 0.25  # seconds between the primary's looks at its extras, and an extra's at the shared flags
LOST_ENGINE_GRACE = 5.0  # seconds the extras get to end their requests once the engine is lost, before they are killed
GONE_GRACE = 1.0  # seconds past the drain's end an extra gets to exit before it is killed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The shared counters: a head, then one slot per process.
DRAINING, FAILED, DRAIN_DEADLINE, ENGINE_LOST = range(4)
HEAD = 4
IN_FLIGHT, UNITS, SERVED, PHASE = range(4)
SLOT = 4
STARTING, SERVING, GONE = 0.0, 1.0, 2.0

# Gauges that each process reports for itself (its own requests, in the runner and in the engine through its own
# client), so that the runner's value is their sum; every other gauge (the capacity, the registration, vLLM's own
# gauges, livepeer_runner_engine_requests_waiting) is the primary's alone.
SUMMED_GAUGES = frozenset({"livepeer_runner_requests_in_flight", "livepeer_runner_admitted_sequences",
                           "livepeer_runner_engine_requests_unfinished"})


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; at once if it has already ended (``prctl(PR_SET_PDEATHSIG)``).

    The runner's own copy of pipelines/llm/lifeline.py's rule: ``runner/`` imports no pipeline.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


class Shared:
    """Counters in shared memory, written by each process into its own slot, and one lock for admission."""

    def __init__(self, count: int, context: Any) -> None:
        self.count = count
        self.values = context.RawArray("d", HEAD + SLOT * count)
        self.lock = context.Lock()

    def slot(self, index: int, field: int) -> int:
        return HEAD + SLOT * index + field

    def get(self, index: int, field: int) -> float:
        return self.values[self.slot(index, field)]

    def add(self, index: int, field: int, value: float) -> None:
        self.values[self.slot(index, field)] += value

    def set(self, index: int, field: int, value: float) -> None:
        self.values[self.slot(index, field)] = value

    def total(self, field: int) -> int:
        return int(sum(self.get(index, field) for index in range(self.count)))

    @property
    def draining(self) -> bool:
        return bool(self.values[DRAINING])

    @property
    def failed(self) -> bool:
        return bool(self.values[FAILED])

    @property
    def engine_lost(self) -> bool:
        return bool(self.values[ENGINE_LOST])


class SharedState(RunnerState):
    """One process's ``RunnerState``, with admission and the count in flight over every process.

    Its own ``in_flight`` and ``units_in_flight`` stay this process's (its
    drain waits for its own requests; its /metrics sums them with the others').
    """

    def __init__(self, pipeline: Pipeline | None, load_wait_timeout: float, shared: Shared, index: int,
                 start_error: str | None = None) -> None:
        super().__init__(pipeline, load_wait_timeout, start_error=start_error)
        self.shared = shared
        self.index = index

    def total_in_flight(self) -> int:
        return self.shared.total(IN_FLIGHT)

    def health(self):
        status = super().health()
        if status == "IDLE" and self.total_in_flight():  # another process serves a request: not idle
            return "OK"
        return status

    def failure(self) -> str | None:
        own = super().failure()
        if own is None and self.index and self.shared.failed:
            return "the runner cannot serve: its primary process says ERROR (see its /health and logs)"
        return own

    @contextlib.contextmanager
    def admit(self, units: int = 1) -> Iterator[None]:
        if self.shared.draining:
            raise NotReady("the runner is shutting down")
        limit = self.capacity()
        shared, index = self.shared, self.index
        with shared.lock:
            taken = shared.total(UNITS)
            if limit is not None and taken + units > limit:
                raise AtCapacity(f"the runner is at capacity ({taken} of {limit} engine sequences in flight; this "
                                 f"request needs {units}); retry later")
            shared.add(index, IN_FLIGHT, 1)
            shared.add(index, UNITS, units)
            shared.add(index, SERVED, 1)
        try:
            with super().admit(units):  # this process's own count (and its drain)
                yield
        finally:
            with shared.lock:
                shared.add(index, IN_FLIGHT, -1)
                shared.add(index, UNITS, -units)


class ProcessesCollector:
    """Per-process series from the shared counters (labelled ``process``), on the primary's /metrics."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def collect(self):
        shared = self.shared
        serving = GaugeMetricFamily("livepeer_runner_api_process_serving",
                                    "1 for each API process accepting connections (API_PROCESSES)", labels=["process"])
        in_flight = GaugeMetricFamily("livepeer_runner_api_process_requests_in_flight",
                                      "Requests each API process is serving", labels=["process"])
        served = CounterMetricFamily("livepeer_runner_api_process_requests",
                                     "Requests each API process has admitted", labels=["process"])
        for index in range(shared.count):
            label = [str(index)]
            serving.add_metric(label, float(shared.get(index, PHASE) == SERVING))
            in_flight.add_metric(label, shared.get(index, IN_FLIGHT))
            served.add_metric(label, shared.get(index, SERVED))
        yield from (serving, in_flight, served)


class Families:
    """A registry's worth of parsed metric families, rendered back in the exposition format."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(primary: bytes, extras: list[bytes]) -> bytes:
    """The primary's /metrics with the extras' summed in: counters, histograms and SUMMED_GAUGES add up, sample by
    sample (a counter's ``_created`` takes the earliest); every other series is the primary's."""
    families = list(text_string_to_metric_families(primary.decode()))
    by_name = {family.name: family for family in families}
    for text in extras:
        for family in text_string_to_metric_families(text.decode()):
            if family.type not in ("counter", "histogram", "summary") and family.name not in SUMMED_GAUGES:
                continue
            mine = by_name.get(family.name)
            if mine is None:
                by_name[family.name] = family
                families.append(family)
                continue
            index = {(sample.name, tuple(sorted(sample.labels.items()))): n for n, sample in enumerate(mine.samples)}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in index:
                    index[key] = len(mine.samples)
                    mine.samples.append(sample)
                    continue
                at = index[key]
                old = mine.samples[at]
                value = min(old.value, sample.value) if sample.name.endswith("_created") else old.value + sample.value
                mine.samples[at] = old._replace(value=value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(families))
    return generate_latest(registry)


@dataclass
class ExtraConfig:
    """What an extra API process is started with (pickled by multiprocessing: it carries sockets)."""

    settings: RunnerSettings
    index: int
    count: int
    share: object  # the pipeline's engine_share(index), opaque here
    sockets: list[socket.socket]  # the listening sockets every API process accepts on (one per address)
    shared: Shared
    primary_path: str  # the primary's private Unix socket (for /health, /ready, /metrics)
    own_path: str  # this process's private Unix socket (its own /metrics, for the primary to sum)
    parent_pid: int


class APIProcesses:
    """The primary's side: the shared socket and counters, the extras' starts, their watch, their drain."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self.count = settings.api_processes
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the engine's threads
        self.shared = Shared(self.count, self.context)
        self.sockets = listening_sockets(settings.host, settings.port, settings.send_buffer_bytes)
        self.folder = Path(tempfile.mkdtemp(prefix="runner-api-"))  # 0700: the private sockets are this user's
        self.processes: dict[int, BaseProcess] = {}
        self.stopping = False
        self.watching: asyncio.Task | None = None
        self.shared.set(0, PHASE, SERVING)

    @property
    def primary_path(self) -> str:
        return str(self.folder / "0.sock")

    def own_path(self, index: int) -> str:
        return str(self.folder / f"{index}.sock")

    def start(self, pipeline: Pipeline, state: RunnerState) -> None:
        """Start the extras (the pipeline is loaded), and watch them: one that ends makes the runner ERROR."""
        for index in range(1, self.count):
            config = ExtraConfig(self.settings, index, self.count, pipeline.engine_share(index), self.sockets,
                                 self.shared, self.primary_path, self.own_path(index), os.getpid())
            process = self.context.Process(target=extra_main, args=(config,), name=f"api-process-{index}", daemon=False)
            process.start()
            self.processes[index] = process
            log.info("api_process.started", process=index, pid=process.pid)
        self.watching = asyncio.create_task(self.watch(state), name="api-processes-watch")

    async def watch(self, state: RunnerState) -> None:
        reported: set[int] = set()
        while not self.stopping:
            reason = state.failure()
            if reason is not None:  # the engine is gone: the extras' requests would hang on it
                await self.lose_engine(reason)
                return
            for index, process in self.processes.items():
                phase = self.shared.get(index, PHASE)
                if phase == SERVING and index not in reported:
                    reported.add(index)
                    log.info("api_process.serving", process=index, pid=process.pid)
                if process.exitcode is not None and not self.stopping:
                    reason = (f"API process {index} of {self.count} (pid {process.pid}) ended with exit code "
                              f"{process.exitcode} (API_PROCESSES={self.count}); its logs say why")
                    log.error("api_process.ended", process=index, exit_code=process.exitcode, reason=reason)
                    self.shared.values[FAILED] = 1
                    state.fail(reason)
                    return
            await asyncio.sleep(WATCH_INTERVAL)

    async def lose_engine(self, reason: str) -> None:
        """Tell every extra that the engine is gone: each ends its requests in flight with the engine's failure, as
        this process's own end (an extra's client cannot see the death itself). One whose requests are still in
        flight after LOST_ENGINE_GRACE is killed, so that nothing waits on a dead engine for ever."""
        self.shared.values[FAILED] = 1
        self.shared.values[ENGINE_LOST] = 1
        log.error("api_process.engine_lost", reason=reason,
                  effect="every API process ends its requests in flight with the engine's failure")
        deadline = time.monotonic() + LOST_ENGINE_GRACE
        while time.monotonic() < deadline and not self.stopping and self.holding():
            await asyncio.sleep(0.05)
        held = self.holding()
        if held:  # still so a moment later: not a new call passing through on its way to its 503
            await asyncio.sleep(0.2)
        for index in set(held) & set(self.holding()):
            if not self.stopping:
                process = self.processes[index]
                log.error("api_process.killed", process=index, pid=process.pid,
                          why=f"its requests in flight did not end within {LOST_ENGINE_GRACE:g} s of the engine's "
                              "loss: their connections close")
                process.kill()
                process.join(1.0)

    def holding(self) -> list[int]:
        """The extras still alive with requests in flight."""
        return [index for index, process in self.processes.items()
                if process.is_alive() and self.shared.get(index, IN_FLIGHT) > 0]

    def serving(self) -> list[int]:
        return [index for index in self.processes if self.shared.get(index, PHASE) == SERVING]

    async def drain(self, deadline: float) -> None:
        """Every extra refuses new work now and drains until ``deadline`` (time.monotonic()); return once all are gone."""
        self.stopping = True
        self.shared.values[DRAIN_DEADLINE] = deadline
        self.shared.values[DRAINING] = 1
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(process.pid, signal.SIGTERM)
        gone_by = deadline + CUT_GRACE + GONE_GRACE
        while any(process.is_alive() for process in self.processes.values()) and time.monotonic() < gone_by:
            await asyncio.sleep(0.02)
        self.kill("still running at the drain's end")

    def kill(self, why: str) -> None:
        for index, process in self.processes.items():
            if process.is_alive():
                log.error("api_process.killed", process=index, pid=process.pid, why=why)
                process.kill()
                process.join(1.0)

    async def close(self) -> None:
        self.stopping = True
        if self.watching is not None:
            self.watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watching
        self.kill("still running as the runner stops")
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    async def extra_metrics(self) -> list[bytes]:
        """Each serving extra's own /metrics, over its private socket (one that does not answer is left out)."""
        async def fetch(index: int) -> bytes:
            connector = aiohttp.UnixConnector(path=self.own_path(index))
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=PRIMARY_TIMEOUT)) as http:
                async with http.get("http://api-process/own-metrics") as answer:
                    answer.raise_for_status()
                    return await answer.read()

        found = await asyncio.gather(*(fetch(index) for index in self.serving()), return_exceptions=True)
        for index, result in zip(self.serving(), found, strict=False):
            if isinstance(result, BaseException):
                log.warning("api_process.metrics_unread", process=index, reason=repr(result))
        return [result for result in found if isinstance(result, bytes)]


def summing_metrics(handler: Callable, processes: APIProcesses) -> Callable:
    """The primary's /metrics handler with every extra's series summed in (``merge_metrics``)."""

    async def metrics(request: web.Request, body: None) -> web.StreamResponse:
        response = await handler(request, body)
        extras = await processes.extra_metrics()
        if extras:
            response.body = merge_metrics(response.body, extras)
        return response

    return metrics


def asking_primary(primary_path: str) -> Callable:
    """An extra's handler for /health, /ready and /metrics: the primary's answer, asked over its private socket."""

    async def ask(request: web.Request, _body: None) -> web.StreamResponse:
        headers = {name: value for name, value in request.headers.items() if name.lower() in ("authorization", "x-request-id")}
        connector = aiohttp.UnixConnector(path=primary_path)
        try:
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=PRIMARY_TIMEOUT)) as http:
                async with http.get(f"http://primary{request.rel_url}", headers=headers) as answer:
                    body = await answer.read()
                    return web.Response(body=body, status=answer.status,
                                        headers={"Content-Type": answer.headers.get("Content-Type", CONTENT_TYPE_LATEST)})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error("api_process.primary_unreachable", path=request.path, reason=repr(exc))
            raise web.HTTPServiceUnavailable(
                text='{"detail": {"msg": "the runner\'s primary process did not answer"}}',
                content_type="application/json") from None

    return ask


async def own_metrics_site(app: web.Application, path: str) -> web.AppRunner:
    """An extra's private site: its own /metrics (the runner's handler over this process's app), for the primary to sum."""
    from runner.handlers import metrics

    private = web.Application()

    async def own(_request: web.Request) -> web.StreamResponse:
        return await metrics(SimpleNamespace(app=app), None)  # the handler reads the app and nothing else

    private.router.add_get("/own-metrics", own)
    runner = web.AppRunner(private, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


def extra_main(config: ExtraConfig) -> None:
    """An extra API process: bound to the primary, it serves until SIGTERM (or the primary's end)."""
    die_with_parent(config.parent_pid)
    from runner.__main__ import exit_now, run_event_loop
    from runner.log import configure_logging

    configure_logging(config.settings.verbose_logging)
    structlog.contextvars.bind_contextvars(api_process=config.index)
    code = 1
    try:
        code = run_event_loop(serve_extra(config))
    finally:
        exit_now(code)


async def follow_primary(shared: Shared, pipeline: Pipeline) -> None:
    """An extra's watch on the primary's word that the engine is gone: its own requests in flight then end with the
    engine's failure, as the primary's do (``Pipeline.lose_engine``), instead of waiting on a dead engine."""
    while not shared.engine_lost:
        await asyncio.sleep(WATCH_INTERVAL)
    reason = "the engine has stopped (the primary API process saw it die: see its log)"
    log.error("api_process.engine_lost", reason=reason,
              effect="this process's requests in flight end with the engine's failure; new ones are refused (503)")
    try:
        pipeline.lose_engine(reason)
    except Exception:  # its calls then wait on the dead engine until the primary kills this process (LOST_ENGINE_GRACE)
        log.error("api_process.engine_lost.unhandled", exc_info=True,
                  effect="the primary kills this process in 5 s if its calls have not ended")


async def serve_extra(config: ExtraConfig) -> int:
    """Build the pipeline, join the engine, then accept on the shared socket; on SIGTERM drain to the primary's deadline."""
    from runner.__main__ import drain_cut_reason
    from runner.app import build_pipeline, create_app

    settings = config.settings
    pipeline, error = build_pipeline(settings)
    if pipeline is None or error is not None:
        log.error("api_process.cannot_serve", reason=error)
        return 1
    pipeline.join_engine(config.share)
    app = create_app(settings, pipeline=pipeline, extra=config)
    state = app[STATE]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()  # loads (joins the engine) in the background
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settled = asyncio.ensure_future(state.settled.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({settled, stopping}, return_when=asyncio.FIRST_COMPLETED)
    private = None
    if not stop.is_set():
        if not state.ready:
            log.error("api_process.cannot_serve", reason=state.failure())
            await runner.cleanup()
            return 1
        private = await own_metrics_site(app, config.own_path)
        for sock in config.sockets:
            await web.SockSite(runner, sock).start()
        config.shared.set(config.index, PHASE, SERVING)
        log.info("runner.listening", api_process=config.index, of=config.count)
        following = asyncio.ensure_future(follow_primary(config.shared, pipeline))
        await stopping
        following.cancel()
    settled.cancel()
    deadline = config.shared.values[DRAIN_DEADLINE] or (time.monotonic() + settings.drain_timeout)
    left = await state.drain(max(0.0, deadline - time.monotonic()), cut_reason=drain_cut_reason(settings))
    if left:
        log.warning("runner.drain.timeout", cut_requests=left)
    config.shared.set(config.index, PHASE, GONE)
    if private is not None:
        await private.cleanup()
    await runner.cleanup()
    log.info("runner.stopped")
    return 0
