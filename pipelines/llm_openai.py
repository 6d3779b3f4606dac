"""The OpenAI operations of the llm pipeline: /v1/chat/completions, /v1/completions, /v1/models.

Serving logic only, as pipelines/llm.py is for /llm: an OpenAI request becomes
a conversation for the pipeline's one chat-template step (``render_chat``) and a
``Sampling`` for its one path into the engine (``start_generation``); the
engine's delta outputs become OpenAI's documents, or its chunks as JSON bytes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydantic_core import to_json

from pipelines.llm_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatToolCall,
    ChatToolCallFunction,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    Model,
    ModelList,
    TokenLogprob,
    TopLogprob,
)
from pipelines.sampling import Sampling
from runner.pipeline import EventStream, OperationError, RequestContext

if TYPE_CHECKING:
    from vllm.outputs import CompletionOutput, RequestOutput

    from pipelines.llm import LLMPipeline

log = structlog.get_logger(__name__)

# OpenAI's roles, as the chat templates know them: "developer" is OpenAI's newer name for "system".
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def not_served(model: str, served: str) -> OperationError:
    return OperationError(
        f"The model '{model}' does not exist; this runner serves '{served}'",
        status=404, param="model", code="model_not_found",
    )


def bad(msg: str, param: str | None = None) -> OperationError:
    return OperationError(msg, status=400, param=param)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def usage_of(context: RequestContext) -> CompletionUsage:
    prompt, completion = context.prompt_tokens, context.completion_tokens
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def usage_bytes(context: RequestContext) -> bytes:
    prompt, completion = context.prompt_tokens, context.completion_tokens
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, completion, prompt + completion)


def error_event(reason: str) -> bytes:
    """The in-band ending of a failed stream, in the shape the OpenAI SDKs raise as an APIError."""
    return b'{"error":{"message":%s,"type":"server_error","param":null,"code":null}}' % to_json(reason)


class ChunkEnvelope:
    """What every streamed chunk of one OpenAI answer shares, prebuilt once per request as bytes."""

    def __init__(self, object_name: str, answer_id: str, created: int, model: str, include_usage: bool) -> None:
        self.head = b'{"id":%s,"object":%s,"created":%d,"model":%s,"choices":[' % (
            to_json(answer_id), to_json(object_name), created, to_json(model)
        )
        self.tail = b'],"usage":null}' if include_usage else b"]}"
        self.include_usage = include_usage

    def chunk(self, choice: bytes) -> bytes:
        return self.head + choice + self.tail

    def usage_chunk(self, context: RequestContext) -> bytes:
        """The last chunk when stream_options.include_usage asks for it: no choices, the usage."""
        return self.head + b'],"usage":' + usage_bytes(context) + b"}"


def include_usage(request: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


@dataclass
class ToolPlan:
    """How a chat request's tools shape its generation and its answer."""

    mode: str = "text"  # "text", "named" (one forced function), "required" (one or more), "auto" (the model decides)
    name: str = ""  # the forced function, in "named" mode
    template_tools: list[dict] | None = None  # what the chat template is shown


