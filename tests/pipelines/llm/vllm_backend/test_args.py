"""vLLM's own configuration, built from the runner's engine arguments for every tuning variable: no engine started.

``engine_args`` maps the settings; ``create_engine_config`` is where vLLM checks
them all (model, cache, parallel, scheduler, quantisation) before it starts
anything. Each case builds that configuration for the default model as a CPU
machine or a GPU machine would have it (``engine_args`` branches on the
platform, which a case chooses), and checks that every argument arrived where
vLLM reads it: a setting the pinned vLLM refuses, renames or drops fails here,
not at a container's start. What only a GPU can run (FP8 kernels) is checked
as far as vLLM lets a CPU check it: the quantisation method vLLM builds from
its registry, the layer method it dispatches a linear layer to, the capability
and activation dtypes it requires.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from pipelines.llm.layout import EIGHT_BIT_METHODS, GPU, GiB, layout_errors
from pipelines.llm.settings import LLMSettings
from pipelines.model_store import resolve_model
from tests.support.fast_lane import IMPORTS_VLLM
from tests.support.nodes import NODE_SECRET
from tests.support.runner_process import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from vllm.config import VllmConfig

pytestmark = IMPORTS_VLLM  # vLLM (and torch) are imported by the tests, not here: see tests/support/fast_lane.py

H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0))
L4 = GPU("NVIDIA L4", (8, 9))
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = GPU("Tesla T4", (7, 5))
CPU_MACHINE = SimpleNamespace(total=32 * GiB, available=16 * GiB)  # psutil.virtual_memory's two fields it reads

# Where vLLM keeps each argument the runner passes (an argument left None keeps vLLM's default).
LANDS: dict[str, Callable[[VllmConfig], object]] = {
    "model": lambda config: config.model_config.model,
    "served_model_name": lambda config: config.model_config.served_model_name,
    "max_model_len": lambda config: config.model_config.max_model_len,
    "quantization": lambda config: config.model_config.quantization,
    "enforce_eager": lambda config: config.model_config.enforce_eager,
    "max_num_batched_tokens": lambda config: config.scheduler_config.max_num_batched_tokens,
    "max_num_seqs": lambda config: config.scheduler_config.max_num_seqs,
    "stream_interval": lambda config: config.scheduler_config.stream_interval,
    "gpu_memory_utilization": lambda config: config.cache_config.gpu_memory_utilization,
    "kv_cache_memory_bytes": lambda config: config.cache_config.kv_cache_memory_bytes,
    "enable_prefix_caching": lambda config: config.cache_config.enable_prefix_caching,
    "tensor_parallel_size": lambda config: config.parallel_config.tensor_parallel_size,
    "pipeline_parallel_size": lambda config: config.parallel_config.pipeline_parallel_size,
    "distributed_executor_backend": lambda config: config.parallel_config.distributed_executor_backend,
    "nnodes": lambda config: config.parallel_config.nnodes,
    "node_rank": lambda config: config.parallel_config.node_rank,
    "master_addr": lambda config: config.parallel_config.master_addr,
    "master_port": lambda config: config.parallel_config.master_port,
    "enable_lora": lambda config: config.lora_config is not None,
    # Kept only with enable_lora (vLLM has no LoRA config without it; the arguments keep their defaults).
    "max_loras": lambda config: config.lora_config.max_loras,
    "max_lora_rank": lambda config: config.lora_config.max_lora_rank,
    "max_cpu_loras": lambda config: config.lora_config.max_cpu_loras,
}
LORA_ARGUMENTS = {"max_loras", "max_lora_rank", "max_cpu_loras"}
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32",
          "float": "float32"}  # DTYPE -> the torch dtype's name


@dataclass
class Case:
    env: dict[str, str]
    platform: str = "cpu"  # the machine engine_args maps for: "cpu" or "cuda"
    gpu: GPU | None = None
    expect: dict[str, object] = field(default_factory=dict)  # engine argument -> the value vLLM must keep


# Every tuning variable the engine takes, alone and in the combinations that matter, as a CPU and as a GPU maps it.
CASES = {
    "defaults-cpu": Case({}),
    "defaults-gpu": Case({}, "cuda", H100, {"gpu_memory_utilization": 0.85, "kv_cache_memory_bytes": None,
                                            "enforce_eager": False, "enable_prefix_caching": True}),
    "8bit-fp8-compute": Case({"USE_8BIT": "true"}, "cuda", H100, {"quantization": "fp8_per_channel"}),
    "8bit-fp8-compute-ada": Case({"USE_8BIT": "true"}, "cuda", L4, {"quantization": "fp8_per_channel"}),
    "8bit-weight-only": Case({"USE_8BIT": "true"}, "cuda", A100, {"quantization": "fp8_per_tensor"}),
    "8bit-turing-float16": Case({"USE_8BIT": "true", "DTYPE": "float16"}, "cuda", T4,
                                {"quantization": "fp8_per_tensor"}),
    "8bit-bfloat16": Case({"USE_8BIT": "true", "DTYPE": "bfloat16"}, "cuda", H100,
                          {"quantization": "fp8_per_channel"}),
    "8bit-tp-pp": Case({"USE_8BIT": "true", "TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2"}, "cuda", H100,
                       {"quantization": "fp8_per_channel", "tensor_parallel_size": 3, "pipeline_parallel_size": 2}),
    "8bit-kv-cache": Case({"USE_8BIT": "true", "KV_CACHE_GIB": "2", "GPU_MEMORY_UTILIZATION": "0.5"}, "cuda", H100,
                          {"quantization": "fp8_per_channel", "kv_cache_memory_bytes": 2 * GiB}),
    "8bit-nodes": Case({"USE_8BIT": "true", "NNODES": "2", "TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2",
                        "MASTER_ADDR": "10.0.0.1", "NODE_SECRET": NODE_SECRET}, "cuda", H100, {"quantization": "fp8_per_tensor", "nnodes": 2}),
    "8bit-worker-node": Case({"USE_8BIT": "true", "NNODES": "2", "NODE_RANK": "1", "TENSOR_PARALLEL_SIZE": "3",
                              "PIPELINE_PARALLEL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "NODE_SECRET": NODE_SECRET}, "cuda", A100,
                             {"quantization": "fp8_per_tensor", "node_rank": 1}),
    "tp-cpu": Case({"TENSOR_PARALLEL_SIZE": "3"}, expect={"tensor_parallel_size": 3}),
    "pp-cpu": Case({"PIPELINE_PARALLEL_SIZE": "2"}, expect={"pipeline_parallel_size": 2, "enforce_eager": False}),
    "tp-pp-cpu": Case({"TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2"}),
    "tp-pp-gpu": Case({"TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2"}, "cuda", H100),
    "pp-eager-gpu": Case({"PIPELINE_PARALLEL_SIZE": "2", "ENFORCE_EAGER": "true"}, "cuda", H100,
                         {"enforce_eager": True}),
    "short-context-large-batch": Case({"MAX_MODEL_LEN": "2048", "MAX_NUM_BATCHED_TOKENS": "16384"},
                                      expect={"max_model_len": 2048, "max_num_batched_tokens": 16384}),
    "batch-raised-to-context": Case({"MAX_MODEL_LEN": "4096", "MAX_NUM_BATCHED_TOKENS": "1024"}, "cuda", H100,
                                    expect={"max_model_len": 4096, "max_num_batched_tokens": 4096}),
    "model-length": Case({"MAX_MODEL_LEN": "8192", "MAX_NUM_BATCHED_TOKENS": "8192", "MAX_NUM_SEQS": "7"},
                         expect={"max_model_len": 8192, "max_num_seqs": 7}),
    "gpu-memory-utilization": Case({"GPU_MEMORY_UTILIZATION": "0.5"}, "cuda", H100, {"gpu_memory_utilization": 0.5}),
    "gpu-memory-utilization-all": Case({"GPU_MEMORY_UTILIZATION": "1"}, "cuda", H100, {"gpu_memory_utilization": 1.0}),
    "kv-cache-cpu": Case({"KV_CACHE_GIB": "0.5"}, expect={"kv_cache_memory_bytes": GiB // 2}),
    "kv-cache-gpu": Case({"KV_CACHE_GIB": "3"}, "cuda", H100, {"kv_cache_memory_bytes": 3 * GiB}),
    "no-prefix-caching": Case({"ENABLE_PREFIX_CACHING": "false"}, expect={"enable_prefix_caching": False}),
    "no-prefix-caching-gpu": Case({"ENABLE_PREFIX_CACHING": "false"}, "cuda", H100, {"enable_prefix_caching": False}),
    "stream-interval": Case({"STREAM_INTERVAL": "8"}, expect={"stream_interval": 8}),
    "stream-interval-gpu": Case({"STREAM_INTERVAL": "4"}, "cuda", H100, {"stream_interval": 4}),
    "dtype-float32": Case({"DTYPE": "float32"}),
    "dtype-bfloat16": Case({"DTYPE": "bfloat16"}),
    "dtype-float16-gpu": Case({"DTYPE": "float16"}, "cuda", T4),
    "compiled-cpu": Case({"ENFORCE_EAGER": "false"}, expect={"enforce_eager": False}),
    "eager-gpu": Case({"ENFORCE_EAGER": "true"}, "cuda", H100, {"enforce_eager": True}),
    "mp-backend": Case({"DISTRIBUTED_EXECUTOR_BACKEND": "mp", "TENSOR_PARALLEL_SIZE": "3"},
                       expect={"distributed_executor_backend": "mp"}),
    "serving-node": Case({"NNODES": "2", "TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555", "NODE_SECRET": NODE_SECRET},
                         expect={"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.1", "master_port": 29555}),
    "worker-node": Case({"NNODES": "2", "NODE_RANK": "1", "TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "2",
                         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555", "NODE_SECRET": NODE_SECRET}, expect={"node_rank": 1}),
    "nodes-gpu": Case({"NNODES": "3", "NODE_RANK": "2", "TENSOR_PARALLEL_SIZE": "3", "PIPELINE_PARALLEL_SIZE": "3",
                       "MASTER_ADDR": "10.0.0.1", "NODE_SECRET": NODE_SECRET}, "cuda", H100, {"nnodes": 3, "node_rank": 2}),
    "lora-cpu": Case({"LORA_RUNTIME_UPDATES": "true", "AUTH_TOKEN": "t", "MAX_LORAS": "2", "MAX_LORA_RANK": "32",
                      "MAX_CPU_LORAS": "3"}, expect={"enable_lora": True, "max_loras": 2, "max_lora_rank": 32, "max_cpu_loras": 3}),
    "lora-gpu-tp": Case({"LORA_RUNTIME_UPDATES": "true", "AUTH_TOKEN": "t", "MAX_LORA_RANK": "16",
                         "TENSOR_PARALLEL_SIZE": "3"}, "cuda", H100, {"max_lora_rank": 16, "tensor_parallel_size": 3}),
}
# The settings that reach no engine argument, and where they are proven instead.
NOT_ENGINE_ARGUMENTS = {
    "MAX_WAITING_REQUESTS": "the runner's admission (runner/state.py)",
    "MAX_PROMPTS_PER_REQUEST": "the runner's admission of one request's prompts (pipeline.admission_units)",
    "GRAMMAR_COMPILE_TIMEOUT": "the time limit of the grammar check before the engine (pipelines/llm/grammar.py)",
    "TOOL_CALL_PARSER": "a vLLM tool parser chosen by name (vllm_backend/tool_parsers.py)",
    "REASONING_PARSER": "a vLLM reasoning parser chosen by name (vllm_backend/reasoning_parsers.py)",
    "MASTER_WAIT_TIMEOUT": "how long the host waits for the nodes (host.py, worker_node.py)",
    "NODE_LINE_PORT": "the serving node's port for its worker nodes' lines (nodes.py)",
    "RAY_ADDRESS": "the Ray cluster the engine's processes join, through their environment",
    "VLLM_CACHE_ROOT": "read by vLLM's processes from their environment (layout.engine_environment)",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "read by vLLM's processes from their environment (layout.engine_environment)",
    "VLLM_CPU_OMP_THREADS_BIND": "read by vLLM's processes from their environment (layout.engine_environment)",
    "TORCH_COMPILE_DISABLE": "read by torch in the engine's processes from their environment (layout.engine_environment)",
    "LORA_ADAPTERS": "the host reads the adapters; their count and ranks are MAX_LORAS' and MAX_LORA_RANK's defaults",
    "LORA_UNLOAD_TIMEOUT": "how long an unload waits for the adapter's requests (api/lora.py)",
    "LORA_ROOT": "where a run-time lora_path may be (host.py)",
    "LORA_MAX_BYTES": "the cap of a run-time adapter download (host.py, model_store)",
    "LORA_MAX_ADAPTERS": "how many adapters are served at once (served_models.py)",
    "AUTH_TOKEN": "read only to refuse LORA_RUNTIME_UPDATES without one (settings.py)",
}


@pytest.fixture(scope="module")
def default_model(model_store) -> tuple[Path, dict]:
    path = resolve_model(DEFAULT_MODEL_ID, model_store)
    return path, json.loads((path / "config.json").read_text())


@pytest.fixture(autouse=True)
def environment_kept():
    """vLLM's CPU platform writes this process's environment (LD_PRELOAD among others) while it builds a config."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def mapped_args(case: Case, model: Path, model_config: dict, monkeypatch):
    """engine_args as the case's machine calls it: its platform, its GPU, a CPU machine of CPU_MACHINE's RAM."""
    from pipelines.llm.vllm_backend import args as vllm_args

    monkeypatch.setattr(vllm_args, "platform", lambda: case.platform)
    monkeypatch.setattr(vllm_args.psutil, "virtual_memory", lambda: CPU_MACHINE)
    settings = LLMSettings.model_validate(case.env)
    return settings, vllm_args.engine_args(settings, model, DEFAULT_MODEL_ID, model_config, case.gpu)


