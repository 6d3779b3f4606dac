"""The ``llm`` pipeline: chat completions from a vLLM engine.

This is the serving logic between the protocol models and the engine: it checks
a request, renders the chat template to token ids, and turns the engine's delta
outputs into one reply or a stream of events. HTTP is the runner's business;
the engine is ``pipelines.vllm_engine``'s, imported once loading starts.
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

import prometheus_client
import structlog
from jinja2 import TemplateError
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_core import to_json

from pipelines import llm_schema
from pipelines.llm_schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from pipelines.llm_openai import OpenAIServing
from pipelines.llm_settings import (
    LLMSettings,
    distributed_errors,
    engine_cache_variables,
    parallelism_errors,
    tool_parser_for_template,
)
from pipelines.model_store import resolve_model
from pipelines.sampling import Sampling
from pipelines.worker_node import WorkerNode, watch_worker_nodes
from runner.hardware import NVML
from runner.pipeline import EngineLoad, EventStream, OperationError, Pipeline, RequestContext, Serve, run_blocking

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput

    from pipelines.vllm_engine import VLLMEngine

log = structlog.get_logger(__name__)

ROLES = ("system", "user", "assistant")


class LLMPipeline(Pipeline):
    name = "llm"
    OPERATIONS = llm_schema.OPERATIONS

    def __init__(self, model_id: str, model_dir: Path) -> None:
        super().__init__(model_id, model_dir)
        try:
            self.settings: LLMSettings | None = LLMSettings()
            self.settings_error = None
        except ValidationError as exc:  # reported by load(), so /health says ERROR with the reason
            self.settings, self.settings_error = None, exc
        self.engine: VLLMEngine | None = None
        self.engine_module = None  # pipelines.vllm_engine, once load() has imported it
        self.worker_node: WorkerNode | None = None  # NODE_RANK > 0: this node's ranks, no engine to serve from
        self.node_watch: asyncio.Task | None = None  # NODE_RANK=0 of several: watches the other nodes' ranks
        self.node_error: str | None = None
        self.starting = False  # the engine's processes are being started
        self.submitted = 0
        self.tool_parser = None  # the vLLM tool-call parser for tool_choice "auto", when one fits the model
        self.openai = OpenAIServing(self)

    def operations(self) -> Mapping[str, Serve]:
        if self.settings is not None and self.settings.worker_node:
            return {operation.operation_id: self.refuse_on_worker_node for operation in self.OPERATIONS}
        return {
            "genLLM": self.generate,
            "createChatCompletion": self.openai.chat_completion,
            "createCompletion": self.openai.completion,
            "listModels": self.openai.list_models,
            "retrieveModel": self.openai.retrieve_model,
        }

    async def refuse_on_worker_node(self, _body, _context: RequestContext):
        settings = self.settings
        raise OperationError(
            f"this runner is worker node {settings.node_rank} of {settings.nnodes} (NODE_RANK={settings.node_rank}): "
            f"it runs engine ranks and serves no requests; send them to the serving node (NODE_RANK=0, "
            f"{settings.master_addr})", status=503)

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
        engine_module, model_path = await asyncio.gather(
            run_blocking(importlib.import_module, "pipelines.vllm_engine"),
            run_blocking(resolve_model, self.model_id, self.model_dir),
        )
        self.engine_module = engine_module
        model_config = json.loads((model_path / "config.json").read_text())
        on_cpu = engine_module.platform() == "cpu"
        devices, device = (len(os.sched_getaffinity(0)), "core") if on_cpu else (gpus, "GPU")
        errors = parallelism_errors(settings, model_config, devices, device)
        errors += distributed_errors(settings, on_cpu, os.environ)
        if errors:
            raise ValueError("; ".join(errors))
        args = engine_module.engine_args(settings, model_path, self.model_id, model_config)
        environment = engine_cache_variables(os.environ, self.model_dir)
        environment.update(engine_module.cpu_engine_environment(settings.local_world_size))
        os.environ.update(environment)  # the engine's processes inherit it
        if settings.worker_node:
            log.info("worker_node.environment", environment=environment)
            self.worker_node = WorkerNode(settings, model_path, self.model_id)
            await self.worker_node.start()
            return
        log.info(
            "engine.start",
            platform=engine_module.platform(),
            environment=environment,
            model_path=str(model_path),
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            enable_prefix_caching=args.enable_prefix_caching,
            stream_interval=args.stream_interval,
            kv_cache_bytes=args.kv_cache_memory_bytes,
            max_model_len=args.max_model_len,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
        )
        # Building the engine blocks for as long as its processes take to start:
        # off the event loop, so /health keeps answering LOADING.
        # Until the engine is up, close() must stop what the start has begun, also if this load is cancelled.
        self.starting = True
        if settings.nnodes > 1:
            try:
                async with asyncio.timeout(settings.master_wait_timeout):
                    self.engine = await run_blocking(engine_module.VLLMEngine.start, args)
            except TimeoutError:
                await run_blocking(engine_module.stop_engine_processes, 1.0)
                raise ValueError(
                    f"the engine's {settings.world_size - settings.local_world_size} ranks on the other nodes did not "
                    f"join within MASTER_WAIT_TIMEOUT ({settings.master_wait_timeout:g} s): start the worker nodes "
                    f"(NODE_RANK=1..{settings.nnodes - 1}) with MASTER_ADDR={settings.master_addr} and "
                    f"MASTER_PORT={settings.master_port}, or raise MASTER_WAIT_TIMEOUT") from None
        else:
            self.engine = await run_blocking(engine_module.VLLMEngine.start, args)
        self.starting = False
        self.tool_parser = self.choose_tool_parser(engine_module)
        await self.warm_up()
        if settings.nnodes > 1:
            self.node_watch = asyncio.create_task(watch_worker_nodes(settings, self.lose_worker_node))

    def lose_worker_node(self, reason: str) -> None:
        log.error("serving_node.worker_node_lost", reason=reason)
        self.node_error = reason

    def choose_tool_parser(self, engine_module):
        """TOOL_CALL_PARSER, or the parser the chat template's tool-call syntax names; None when none fits."""
        names = engine_module.tool_parser_names()
        name = self.settings.tool_call_parser
        if name is not None and name not in names:
            raise ValueError(f"TOOL_CALL_PARSER={name!r} is not one of vLLM's tool-call parsers: {', '.join(names)}")
        if name is None:
            name = tool_parser_for_template(getattr(self.engine.tokenizer, "chat_template", None) or "")
        log.info("engine.tool_parser", name=name, chosen_by="TOOL_CALL_PARSER" if self.settings.tool_call_parser else "chat template")
        return None if name is None else self.engine.tool_parser(name)

    async def warm_up(self) -> None:
        request = LLMRequest(messages=[LLMMessage(role="user", content="Hello")], max_tokens=4, temperature=0)
        reply = await self.generate(request, RequestContext(request_id="warm-up"))
        log.info("engine.warm", completion_tokens=reply.usage.completion_tokens)

    def failure(self) -> str | None:
        if self.worker_node is not None:
            return self.worker_node.error
        if self.node_error is not None:
            return self.node_error
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine has stopped (its worker process died or failed)"
        return None

    def engine_load(self) -> EngineLoad:
        unfinished = self.engine.unfinished_requests() if self.engine else 0
        batch_size = self.settings.max_num_seqs if self.settings else 0
        return EngineLoad(unfinished=unfinished, submitted=self.submitted, batch_size=batch_size)

    def metrics_registry(self) -> CollectorRegistry | None:
        """vLLM's own series (vllm:*): its PrometheusStatLogger registers them in the global registry."""
        return prometheus_client.REGISTRY if self.engine is not None else None

    async def close(self) -> None:
        if self.node_watch is not None:
            self.node_watch.cancel()
        if self.worker_node is not None:
            await self.worker_node.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await run_blocking(engine.shutdown)
        elif self.starting:  # stopped, or failed, while the engine was starting: end what it had started
            stopped = await run_blocking(self.engine_module.stop_engine_processes, 1.0)  # nothing to save in a half-started engine
            log.info("engine.start_stopped", processes=stopped)

    def render_chat(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The one chat-template step of every operation: the conversation as prompt token ids."""
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                conversation, tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:  # e.g. templates that insist user and assistant alternate
            raise OperationError(f"the model's chat template refuses these messages: {exc}", param="messages") from None
        # The template already holds any BOS it wants: encoding it with special
        # tokens again would put a second one in front.
        return tokenizer.encode(text, add_special_tokens=False)

    def start_generation(
        self, prompt: list[int], sampling: Sampling, context: RequestContext, length_param: str = "max_tokens"
    ) -> AsyncIterator[RequestOutput]:
        """Hand one prompt to the engine, after the checks every operation shares."""
        max_model_len = self.engine.max_model_len
        if len(prompt) + sampling.max_tokens > max_model_len:
            raise OperationError(
                f"the prompt is {len(prompt)} tokens and {length_param} is {sampling.max_tokens}: "
                f"{len(prompt) + sampling.max_tokens} is more than this model's limit of "
                f"{max_model_len} tokens (MAX_MODEL_LEN)",
                param=length_param,
                code="context_length_exceeded",
            )
        try:
            params = self.engine.sampling_params(sampling)
        except ValueError as exc:  # the spec allows what vLLM refuses, e.g. a temperature above 2
            raise OperationError(str(exc)) from None
        context.prompt_tokens += len(prompt)
        self.submitted += 1
        return self.engine.generate(prompt, params, uuid.uuid4().hex)

    def check(self, request: LLMRequest) -> list[dict]:
        """Everything that makes an /llm request unservable, found before the engine sees it."""
        if request.model and request.model != self.model_id:
            raise OperationError(f"model {request.model!r} is not served here; this runner serves {self.model_id!r}")
        if not request.messages:
            raise OperationError("messages must hold at least one message")
        for index, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise OperationError(
                    f"messages[{index}].role is {message.role!r}; it must be one of {', '.join(ROLES)}"
                )
        return [{"role": message.role, "content": message.content} for message in request.messages]

    async def generate(self, request: LLMRequest, context: RequestContext) -> LLMResponse | EventStream:
        prompt = self.render_chat(self.check(request))
        sampling = Sampling(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k
        )
        outputs = self.start_generation(prompt, sampling, context)
        reply = ReplyBuilder(self.model_id, context)
        if request.stream:
            return EventStream(events=reply.events(outputs), error_event=reply.error_event)
        return await reply.whole(outputs)


class ReplyBuilder:
    """Turns one request's engine outputs into an LLMResponse, or a stream of them as JSON bytes."""

    def __init__(self, model: str, context: RequestContext) -> None:
        self.completion_id = f"chatcmpl-{context.request_id}"
        self.model = model
        self.context = context
        self.created = int(time.time())
        self.event_head = b'{"id":%s,"model":%s,"created":%d,"usage":{"prompt_tokens":' % (
            to_json(self.completion_id), to_json(model), self.created
        )

    def usage(self) -> LLMTokenUsage:
        prompt, completion = self.context.prompt_tokens, self.context.completion_tokens
        return LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, choice: LLMChoice) -> LLMResponse:
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created, usage=self.usage(), choices=[choice]
        )

    def event(self, content: str, finish_reason: str = "", error: str | None = None) -> bytes:
        """One stream event, as the JSON bytes pydantic would write of its LLMResponse.

        Every event of a stream is built here, without models: this runs once
        per token for every stream, and four models and their serialisation
        cost several times what these few byte operations do. ``to_json``
        escapes text as pydantic does; the running ``usage`` is read now.
        """
        prompt_tokens, completion_tokens = self.context.prompt_tokens, self.context.completion_tokens
        document = self.event_head + (
            b'%d,"completion_tokens":%d,"total_tokens":%d},'
            b'"choices":[{"index":0,"finish_reason":%s,"delta":{"role":"assistant","content":%s}}]'
        ) % (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, to_json(finish_reason),
             to_json(content))
        if error is not None:
            document += b',"error":{"msg":%s}' % to_json(error)
        return document + b"}"

    def error_event(self, reason: str) -> bytes:
        """The in-band ending of a failed stream: one choice, empty content, finish_reason "error"."""
        return self.event("", finish_reason="error", error=reason)

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

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
        try:
            async for output in outputs:
                text = self.count(output)
                if text:
                    yield self.event(text)
                if output.finished:
                    yield self.event("", finish_reason=self.context.finish_reason)
        finally:
            await outputs.aclose()  # aborts the engine request if the stream stopped early