@dataclass
class ChoiceState:
    """One choice being generated: what came so far."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # the stream has sent this choice's first chunk

    @property
    def text(self) -> str:
        return "".join(self.parts)


class OpenAIServing:
    def __init__(self, pipeline: LLMPipeline) -> None:
        self.pipeline = pipeline
        self.created = int(time.time())

    # /v1/models

    def model_card(self) -> Model:
        card = Model(id=self.pipeline.model_id, object="model", created=self.created, owned_by="livepeer")
        if self.pipeline.engine is not None:
            card.max_model_len = self.pipeline.engine.max_model_len
        return card

    async def list_models(self, _body: None, context: RequestContext) -> ModelList:
        return ModelList(object="list", data=[self.model_card()])

    async def retrieve_model(self, _body: None, context: RequestContext) -> Model:
        model = context.params.get("model", "")
        if model != self.pipeline.model_id:
            raise not_served(model, self.pipeline.model_id)
        return self.model_card()

    # Shared checks

    def check_model(self, model: str) -> None:
        if model != self.pipeline.model_id:
            raise not_served(model, self.pipeline.model_id)

    def stop_list(self, stop: str | list[str] | None) -> list[str]:
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = self.pipeline.engine.vocab_size
        parsed = {}
        for key, value in bias.items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
                raise bad(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})", "logit_bias")
            parsed[int(key)] = value
        return parsed

    def max_tokens(self, requested: int | None, prompt: list[int]) -> int:
        # OpenAI's default: as many as the model has room for after the prompt.
        return requested if requested is not None else max(1, self.pipeline.engine.max_model_len - len(prompt))

    # /v1/chat/completions

    def conversation(self, request: ChatCompletionRequest) -> list[dict]:
        if not request.messages:
            raise bad("messages must hold at least one message", "messages")
        conversation = []
        for index, message in enumerate(request.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for part_index, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad(
                            f"content parts of type {part.type!r} are not supported: this model reads text parts only",
                            f"messages.[{index}].content.[{part_index}].type",
                        )
                    texts.append(part.text)
                content = "\n".join(texts)
            turn: dict[str, Any] = {"role": TEMPLATE_ROLES[message.role], "content": content or ""}
            if message.role == "tool":
                if not message.tool_call_id:
                    raise bad("a tool message needs the tool_call_id it answers", f"messages.[{index}].tool_call_id")
                turn["tool_call_id"] = message.tool_call_id
            if message.name:
                turn["name"] = message.name
            if message.tool_calls:
                calls = []
                for call in message.tool_calls:
                    try:
                        arguments = json.loads(call.function.arguments)
                    except ValueError:
                        raise bad(
                            f"the arguments of tool call {call.id!r} are not JSON", f"messages.[{index}].tool_calls"
                        ) from None
                    # Chat templates take the arguments as an object, as Hugging Face's do.
                    calls.append({"id": call.id, "type": "function",
                                  "function": {"name": call.function.name, "arguments": arguments}})
                turn["tool_calls"] = calls
            conversation.append(turn)
        return conversation

    def tool_plan(self, request: ChatCompletionRequest) -> tuple[ToolPlan, dict | None]:
        """The tool mode and the JSON schema the output must match (None: free text)."""
        tools = request.tools or []
        choice = request.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise bad("tool_choice needs tools", "tool_choice")
            return ToolPlan(), None
        template_tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in tools]
        functions = {tool.function.name: tool.function for tool in tools}
        if choice == "none":
            return ToolPlan(), None
        if choice is None or choice == "auto":
            if self.pipeline.tool_parser is None:
                raise bad(
                    f"tool_choice 'auto' needs a tool-call parser, and none fits {self.pipeline.model_id!r} (its chat "
                    "template names no tool-call syntax the runner knows): set TOOL_CALL_PARSER to one of vLLM's "
                    "parsers, or ask for a named function or 'required', which work with any model",
                    "tool_choice",
                )
            return ToolPlan("auto", template_tools=template_tools), None
        if choice == "required":
            calls = {
                "type": "object",
                "anyOf": [
                    {
                        "properties": {
                            "name": {"type": "string", "enum": [name]},
                            "parameters": function.parameters or {"type": "object", "properties": {}},
                        },
                        "required": ["name", "parameters"],
                    }
                    for name, function in functions.items()
                ],
            }
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls}
            if request.parallel_tool_calls is False:
                schema["maxItems"] = 1
            return ToolPlan("required", template_tools=template_tools), schema
        name = choice.function.name
        if name not in functions:
            raise bad(f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")
        parameters = functions[name].parameters or {"type": "object", "properties": {}}
        return ToolPlan("named", name=name, template_tools=template_tools), parameters

    def chat_sampling(self, request: ChatCompletionRequest, prompt: list[int], schema: dict | None) -> Sampling:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        if request.stream_options is not None and not request.stream:
            raise bad("stream_options needs stream: true", "stream_options")
        response_format = request.response_format
        json_object = False
        if schema is None and response_format is not None:
            if response_format.type == "json_schema":
                if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                    raise bad("response_format json_schema needs json_schema.schema", "response_format")
                schema = response_format.json_schema.schema_
            json_object = response_format.type == "json_object"
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return self.sampling(
            request, self.max_tokens(requested, prompt), logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            json_schema=schema, json_object=json_object,
        )

    def sampling(self, request: ChatCompletionRequest | CompletionRequest, max_tokens: int, **only: Any) -> Sampling:
        """The sampling fields both OpenAI requests share, OpenAI's defaults for those left out, and ``only`` theirs."""
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            min_p=request.min_p or 0.0,
            n=request.n or 1,
            stop=self.stop_list(request.stop),
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=self.logit_bias(request.logit_bias),
            **only,
        )

    async def chat_completion(self, request: ChatCompletionRequest, context: RequestContext):
        self.check_model(request.model)
        plan, schema = self.tool_plan(request)
        prompt = self.pipeline.render_chat(self.conversation(request), plan.template_tools)
        sampling = self.chat_sampling(request, prompt, schema)
        length_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        outputs = self.pipeline.start_generation(prompt, sampling, context, length_param)
        reply = ChatReply(self, request, plan, sampling, context)
        if request.stream:
            return EventStream(events=reply.events(outputs), error_event=error_event)
        return await reply.whole(outputs)

    # /v1/completions

    def completion_prompts(self, request: CompletionRequest) -> list[str]:
        if request.suffix is not None:
            raise bad("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise bad("best_of is supported only equal to n", "best_of")
        if request.echo and request.logprobs is not None:
            raise bad("echo with logprobs is not supported", "echo")
        if request.stream_options is not None and not request.stream:
            raise bad("stream_options needs stream: true", "stream_options")
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if any(not prompt for prompt in prompts):
            raise bad("a prompt must not be empty", "prompt")
        return prompts

    async def completion(self, request: CompletionRequest, context: RequestContext):
        self.check_model(request.model)
        tokenizer = self.pipeline.engine.tokenizer
        runs = []
        for prompt in self.completion_prompts(request):
            prompt_ids = tokenizer.encode(prompt)
            sampling = self.sampling(request, self.max_tokens(request.max_tokens, prompt_ids), logprobs=request.logprobs)
            runs.append((prompt, prompt_ids, sampling))
        outputs = [self.pipeline.start_generation(ids, sampling, context) for _, ids, sampling in runs]
        reply = CompletionReply(self, request, [prompt for prompt, _, _ in runs], context)
        if request.stream:
            return EventStream(events=reply.events(outputs), error_event=error_event)
        return await reply.whole(outputs)


def finish_reason_of(completion: CompletionOutput) -> str | None:
    reason = completion.finish_reason
    if reason is None or reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"the engine ended the request early ({reason})")


