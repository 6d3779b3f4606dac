"""Serving the Responses API: what a request may ask, its answer (JSON, or a stream of events) and the operations."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic_core import to_json

from pipelines.llm import schema
from pipelines.llm.answers import AnswerEvent, AnswerReader, ReasoningDelta, TextDelta
from pipelines.llm.api import bad, openai_error_detail
from pipelines.llm.api.openai_base import OpenAIAPI, common_sampling
from pipelines.llm.api.responses.conversation import Conversation, Message
from pipelines.llm.api.responses.output import Output, new_id
from pipelines.llm.api.responses.store import ResponsesSettings, ResponseStore, StoredResponse
from pipelines.llm.conversation import chat_body
from pipelines.llm.engine import Sampling
from pipelines.llm.generation import Generation
from pipelines.llm.limits import check_schemas, path_parameter
from pipelines.llm.replies import NOTHING, Choice, Reply, ReplyTracker, Update, usage_of
from pipelines.llm.schema import (
    ResponsesDeleted,
    ResponsesError,
    ResponsesIncompleteDetails,
    ResponsesInputTokensDetails,
    ResponsesOutputTokensDetails,
    ResponsesRequest,
    ResponsesResponse,
    ResponsesTextConfig,
    ResponsesUsage,
)
from pipelines.llm.served_models import ServedModels
from pipelines.llm.tools import ToolPlan, plan_constraint
from runner.pipeline import RequestContext


NOT_SERVED = (  # (param, whether the request asks for it, why not)
    ("background", lambda r: bool(r.background), "background responses are not served; leave background out"),
    ("include", lambda r: bool(r.include), "include is not served (no logprobs, no encrypted reasoning)"),
    ("max_tool_calls", lambda r: r.max_tool_calls is not None, "max_tool_calls is not served"),
    ("top_logprobs", lambda r: bool(r.top_logprobs), "top_logprobs is not served"),
    ("conversation", lambda r: r.conversation is not None,
     "conversation objects are not served; use previous_response_id"),
    ("prompt", lambda r: r.prompt is not None, "prompt templates are not served; send input"),
    ("truncation", lambda r: r.truncation == "auto",
     "truncation 'auto' is not served: a conversation too long for the model is a 400"),
    ("service_tier", lambda r: r.service_tier not in (None, "auto", "default"),
     "service_tier is served as 'auto' or 'default' only"),
    ("reasoning.effort", lambda r: r.reasoning is not None and r.reasoning.effort is not None,
     "reasoning effort is not served"),
    ("reasoning.summary", lambda r: r.reasoning is not None and r.reasoning.summary is not None,
     "reasoning summaries are not served"),
    ("reasoning.generate_summary", lambda r: r.reasoning is not None and r.reasoning.generate_summary is not None,
     "reasoning summaries are not served"),
    ("text.verbosity", lambda r: r.text is not None and r.text.verbosity not in (None, "medium"),
     "text.verbosity is served as 'medium' only"),
)


def refuse_what_is_not_served(request: ResponsesRequest) -> None:
    for param, asked, why in NOT_SERVED:
        if asked(request):
            raise bad(why, param)


def function_tools(request: ResponsesRequest) -> list[dict]:
    """The request's function tools as OpenAI chat tools, which the tool plan and the templates read."""
    tools = []
    for index, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise bad(f"tools of type {tool.type!r} are not served: only function tools", f"tools.[{index}].type")
        if not tool.name:
            raise bad("a function tool needs its name", f"tools.[{index}].name")
        function: dict = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        tools.append({"type": "function", "function": function})
    return tools


