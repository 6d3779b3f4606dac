"""``POST /v1/chat/completions``: OpenAI's chat completions, JSON or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from pydantic_core import to_json

from pipelines.llm import schema
from pipelines.llm.api import spec_operations
from pipelines.llm.answers import AnswerEvent, AnswerReader, CallArguments, CallStart, TextDelta, ToolCall
from pipelines.llm.api.openai_base import ChunkEnvelope, OpenAIAPI, bad, error_event
from pipelines.llm.conversation import require_turns, turn
from pipelines.llm.engine import GenerationStep, Sampling
from pipelines.llm.replies import LogprobEntry, ReplyTracker, choice_finish_reason, usage_of
from pipelines.llm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatToolCall,
    ChatToolCallFunction,
    ChoiceLogprobs,
    CompletionUsage,
    TokenLogprob,
    TopLogprob,
)
from pipelines.llm.tools import ToolPlan, plan_tools
from runner.pipeline import EventStream, RequestContext, Serve


class ChatCompletionAPI(OpenAIAPI):
    OPERATIONS = spec_operations(schema.OPERATIONS, "createChatCompletion")

    def operations(self) -> Mapping[str, Serve]:
        return {"createChatCompletion": self.chat_completion}

    async def chat_completion(self, request: ChatCompletionRequest, context: RequestContext):
        model = self.served(request.model)
        tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in request.tools or []]
        choice = request.tool_choice.model_dump() if isinstance(request.tool_choice, schema.NamedToolChoice) \
            else request.tool_choice
        plan = plan_tools(tools, choice, request.parallel_tool_calls, self.generation.tool_parser is not None,
                          self.models.base.id)
        prompt = self.generation.render_chat(conversation(request), plan.template_tools)
        sampling = self.chat_sampling(request, prompt, plan)
        length_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        steps = self.generation.start(prompt, sampling, context, model, length_param)
        tracker = ReplyTracker(context, [len(prompt)], n=sampling.n, logprobs=sampling.logprobs)
        reply = ChatReply(self, request, plan, model.id, tracker)
        if request.stream:
            return EventStream(events=reply.events(steps), error_event=error_event)
        return await reply.whole(steps)

    def chat_sampling(self, request: ChatCompletionRequest, prompt: list[int], plan: ToolPlan) -> Sampling:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        schema_, json_object = plan.schema, False
        response_format = request.response_format
        if schema_ is None and response_format is not None:
            if response_format.type == "json_schema":
                if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                    raise bad("response_format json_schema needs json_schema.schema", "response_format")
                schema_ = response_format.json_schema.schema_
            json_object = response_format.type == "json_object"
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return self.sampling(
            request, self.max_tokens(requested, prompt),
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            json_schema=schema_, json_object=json_object,
        )


def conversation(request: ChatCompletionRequest) -> list[dict]:
    require_turns(request.messages)
    turns = []
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
        calls = [(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ()]
        turns.append(turn(index, message.role, content, tool_call_id=message.tool_call_id, name=message.name,
                          tool_calls=calls))
    return turns


def chat_logprobs(entries: list[LogprobEntry]) -> list[TokenLogprob]:
    """OpenAI's chat logprobs: each token with its bytes and its alternatives."""
    return [
        TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()),
                     top_logprobs=[TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
                                   for token, logprob in entry.top])
        for entry in entries
    ]


