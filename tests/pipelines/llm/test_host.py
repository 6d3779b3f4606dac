"""The engine's host on a fake backend: what stops a start, what the engine's processes are handed.

Each failure is the runner's /health ERROR with the reason logged and 503 for
requests, as go-livepeer reads it; the same path with a real runner process and
vLLM is tests/runner/test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace

import pytest
import structlog

from pipelines.llm import host
from pipelines.llm.layout import GPU
from tests.support.apps import llm_app, llm_settings, ready_client
from tests.support.fake_engine import MODEL_CONFIG, FakeBackend, FakeEngine
from tests.support.http import QUESTION

H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0))
A100 = GPU("NVIDIA A100-SXM4-40GB", (8, 0))
V100 = GPU("Tesla V100-SXM2-16GB", (7, 0))
GPTQ_4BIT = {**MODEL_CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
FP8_CHECKPOINT = {**MODEL_CONFIG, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}

CASES = {
    "tensor-parallel": ({"TENSOR_PARALLEL_SIZE": "3"}, {}, "TENSOR_PARALLEL_SIZE=3 must divide the model's 4 attention heads"),
    "pipeline-parallel": ({"PIPELINE_PARALLEL_SIZE": "5"}, {}, "PIPELINE_PARALLEL_SIZE=5 is more than the model's 2 layers"),
    # On a machine without a GPU each rank needs a core: 4 ranks on the one core it is given.
    "cores": ({"TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2"}, {"cpus": {0}},
              "= 4 ranks of at least one core each, but this machine has 1 core:"),
    "ray-on-cpu": ({"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}, {}, "vLLM's CPU backend does not support Ray"),
    # vLLM's CUDA build where NVML finds no GPU (its platform is then vLLM's unspecified one, ""): the GPU image
    # run without one (make image-test-gpu).
    "no-gpu": ({}, {"gpus": 0, "platform": ""}, "no NVIDIA GPU: NVML finds none"),
    "8bit": ({"USE_8BIT": "true"}, {}, "USE_8BIT needs an NVIDIA GPU"),
    "8bit-old-gpu": ({"USE_8BIT": "true"}, {"gpus": 1, "gpu": V100, "platform": "cuda"},
                     "the GPU Tesla V100-SXM2-16GB (compute capability 7.0) has no 8-bit weight kernel in vLLM"),
    "8bit-quantised-checkpoint": ({"USE_8BIT": "true"},
                                  {"gpus": 1, "gpu": H100, "platform": "cuda", "model_config": GPTQ_4BIT},
                                  "the checkpoint is already quantised (gptq, 4-bit weights)"),
    "8bit-float32": ({"USE_8BIT": "true", "DTYPE": "float32"}, {"gpus": 1, "gpu": H100, "platform": "cuda"},
                     "not DTYPE=float32: set DTYPE=auto, bfloat16 or float16"),
}


@pytest.mark.parametrize("case", CASES)
async def test_a_start_that_cannot_work_is_error_with_the_reason_and_503(aiohttp_client, tmp_path, case):
    values, machine, reason = CASES[case]
    machine = dict(machine)
    engine = FakeEngine()
    backend = FakeBackend(engine, machine.pop("platform", "cpu"))
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


@pytest.mark.parametrize("case", ["adapter", "model"])
async def test_an_adapter_or_model_that_cannot_serve_is_error_before_vllm_is_imported(aiohttp_client, tmp_path, case):
    """Importing vLLM takes seconds: what can be found without it fails while the import still runs."""
    engine = FakeEngine()
    imported = threading.Event()

    def slow_import() -> FakeBackend:
        imported.wait(60)
        return FakeBackend(engine)

    values, reason = {
        "adapter": ({"LORA_ADAPTERS": f"x={tmp_path / 'no-such-adapter'}"}, "adapter 'x'"),
        "model": ({}, "is not a model"),
    }[case]
    app = llm_app(engine, tmp_path / "model", llm_settings(**values), load_backend=slow_import)
    if case == "model":
        (tmp_path / "model" / "config.json").unlink()
    try:
        with structlog.testing.capture_logs() as logs:
            client = await ready_client(aiohttp_client, app)
        assert not imported.is_set()
        assert (await (await client.get("/health")).json())["status"] == "ERROR"
        [failed] = [entry for entry in logs if entry["event"] == "pipeline.load.failed"]
        assert reason in failed["reason"], failed
    finally:
        imported.set()


EIGHT_BIT = {  # the machine's least capable GPU, the checkpoint -> what USE_8BIT asks of vLLM
    "fp8-gpu": (H100, MODEL_CONFIG, "fp8_per_channel"),
    "gpu-without-fp8": (A100, MODEL_CONFIG, "fp8_per_tensor"),
    "fp8-checkpoint": (A100, FP8_CHECKPOINT, None),
}


@pytest.mark.parametrize("case", EIGHT_BIT)
async def test_use_8bit_asks_vllm_for_what_the_gpu_and_the_checkpoint_allow(aiohttp_client, tmp_path, case):
    gpu, model_config, quantization = EIGHT_BIT[case]
    engine = FakeEngine()
    backend = FakeBackend(engine, "cuda")
    app = llm_app(engine, tmp_path / "model", llm_settings(USE_8BIT="true"), backend=backend, gpus=2, gpu=gpu,
                  model_config=model_config)
    with structlog.testing.capture_logs() as logs:
        client = await ready_client(aiohttp_client, app)
    assert (await (await client.get("/health")).json())["status"] == "IDLE"
    assert backend.args.quantization == quantization
    [started] = [entry for entry in logs if entry["event"] == "engine.start"]
    assert started["quantization"] == quantization and started["gpu"] == str(gpu)
    assert (await client.post("/llm", json={"messages": QUESTION})).status == 200


def test_the_host_takes_the_least_capable_gpu_nvml_finds(monkeypatch):
    class TwoGPUs:
        def compute_info(self):
            return {"0": SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0),
                    "1": SimpleNamespace(name="NVIDIA A100-SXM4-40GB", major=8, minor=0)}

        def close(self):
            pass

    monkeypatch.setattr(host, "NVML", TwoGPUs)
    assert host.least_capable_gpu() == A100

    class NoGPU(TwoGPUs):
        def compute_info(self):
            return {}

    monkeypatch.setattr(host, "NVML", NoGPU)
    assert host.least_capable_gpu() is None
