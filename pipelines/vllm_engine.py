"""Everything that touches vLLM, imported by the llm pipeline once it starts loading."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from pipelines.llm import GiB, LLMSettings, cpu_engine_variables, cpu_kv_cache_bytes
from runner.schema import LLMRequest

__all__ = ["AsyncLLM", "cpu_engine_environment", "engine_args", "sampling_params", "tokens_prompt"]


def cpu_has_native_bfloat16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def engine_args(settings: LLMSettings, model_path: Path, served_name: str, model_config: dict) -> AsyncEngineArgs:
    """Raises ValueError when the CPU KV cache cannot fit in the RAM free now."""
    on_cpu = current_platform.is_cpu()
    dtype = settings.dtype
    kv_cache_bytes = int(settings.kv_cache_gib * GiB) if settings.kv_cache_gib else None
    if on_cpu:
        if dtype == "auto":
            # bfloat16 gives wrong text on CPUs that only emulate it (AVX2).
            dtype = "bfloat16" if cpu_has_native_bfloat16() else "float32"
        memory = psutil.virtual_memory()
        if kv_cache_bytes is None:
            kv_cache_bytes = cpu_kv_cache_bytes(settings, model_config, dtype, memory.total)
        if kv_cache_bytes > memory.available:
            raise ValueError(
                f"the KV cache needs {kv_cache_bytes / GiB:.2f} GiB of RAM and {memory.available / GiB:.2f} GiB "
                "is free: set KV_CACHE_GIB lower (with MAX_MODEL_LEN and MAX_NUM_SEQS to match) or free some RAM"
            )
    enforce_eager = on_cpu if settings.enforce_eager is None else settings.enforce_eager
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
        quantization="bitsandbytes" if settings.use_8bit else None,
        enforce_eager=enforce_eager,
        disable_log_stats=True,
    )


def cpu_engine_environment() -> dict[str, str]:
    """What the runner adds to the environment of the engine's processes on this machine."""
    if not current_platform.is_cpu():
        return {}
    return cpu_engine_variables(os.environ, len(os.sched_getaffinity(0)))


def sampling_params(request: LLMRequest, vocab_size: int) -> SamplingParams:
    """Raises ValueError, with vLLM's message, for values vLLM refuses (e.g. a temperature above 2)."""
    # -1, 0 and anything from the vocabulary's size up all mean "off"; a top_k
    # beyond 64 bits would not even reach the engine.
    top_k = 0 if request.top_k == -1 or request.top_k >= vocab_size else request.top_k
    try:
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=top_k,
            max_tokens=request.max_tokens,
            output_kind=RequestOutputKind.DELTA,  # only new tokens each step: nothing to diff
        )
    except (VLLMClientError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def tokens_prompt(token_ids: list[int]) -> TokensPrompt:
    return TokensPrompt(prompt_token_ids=token_ids)
