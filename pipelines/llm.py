"""The ``llm`` pipeline: chat completions from a vLLM engine (``AsyncLLM``).

This is the serving logic between the protocol models and the engine: it checks
a request, renders the chat template to token ids, and turns the engine's delta
outputs into one reply or a stream of events. HTTP is the runner's business.
"""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from pydantic import Field, model_validator
from pydantic_core import to_json
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.base import EngineLoad, EventStream, Operation, OperationError, Pipeline
from pipelines.model_store import resolve_model
from runner.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = structlog.get_logger(__name__)

ROLES = ("system", "user", "assistant")


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


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def model(self) -> LLMTokenUsage:
        return LLMTokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


class LLMPipeline(Pipeline):
    name = "llm"

    def __init__(self, model_id: str, model_dir: Path) -> None:
        super().__init__(model_id, model_dir)
        self.vllm = None  # pipelines.vllm_engine, imported by load(): importing vLLM takes seconds
        self.engine: AsyncLLM | None = None
        self.submitted = 0
        self.tokenizer = None
        self.max_model_len = 0

    def operations(self) -> Mapping[str, Operation]:
        return {"genLLM": self.generate}

    async def load(self) -> None:
        settings = LLMSettings()
        self.vllm = await asyncio.to_thread(importlib.import_module, "pipelines.vllm_engine")
        model_path = await asyncio.to_thread(resolve_model, self.model_id, self.model_dir)
        args = self.vllm.engine_args(settings, model_path, self.model_id)
        log.info(
            "engine.start",
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
        await self.warm_up()

    async def warm_up(self) -> None:
        request = LLMRequest(messages=[LLMMessage(role="user", content="Hello")], max_tokens=4, temperature=0)
        reply = await self.generate(request, "warm-up")
        log.info("engine.warm", completion_tokens=reply.usage.completion_tokens)

    def failure(self) -> str | None:
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine has stopped (its worker process died or failed)"
        return None

    def engine_load(self) -> EngineLoad:
        unfinished = self.engine.get_num_unfinished_requests() if self.engine else 0
        return EngineLoad(unfinished=unfinished, submitted=self.submitted)

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    def prompt_token_ids(self, messages: list[LLMMessage]) -> list[int]:
        conversation = [{"role": message.role, "content": message.content} for message in messages]
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template already holds any BOS it wants: encoding it with special
        # tokens again would put a second one in front.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, request: LLMRequest) -> list[int]:
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
        return prompt

    async def generate(self, request: LLMRequest, request_id: str) -> LLMResponse | EventStream:
        prompt = self.check(request)
        self.submitted += 1
        outputs = self.engine.generate(
            self.vllm.tokens_prompt(prompt), self.vllm.sampling_params(request), uuid.uuid4().hex
        )
        reply = ReplyBuilder(f"chatcmpl-{request_id}", self.model_id, Usage(prompt_tokens=len(prompt)))
        if request.stream:
            return EventStream(events=reply.events(outputs), error_event=reply.error_event)
        return await reply.whole(outputs)


class ReplyBuilder:
    """Turns one request's engine outputs into LLMResponse documents."""

    def __init__(self, completion_id: str, model: str, usage: Usage) -> None:
        self.completion_id = completion_id
        self.model = model
        self.usage = usage
        self.created = int(time.time())
        self.text_event_head = b'{"id":%s,"model":%s,"created":%d,"usage":{"prompt_tokens":' % (
            to_json(completion_id), to_json(model), self.created
        )

    def response(self, choice: LLMChoice) -> LLMResponse:
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created, usage=self.usage.model(), choices=[choice]
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
        prompt_tokens, completion_tokens = self.usage.prompt_tokens, self.usage.completion_tokens
        return self.text_event_head + (
            b'%d,"completion_tokens":%d,"total_tokens":%d},'
            b'"choices":[{"index":0,"finish_reason":"","delta":{"role":"assistant","content":%s}}]}'
        ) % (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, to_json(content))

    def error_event(self, msg: str) -> LLMResponse:
        log.error("llm.stream_error", msg=msg, completion_tokens=self.usage.completion_tokens)
        return self.chunk("", finish_reason="error")

    def count(self, output: RequestOutput) -> str:
        if output.prompt_token_ids is not None:  # what the engine saw, not what we meant to send
            self.usage.prompt_tokens = len(output.prompt_token_ids)
        completion = output.outputs[0]
        self.usage.completion_tokens += len(completion.token_ids)
        if output.finished and completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"the engine ended the request early ({completion.finish_reason})")
        return completion.text

    async def whole(self, outputs: AsyncIterator[RequestOutput]) -> LLMResponse:
        parts = []
        finish_reason = ""
        async for output in outputs:
            parts.append(self.count(output))
            if output.finished:
                finish_reason = output.outputs[0].finish_reason
        message = LLMMessage(role="assistant", content="".join(parts))
        return self.response(LLMChoice(index=0, message=message, finish_reason=finish_reason))

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[LLMResponse | bytes]:
        try:
            async for output in outputs:
                text = self.count(output)
                if text:
                    yield self.text_event(text)
                if output.finished:
                    yield self.chunk("", finish_reason=output.outputs[0].finish_reason)
        finally:
            await outputs.aclose()  # aborts the engine request if the stream stopped early
