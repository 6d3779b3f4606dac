"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{response_id}``: OpenAI's Responses API.

Answers are JSON or SSE events. The input items become the chat template's turns (``conversation.turn``), the
function tools and tool choice an OpenAI-style tool plan (``tools.plan_tools``),
and the answer is read by the shared ``AnswerReader``: its events (text,
thinking, a call's start, a piece of its arguments) are written here as output
items and Responses stream events, so whatever the reader streams, this API
streams. Finished responses are kept in a bounded store of this process
(RESPONSES_STORE_SIZE responses, RESPONSES_STORE_BYTES bytes) for ``GET`` and
``previous_response_id``, until ``DELETE`` removes them.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from pydantic import Field
from pydantic_core import to_json
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.llm import schema
from pipelines.llm.answers import AnswerEvent, AnswerReader, CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api import bad, openai_error_detail, spec_operations
from pipelines.llm.api.openai_base import OpenAIAPI, common_sampling
from pipelines.llm.conversation import chat_body, turn
from pipelines.llm.engine import Sampling
from pipelines.llm.generation import Generation
from pipelines.llm.limits import check_schemas, json_document
from pipelines.llm.replies import Choice, Reply, ReplyTracker, Update, usage_of
from pipelines.llm.schema import (
    ResponsesContentPart,
    ResponsesDeleted,
    ResponsesError,
    ResponsesFunctionCall,
    ResponsesIncompleteDetails,
    ResponsesInputItem,
    ResponsesInputTokensDetails,
    ResponsesOutputMessage,
    ResponsesOutputText,
    ResponsesOutputTokensDetails,
    ResponsesReasoningItem,
    ResponsesReasoningText,
    ResponsesRequest,
    ResponsesResponse,
    ResponsesTextConfig,
    ResponsesUsage,
)
from pipelines.llm.served_models import ServedModels
from pipelines.llm.tools import ToolPlan, plan_constraint
from runner.pipeline import OperationError, RequestContext, Serve

log = structlog.get_logger(__name__)

TEXT_PARTS = ("input_text", "output_text", "text")  # the content parts read as text, whatever the role
REASONING_PARTS = ("reasoning_text", "summary_text")
# 64 MiB: the default count (1,000) of responses at 64 KiB each; what a 1,000-response store of 1 MiB requests
# (MAX_REQUEST_BYTES) would otherwise hold is about 1 GiB of the process's memory.
STORE_BYTES_DEFAULT = 64 * 1024 * 1024


class ResponsesSettings(BaseSettings):
    """The Responses API's own setting, read with the pipeline at start."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    store_size: int = Field(
        1000, alias="RESPONSES_STORE_SIZE", ge=0,
        description="Finished responses kept in memory for GET /v1/responses/{id} and previous_response_id "
                    "(the oldest dropped first; 0 keeps none)",
    )
    store_bytes: int = Field(
        STORE_BYTES_DEFAULT, alias="RESPONSES_STORE_BYTES", ge=0,
        description="Bytes the stored responses may hold in all, counted as their JSON and their conversation's "
                    "text (the oldest dropped first; a response larger than all of it is not stored)",
    )


# 1. The conversation: Responses items as the chat template's turns


@dataclass
class Message:
    """One turn of a conversation, before the template reads it; ``origin`` is the request field it came from."""

    role: str  # user, assistant, system, developer or tool
    content: str | None
    origin: str
    tool_call_id: str | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (call_id, name, arguments JSON)

    def copy(self) -> Message:
        return Message(self.role, self.content, self.origin, self.tool_call_id, list(self.calls))


class Conversation:
    """Messages built from Responses items, a function call joining the assistant turn before it."""

    def __init__(self, history: Iterable[Message] = ()) -> None:
        self.messages = [message.copy() for message in history]

    def say(self, role: str, content: str | None, origin: str) -> None:
        self.messages.append(Message(role, content, origin))

    def call(self, call_id: str, name: str, arguments: str, origin: str) -> None:
        last = self.messages[-1] if self.messages else None
        if last is not None and last.role == "assistant":
            last.calls.append((call_id, name, arguments))
        else:
            self.messages.append(Message("assistant", None, origin, calls=[(call_id, name, arguments)]))

    def answer(self, call_id: str, output: str, origin: str) -> None:
        self.messages.append(Message("tool", output, origin, tool_call_id=call_id))

    def read_input(self, request_input: str | list[ResponsesInputItem] | None) -> None:
        if isinstance(request_input, str):
            self.say("user", request_input, "input")
            return
        for index, item in enumerate(request_input or ()):
            self.read_item(index, item)

    def read_item(self, index: int, item: ResponsesInputItem) -> None:
        where = f"input.[{index}]"
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            if item.role is None:
                raise bad("a message item needs its role (user, assistant, system or developer)", f"{where}.role")
            if item.content is None:
                raise bad("a message item needs its content", f"{where}.content")
            self.say(item.role, text_of(item.content, f"{where}.content"), where)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if getattr(item, name) is None:
                    raise bad(f"a function_call item needs its {name}", f"{where}.{name}")
            json_document(item.arguments, f"the arguments of function call {item.call_id!r}", f"{where}.arguments")
            self.call(item.call_id, item.name, item.arguments, where)
        elif kind == "function_call_output":
            for name in ("call_id", "output"):
                if getattr(item, name) is None:
                    raise bad(f"a function_call_output item needs its {name}", f"{where}.{name}")
            self.answer(item.call_id, text_of(item.output, f"{where}.output"), where)
        elif kind == "reasoning":
            pass  # earlier thinking is not shown to the model again, as reasoning models' templates drop it
        elif kind is None:
            raise bad("an input item needs its type (message, function_call or function_call_output)", f"{where}.type")
        else:
            raise bad(f"input items of type {kind!r} are not served: only message, function_call, "
                      "function_call_output and reasoning items", f"{where}.type")

    def turns(self, instructions: str | None) -> list[dict]:
        """The template's turns: the instructions as a system turn first, then the messages."""
        messages = ([Message("system", instructions, "instructions")] if instructions else []) + self.messages
        turns = []
        for index, message in enumerate(messages):
            try:
                turns.append(turn(index, message.role, message.content, tool_call_id=message.tool_call_id,
                                  tool_calls=message.calls))
            except OperationError as exc:  # named by the field the message came from, not by its place
                raise bad(exc.msg, message.origin) from None
        return turns


def text_of(content: str | list[ResponsesContentPart], where: str) -> str:
    """A message's content, or a function call's output, as the text the template reads."""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            raise bad(f"content parts of type {part.type!r} are not served: this model reads text parts only "
                      f"({', '.join(TEXT_PARTS)})", f"{where}.[{index}].type")
        texts.append(part.text)
    return "\n".join(texts)


# 2. The store of finished responses


@dataclass(frozen=True)
class StoredResponse:
    response: ResponsesResponse
    history: tuple[Message, ...]  # its conversation without its instructions, then its output

    def size(self) -> int:
        """What it holds, in bytes: its JSON and the text of its conversation (what a caller can make large)."""
        text = sum(len(message.content or "") + sum(len(part) for call in message.calls for part in call)
                   for message in self.history)
        return len(self.response.model_dump_json(exclude_unset=True)) + text


class ResponseStore:
    """The last finished responses of this process, at most ``size`` of them and ``max_bytes`` in all, the oldest
    dropped first."""

    def __init__(self, size: int, max_bytes: int = STORE_BYTES_DEFAULT) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.kept: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self.bytes = 0  # what the kept responses hold

    def put(self, stored: StoredResponse) -> None:
        if self.size == 0:
            return
        size = stored.size()
        if size > self.max_bytes:
            log.warning("responses.store.too_large", response_id=stored.response.id, bytes=size,
                        store_bytes=self.max_bytes, effect="not stored: GET and previous_response_id answer 404")
            return
        self.delete(stored.response.id)
        self.kept[stored.response.id] = (stored, size)
        self.bytes += size
        while len(self.kept) > self.size or self.bytes > self.max_bytes:
            _, (_, dropped) = self.kept.popitem(last=False)
            self.bytes -= dropped

    def get(self, response_id: str) -> StoredResponse | None:
        kept = self.kept.get(response_id)
        return None if kept is None else kept[0]

    def delete(self, response_id: str) -> bool:
        """Forget a stored response; False when none of that id is kept."""
        kept = self.kept.pop(response_id, None)
        if kept is None:
            return False
        self.bytes -= kept[1]
        return True

    def find(self, response_id: str, param: str) -> StoredResponse:
        stored = self.get(response_id)
        if stored is None:
            raise self.not_found(response_id, param)
        return stored

    def not_found(self, response_id: str, param: str) -> OperationError:
        return OperationError(
            f"Response with id {response_id!r} not found: this runner keeps the last {self.size} stored responses "
            f"of this process, {self.max_bytes} bytes in all (RESPONSES_STORE_SIZE, RESPONSES_STORE_BYTES), in "
            "memory, only those sent with store true, until they are deleted",
            status=404, param=param,
        )


# 3. The request: what is served, the tools, the sampling

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


# 4. The output items, and the stream events that build them


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class MessageItem:
    kind = "message"

    def __init__(self, index: int) -> None:
        self.id, self.index, self.parts, self.status = new_id("msg"), index, [], "in_progress"
        # Each piece of text is one event: its bytes up to the sequence number are written once.
        self.delta_head = b'{"type":"response.output_text.delta","item_id":%s,"output_index":%d,' \
                          b'"content_index":0,"logprobs":[],"sequence_number":' % (to_json(self.id), index)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def part(self) -> ResponsesOutputText:
        return ResponsesOutputText(type="output_text", text=self.text, annotations=[], logprobs=[])

    def model(self, opened: bool = False) -> ResponsesOutputMessage:
        return ResponsesOutputMessage(id=self.id, type="message", role="assistant", status=self.status,
                                      content=[] if opened else [self.part()])


class ReasoningItem:
    kind = "reasoning"

    def __init__(self, index: int) -> None:
        self.id, self.index, self.parts, self.status = new_id("rs"), index, [], "in_progress"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def part(self) -> ResponsesReasoningText:
        return ResponsesReasoningText(type="reasoning_text", text=self.text)

    def model(self, opened: bool = False) -> ResponsesReasoningItem:
        return ResponsesReasoningItem(id=self.id, type="reasoning", summary=[], status=self.status,
                                      content=[] if opened else [self.part()])


class CallItem:
    kind = "function_call"

    def __init__(self, index: int, call_id: str, name: str) -> None:
        self.id, self.index, self.call_id, self.name = new_id("fc"), index, call_id, name
        self.parts: list[str] = []
        self.status = "in_progress"

    @property
    def arguments(self) -> str:
        return "".join(self.parts)

    def model(self, opened: bool = False) -> ResponsesFunctionCall:
        return ResponsesFunctionCall(id=self.id, type="function_call", call_id=self.call_id, name=self.name,
                                     arguments="" if opened else self.arguments, status=self.status)


OutputItem = MessageItem | ReasoningItem | CallItem


TEXT_DELTA = b"response.output_text.delta"


class Output:
    """One answer's output items as its events come, and (when ``streaming``) the stream events that say so.

    Text and thinking go to the open item of their kind, a new one opening
    when the kind changes; each call is an item of its own, and calls stay
    open, taking their argument pieces by the reader's call index, until
    text or thinking follows or the answer ends.
    """

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.items: list[OutputItem] = []
        self.open: MessageItem | ReasoningItem | None = None
        self.calls: dict[int, CallItem] = {}  # the open calls, by the reader's call index
        self.sequence = 0  # the next event's sequence_number

    def event(self, kind: str, **fields) -> tuple[bytes, bytes]:
        """One stream event, under its type (its SSE name)."""
        number, self.sequence = self.sequence, self.sequence + 1
        return kind.encode(), to_json({"type": kind, "sequence_number": number, **fields})

    def text_delta(self, text: str) -> tuple[bytes, bytes]:
        """The hot path: one piece of text for the open message."""
        item = self.open
        item.parts.append(text)
        number, self.sequence = self.sequence, self.sequence + 1
        return TEXT_DELTA, item.delta_head + b'%d,"delta":%s}' % (number, to_json(text))

    @property
    def writing_text(self) -> bool:
        return self.streaming and self.open is not None and self.open.kind == "message"

    def take(self, event: AnswerEvent) -> list[tuple[bytes, bytes]]:
        sent: list[tuple[bytes, bytes]] = []
        if isinstance(event, TextDelta):
            if not event.text:
                return sent
            if self.open is None or self.open.kind != "message":
                sent += self.close_open() + self.close_calls() + self.start(MessageItem(len(self.items)))
            if self.streaming:
                sent.append(self.text_delta(event.text))
            else:
                self.open.parts.append(event.text)
        elif isinstance(event, ReasoningDelta):
            if not event.text:
                return sent
            if self.open is None or self.open.kind != "reasoning":
                sent += self.close_open() + self.close_calls() + self.start(ReasoningItem(len(self.items)))
            item = self.open
            item.parts.append(event.text)
            if self.streaming:
                sent.append(self.event("response.reasoning_text.delta", item_id=item.id, output_index=item.index,
                                       content_index=0, delta=event.text))
        elif isinstance(event, CallStart):
            sent += self.close_open()
            call = CallItem(len(self.items), event.id, event.name)
            self.calls[event.index] = call
            sent += self.start(call)
        elif isinstance(event, CallArguments):
            call = self.calls.get(event.index)
            if call is None:
                raise RuntimeError(f"arguments for tool call {event.index}, which has not started or has ended")
            call.parts.append(event.text)
            if self.streaming and event.text:
                sent.append(self.event("response.function_call_arguments.delta", item_id=call.id,
                                       output_index=call.index, delta=event.text))
        return sent

    def start(self, item: OutputItem) -> list[tuple[bytes, bytes]]:
        self.items.append(item)
        if item.kind != "function_call":
            self.open = item
        if not self.streaming:
            return []
        sent = [self.event("response.output_item.added", output_index=item.index, item=item.model(opened=True))]
        if item.kind != "function_call":
            empty = ResponsesOutputText(type="output_text", text="", annotations=[], logprobs=[]) \
                if item.kind == "message" else ResponsesReasoningText(type="reasoning_text", text="")
            sent.append(self.event("response.content_part.added", item_id=item.id, output_index=item.index,
                                   content_index=0, part=empty))
        return sent

    def close_open(self, status: str = "completed") -> list[tuple[bytes, bytes]]:
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = status
        if not self.streaming:
            return []
        done = "response.output_text.done" if item.kind == "message" else "response.reasoning_text.done"
        fields = {"logprobs": []} if item.kind == "message" else {}
        return [
            self.event(done, item_id=item.id, output_index=item.index, content_index=0, text=item.text, **fields),
            self.event("response.content_part.done", item_id=item.id, output_index=item.index, content_index=0,
                       part=item.part()),
            self.event("response.output_item.done", output_index=item.index, item=item.model()),
        ]

    def close_calls(self, status: str = "completed") -> list[tuple[bytes, bytes]]:
        sent = []
        for call in self.calls.values():
            call.status = status
            if self.streaming:
                sent += [
                    self.event("response.function_call_arguments.done", item_id=call.id, output_index=call.index,
                               name=call.name, arguments=call.arguments),
                    self.event("response.output_item.done", output_index=call.index, item=call.model()),
                ]
        self.calls = {}
        return sent

    def close(self, cut: bool) -> list[tuple[bytes, bytes]]:
        """The end of the answer: what is still open ends, "incomplete" when the length limit cut it."""
        if not self.items:  # nothing at all was said: an empty message, as OpenAI answers it
            sent = self.start(MessageItem(0))
        else:
            sent = []
        status = "incomplete" if cut else "completed"
        return sent + self.close_open(status) + self.close_calls(status)

    def models(self) -> list:
        return [item.model() for item in self.items]

    def message_text(self) -> str | None:
        texts = [item.text for item in self.items if item.kind == "message"]
        return "".join(texts) if any(texts) else None


# 5. One response: JSON, or a stream of events


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
            started = self.response("in_progress", [])
            sent += [self.lifecycle("response.created", started), self.lifecycle("response.in_progress", started)]
        for event in starts[0]:
            sent += self.output.take(event)
        return sent

    def said(self, update: Update, events: list[AnswerEvent]) -> list[tuple[bytes, bytes]]:
        # The step's tokens count as thinking if all it said was.
        tokens, self.counted = update.choice.tokens - self.counted, update.choice.tokens
        if events and type(events[-1]) is ReasoningDelta and all(type(event) is ReasoningDelta for event in events):
            self.reasoning_tokens += tokens
        output = self.output
        sent = []
        for event in events:
            if type(event) is TextDelta and event.text and output.writing_text:
                sent.append(output.text_delta(event.text))
            else:
                sent += output.take(event)
        return sent

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

    def lifecycle(self, kind: str, response: ResponsesResponse, **extra: bytes) -> tuple[bytes, bytes]:
        """An event that carries the whole response, written as the JSON answer is (what was set, by alias)."""
        output = self.output
        number, output.sequence = output.sequence, output.sequence + 1
        document = b'{"type":%s,"sequence_number":%d,"response":%s' % (
            to_json(kind), number, response.model_dump_json(exclude_unset=True, by_alias=True).encode())
        for name, value in extra.items():
            document += b',"%s":%s' % (name.encode(), value)
        return kind.encode(), document + b"}"

    def error_event(self, reason: str) -> tuple[bytes, bytes]:
        """The in-band ending of a failed stream: ``response.failed``, with OpenAI's error object for the SDKs to raise."""
        failed = self.response("failed", self.output.models(), self.usage(),
                               ResponsesError(code="server_error", message=reason))
        return self.lifecycle("response.failed", failed, error=openai_error_detail(reason))


# 6. The API


class ResponsesAPI(OpenAIAPI):
    OPERATIONS = spec_operations(schema.OPERATIONS, "createResponse", "retrieveResponse", "deleteResponse")

    def __init__(self, generation: Generation, models: ServedModels, settings: ResponsesSettings | None = None) -> None:
        super().__init__(generation, models)
        self.settings = settings if settings is not None else ResponsesSettings()
        self.store = ResponseStore(self.settings.store_size, self.settings.store_bytes)

    def operations(self) -> Mapping[str, Serve]:
        return {"createResponse": self.create_response, "retrieveResponse": self.retrieve_response,
                "deleteResponse": self.delete_response}

    async def retrieve_response(self, _body: None, context: RequestContext) -> ResponsesResponse:
        return self.store.find(context.params.get("response_id", ""), "response_id").response

    async def delete_response(self, _body: None, context: RequestContext) -> ResponsesDeleted:
        response_id = context.params.get("response_id", "")
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
