"""The llm pipeline's settings: pure, no vLLM, read once at start.

The tuning variables the Livepeer docs promise, the engine choices for CPUs and
several machines, and the few vLLM variables whose values the runner derives
others from. The runner builds this object at start (``Pipeline.settings_class``)
and hands it in: nothing else in the pipeline reads the environment. What the
settings mean for this machine is ``pipelines.llm.layout``'s business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import structlog
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger(__name__)


class LLMSettings(BaseSettings):
    """The tuning variables the Livepeer docs promise, plus engine choices for CPUs."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

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
    enable_prefix_caching: bool = Field(True, alias="ENABLE_PREFIX_CACHING")
    # Tokens the engine gathers per stream before it hands them on (its first and last always at once):
    # fewer, larger stream events, for less front-end CPU per token at the cost of coarser arrival.
    stream_interval: int = Field(1, alias="STREAM_INTERVAL", ge=1)
    max_waiting_requests: int | None = Field(None, alias="MAX_WAITING_REQUESTS", ge=0)
    tool_call_parser: str | None = Field(
        None, alias="TOOL_CALL_PARSER", min_length=1,
        description="vLLM's tool-call parser for tool_choice 'auto' (default: chosen from the chat template)",
    )
    reasoning_parser: str | None = Field(
        None, alias="REASONING_PARSER", min_length=1,
        description="vLLM's reasoning parser, which tells a model's thinking from its answer (default: chosen from "
                    "the chat template; none for a template that names no thinking syntax)",
    )
    # Several machines, vLLM's meanings: NODE_RANK 0 serves HTTP and hosts the rendezvous at MASTER_ADDR:MASTER_PORT.
    nnodes: int = Field(1, alias="NNODES", ge=1)
    node_rank: int = Field(0, alias="NODE_RANK", ge=0)
    master_addr: str = Field("127.0.0.1", alias="MASTER_ADDR", min_length=1)
    master_port: int = Field(29501, alias="MASTER_PORT", ge=1, le=65535)
    master_wait_timeout: float = Field(300.0, alias="MASTER_WAIT_TIMEOUT", gt=0)
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(None, alias="DISTRIBUTED_EXECUTOR_BACKEND")
    ray_address: str | None = Field(None, alias="RAY_ADDRESS", min_length=1)
    # vLLM's own variables, read here because the runner derives its defaults from whether they are set;
    # the engine's processes read them from the environment they inherit.
    vllm_cache_root: Path | None = Field(None, alias="VLLM_CACHE_ROOT")
    vllm_cpu_reserved_cores: int | None = Field(None, alias="VLLM_CPU_NUM_OF_RESERVED_CPU", ge=0)
    vllm_cpu_threads_bind: str = Field("auto", alias="VLLM_CPU_OMP_THREADS_BIND", min_length=1)

    @property
    def world_size(self) -> int:
        """Engine ranks over all nodes: one per device."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_world_size(self) -> int:
        """Engine ranks on this node (vLLM splits the world evenly over the nodes)."""
        return max(1, self.world_size // self.nnodes)

    @property
    def worker_node(self) -> bool:
        """This runner runs another node's share of the engine's ranks, and serves no requests."""
        return self.node_rank > 0

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