def vllm_config(settings: LLMSettings, args) -> VllmConfig:
    """vLLM's configuration as the runner's start builds it: a worker node's headless (vllm_backend/worker.py)."""
    from vllm.usage.usage_lib import UsageContext

    if settings.worker_node:
        return args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    return args.create_engine_config()


def devices_short(settings: LLMSettings) -> int | None:
    """The GPUs of a machine with fewer than a one-node case's ranks, else None (vLLM refuses then, as layout does)."""
    import torch

    if not torch.cuda.is_available() or settings.nnodes > 1:
        return None
    gpus = torch.cuda.device_count()
    return gpus if settings.world_size > gpus else None


@pytest.mark.parametrize("name", CASES)
def test_vllm_builds_its_configuration_from_the_runner_engine_arguments(name, default_model, monkeypatch):
    import torch

    case, (model, model_config) = CASES[name], default_model
    settings, args = mapped_args(case, model, model_config, monkeypatch)
    devices = settings.world_size if case.platform == "cuda" else 64
    assert layout_errors(settings, model_config, case.platform == "cpu", devices, 64, case.gpu) == [], \
        "the runner itself lets the case start on its machine"
    if (gpus := devices_short(settings)) is not None:
        with pytest.raises(ValueError, match=rf"larger than the number of available GPUs \({gpus}\)"):
            vllm_config(settings, args)
        return
    config = vllm_config(settings, args)
    for argument, lands in LANDS.items():
        if argument in LORA_ARGUMENTS and not args.enable_lora:
            continue
        if (value := getattr(args, argument)) is not None:
            assert lands(config) == value, f"vLLM keeps {argument}={lands(config)!r}, the runner passed {value!r}"
    for argument, value in case.expect.items():
        assert getattr(args, argument) == value and LANDS[argument](config) == value, argument
    if args.dtype != "auto":
        assert config.model_config.dtype == getattr(torch, DTYPES[args.dtype])