class ChatReply:
    """One chat request's tracked choices as a ChatCompletion, or as a stream of chunks."""

    def __init__(self, api: ChatCompletionAPI, request: ChatCompletionRequest, plan: ToolPlan, model: str,
                 tracker: ReplyTracker) -> None:
        self.tracker = tracker
        self.context = tracker.context
        self.with_logprobs = tracker.logprobs is not None
        body = request.model_dump(exclude_none=True, by_alias=True) if plan.mode == "auto" else None
        self.readers = [AnswerReader(plan, api.generation.tool_parser, body) for _ in tracker.choices]
        self.model = model
        self.id = f"chatcmpl-{self.context.request_id}"
        self.created = int(time.time())
        self.envelope = ChunkEnvelope("chat.completion.chunk", self.id, self.created, model,
                                      api.include_usage(request))

    async def whole(self, steps: AsyncIterator[GenerationStep]) -> ChatCompletion:
        async for step in steps:
            self.tracker.take(step)
        choices = []
        for choice, reader in zip(self.tracker.choices, self.readers):
            reader.feed(choice.text)
            reader.finish(cut=choice.finish_reason == "length")
            calls = [tool_call(call) for call in reader.calls]
            choices.append(ChatCompletionChoice(
                index=choice.index,
                message=AssistantMessage(role="assistant", content=reader.content,
                                         **({"tool_calls": calls} if calls else {})),
                logprobs=ChoiceLogprobs(content=chat_logprobs(choice.logprobs)) if self.with_logprobs else None,
                finish_reason=choice_finish_reason(choice, bool(calls)),
            ))
        self.tracker.settle([choice.finish_reason for choice in choices])
        prompt, completion, total = usage_of(self.context)
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model,
                              choices=choices, usage=CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                                                                     total_tokens=total))

    def chunk(self, index: int, delta: bytes, logprobs: list[LogprobEntry], finish_reason: str | None = None) -> bytes:
        logprobs_json = to_json(ChoiceLogprobs(content=chat_logprobs(logprobs))) if self.with_logprobs else b"null"
        return self.envelope.chunk(b'{"index":%d,"delta":%s,"logprobs":%s,"finish_reason":%s}' % (
            index, delta, logprobs_json, to_json(finish_reason)))

    async def events(self, steps: AsyncIterator[GenerationStep]) -> AsyncIterator[bytes]:
        reasons: list[str] = []
        held: dict[int, list[LogprobEntry]] = {choice.index: [] for choice in self.tracker.choices}
        try:
            async for step in steps:
                for update in self.tracker.take(step):
                    choice = update.choice
                    reader = self.readers[choice.index]
                    logprobs = held[choice.index]
                    logprobs.extend(update.logprobs)
                    if not choice.started:
                        choice.started = True
                        yield self.first_chunk(choice.index, reader.start())
                    for event in reader.feed(update.text):
                        yield self.chunk(choice.index, delta_of(event), logprobs)
                        logprobs = held[choice.index] = []
                    if update.finished:
                        for event in reader.finish(cut=choice.finish_reason == "length"):
                            yield self.chunk(choice.index, delta_of(event), logprobs)
                            logprobs = held[choice.index] = []
                        reason = choice_finish_reason(choice, bool(reader.calls))
                        reasons.append(reason)
                        yield self.chunk(choice.index, b"{}", logprobs, reason)
                        held[choice.index] = []
            self.tracker.settle(reasons)
            if self.envelope.include_usage:
                yield self.envelope.usage_chunk(self.context)
        finally:
            await steps.aclose()  # aborts the engine request if the stream stopped early

    def first_chunk(self, index: int, events: list[AnswerEvent]) -> bytes:
        """The role, with whatever the answer says before its first token (a forced call's name)."""
        if events and isinstance(events[0], CallStart):
            return self.chunk(index, b'{"role":"assistant",' + delta_of(events[0])[1:], [])
        return self.chunk(index, b'{"role":"assistant","content":""}', [])


def delta_of(event: AnswerEvent) -> bytes:
    """One answer event as a chat chunk's delta."""
    if isinstance(event, TextDelta):
        return b'{"content":%s}' % to_json(event.text)
    if isinstance(event, CallArguments):
        return b'{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}' % (event.index, to_json(event.text))
    if isinstance(event, CallStart):
        return b'{"tool_calls":[{"index":%d,"id":%s,"type":"function","function":{"name":%s,"arguments":""}}]}' % (
            event.index, to_json(event.id), to_json(event.name))
    return b'{"reasoning_content":%s}' % to_json(event.text)


def tool_call(call: ToolCall) -> ChatToolCall:
    return ChatToolCall(id=call.id, type="function", function=ChatToolCallFunction(name=call.name, arguments=call.arguments))
