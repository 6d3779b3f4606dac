"""``POST /v1/chat/completions``: OpenAI's chat completions, JSON or SSE chunks."""

from __future__ import annotations

import time

from pydantic_core import to_json

from pipelines.llm import schema
from pipelines.llm.api import RequestSize, bad
from pipelines.llm.answers import AnswerEvent, CallArguments, CallStart, ReasoningDelta, TextDelta, ToolCall
from pipelines.llm.api.openai_base import (
    ChunkEnvelope,
    OpenAIAPI,
    OpenAIReply,
    generation_prompt,
    prompt_logprobs_json,
    response_format_constraint,
    structured_outputs,
)
from pipelines.llm.engine import Sampling
from pipelines.llm.replies import (
    NOTHING,
    TEXT_MARK,
    Choice,
    LogprobEntry,
    ReplyTracker,
    Update,
    text_frame,
    usage_model,
)
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
from pipelines.llm.tools import ToolPlan, plan_constraint
from runner.pipeline import RequestContext


class ChatCompletionAPI(OpenAIAPI):
    SERVES = {"createChatCompletion": "chat_completion"}

    def request_size(self, operation_id: str, request: ChatCompletionRequest) -> RequestSize:
        return RequestSize(1, request.n or 1, "messages", "n")

    async def chat_completion(self, request: ChatCompletionRequest, context: RequestContext):
        model = self.served(request.model)
        if request.chat_template is not None:
            raise bad("chat_template: this runner renders the model's own chat template only (as vLLM does unless "
                      "started with --trust-request-chat-template)", "chat_template")
        choice = request.tool_choice.model_dump() if isinstance(request.tool_choice, schema.NamedToolChoice) \
            else request.tool_choice
        prompt, plan, turns = await self.openai_chat_prompt(request, choice, request.parallel_tool_calls,
                                                            template_kwargs(request), request.documents)
        prompt = self.generation.truncate(prompt, request.truncate_prompt_tokens, request.truncation_side)
        sampling = self.chat_sampling(request, prompt, plan)
        length_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        steps = await self.generation.start(prompt, sampling, context, model, length_param)
        tracker = ReplyTracker(context, [len(prompt)], n=sampling.n, logprobs=sampling.logprobs)
        reply = ChatReply(self, request, plan, model.id, tracker, sampling, prompt, echoed(request, turns))
        return await reply.reply(bool(request.stream), steps)

    def chat_sampling(self, request: ChatCompletionRequest, prompt: list[int], plan: ToolPlan) -> Sampling:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        answer_schema, json_object = response_format_constraint(request.response_format)
        constraint = plan_constraint(plan, answer_schema, json_object)
        if "structural_tag" in constraint:  # own-syntax tools: calls where the model opens them, else the answer
            if structured_outputs(request):
                raise bad("structured_outputs and tools in the runner's own syntax both constrain the answer: use "
                          "response_format for the answer's format", "structured_outputs")
        else:
            constraint = structured_outputs(request, constraint.get("json_schema"), constraint.get("json_object", False))
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return self.sampling(
            request, self.max_tokens(requested, prompt),
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            **constraint,
        )


def template_kwargs(request: ChatCompletionRequest) -> dict | None:
    """chat_template_kwargs, and reasoning_effort as vLLM hands it to the template (thinking off for "none")."""
    kwargs = dict(request.chat_template_kwargs or {})
    if request.reasoning_effort is not None:
        kwargs["reasoning_effort"] = request.reasoning_effort
        kwargs.setdefault("enable_thinking", request.reasoning_effort != "none")
    return kwargs or None


def echoed(request: ChatCompletionRequest, turns: list[dict]) -> str:
    """What vLLM's echo puts in front of the answer: the last message, when it is in the answer's role."""
    if not request.echo:
        return ""
    last = turns[-1]
    return last["content"] if last["role"] == "assistant" or not generation_prompt(request) else ""


def chat_logprobs(entries: list[LogprobEntry]) -> list[TokenLogprob]:
    """OpenAI's chat logprobs: each token with its bytes and its alternatives."""
    return [
        TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()),
                     top_logprobs=[TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
                                   for token, logprob in entry.top])
        for entry in entries
    ]


