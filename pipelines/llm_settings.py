"""The llm pipeline's settings and the engine sizes that follow from them: pure, no vLLM.

The tuning variables the Livepeer docs promise, plus the engine choices for
CPUs; every rule here is checked without an engine (tests/pipelines/test_llm_settings.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger(__name__)

GiB = 1024**3
CPU_KV_CACHE_SHARE = 0.25  # of the machine's RAM
CPU_KV_CACHE_MAX_BYTES = 4 * GiB
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
SMALL_MACHINE_CORES = 4  # and fewer: vLLM's worker gets every core (cpu_engine_variables)


class LLMSettings(BaseSettings):
    """The tuning variables the Livepeer docs promise, plus engine choices for CPUs."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    use_8bit: bool = Field(False, alias="USE_8BIT")
    pipeline_parallel_size: int = Field(1, alias="PIPELINE_PARALLEL_SIZE", ge=1)
    tensor_parallel_size: int = Field(1, alias="TENSOR_PARALLEL_SIZE", ge=1)
    max_model_len: int = Field(8192, alias="MAX_MODEL_LEN", ge=16)
    max_num_batched_tokens: int = Field(8192, alias="MAX_NUM_BATCHED_TOKENS", ge=1)
    max_num_seqs: int = Field(128, alias="MAX_NUM_SEQS", ge=1)
    gpu_memory_utilization: float = Field(0.85, alias="GPU_MEMORY_UTILIZATION", gt=0, le=1)
    dtype: str = Field("auto", alias="DTYPE")
    enforce_eager: bool | None = Field(None, alias="ENFORCE_EAGER")
    kv_cache_gib: float | None = Field(None, alias="KV_CACHE_GIB", gt=0)
    max_waiting_requests: int | None = Field(None, alias="MAX_WAITING_REQUESTS", ge=0)
    tool_call_parser: str | None = Field(
        None, alias="TOOL_CALL_PARSER", min_length=1,
        description="vLLM's tool-call parser for tool_choice 'auto' (default: chosen from the chat template)",
    )

    @property
    def max_in_flight(self) -> int:
        """Running slots plus the queue behind them (as deep as the batch by default)."""
        waiting = self.max_num_seqs if self.max_waiting_requests is None else self.max_waiting_requests
        return self.max_num_seqs + waiting

    @model_validator(mode="after")
    def batch_holds_longest_sequence(self) -> LLMSettings:
        if self.max_num_batched_tokens < self.max_model_len:
            log.warning(
                "settings.max_num_batched_tokens.raised",
                was=self.max_num_batched_tokens,
                now=self.max_model_len,
                why="MAX_NUM_BATCHED_TOKENS must be at least MAX_MODEL_LEN",
            )
            self.max_num_batched_tokens = self.max_model_len
        return self


def parallelism_errors(settings: LLMSettings, model_config: dict, gpus: int) -> list[str]:
    """What stops the engine from splitting this model the way the settings ask."""
    text_config = model_config.get("text_config", model_config)
    heads = text_config.get("num_attention_heads")
    layers = text_config.get("num_hidden_layers")
    tensor, pipeline = settings.tensor_parallel_size, settings.pipeline_parallel_size
    errors = []
    if heads and heads % tensor:
        errors.append(f"TENSOR_PARALLEL_SIZE={tensor} must divide the model's {heads} attention heads")
    if layers and pipeline > layers:
        errors.append(f"PIPELINE_PARALLEL_SIZE={pipeline} is more than the model's {layers} layers")
    if tensor * pipeline > 1 and tensor * pipeline > gpus:
        errors.append(
            f"TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = {tensor * pipeline} GPUs, "
            f"but this machine has {gpus}"
        )
    return errors


def kv_bytes_per_token(model_config: dict, dtype: str) -> int | None:
    """Keys and values of one token in every layer, or None where the config does not say."""
    text_config = model_config.get("text_config", model_config)
    layers = text_config.get("num_hidden_layers")
    heads = text_config.get("num_attention_heads")
    kv_heads = text_config.get("num_key_value_heads") or heads
    head_dim = text_config.get("head_dim")
    if not head_dim and heads and text_config.get("hidden_size"):
        head_dim = text_config["hidden_size"] // heads
    if not (layers and kv_heads and head_dim and dtype in DTYPE_BYTES):
        return None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def cpu_kv_cache_bytes(settings: LLMSettings, model_config: dict, dtype: str, total_ram: int) -> int:
    """The CPU KV cache's size when KV_CACHE_GIB is unset.

    Sized from the model and the settings, never from the RAM free at the moment,
    so that the same settings give the same capacity on every start, whatever
    else is starting beside it: room for MAX_NUM_SEQS sequences of MAX_MODEL_LEN
    tokens, at most a quarter of the machine's RAM and 4 GiB, and never less than
    one sequence of MAX_MODEL_LEN tokens (vLLM refuses to start with less).
    """
    cap = min(int(total_ram * CPU_KV_CACHE_SHARE), CPU_KV_CACHE_MAX_BYTES)
    per_token = kv_bytes_per_token(model_config, dtype)
    if per_token is None:
        return cap
    one_sequence = per_token * settings.max_model_len
    return max(min(one_sequence * settings.max_num_seqs, cap), one_sequence)


def cpu_engine_variables(environ: Mapping[str, str], cores: int) -> dict[str, str]:
    """vLLM CPU-backend variables the runner sets where the user has not: none, or one.

    vLLM keeps one core out of its worker's thread team, for its scheduler
    process. On a small machine that is a large share of the compute: on two
    cores, letting the worker use both raised tokens per second by 45 to 67 %
    and halved time to first token (the runner at concurrency 1, 32 and 64).
    """
    if cores > SMALL_MACHINE_CORES or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return {}
    if environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":  # the user placed the threads
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# A chat template's tool-call syntax, and vLLM's parser for it (first match wins).
TOOL_CALL_SYNTAX = (
    ("<tool_call>", "hermes"),  # Qwen 2.5, Hermes, SmolLM3 and most others
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 to 3.3
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "granite"),
)


def tool_parser_for_template(chat_template: str) -> str | None:
    """The tool-call parser that fits a chat template, or None for a template that knows no tools."""
    for marker, name in TOOL_CALL_SYNTAX:
        if marker in chat_template:
            return name
    return None
