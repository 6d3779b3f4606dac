"""The llm pipeline's settings: pure, no vLLM, read once at start.

The tuning variables the Livepeer docs promise, the engine choices for CPUs and
several machines, and the few vLLM variables whose values the runner derives
others from. The runner builds this object at start (``Pipeline.settings_class``)
and hands it in: nothing else in the pipeline reads the environment. What the
settings mean for this machine is ``pipelines.llm.layout``'s business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import structlog
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipelines.llm.grammar import GRAMMAR_COMPILE_TIMEOUT_DEFAULT
from runner.settings import token_set

log = structlog.get_logger(__name__)

# The ranks vLLM 0.32 takes for max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORAS_DEFAULT_CAP = 8  # the default MAX_LORAS follows LORA_ADAPTERS up to here: each slot reserves device memory
RUNTIME_MAX_LORAS_DEFAULT = 4  # with LORA_RUNTIME_UPDATES, the default leaves room to mix adapters loaded later
# A run-time adapter download's cap: room for a rank-64 adapter of every linear layer of an 8B model in float32
# (about 670 MB); a larger one is refused before a byte of it is fetched.
LORA_MAX_BYTES_DEFAULT = 1 << 30
# Adapters served at once (LORA_ADAPTERS and run-time loads): each one is a model id, files in the store and, when
# used, host memory; twice the default MAX_LORAS cap.
LORA_MAX_ADAPTERS_DEFAULT = 16
NODE_SECRET_MIN_LENGTH = 16  # characters: a secret nobody guesses (openssl rand -hex 16 gives 32)


def parse_adapter_list(text: str) -> tuple[tuple[str, str], ...]:
    """LORA_ADAPTERS: ``name=source`` items, comma separated; each name once."""
    adapters: list[tuple[str, str]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, equals, source = (part.strip() for part in item.partition("="))
        if not equals or not name or not source:
            raise ValueError(
                f"LORA_ADAPTERS item {item.strip()!r} is not name=source: give each adapter a model id and where it "
                "is, a Hub id or a local folder (e.g. LORA_ADAPTERS=sql=org/sql-lora,chat=/adapters/chat)")
        if name in (known for known, _ in adapters):
            raise ValueError(f"LORA_ADAPTERS names {name!r} twice: each adapter needs a model id of its own")
        adapters.append((name, source))
    return tuple(adapters)


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
    # Prompts one /v1/completions request may hold (vLLM's OpenAI server takes at most 1,024); each is an engine
    # sequence of its own (n of them), counted against the admission bound (max_in_flight).
    max_prompts_per_request: int = Field(1024, alias="MAX_PROMPTS_PER_REQUEST", ge=1)
    # Seconds a request's grammar (JSON schema, grammar, regex, structural tag) may take to compile before the
    # engine sees it: past that, refused with 400 and its compile killed (pipelines/llm/grammar.py, docs/limits.md).
    grammar_compile_timeout: float = Field(GRAMMAR_COMPILE_TIMEOUT_DEFAULT, alias="GRAMMAR_COMPILE_TIMEOUT", gt=0)
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
    # The serving node's port for its worker nodes' lines (pipelines.llm.nodes); default MASTER_PORT + 1.
    line_port: int | None = Field(None, alias="NODE_LINE_PORT", ge=1, le=65535)
    # What a worker node proves itself with on its line (pipelines.llm.nodes): the same on every node of an engine.
    node_secret: SecretStr | None = Field(None, alias="NODE_SECRET", repr=False)
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(None, alias="DISTRIBUTED_EXECUTOR_BACKEND")
    ray_address: str | None = Field(None, alias="RAY_ADDRESS", min_length=1)
    # vLLM's own variables, read here because the runner derives its defaults from whether they are set;
    # the engine's processes read them from the environment they inherit.
    vllm_cache_root: Path | None = Field(None, alias="VLLM_CACHE_ROOT")
    vllm_cpu_reserved_cores: int | None = Field(None, alias="VLLM_CPU_NUM_OF_RESERVED_CPU", ge=0)
    vllm_cpu_threads_bind: str = Field("auto", alias="VLLM_CPU_OMP_THREADS_BIND", min_length=1)
    torch_compile_disable: bool | None = Field(None, alias="TORCH_COMPILE_DISABLE")
    # LoRA adapters, each served as a model id of its own on the one base model (docs/lora.md).
    lora_adapters: Annotated[tuple[tuple[str, str], ...], NoDecode] = Field((), alias="LORA_ADAPTERS")
    max_loras: int | None = Field(None, alias="MAX_LORAS", ge=1, description="adapters in one batch")
    max_lora_rank: int | None = Field(None, alias="MAX_LORA_RANK", description="default: from the adapters' configs")
    max_cpu_loras: int | None = Field(None, alias="MAX_CPU_LORAS", ge=1, description="adapters kept in host memory")
    lora_runtime_updates: bool = Field(False, alias="LORA_RUNTIME_UPDATES")
    lora_unload_timeout: float = Field(30.0, alias="LORA_UNLOAD_TIMEOUT", gt=0)
    # Run-time loads (LORA_RUNTIME_UPDATES): where a local lora_path may be (default: the model store, MODEL_DIR),
    # the bytes one Hub download may take, and how many adapters may be served at once.
    lora_root: Path | None = Field(None, alias="LORA_ROOT")
    lora_max_bytes: int = Field(LORA_MAX_BYTES_DEFAULT, alias="LORA_MAX_BYTES", ge=1)
    lora_max_adapters: int = Field(LORA_MAX_ADAPTERS_DEFAULT, alias="LORA_MAX_ADAPTERS", ge=1)
    # The runner's bearer token (the runner checks it): read here only to know that one is set, because
    # LORA_RUNTIME_UPDATES lets a caller load files into the engine and may not be left open.
    auth_token: SecretStr | None = Field(None, alias="AUTH_TOKEN", repr=False)

    @property
    def world_size(self) -> int:
        """Engine ranks over all nodes: one per device."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_world_size(self) -> int:
        """Engine ranks on this node (vLLM splits the world evenly over the nodes)."""
        return max(1, self.world_size // self.nnodes)

    @property
    def node_line_port(self) -> int:
        """Where the serving node listens for its worker nodes' lines: NODE_LINE_PORT, or the port after MASTER_PORT."""
        if self.line_port is not None:
            return self.line_port
        return self.master_port + 1 if self.master_port < 65535 else self.master_port - 1

    @property
    def worker_node(self) -> bool:
        """This runner runs another node's share of the engine's ranks, and serves no requests."""
        return self.node_rank > 0

    @property
    def max_in_flight(self) -> int:
        """Engine sequences admitted at once: running slots plus the queue behind them (as deep as the batch by
        default). A request takes as many as it becomes (prompts x n)."""
        waiting = self.max_num_seqs if self.max_waiting_requests is None else self.max_waiting_requests
        return self.max_num_seqs + waiting

    @property
    def lora_enabled(self) -> bool:
        """The engine is started with room for LoRA adapters."""
        return bool(self.lora_adapters) or self.lora_runtime_updates

    @property
    def lora_slots(self) -> int:
        """MAX_LORAS, or its default: one per adapter listed, at least RUNTIME_MAX_LORAS_DEFAULT for run-time loads."""
        if self.max_loras is not None:
            return self.max_loras
        wanted = max(len(self.lora_adapters), RUNTIME_MAX_LORAS_DEFAULT if self.lora_runtime_updates else 1)
        return min(wanted, MAX_LORAS_DEFAULT_CAP)

    @property
    def lora_cpu_slots(self) -> int:
        """MAX_CPU_LORAS, or its default: every adapter listed stays in host memory."""
        if self.max_cpu_loras is not None:
            return self.max_cpu_loras
        return max(self.lora_slots, len(self.lora_adapters))

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def adapter_list(cls, value):
        return parse_adapter_list(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def lora_fits(self) -> LLMSettings:
        errors = []
        if self.max_lora_rank is not None and self.max_lora_rank not in LORA_RANKS:
            above = [rank for rank in LORA_RANKS if rank >= self.max_lora_rank]
            errors.append(f"MAX_LORA_RANK={self.max_lora_rank} is not a rank vLLM takes "
                          f"({', '.join(map(str, LORA_RANKS))})" + (f": use {above[0]}" if above else ""))
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.lora_slots:
            errors.append(f"MAX_CPU_LORAS={self.max_cpu_loras} is less than MAX_LORAS={self.lora_slots}: the adapters "
                          "of a batch must fit in host memory too; raise MAX_CPU_LORAS or lower MAX_LORAS")
        if self.lora_runtime_updates and not token_set(self.auth_token):
            errors.append("LORA_RUNTIME_UPDATES=true lets callers load adapters into the engine: set AUTH_TOKEN too "
                          "(not empty, not only whitespace: that leaves the runner open), so that only holders of "
                          "the token can")
        if self.lora_runtime_updates and self.lora_root is not None and not self.lora_root.is_dir():
            errors.append(f"LORA_ROOT={self.lora_root} is not a folder: give the folder run-time adapters may be "
                          "loaded from, or leave it unset for the model store (MODEL_DIR)")
        if len(self.lora_adapters) > self.lora_max_adapters:
            errors.append(f"LORA_ADAPTERS lists {len(self.lora_adapters)} adapters, more than LORA_MAX_ADAPTERS="
                          f"{self.lora_max_adapters}: raise LORA_MAX_ADAPTERS or list fewer")
        if self.lora_enabled and self.nnodes > 1 and self.max_lora_rank is None:
            errors.append("LoRA over several nodes needs MAX_LORA_RANK set on every node (all nodes must agree, and "
                          "only the serving node reads the adapters)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def nodes_prove_themselves(self) -> LLMSettings:
        if self.nnodes > 1:
            secret = self.node_secret.get_secret_value().strip() if self.node_secret is not None else ""
            if len(secret) < NODE_SECRET_MIN_LENGTH:
                raise ValueError(
                    f"NNODES={self.nnodes} needs NODE_SECRET, the same secret on every node, of at least "
                    f"{NODE_SECRET_MIN_LENGTH} characters (e.g. the output of `openssl rand -hex 16`): the serving node "
                    "takes a worker node's line only from a node that knows it"
                    + (" (it is unset)" if self.node_secret is None else
                       f" (it has {len(secret)} characters that are not blank)"))
        return self

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