def chat_tool_choice(request: ResponsesRequest) -> str | dict | None:
    choice = request.tool_choice
    if choice == "auto" and not request.tools:  # as vLLM reads it: nothing to call, so no call
        return None
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function":
        raise bad(f"tool_choice of type {choice.type!r} is not served: give none, auto, required or "
                  "{'type': 'function', 'name': ...}", "tool_choice")
    if not choice.name:
        raise bad("a function tool_choice needs the function's name", "tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}


def output_format(request: ResponsesRequest) -> tuple[dict | None, bool]:
    """The JSON schema the answer must match, and whether it must be a JSON object, by text.format."""
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return None, False
    if text_format.type == "json_object":
        return None, True
    if text_format.schema_ is None:
        raise bad("text.format json_schema needs its schema", "text.format.schema")
    check_schemas([text_format.schema_], "text.format.schema", "text.format.schema")
    return text_format.schema_, False


class ResponsesReply(Reply):
    """One Responses request's answer, as a ResponsesResponse or as its stream of events, each under its type (as
    OpenAI and ``vllm serve`` frame them: ``event: <type>`` before ``data:``, and no ``data: [DONE]``)."""

    NAMED = True

    def __init__(self, request: ResponsesRequest, sampling: Sampling, model: str, tracker: ReplyTracker,
                 reader: AnswerReader, conversation: Conversation, store: ResponseStore) -> None:
        self.request = request
        self.sampling = sampling
        self.model = model
        self.tracker = tracker
        self.context = tracker.context
        self.reader = reader
        self.readers = [reader]
        self.conversation = conversation
        self.store = store
        self.id = new_id("resp")
        self.created = int(time.time())
        self.output = Output(streaming=True)
        self.counted = 0  # the choice's tokens already told apart as thinking or not
        self.reasoning_tokens = 0

    def response(self, status: str, output: list, usage: ResponsesUsage | None = None,
                 error: ResponsesError | None = None) -> ResponsesResponse:
        request = self.request
        tool_choice = request.tool_choice if request.tool_choice is not None else "auto" if request.tools else "none"
        return ResponsesResponse(
            id=self.id, object="response", created_at=self.created, status=status, error=error,
            incomplete_details=ResponsesIncompleteDetails(reason="max_output_tokens") if status == "incomplete"
            else None,
            model=self.model, output=output, instructions=request.instructions, metadata=request.metadata,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            temperature=self.sampling.temperature, top_p=self.sampling.top_p,
            tool_choice=tool_choice, tools=list(request.tools or ()),
            max_output_tokens=request.max_output_tokens, previous_response_id=request.previous_response_id,
            text=request.text if request.text is not None and request.text.format is not None
            else ResponsesTextConfig(format=schema.ResponsesTextFormat(type="text")),
            store=request.store is not False, background=False, truncation="disabled", usage=usage,
        )

    def usage(self) -> ResponsesUsage:
        prompt, completion, total = usage_of(self.context)
        # The engine protocol carries no prefix-cache counts: cached_tokens says 0, not "none were cached".
        return ResponsesUsage(
            input_tokens=prompt, output_tokens=completion, total_tokens=total,
            input_tokens_details=ResponsesInputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens_details=ResponsesOutputTokensDetails(reasoning_tokens=self.reasoning_tokens),
        )

    def opening(self, starts: list[list[AnswerEvent]]) -> list[tuple[bytes, bytes]]:
        sent = []
        if self.streaming:
            started = self.dumped(self.response("in_progress", []))  # the same response in both: written once
            sent += [self.lifecycle("response.created", started), self.lifecycle("response.in_progress", started)]
        for event in starts[0]:
            sent += self.output.take(event)
        return sent

    def said(self, update: Update, events: list[AnswerEvent]) -> list[tuple[bytes, bytes]]:
        output = self.output
        if len(events) == 1 and type(events[0]) is TextDelta:  # the hot path: one piece of text
            self.counted = update.choice.tokens
            text = events[0].text
            if text and output.writing_text:
                return (output.text_delta(text),)
            return output.take(events[0])
        # The step's tokens count as thinking if all it said was.
        tokens, self.counted = update.choice.tokens - self.counted, update.choice.tokens
        if events and type(events[-1]) is ReasoningDelta and all(type(event) is ReasoningDelta for event in events):
            self.reasoning_tokens += tokens
        sent = []
        for event in events:
            if type(event) is TextDelta and event.text and output.writing_text:
                sent.append(output.text_delta(event.text))
            else:
                sent += output.take(event)
        return sent

    def said_text(self, update: Update) -> list[tuple[bytes, bytes]] | tuple:
        self.counted = update.choice.tokens  # text, not thinking
        text = update.text
        if not text:
            return NOTHING
        output = self.output
        if output.writing_text:  # the hot path: one piece of text for the open message
            return (output.text_delta(text),)
        return output.take(TextDelta(text))

    def ended(self, choice: Choice, events: list[AnswerEvent], reason: str) -> list[tuple[bytes, bytes]]:
        sent = []
        for event in events:
            sent += self.output.take(event)
        return sent

    def closing(self) -> list[tuple[bytes, bytes]]:
        [choice] = self.tracker.choices
        cut = choice.cut
        sent = self.output.close(cut)
        response = self.finish(cut)
        if self.streaming:
            sent.append(self.lifecycle("response.incomplete" if cut else "response.completed", response))
        return sent

    def finish(self, cut: bool) -> ResponsesResponse:
        """The finished response, kept in the store when the request asked (and the store keeps any)."""
        response = self.response("incomplete" if cut else "completed", self.output.models(), self.usage())
        if self.request.store is not False:
            answered = Message("assistant", self.output.message_text(), "previous_response_id",
                               calls=[(call.id, call.name, call.arguments) for call in self.reader.calls])
            history = [*self.conversation.messages, *([answered] if answered.content or answered.calls else [])]
            self.store.put(StoredResponse(response, tuple(history)))
        self.finished = response
        return response

    async def whole(self, steps) -> ResponsesResponse:
        self.output.streaming = False
        return await super().whole(steps)

    def answer(self) -> ResponsesResponse:
        return self.finished

    @staticmethod
    def dumped(response: ResponsesResponse) -> bytes:
        """The response as the JSON answer is written (what was set, by alias)."""
        return response.model_dump_json(exclude_unset=True, by_alias=True).encode()

    def lifecycle(self, kind: str, response: ResponsesResponse | bytes, **extra: bytes) -> tuple[bytes, bytes]:
        """An event that carries the whole response (or its bytes, ``dumped``), written as the JSON answer is."""
        output = self.output
        number, output.sequence = output.sequence, output.sequence + 1
        document = b'{"type":%s,"sequence_number":%d,"response":%s' % (
            to_json(kind), number, response if type(response) is bytes else self.dumped(response))
        for name, value in extra.items():
            document += b',"%s":%s' % (name.encode(), value)
        return kind.encode(), document + b"}"

    def error_event(self, reason: str) -> tuple[bytes, bytes]:
        """The in-band ending of a failed stream: ``response.failed``, with OpenAI's error object for the SDKs to raise."""
        failed = self.response("failed", self.output.models(), self.usage(),
                               ResponsesError(code="server_error", message=reason))
        return self.lifecycle("response.failed", failed, error=openai_error_detail(reason))


class ResponsesAPI(OpenAIAPI):
    SERVES = {"createResponse": "create_response", "retrieveResponse": "retrieve_response",
              "deleteResponse": "delete_response"}

    def __init__(self, generation: Generation, models: ServedModels, settings: ResponsesSettings | None = None) -> None:
        super().__init__(generation, models)
        self.settings = settings if settings is not None else ResponsesSettings()
        self.store = ResponseStore(self.settings.store_size, self.settings.store_bytes)

    async def retrieve_response(self, _body: None, context: RequestContext) -> ResponsesResponse:
        return self.store.find(path_parameter(context.params, "response_id"), "response_id").response

    async def delete_response(self, _body: None, context: RequestContext) -> ResponsesDeleted:
        response_id = path_parameter(context.params, "response_id")
        if not self.store.delete(response_id):
            raise self.store.not_found(response_id, "response_id")
        return ResponsesDeleted(id=response_id, object="response", deleted=True)

    async def create_response(self, request: ResponsesRequest, context: RequestContext):
        model = self.served(request.model, blank_is_base=True)
        refuse_what_is_not_served(request)
        previous = None
        if request.previous_response_id is not None:
            previous = self.store.find(request.previous_response_id, "previous_response_id")
        conversation = Conversation(previous.history if previous is not None else ())
        conversation.read_input(request.input)
        if not conversation.messages:
            raise bad("input must hold at least one item (or name a previous_response_id)", "input")
        tools = function_tools(request)
        turns = conversation.turns(request.instructions)
        prompt, plan = await self.chat_prompt(turns, tools, chat_tool_choice(request), request.parallel_tool_calls)
        sampling = self.response_sampling(request, prompt, plan)
        steps = await self.generation.start(prompt, sampling, context, model, "max_output_tokens")
        tracker = ReplyTracker(context, [len(prompt)])
        body = chat_body(model.id, turns, tools) if plan.mode == "auto" else None
        reader = self.generation.answer_reader(plan, sampling, prompt, body)
        reply = ResponsesReply(request, sampling, model.id, tracker, reader, conversation, self.store)
        return await reply.reply(bool(request.stream), steps)

    def response_sampling(self, request: ResponsesRequest, prompt: Sequence[int], plan: ToolPlan) -> Sampling:
        json_schema, json_object = output_format(request)
        return Sampling(
            max_tokens=self.max_tokens(request.max_output_tokens, list(prompt)),
            **common_sampling(request),
            **plan_constraint(plan, json_schema, json_object),
        )
