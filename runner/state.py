"""The runner's lifecycle: loading, serving, failed, as /health reports it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import structlog

from pipelines.base import Pipeline

log = structlog.get_logger(__name__)

HealthStatus = Literal["LOADING", "OK", "IDLE", "ERROR"]


class NotReady(Exception):
    """The pipeline cannot take a request now; the message says why."""


@dataclass
class RunnerState:
    pipeline: Pipeline
    load_wait_timeout: float
    in_flight: int = 0
    draining: bool = False
    load_error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # loaded or failed

    async def load(self) -> None:
        log.info("pipeline.load.start", pipeline=self.pipeline.name, model_id=self.pipeline.model_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self.pipeline.load()
        except asyncio.CancelledError:
            self.load_error = "loading was cancelled"
            raise
        except Exception as exc:  # any failure to load is reported, never raised out of the server
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("pipeline.load.failed", reason=self.load_error, exc_info=True)
        else:
            self.loaded.set()
            log.info("pipeline.load.done", seconds=round(loop.time() - started, 2))
        finally:
            self.settled.set()

    def failure(self) -> str | None:
        if self.load_error is not None:
            return self.load_error
        if self.loaded.is_set():
            return self.pipeline.failure()
        return None

    def health(self) -> HealthStatus:
        if self.failure() is not None:
            return "ERROR"
        if not self.loaded.is_set():
            return "LOADING"
        if self.in_flight:
            return "OK"
        # Draining takes no new work: IDLE would invite a request it must refuse.
        return "ERROR" if self.draining else "IDLE"

    async def drain(self, timeout: float) -> int:
        """Refuse new requests and wait, bounded, for those in flight; return how many are left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    async def wait_until_ready(self) -> None:
        """Wait, bounded, for a load in progress; raise NotReady if the pipeline can't serve."""
        if not self.settled.is_set():
            try:
                await asyncio.wait_for(self.settled.wait(), self.load_wait_timeout)
            except asyncio.TimeoutError:
                raise NotReady(
                    f"the model is still loading after {self.load_wait_timeout:g} s; retry later"
                ) from None
        failure = self.failure()
        if failure is not None:
            raise NotReady(f"the runner cannot serve: {failure}")
