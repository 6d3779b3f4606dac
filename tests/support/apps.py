"""The llm pipeline served in-process, on a fake engine: the runner's own app, its real route layer and APIs.

Only the engine is a stand-in (``tests.support.fake_engine``); the host, the
generation path, the replies and every API module are the ones a container runs.
"""

from __future__ import annotations

import asyncio

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from pipelines.llm.api import LLMAPI, installed_apis
from pipelines.llm.host import EngineHost
from pipelines.llm.layout import GPU
from pipelines.llm.pipeline import LLMPipeline
from pipelines.llm.settings import LLMSettings
from runner.app import create_app
from runner.settings import RunnerSettings
from tests.support.fake_engine import FakeBackend, FakeEngine, fake_model_dir

CPUS = {0, 1}


def llm_settings(**values: Any) -> LLMSettings:
    """The llm pipeline's settings from these values alone, not from this process's environment."""
    return LLMSettings.model_validate(values)


def runner_settings(**values: Any) -> RunnerSettings:
    return RunnerSettings.model_validate(values)


def llm_pipeline(engine: FakeEngine, folder: Path, settings: LLMSettings | None = None,
                 apis: list[type[LLMAPI]] | None = None, backend: FakeBackend | None = None,
                 gpus: int = 0, cpus: set[int] = CPUS, gpu: GPU | None = None,
                 model_config: dict | None = None,
                 load_backend: Callable[[], FakeBackend] | None = None) -> LLMPipeline:
    """The llm pipeline on a fake model in ``folder``; ``load_backend`` stands for importing vLLM (default: at once)."""
    model = fake_model_dir(folder, model_config)
    settings = settings or llm_settings()
    backend = backend or FakeBackend(engine)
    host = EngineHost(settings, str(model), model, backend=load_backend or (lambda: backend), gpus=gpus, cpus=cpus,
                      gpu=gpu)
    return LLMPipeline(str(model), model, settings, host=host,
                       apis=apis if apis is not None else installed_apis())


def llm_app(engine: FakeEngine, folder: Path, settings: LLMSettings | None = None,
            runner: RunnerSettings | None = None, **kwargs: Any) -> web.Application:
    pipeline = llm_pipeline(engine, folder, settings, **kwargs)
    return create_app(runner or runner_settings(), pipeline=pipeline)


async def served_client(aiohttp_client, engine: FakeEngine, folder: Path, settings: LLMSettings | None = None,
                        **kwargs: Any):
    """The llm app on this engine and a model in folder/"model", ready; ``.model`` is the id it serves, and the
    warm-up's request is gone from ``engine.submitted``."""
    client = await ready_client(aiohttp_client, llm_app(engine, folder / "model", settings, **kwargs))
    client.model = str(folder / "model")
    engine.submitted.clear()  # the warm-up's request
    return client


async def ready_client(aiohttp_client, app: web.Application, timeout: float = 5.0):
    """The app under pytest-aiohttp's test client, once its pipeline has loaded (IDLE or ERROR)."""
    import asyncio

    # As the runner's own server: a client that goes away cancels its handler.
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    async with asyncio.timeout(timeout):
        while (await (await client.get("/health")).json())["status"] == "LOADING":
            await asyncio.sleep(0.01)
    return client


async def assert_a_vanishing_client_aborts(client, engine: FakeEngine, path: str, body: dict[str, Any]) -> None:
    """A client that goes away mid-answer, whole and then streamed, aborts its engine request; the runner is IDLE
    after."""
    engine.step_seconds = 0.01

    async def call(stream: bool) -> None:
        async with client.post(path, json={**body, "stream": stream}) as response:
            await response.read()

    for stream in (False, True):
        request = asyncio.ensure_future(call(stream))
        while not engine.running:
            await asyncio.sleep(0.01)
        request.cancel()
        async with asyncio.timeout(2):
            while engine.running:
                await asyncio.sleep(0.01)
        assert engine.submitted[-1].aborted
    assert (await (await client.get("/health")).json())["status"] == "IDLE"
