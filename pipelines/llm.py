"""The ``llm`` pipeline: chat completions from a vLLM engine (``AsyncLLM``).

This is the serving logic between the protocol models and the engine: it checks
a request, renders the chat template to token ids, and turns the engine's delta
outputs into one reply or a stream of events. HTTP is the runner's business.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from jinja2 import TemplateError
from pydantic import Field, ValidationError, model_validator
from pydantic_core import to_json
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.base import EngineLoad, EventStream, Operation, OperationError, Pipeline, RequestContext
from pipelines.model_store import resolve_model
from runner.hardware import NVML
from runner.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = structlog.get_logger(__name__)

ROLES = ("system", "user", "assistant")
# go-livepeer kills a container 8 s after SIGTERM and the runner drains for up to
# DRAIN_TIMEOUT (5 s) first: the engine's processes get 2 s to exit, not vLLM's 5.
ENGINE_SHUTDOWN_TIMEOUT = 2.0
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


class LLMPipeline(Pipeline):
    name = "llm"

    def __init__(self, model_id: str, model_dir: Path) -> None:
        super().__init__(model_id, model_dir)
        try:
            self.settings: LLMSettings | None = LLMSettings()
            self.settings_error = None
        except ValidationError as exc:  # reported by load(), so /health says ERROR with the reason
            self.settings, self.settings_error = None, exc
        self.vllm = None  # pipelines.vllm_engine, imported by load(): importing vLLM takes seconds
        self.engine: AsyncLLM | None = None
        self.submitted = 0
        self.tokenizer = None
        self.max_model_len = 0
        self.vocab_size = 0

    def operations(self) -> Mapping[str, Operation]:
        return {"genLLM": self.generate}

    def max_in_flight(self) -> int | None:
        return self.settings.max_in_flight if self.settings else None

    async def load(self) -> None:
        if self.settings_error is not None:
            raise ValueError(f"invalid settings: {self.settings_error}")
        settings = self.settings
        nvml = NVML()
        gpus = nvml.device_count()
        nvml.close()
        if settings.use_8bit and not gpus:
            raise ValueError("USE_8BIT needs an NVIDIA GPU (bitsandbytes); this machine has none")
        # Importing vLLM takes seconds: let a download (or a quick failure to find the model) overlap it.
        self.vllm, model_path = await asyncio.gather(
            asyncio.to_thread(importlib.import_module, "pipelines.vllm_engine"),
            asyncio.to_thread(resolve_model, self.model_id, self.model_dir),
        )
        model_config = json.loads((model_path / "config.json").read_text())
        errors = parallelism_errors(settings, model_config, gpus)
        if errors:
            raise ValueError("; ".join(errors))
        args = self.vllm.engine_args(settings, model_path, self.model_id, model_config)
        environment = self.vllm.cpu_engine_environment()
        os.environ.update(environment)  # the engine's processes inherit it
        log.info(
            "engine.start",
            environment=environment,
            model_path=str(model_path),
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            kv_cache_bytes=args.kv_cache_memory_bytes,
            max_model_len=args.max_model_len,
        )
        # Building the engine blocks for as long as its worker takes to start:
        # off the event loop, so /health keeps answering LOADING.
        self.engine = await asyncio.to_thread(self.vllm.AsyncLLM.from_engine_args, args)
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = self.engine.model_config.max_model_len
        self.vocab_size = self.engine.model_config.get_vocab_size()
        await self.warm_up()

    async def warm_up(self) -> None:
        request = LLMRequest(messages=[LLMMessage(role="user", content="Hello")], max_tokens=4, temperature=0)
        reply = await self.generate(request, RequestContext(request_id="warm-up"))
        log.info("engine.warm", completion_tokens=reply.usage.completion_tokens)

    def failure(self) -> str | None:
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine has stopped (its worker process died or failed)"
        return None

    def engine_load(self) -> EngineLoad:
        unfinished = self.engine.get_num_unfinished_requests() if self.engine else 0
        batch_size = self.settings.max_num_seqs if self.settings else 0
        return EngineLoad(unfinished=unfinished, submitted=self.submitted, batch_size=batch_size)

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown, ENGINE_SHUTDOWN_TIMEOUT)

    def prompt_token_ids(self, messages: list[LLMMessage]) -> list[int]:
        conversation = [{"role": message.role, "content": message.content} for message in messages]
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # e.g. templates that insist user and assistant alternate
            raise OperationError(f"the model's chat template refuses these messages: {exc}") from None
        # The template already holds any BOS it wants: encoding it with special
        # tokens again would put a second one in front.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, request: LLMRequest) -> tuple[list[int], SamplingParams]:
        """Everything that makes a request unservable, found before the engine sees it."""
        if request.model and request.model != self.model_id:
            raise OperationError(f"model {request.model!r} is not served here; this runner serves {self.model_id!r}")
        if not request.messages:
            raise OperationError("messages must hold at least one message")
        for index, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise OperationError(
                    f"messages[{index}].role is {message.role!r}; it must be one of {', '.join(ROLES)}"
                )
        prompt = self.prompt_token_ids(request.messages)
        if len(prompt) + request.max_tokens > self.max_model_len:
            raise OperationError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {request.max_tokens}: "
                f"{len(prompt) + request.max_tokens} is more than this model's limit of "
                f"{self.max_model_len} tokens (MAX_MODEL_LEN)"
            )
        try:
            sampling = self.vllm.sampling_params(request, self.vocab_size)
        except ValueError as exc:  # the spec allows what vLLM refuses, e.g. a temperature above 2
            raise OperationError(str(exc)) from None
        return prompt, sampling

    async def generate(self, request: LLMRequest, context: RequestContext) -> LLMResponse | EventStream:
        prompt, sampling = self.check(request)
        context.prompt_tokens = len(prompt)
        self.submitted += 1
        outputs = self.engine.generate(self.vllm.tokens_prompt(prompt), sampling, uuid.uuid4().hex)
        reply = ReplyBuilder(self.model_id, context)
        if request.stream:
            return EventStream(events=reply.events(outputs), error_event=reply.error_event)
        return await reply.whole(outputs)


class ReplyBuilder:
    """Turns one request's engine outputs into LLMResponse documents."""

    def __init__(self, model: str, context: RequestContext) -> None:
        self.completion_id = f"chatcmpl-{context.request_id}"
        self.model = model
        self.context = context
        self.created = int(time.time())
        self.text_event_head = b'{"id":%s,"model":%s,"created":%d,"usage":{"prompt_tokens":' % (
            to_json(self.completion_id), to_json(model), self.created
        )

    def usage(self) -> LLMTokenUsage:
        prompt, completion = self.context.prompt_tokens, self.context.completion_tokens
        return LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, choice: LLMChoice) -> LLMResponse:
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created, usage=self.usage(), choices=[choice]
        )

    def chunk(self, content: str, finish_reason: str = "") -> LLMResponse:
        delta = LLMMessage(role="assistant", content=content)
        return self.response(LLMChoice(index=0, delta=delta, finish_reason=finish_reason))

    def text_event(self, content: str) -> bytes:
        """``chunk(content)`` as the JSON bytes pydantic would write, built without models.

        This runs once per token for every stream: four models and their
        serialisation cost several times what these few byte operations do.
        ``to_json`` escapes the text as pydantic does.
        """
        prompt_tokens, completion_tokens = self.context.prompt_tokens, self.context.completion_tokens
        return self.text_event_head + (
            b'%d,"completion_tokens":%d,"total_tokens":%d},'
            b'"choices":[{"index":0,"finish_reason":"","delta":{"role":"assistant","content":%s}}]}'
        ) % (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, to_json(content))

    def error_event(self, msg: str) -> LLMResponse:
        return self.chunk("", finish_reason="error")

    def count(self, output: RequestOutput) -> str:
        if output.prompt_token_ids is not None:  # what the engine saw, not what we meant to send
            self.context.prompt_tokens = len(output.prompt_token_ids)
        completion = output.outputs[0]
        self.context.count_tokens(len(completion.token_ids))
        if output.finished:
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"the engine ended the request early ({completion.finish_reason})")
            self.context.finish_reason = completion.finish_reason
        return completion.text

    async def whole(self, outputs: AsyncIterator[RequestOutput]) -> LLMResponse:
        parts = [self.count(output) async for output in outputs]
        message = LLMMessage(role="assistant", content="".join(parts))
        return self.response(LLMChoice(index=0, message=message, finish_reason=self.context.finish_reason))

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[LLMResponse | bytes]:
        try:
            async for output in outputs:
                text = self.count(output)
                if text:
                    yield self.text_event(text)
                if output.finished:
                    yield self.chunk("", finish_reason=self.context.finish_reason)
        finally:
            await outputs.aclose()  # aborts the engine request if the stream stopped early