class ChatReply(OpenAIReply):
    """One chat request's tracked choices as a ChatCompletion, or as a stream of chunks."""

    def __init__(self, api: ChatCompletionAPI, request: ChatCompletionRequest, plan: ToolPlan, model: str,
                 tracker: ReplyTracker, sampling: Sampling, prompt: list[int], echo: str = "") -> None:
        self.tracker = tracker
        self.context = tracker.context
        self.with_logprobs = tracker.logprobs is not None
        self.with_reasoning = request.include_reasoning is not False
        self.echo = echo
        body = request.model_dump(exclude_none=True, by_alias=True) if plan.mode == "auto" else None
        self.readers = [api.generation.answer_reader(plan, sampling, prompt, body) for _ in tracker.choices]
        self.model = model
        self.id = f"chatcmpl-{self.context.request_id}"
        self.created = int(time.time())
        self.envelope = ChunkEnvelope("chat.completion.chunk", self.id, self.created, model,
                                      api.include_usage(request))
        # Per choice, the logprobs of tokens whose text no chunk has carried yet (they go with the next chunk).
        self.held: dict[int, list[LogprobEntry]] = {choice.index: [] for choice in tracker.choices}
        # Per choice, a text chunk's bytes around its text (no logprobs: the hot path).
        self.text_frames = {choice.index: text_frame(self.chunk(choice.index, delta_of(TextDelta(TEXT_MARK)), NOTHING))
                            for choice in tracker.choices} if not self.with_logprobs else {}

    def began(self, choice: Choice, start: list[AnswerEvent]) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        first = self.first_chunk(choice.index, start)
        return [first, self.chunk(choice.index, delta_of(TextDelta(self.echo)), [])] if self.echo else [first]

    def said(self, update: Update, events: list[AnswerEvent]) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        index = update.choice.index
        if not self.with_logprobs:  # the hot path: one chunk per event, most often one event
            if len(events) == 1:
                event = events[0]
                if type(event) is TextDelta:  # most often text
                    head, tail = self.text_frames[index]
                    return (head + to_json(event.text) + tail,)
                if self.with_reasoning or type(event) is not ReasoningDelta:
                    return (self.chunk(index, delta_of(event), NOTHING),)
                return NOTHING
            return [self.chunk(index, delta_of(event), NOTHING) for event in events
                    if self.with_reasoning or type(event) is not ReasoningDelta]
        held = self.held[index]
        held.extend(update.logprobs)
        return self.written(index, events)

    def said_text(self, update: Update) -> list[bytes] | tuple:
        if self.with_logprobs or not self.streaming:
            return super().said_text(update)
        text = update.text  # the hot path: a plain reader's piece, its chunk written around it
        if not text:
            return NOTHING
        head, tail = self.text_frames[update.choice.index]
        return (head + to_json(text) + tail,)

    def written(self, index: int, events: list[AnswerEvent]) -> list[bytes]:
        """A chunk per event, the held logprobs going with the first."""
        sent = []
        for event in events:
            if self.with_reasoning or type(event) is not ReasoningDelta:
                sent.append(self.chunk(index, delta_of(event), self.held[index]))
                self.held[index] = []
        return sent

    def ended(self, choice: Choice, events: list[AnswerEvent], reason: str) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        sent = self.written(choice.index, events)
        sent.append(self.chunk(choice.index, b"{}", self.held[choice.index], reason))
        self.held[choice.index] = []
        return sent

    def answer(self) -> ChatCompletion:
        choices = []
        for choice, reader in zip(self.tracker.choices, self.readers):
            calls = [tool_call(call) for call in reader.calls]
            content = reader.content
            if self.echo:
                content = self.echo + (content or "")
            thinking = {"reasoning_content": reader.reasoning, "reasoning": reader.reasoning} \
                if reader.reasoning and self.with_reasoning else {}
            choices.append(ChatCompletionChoice(
                index=choice.index,
                message=AssistantMessage(role="assistant", content=content, **thinking,
                                         **({"tool_calls": calls} if calls else {})),
                logprobs=ChoiceLogprobs(content=chat_logprobs(choice.logprobs)) if self.with_logprobs else None,
                finish_reason=choice.reason,
            ))
        extra = {}
        if self.tracker.prompt_logprobs[0] is not None:
            extra["prompt_logprobs"] = prompt_logprobs_json(self.tracker.prompt_logprobs[0])
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model,
                              choices=choices, usage=usage_model(self.context, CompletionUsage), **extra)

    def chunk(self, index: int, delta: bytes, logprobs: list[LogprobEntry], finish_reason: str | None = None) -> bytes:
        logprobs_json = to_json(ChoiceLogprobs(content=chat_logprobs(logprobs))) if self.with_logprobs else b"null"
        return self.envelope.chunk(b'{"index":%d,"delta":%s,"logprobs":%s,"finish_reason":%s}' % (
            index, delta, logprobs_json, to_json(finish_reason)))

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
    text = to_json(event.text)  # the thinking, under both the names clients read it by
    return b'{"reasoning_content":%s,"reasoning":%s}' % (text, text)


def tool_call(call: ToolCall) -> ChatToolCall:
    return ChatToolCall(id=call.id, type="function", function=ChatToolCallFunction(name=call.name, arguments=call.arguments))
