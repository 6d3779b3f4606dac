"""A pipeline with no engine behind it, for the runner's own tests: what each test's pipeline does not make its own.

The runner's tests (routes, state, slow readers, the Live Runner path, the
entry point) each serve a pipeline of their own that scripts what they test:
its answers, its load, its failure, its admission bound. Everything else, the
contract's plain answers, is here once: no operations, a load that returns once
``loaded`` is set (at once, unless the test holds it: ``load_waits``), no
failure, an idle engine, nothing to close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from pydantic_settings import BaseSettings

from runner.operations import Operation
from runner.pipeline import EngineLoad, Pipeline, Serve


class StubPipeline(Pipeline):
    name = "stub"
    OPERATIONS: tuple[Operation, ...] = ()

    def __init__(self, model_id: str = "stub/model", model_dir: Path = Path("."), settings: BaseSettings | None = None,
                 *, load_waits: bool = False) -> None:
        super().__init__(model_id, model_dir, settings)
        self.loaded = asyncio.Event()  # load() returns once it is set
        if not load_waits:
            self.loaded.set()

    def operations(self) -> Mapping[str, Serve]:
        return {}

    async def load(self) -> None:
        await self.loaded.wait()

    def failure(self) -> str | None:
        return None

    def engine_load(self) -> EngineLoad:
        return EngineLoad(unfinished=0, submitted=0, batch_size=1)

    async def close(self) -> None:
        pass
