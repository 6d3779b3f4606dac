"""The runner's settings as vLLM's engine arguments: the one place they are mapped."""

from __future__ import annotations

from pathlib import Path

import psutil
import structlog
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform

from pipelines.llm.layout import (
    EIGHT_BIT_METHODS,
    GPU,
    GiB,
    cpu_enforce_eager,
    cpu_kv_cache_bytes,
    eight_bit_quantization,
    engine_dtype,
)
from pipelines.llm.settings import LLMSettings

log = structlog.get_logger(__name__)


def platform() -> str:
    """The device type vLLM runs on here: "cpu", "cuda", ..."""
    return current_platform.device_type


def engine_args(settings: LLMSettings, model_path: Path, served_name: str, model_config: dict,
                gpu: GPU | None = None) -> AsyncEngineArgs:
    """vLLM's arguments for these settings here; ``gpu`` is the machine's least capable GPU (None: none).

    Raises ValueError when the CPU KV cache cannot fit in the RAM free now.
    """
    on_cpu = platform() == "cpu"
    dtype = engine_dtype(settings, on_cpu)
    kv_cache_bytes = int(settings.kv_cache_gib * GiB) if settings.kv_cache_gib else None
    if on_cpu:
        memory = psutil.virtual_memory()
        if kv_cache_bytes is None:
            kv_cache_bytes = cpu_kv_cache_bytes(settings, model_config, dtype, memory.total)
        if kv_cache_bytes > memory.available:
            raise ValueError(
                f"the KV cache needs {kv_cache_bytes / GiB:.2f} GiB of RAM and {memory.available / GiB:.2f} GiB "
                "is free: set KV_CACHE_GIB lower (with MAX_MODEL_LEN and MAX_NUM_SEQS to match) or free some RAM"
            )
        enforce_eager = cpu_enforce_eager(settings)
        if not enforce_eager and settings.enforce_eager is None:
            log.info("engine.compiled_for_pipeline_parallel", pipeline_parallel_size=settings.pipeline_parallel_size,
                     why="vLLM's CPU backend fails pipeline parallelism in eager mode")
    else:
        enforce_eager = bool(settings.enforce_eager)
    return AsyncEngineArgs(
        model=str(model_path),
        served_model_name=served_name,
        dtype=dtype,
        max_model_len=settings.max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_bytes,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        quantization=eight_bit_quantization(settings, model_config, gpu),
        enforce_eager=enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        stream_interval=settings.stream_interval,
        # Stats on: the engine's series are recorded each step into the registry VLLMEngine serves.
        **distributed_args(settings),
        **lora_args(settings),
    )


def missing_eight_bit_methods() -> list[str]:
    """The quantisation methods USE_8BIT may ask for that this vLLM lacks: none for the release pyproject.toml pins.

    The GPU image runs it at its build, so that a vLLM without them fails there, not at a start with USE_8BIT.
    """
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return [method for method in EIGHT_BIT_METHODS if method not in QUANTIZATION_METHODS]


def lora_args(settings: LLMSettings) -> dict:
    """Room for LoRA adapters: as many in one batch, of at most this rank, and kept in host memory."""
    if not settings.lora_enabled:
        return {}
    return {"enable_lora": True, "max_loras": settings.lora_slots, "max_lora_rank": settings.max_lora_rank,
            "max_cpu_loras": settings.lora_cpu_slots}


def distributed_args(settings: LLMSettings) -> dict:
    """The executor backend and, for several nodes, where they meet (vLLM's own multi-node launch)."""
    args = {}
    if settings.distributed_executor_backend:
        args["distributed_executor_backend"] = settings.distributed_executor_backend
    if settings.nnodes > 1:
        args.update(nnodes=settings.nnodes, node_rank=settings.node_rank,
                    master_addr=settings.master_addr, master_port=settings.master_port)
    return args
