"""The engine's host on a fake backend: what stops a start, what the engine's processes are handed.

Each failure is the runner's /health ERROR with the reason logged and 503 for
requests, as go-livepeer reads it; the same path with a real runner process and
vLLM is tests/runner/test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import structlog

from tests.support.apps import llm_app, llm_settings, ready_client
from tests.support.fake_engine import FakeBackend, FakeEngine
from tests.support.http import QUESTION

CASES = {
    "tensor-parallel": ({"TENSOR_PARALLEL_SIZE": "3"}, {}, "TENSOR_PARALLEL_SIZE=3 must divide the model's 4 attention heads"),
    "pipeline-parallel": ({"PIPELINE_PARALLEL_SIZE": "5"}, {}, "PIPELINE_PARALLEL_SIZE=5 is more than the model's 2 layers"),
    # On a machine without a GPU each rank needs a core: 4 ranks on the one core it is given.
    "cores": ({"TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2"}, {"cpus": {0}},
              "= 4 ranks of at least one core each, but this machine has 1 core:"),
    "ray-on-cpu": ({"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}, {}, "vLLM's CPU backend does not support Ray"),
    "8bit": ({"USE_8BIT": "true"}, {}, "USE_8BIT needs an NVIDIA GPU"),
}


@pytest.mark.parametrize("case", CASES)
async def test_a_start_that_cannot_work_is_error_with_the_reason_and_503(aiohttp_client, tmp_path, case):
    values, machine, reason = CASES[case]
    engine = FakeEngine()
    backend = FakeBackend(engine)
    app = llm_app(engine, tmp_path / "model", llm_settings(**values), backend=backend, **machine)
    with structlog.testing.capture_logs() as logs:
        client = await ready_client(aiohttp_client, app)
    assert (await (await client.get("/health")).json())["status"] == "ERROR"
    [failed] = [entry for entry in logs if entry["event"] == "pipeline.load.failed"]
    assert reason in failed["reason"]
    response = await client.post("/llm", json={"messages": QUESTION})
    assert response.status == 503 and reason in (await response.json())["detail"]["msg"]
    assert backend.args is None and engine.submitted == [], "nothing was started"


async def test_the_engine_environment_is_handed_to_the_engine_not_written_here(aiohttp_client, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    before = dict(os.environ)
    engine = FakeEngine()
    backend = FakeBackend(engine)
    with structlog.testing.capture_logs() as logs:
        await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model", backend=backend))
    expected = {"VLLM_CACHE_ROOT": str((tmp_path / "model").resolve() / "vllm-cache"),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TORCH_COMPILE_DISABLE": "1"}
    assert backend.environment == expected
    [started] = [entry for entry in logs if entry["event"] == "engine.start"]
    assert started["environment"] == expected
    assert dict(os.environ) == before, "the runner's own environment is left as it was"


async def test_a_stop_while_the_engine_starts_ends_what_it_started(aiohttp_client, tmp_path):
    engine = FakeEngine()
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    class SlowBackend(FakeBackend):
        def start_engine(self, args, environment):
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return super().start_engine(args, environment)

    backend = SlowBackend(engine)
    client = await aiohttp_client(llm_app(engine, tmp_path / "model", backend=backend))
    await asyncio.wait_for(started.wait(), 5)
    assert (await (await client.get("/health")).json())["status"] == "LOADING"
    with structlog.testing.capture_logs() as logs:
        await client.close()  # the app's cleanup: the load is cancelled, then the pipeline closed
    release.set()
    assert backend.stopped_processes == 1
    assert "engine.start_stopped" in [entry["event"] for entry in logs]