@pytest.mark.parametrize("native_bfloat16", [False, True], ids=["avx2-only", "avx512-bf16-and-amx"])
def test_with_no_dtype_vllm_computes_in_float32_on_every_cpu(native_bfloat16, default_model, monkeypatch):
    """DTYPE unset on a CPU: float32, whether it computes bfloat16 natively or emulates it; vLLM's auto on a GPU."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native_bfloat16)
    model, model_config = default_model
    settings, args = mapped_args(Case({}), model, model_config, monkeypatch)
    assert args.dtype == "float32"
    assert vllm_config(settings, args).model_config.dtype == torch.float32
    _, args = mapped_args(Case({}, "cuda", H100), model, model_config, monkeypatch)
    assert args.dtype == "auto"


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.env.get("USE_8BIT") == "true"])
def test_use_8bit_is_a_method_vllm_builds_for_the_gpu(name, default_model, monkeypatch):
    """The method's config validation, its linear-layer dispatch and its minimum capability, as far as a CPU can."""
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    case, (model, model_config) = CASES[name], default_model
    _, args = mapped_args(case, model, model_config, monkeypatch)
    # The model's and the loader's configs are all vLLM builds its quantisation from (whatever the machine's GPUs).
    model_config = args.create_model_config()
    quant_config = VllmConfig.get_quantization_config(model_config, args.create_load_config())
    assert quant_config is not None and quant_config.get_name() == "online", "quantised as vLLM loads the checkpoint"
    capability = case.gpu.capability[0] * 10 + case.gpu.capability[1]
    assert quant_config.get_min_capability() <= capability, f"vLLM refuses {case.gpu}"
    assert model_config.dtype in quant_config.get_supported_act_dtypes()
    method = {"fp8_per_channel": "Fp8PtpcOnlineLinearMethod", "fp8_per_tensor": "Fp8PerTensorOnlineLinearMethod"}
    for layer, prefix in [(QKVParallelLinear, "model.layers.0.self_attn.qkv_proj"),
                          (RowParallelLinear, "model.layers.0.mlp.down_proj")]:
        resolved = quant_config.resolve_quant_method_cls(layer, prefix)
        assert resolved is not None, f"{args.quantization} leaves {prefix} in 16 bits: USE_8BIT would save nothing"
        assert resolved[-1].__name__ == method[args.quantization]