def token_logprobs(completion: CompletionOutput, top: int) -> list[TokenLogprob]:
    """OpenAI's chat logprobs for the tokens of one delta."""
    entries = []
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs or ()):
        sampled = alternatives[token_id]
        ranked = sorted((lp for lp in alternatives.values() if lp.rank is not None and lp.rank <= top),
                        key=lambda lp: lp.rank)[:top]
        token = sampled.decoded_token or ""
        entries.append(TokenLogprob(
            token=token, logprob=max(sampled.logprob, -9999.0), bytes=list(token.encode()),
            top_logprobs=[
                TopLogprob(token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0),
                           bytes=list((lp.decoded_token or "").encode()))
                for lp in ranked
            ],
        ))
    return entries


class ChatReply:
    """One chat request's engine outputs as a ChatCompletion, or as a stream of chunks."""

    def __init__(self, serving: OpenAIServing, request: ChatCompletionRequest, plan: ToolPlan,
                 sampling: Sampling, context: RequestContext) -> None:
        self.serving = serving
        self.request = request
        self.plan = plan
        self.context = context
        self.top_logprobs = sampling.logprobs
        self.choices = {index: ChoiceState(index) for index in range(sampling.n)}
        self.id = f"chatcmpl-{context.request_id}"
        self.created = int(time.time())
        self.envelope = ChunkEnvelope(
            "chat.completion.chunk", self.id, self.created, serving.pipeline.model_id, include_usage(request)
        )

    def take(self, output: RequestOutput) -> list[tuple[ChoiceState, str, list[TokenLogprob]]]:
        """Count one engine output; each updated choice with its new text and logprobs."""
        if output.prompt_token_ids is not None:
            self.context.prompt_tokens = len(output.prompt_token_ids)
        updates = []
        for completion in output.outputs:
            state = self.choices[completion.index]
            self.context.count_tokens(len(completion.token_ids))
            state.parts.append(completion.text)
            entries = token_logprobs(completion, self.top_logprobs) if self.top_logprobs is not None else []
            state.logprobs.extend(entries)
            state.finish_reason = finish_reason_of(completion) or state.finish_reason
            updates.append((state, completion.text, entries))
        if output.finished:
            self.context.finish_reason = next(
                (state.finish_reason for state in self.choices.values() if state.finish_reason == "length"), "stop"
            )
        return updates

    def tool_calls(self, state: ChoiceState) -> tuple[str | None, list[ChatToolCall]]:
        """The choice's content and tool calls, by the plan; a cut (length) answer keeps its partial text."""
        text = state.text
        if self.plan.mode == "named":
            return None, [self.call(self.plan.name, text)]
        if self.plan.mode == "required":
            try:
                calls = json.loads(text)
            except ValueError:
                if state.finish_reason == "length":
                    return text, []
                raise RuntimeError("the constrained tool calls are not JSON") from None
            return None, [self.call(call["name"], json.dumps(call["parameters"])) for call in calls]
        if self.plan.mode == "auto":
            body = self.request.model_dump(exclude_none=True, by_alias=True)
            content, found = self.serving.pipeline.tool_parser.extract(text, body)
            return content, [self.call(name, arguments) for name, arguments in found]
        return text, []

    @staticmethod
    def call(name: str, arguments: str) -> ChatToolCall:
        return ChatToolCall(id=call_id(), type="function", function=ChatToolCallFunction(name=name, arguments=arguments))

    def finish_reason(self, state: ChoiceState, calls: list[ChatToolCall]) -> str:
        if state.finish_reason == "length":
            return "length"
        return "tool_calls" if calls else "stop"

    async def whole(self, outputs: AsyncIterator[RequestOutput]) -> ChatCompletion:
        async for output in outputs:
            self.take(output)
        choices = []
        for state in self.choices.values():
            content, calls = self.tool_calls(state)
            reason = self.finish_reason(state, calls)
            choices.append(ChatCompletionChoice(
                index=state.index,
                message=AssistantMessage(role="assistant", content=content, **({"tool_calls": calls} if calls else {})),
                logprobs=ChoiceLogprobs(content=state.logprobs) if self.top_logprobs is not None else None,
                finish_reason=reason,
            ))
        if any(choice.finish_reason == "tool_calls" for choice in choices):
            self.context.finish_reason = "tool_calls"
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created,
                              model=self.serving.pipeline.model_id, choices=choices, usage=usage_of(self.context))

    def delta_chunk(self, index: int, delta: bytes, logprobs: list[TokenLogprob], finish_reason: str | None) -> bytes:
        logprobs_json = to_json(ChoiceLogprobs(content=logprobs)) if self.top_logprobs is not None else b"null"
        return self.envelope.chunk(b'{"index":%d,"delta":%s,"logprobs":%s,"finish_reason":%s}' % (
            index, delta, logprobs_json, to_json(finish_reason)))

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
        streams_text = self.plan.mode in ("text", "named")
        try:
            async for output in outputs:
                for state, text, entries in self.take(output):
                    if not state.started:
                        state.started = True
                        if self.plan.mode == "named":
                            call = {"index": 0, "id": call_id(), "type": "function",
                                    "function": {"name": self.plan.name, "arguments": ""}}
                            yield self.delta_chunk(state.index, b'{"role":"assistant","tool_calls":[%s]}' % to_json(call), [], None)
                        else:
                            yield self.delta_chunk(state.index, b'{"role":"assistant","content":""}', [], None)
                    if streams_text and (text or entries):
                        if self.plan.mode == "named":
                            delta = b'{"tool_calls":[{"index":0,"function":{"arguments":%s}}]}' % to_json(text)
                        else:
                            delta = b'{"content":%s}' % to_json(text)
                        yield self.delta_chunk(state.index, delta, entries, None)
                    if state.finish_reason is not None:
                        yield self.ending(state)
            if self.envelope.include_usage:
                yield self.envelope.usage_chunk(self.context)
        finally:
            await outputs.aclose()  # aborts the engine request if the stream stopped early

    def ending(self, state: ChoiceState) -> bytes:
        """A choice's last chunk: for tools decided at the end ("required", "auto"), the whole answer first."""
        if self.plan.mode == "named":  # its one call went out with the first chunk
            return self.delta_chunk(state.index, b"{}", [], "length" if state.finish_reason == "length" else "tool_calls")
        if self.plan.mode == "text":
            return self.delta_chunk(state.index, b"{}", [], state.finish_reason)
        content, calls = self.tool_calls(state)
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"index": position, **call.model_dump()} for position, call in enumerate(calls)]
            self.context.finish_reason = "tool_calls"
        reason = self.finish_reason(state, calls)
        logprobs = state.logprobs if self.top_logprobs is not None else []
        return self.delta_chunk(state.index, to_json(delta), logprobs, reason)


