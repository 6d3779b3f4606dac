"""The runner's lifecycle and admission: loading, ready or failed, and what is in flight.

One small object answers every question /health, the handlers and the drain
ask: may this request come in, how many are in, is everything finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterator
from typing import Literal

import structlog

from runner.pipeline import Pipeline

log = structlog.get_logger(__name__)

HealthStatus = Literal["LOADING", "OK", "IDLE", "ERROR"]

CUT_GRACE = 0.25  # seconds the requests cut at the end of a drain get to write their error endings
# go-livepeer destroys a managed container that stays LOADING: past 3 minutes each /health poll counts as a failure,
# and two failures (10 s) end it. A load still going this long after its start is warned about, in time to act.
SLOW_LOAD_WARNING = 150.0


class Load(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class NotReady(Exception):
    """The runner cannot take a request now; the message says why (503)."""


class AtCapacity(NotReady):
    """Every running slot and every place in the queue behind them is taken (503)."""


class Deadline:
    """``RunnerState.deadline``: an ``asyncio.timeout_at`` kept among the deadlines in flight while it is entered
    (a class, not a generator-based context manager: one is entered for every request)."""

    __slots__ = ("deadlines", "timeout")

    def __init__(self, deadlines: set[asyncio.Timeout], when: float) -> None:
        self.deadlines = deadlines
        self.timeout = asyncio.timeout_at(when)

    async def __aenter__(self) -> asyncio.Timeout:
        timeout = await self.timeout.__aenter__()
        self.deadlines.add(timeout)
        return timeout

    async def __aexit__(self, kind, error, traceback) -> bool | None:
        self.deadlines.discard(self.timeout)
        return await self.timeout.__aexit__(kind, error, traceback)


class RunnerState:
    def __init__(self, pipeline: Pipeline | None, load_wait_timeout: float, start_error: str | None = None) -> None:
        self.pipeline = pipeline
        self.load_wait_timeout = load_wait_timeout
        self.load = Load.LOADING if start_error is None else Load.FAILED
        self.load_error = start_error
        self.in_flight = 0  # requests
        self.units_in_flight = 0  # what they take of the admission bound (Pipeline.admission_units)
        self.draining = False
        self.settled = asyncio.Event()  # the load is over, one way or the other
        self.idle = asyncio.Event()  # nothing in flight
        self.idle.set()
        self.deadlines: set[asyncio.Timeout] = set()  # the deadlines of the requests in flight
        self.cut_reason: str | None = None  # set when a drain outlasted its timeout: why the requests left were cut
        self.listeners: list[Callable[[], None]] = []
        self.slow_load_warning = SLOW_LOAD_WARNING  # seconds of LOADING before the warning; tests shorten it
        if start_error is not None:
            self.settled.set()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the load settles or draining starts (not for each request).

        A pipeline's own failure after its load (its engine dying) is no event
        here: ``failure()`` reads it when asked.
        """
        self.listeners.append(listener)

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def load_pipeline(self) -> None:
        assert self.pipeline is not None
        log.info("pipeline.load.start", pipeline=self.pipeline.name, model_id=self.pipeline.model_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        warning = loop.call_later(self.slow_load_warning, self.warn_slow_load, started)
        try:
            await self.pipeline.load()
        except asyncio.CancelledError:
            self.fail("loading was cancelled")
            raise
        except Exception as exc:  # any failure to load is reported, never raised out of the server
            self.fail(f"{type(exc).__name__}: {exc}")
            log.error("pipeline.load.failed", reason=self.load_error, exc_info=True)
        else:
            self.load = Load.READY
            self.settled.set()
            log.info("pipeline.load.done", seconds=round(loop.time() - started, 2))
            self.changed()
        finally:
            warning.cancel()

    def warn_slow_load(self, started: float) -> None:
        log.warning("pipeline.load.slow", seconds=round(asyncio.get_running_loop().time() - started, 1),
                    hint="prefetch the model: go-livepeer counts failures from 180 s",
                    effect="a managed container still LOADING after 3 minutes is destroyed after two more "
                           "/health polls (10 s); its start wait is 3 minutes, 5 with optimisation flags set")

    def fail(self, reason: str) -> None:
        self.load, self.load_error = Load.FAILED, reason
        self.settled.set()
        self.changed()

    @property
    def ready(self) -> bool:
        return self.load is Load.READY

    def failure(self) -> str | None:
        if self.load is Load.FAILED:
            return self.load_error
        if self.load is Load.READY:
            return self.pipeline.failure()
        return None

    def health(self) -> HealthStatus:
        if self.failure() is not None:
            return "ERROR"
        if self.load is Load.LOADING:
            return "LOADING"
        if self.in_flight:
            return "OK"
        # Draining takes no new work: IDLE would invite a request it must refuse.
        return "ERROR" if self.draining else "IDLE"

    def accepting(self) -> bool:
        """Whether a request arriving now would be served (GET /ready): ready, sound, not draining."""
        return not self.draining and self.health() in ("IDLE", "OK")

    def capacity(self) -> int | None:
        """The admission bound, in the pipeline's units (the llm pipeline's: engine sequences); None: no bound."""
        return self.pipeline.max_in_flight() if self.pipeline is not None else None

    @contextlib.contextmanager
    def admit(self, units: int = 1) -> Iterator[None]:
        """Hold ``units`` of the admission bound for a request while it is served; raise NotReady when it may not
        come in (AtCapacity when the bound has no room for it now)."""
        if self.draining:
            raise NotReady("the runner is shutting down")
        limit = self.capacity()
        if limit is not None and self.units_in_flight + units > limit:
            raise AtCapacity(f"the runner is at capacity ({self.units_in_flight} of {limit} engine sequences in "
                             f"flight; this request needs {units}); retry later")
        self.in_flight += 1
        self.units_in_flight += units
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.units_in_flight -= units
            if not self.in_flight:
                self.idle.set()

    async def drain(self, timeout: float, cut_reason: str = "the runner is stopping", cut_grace: float = CUT_GRACE) -> int:
        """Refuse new requests and wait, bounded, for those in flight; return how many were left at ``timeout``.

        Those left are cut: their deadlines (``deadline``) are brought forward to
        now, so each ends the way a request past its deadline does (an error
        status, or a stream's in-band error event) with ``cut_reason`` as the
        reason, and they get ``cut_grace`` seconds to write that ending.
        """
        self.draining = True
        self.changed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.idle.wait()
        left = self.in_flight
        if left:
            self.cut_reason = cut_reason
            now = asyncio.get_running_loop().time()
            for deadline in list(self.deadlines):
                with contextlib.suppress(RuntimeError):  # one that is expiring or exiting now
                    deadline.reschedule(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cut_grace):
                    await self.idle.wait()
        return left

    def deadline(self, when: float) -> Deadline:
        """``asyncio.timeout_at(when)`` for a request in flight, which a drain past its timeout brings forward to now.

        A TimeoutError out of it is the request's deadline, or, when ``cut_reason`` is set, the drain's cut.
        """
        return Deadline(self.deadlines, when)

    async def wait_until_ready(self) -> None:
        """Wait, bounded, for a load in progress; raise NotReady if the pipeline can't serve."""
        if not self.settled.is_set():
            try:
                async with asyncio.timeout(self.load_wait_timeout):
                    await self.settled.wait()
            except TimeoutError:
                raise NotReady(
                    f"the model is still loading after {self.load_wait_timeout:g} s; retry later"
                ) from None
        failure = self.failure()
        if failure is not None:
            raise NotReady(f"the runner cannot serve: {failure}")