def test_every_engine_setting_has_a_case():
    """A tuning variable added to LLMSettings gets a case here, or a reason it reaches no engine argument."""
    covered = {alias for case in CASES.values() for alias in case.env}
    every = {info.alias for info in LLMSettings.model_fields.values()}
    assert every - covered - NOT_ENGINE_ARGUMENTS.keys() == set()
    assert set(LANDS) >= {key for case in CASES.values() for key in case.expect}


def test_use_8bit_methods_are_in_the_pinned_vllm():
    """What USE_8BIT may ask for is a quantisation method of this vLLM (the GPU image checks the same at its build)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from pipelines.llm.vllm_backend import args as vllm_args

    assert vllm_args.missing_eight_bit_methods() == []
    assert set(EIGHT_BIT_METHODS) <= set(QUANTIZATION_METHODS)


def test_the_ray_backend_builds_where_ray_is_installed(default_model, monkeypatch):
    """DISTRIBUTED_EXECUTOR_BACKEND=ray (GPUs only: layout refuses it on CPUs): vLLM's parallel config needs Ray."""
    model, model_config = default_model
    case = Case({"DISTRIBUTED_EXECUTOR_BACKEND": "ray", "RAY_ADDRESS": "10.0.0.1:6379", "TENSOR_PARALLEL_SIZE": "3"},
                "cuda", H100)
    settings, args = mapped_args(case, model, model_config, monkeypatch)
    assert layout_errors(settings, model_config, False, 3, 64, H100) == []
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(ValueError, match="Failed to import Ray"):
            vllm_config(settings, args)
    else:
        assert vllm_config(settings, args).parallel_config.distributed_executor_backend == "ray"