class CompletionReply:
    """One completion request's engine outputs (one run per prompt) as a Completion, or a stream of them."""

    def __init__(self, serving: OpenAIServing, request: CompletionRequest, prompts: list[str],
                 context: RequestContext) -> None:
        self.serving = serving
        self.request = request
        self.prompts = prompts
        self.context = context
        self.n = request.n or 1
        self.id = f"cmpl-{context.request_id}"
        self.created = int(time.time())
        self.envelope = ChunkEnvelope(
            "text_completion", self.id, self.created, serving.pipeline.model_id, include_usage(request)
        )
        self.choices = {index: ChoiceState(index) for index in range(len(prompts) * self.n)}

    def take(self, run: int, output: RequestOutput) -> list[tuple[ChoiceState, str, CompletionLogprobs | None]]:
        updates = []
        for completion in output.outputs:
            state = self.choices[run * self.n + completion.index]
            self.context.count_tokens(len(completion.token_ids))
            text = completion.text
            if self.request.echo and not state.started and not state.parts:
                text = self.prompts[run] + text
            state.parts.append(text)
            state.finish_reason = finish_reason_of(completion) or state.finish_reason
            updates.append((state, text, self.logprobs(completion, len(state.text) - len(text))))
        return updates

    def logprobs(self, completion: CompletionOutput, offset: int) -> CompletionLogprobs | None:
        if self.request.logprobs is None:
            return None
        entries = token_logprobs(completion, self.request.logprobs)
        offsets, position = [], offset
        for entry in entries:
            offsets.append(position)
            position += len(entry.token)
        return CompletionLogprobs(
            tokens=[entry.token for entry in entries],
            token_logprobs=[entry.logprob for entry in entries],
            top_logprobs=[{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
            text_offset=offsets,
        )

    async def whole(self, runs: list[AsyncIterator[RequestOutput]]) -> Completion:
        merged: dict[int, CompletionLogprobs] = {}
        for run, outputs in enumerate(runs):
            async for output in outputs:
                for state, _, logprobs in self.take(run, output):
                    if logprobs is not None:
                        kept = merged.setdefault(state.index, CompletionLogprobs(
                            tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]))
                        kept.tokens += logprobs.tokens
                        kept.token_logprobs += logprobs.token_logprobs
                        kept.top_logprobs += logprobs.top_logprobs
                        kept.text_offset += logprobs.text_offset
        self.context.finish_reason = self.overall_finish()
        choices = [
            CompletionChoice(index=state.index, text=state.text, logprobs=merged.get(state.index),
                             finish_reason=state.finish_reason)
            for state in self.choices.values()
        ]
        return Completion(id=self.id, object="text_completion", created=self.created,
                          model=self.serving.pipeline.model_id, choices=choices, usage=usage_of(self.context))

    def overall_finish(self) -> str:
        return "length" if any(state.finish_reason == "length" for state in self.choices.values()) else "stop"

    def choice_chunk(self, index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> bytes:
        return self.envelope.chunk(b'{"index":%d,"text":%s,"logprobs":%s,"finish_reason":%s}' % (
            index, to_json(text), b"null" if logprobs is None else to_json(logprobs), to_json(finish_reason)
        ))

    async def events(self, runs: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[bytes]:
        try:
            for run, outputs in enumerate(runs):
                async for output in outputs:
                    for state, text, logprobs in self.take(run, output):
                        state.started = True
                        if text or logprobs is not None or state.finish_reason is not None:
                            yield self.choice_chunk(state.index, text, logprobs, state.finish_reason)
            self.context.finish_reason = self.overall_finish()
            if self.envelope.include_usage:
                yield self.envelope.usage_chunk(self.context)
        finally:
            for outputs in runs:
                await outputs.aclose()