def test_a_setting_vllm_refuses_fails_here(default_model, monkeypatch):
    """The cases can fail: vLLM refuses a context longer than the model's, and the method USE_8BIT used to name."""
    model, model_config = default_model
    settings, args = mapped_args(Case({"MAX_MODEL_LEN": "65536"}), model, model_config, monkeypatch)
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_config(settings, args)
    settings, args = mapped_args(Case({"USE_8BIT": "true"}, "cuda", H100), model, model_config, monkeypatch)
    args.quantization = "bitsandbytes"
    with pytest.raises(ValueError, match="Unknown quantization method: bitsandbytes"):
        vllm_config(settings, args)


def test_vllm_refuses_8bit_in_float32_as_the_runner_does(default_model, monkeypatch):
    """layout refuses USE_8BIT with DTYPE=float32 before vLLM would, for the reason vLLM gives."""
    model, model_config = default_model
    settings, args = mapped_args(Case({"USE_8BIT": "true", "DTYPE": "float32"}, "cuda", H100), model, model_config,
                                 monkeypatch)
    [error] = layout_errors(settings, model_config, False, 1, 64, H100)
    assert "DTYPE=float32" in error
    with pytest.raises(ValueError, match="torch.float32 is not supported for quantization method fp8_per_channel"):
        vllm_config(settings, args)


def test_a_quantised_checkpoint_loads_in_its_own_format_with_use_8bit(default_model, monkeypatch, tmp_path):
    """USE_8BIT asks nothing of vLLM for an FP8 checkpoint: vLLM reads the format from config.json."""
    model, model_config = default_model
    quantised = dict(model_config, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    folder = tmp_path / "fp8-checkpoint"
    folder.mkdir()
    for file in model.iterdir():
        if file.name != "config.json":
            (folder / file.name).symlink_to(file.resolve())
    (folder / "config.json").write_text(json.dumps(quantised))
    settings, args = mapped_args(Case({"USE_8BIT": "true"}, "cuda", A100), folder, quantised, monkeypatch)
    assert layout_errors(settings, quantised, False, 1, 64, A100) == []
    assert args.quantization is None
    config = vllm_config(settings, args)
    assert config.model_config.quantization == "fp8"
    assert config.quant_config.get_min_capability() <= 80
