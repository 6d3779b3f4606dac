"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

A request's ``system`` and ``messages`` (text, tool_use and tool_result blocks)
become the chat template's turns; its tools and tool choice become the shared
tool plan (``any`` is OpenAI's ``required``, ``tool`` a named function). The
answer is written from the shared answer events: text as ``text`` blocks,
thinking as ``thinking`` blocks, each call as a ``tool_use`` block whose input
streams as ``input_json_delta``. A stream is Anthropic's named events; the
whole message is built from the same events, so the two never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic_core import from_json, to_json

from pipelines.llm.answers import AnswerEvent, AnswerReader, CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api import LLMAPI, bad, in_band_error
from pipelines.llm.conversation import chat_body, require_turns, turn
from pipelines.llm.engine import Sampling
from pipelines.llm.replies import NOTHING, Choice, Reply, ReplyTracker, Update, anthropic_usage_json
from pipelines.llm.schema import (
    AnthropicContentBlock,
    AnthropicCountTokensRequest,
    AnthropicMessage,
    AnthropicMessagesRequest,
    AnthropicResponseText,
    AnthropicResponseThinking,
    AnthropicResponseToolUse,
    AnthropicTokensCount,
    AnthropicTool,
    AnthropicToolChoice,
    AnthropicUsage,
)
from pipelines.llm.tools import ToolPlan, plan_constraint
from runner.pipeline import RequestContext

# Anthropic's stop reasons for the shared finish reasons.
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
# The stream's event names, which are also the ``type`` of their data.
MESSAGE_START, MESSAGE_DELTA, MESSAGE_STOP = b"message_start", b"message_delta", b"message_stop"
BLOCK_START, BLOCK_DELTA, BLOCK_STOP = b"content_block_start", b"content_block_delta", b"content_block_stop"
TEXT_DELTA_EVENT = b'{"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":%s}}'  # index, text
EMPTY_BLOCKS = {"text": b'{"type":"text","text":""}', "thinking": b'{"type":"thinking","thinking":"","signature":""}'}


class AnthropicAPI(LLMAPI):
    SERVES = {"createMessage": "create_message", "countMessageTokens": "count_tokens"}

    async def prompt(self, request: AnthropicMessagesRequest | AnthropicCountTokensRequest
                     ) -> tuple[list[int], ToolPlan, list[dict]]:
        """The request's prompt as the chat template renders it, its tool plan and its turns."""
        tools = [function_tool(tool, index) for index, tool in enumerate(request.tools or ())]
        choice, parallel = openai_tool_choice(request.tool_choice)
        turns = conversation(request)
        prompt, plan = await self.chat_prompt(turns, tools, choice, parallel)
        return prompt, plan, turns

    async def create_message(self, request: AnthropicMessagesRequest, context: RequestContext):
        model = self.served(request.model)
        prompt, plan, turns = await self.prompt(request)
        sampling = Sampling(
            max_tokens=request.max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,  # Anthropic's defaults
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            stop=list(request.stop_sequences or ()),
            **plan_constraint(plan),
        )
        body = chat_body(model.id, turns, plan.template_tools) if plan.mode == "auto" else None
        steps = await self.generation.start(prompt, sampling, context, model)
        reply = MessageReply(self.generation.answer_reader(plan, sampling, prompt, body), model.id,
                             ReplyTracker(context, [len(prompt)]))
        return await reply.reply(bool(request.stream), steps)

    async def count_tokens(self, request: AnthropicCountTokensRequest, context: RequestContext) -> AnthropicTokensCount:
        self.served(request.model)
        prompt, _, _ = await self.prompt(request)
        return AnthropicTokensCount(input_tokens=len(prompt))


def function_tool(tool: AnthropicTool, index: int) -> dict:
    """An Anthropic tool as the OpenAI-style function tool the tool plan and the chat templates read."""
    if tool.type not in (None, "custom"):
        raise bad(f"tools.{index}.type: {tool.type!r} is one of Anthropic's server tools, which are not served; "
                  "a tool here is a client tool: name, description and input_schema", f"tools.{index}.type")
    if tool.input_schema is None:
        raise bad(f"tools.{index}.input_schema: Field required", f"tools.{index}.input_schema")
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def openai_tool_choice(choice: AnthropicToolChoice | None) -> tuple[str | dict | None, bool | None]:
    """Anthropic's tool_choice as OpenAI's, and whether parallel calls are allowed (None: not said)."""
    if choice is None:
        return None, None
    parallel = None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise bad("tool_choice.name: a tool_choice of type 'tool' needs the name of the tool", "tool_choice")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"any": "required"}.get(choice.type, choice.type), parallel


def conversation(request: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> list[dict]:
    """The system prompt and the messages as the chat template's turns.

    A user message's tool_result blocks become tool turns (before its text, if
    any); an assistant message's tool_use blocks its calls. Text blocks are
    joined with a newline, the system prompt's with nothing between them (as
    vllm serve joins both).
    """
    require_turns(request.messages)
    turns = []
    system = request.system
    if isinstance(system, list):
        system = "".join(block.text for block in system)
    if system:
        turns.append(turn(0, "system", system))
    for index, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, str):
            turns.append(turn(index, message.role, content))
            continue
        if not content and message.role != "assistant":
            raise bad(f"messages.{index}.content: a {message.role} message needs at least one content block",
                      f"messages.{index}.content")
        texts: list[str] = []
        calls: list[tuple[str, str, str]] = []
        results: list[dict] = []
        for place, block in enumerate(content):
            where = f"messages.{index}.content.{place}"
            kind = block.type
            if kind == "text":
                texts.append(required(block.text, f"{where}.text"))
            elif kind == "tool_use" and message.role == "assistant":
                calls.append((required(block.id, f"{where}.id"), required(block.name, f"{where}.name"),
                              json.dumps(block.input or {})))
            elif kind == "tool_result" and message.role == "user":
                results.append(turn(index, "tool", tool_result_text(block, where),
                                    tool_call_id=required(block.tool_use_id, f"{where}.tool_use_id")))
            elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
                continue  # chat templates leave a past turn's thinking out
            elif kind in ("tool_use", "tool_result", "thinking", "redacted_thinking"):
                raise bad(f"{where}.type: a {kind} block belongs in {'a user' if kind == 'tool_result' else 'an assistant'}"
                          f" message, not a {message.role} one", f"{where}.type")
            else:
                raise bad(f"{where}.type: content blocks of type {kind!r} are not served: this model reads "
                          "text, tool_use and tool_result blocks", f"{where}.type")
        turns.extend(results)
        if message.role == "system":
            turns.append(turn(index, "system", "".join(texts)))
        elif texts or calls or not (results or message.role == "user"):
            turns.append(turn(index, message.role, "\n".join(texts), tool_calls=calls))
    return turns


def required(value: str | None, where: str) -> str:
    if value is None:
        raise bad(f"{where}: Field required", where)
    return value


def tool_result_text(block: AnthropicContentBlock, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for place, part in enumerate(content):
        if part.type != "text":
            raise bad(f"{where}.content.{place}.type: tool_result content of type {part.type!r} is not served: "
                      "this model reads text", f"{where}.content.{place}.type")
        texts.append(required(part.text, f"{where}.content.{place}.text"))
    return "\n".join(texts)


def stop_reason(choice: Choice) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished choice."""
    reason = choice.reason
    if reason == "stop" and choice.stop_sequence is not None:
        return "stop_sequence", choice.stop_sequence
    return STOP_REASONS[reason], None


def tool_input(arguments: str) -> dict:
    """A call's input from its arguments; arguments cut short by max_tokens are read as far as they go,
    as Anthropic's SDK reads a stream's input_json_delta."""
    if not arguments.strip():
        return {}
    parsed = from_json(arguments, allow_partial=True)
    return parsed if isinstance(parsed, dict) else {}


class MessageReply(Reply):
    """One Messages request's answer (one choice): an AnthropicMessage, or Anthropic's stream of named events."""

    NAMED = True

    def __init__(self, reader: AnswerReader, model: str, tracker: ReplyTracker) -> None:
        self.reader = reader
        self.readers = [reader]
        self.tracker = tracker
        self.context = tracker.context
        self.model = model
        self.id = f"msg_{self.context.request_id}"
        # The stream's open block: its index and kind ("text", "thinking", "tool_use"); -1 and "" before the first.
        self.index = -1
        self.kind = ""
        self.call_blocks: dict[int, int] = {}  # a call's place among the calls -> its block's index
        self.kept: list[AnswerEvent] = []  # the whole answer's events (not streaming)

    def error_event(self, reason: str) -> tuple[bytes, bytes]:
        """The in-band ending of a failed stream: Anthropic's ``error`` event, which its SDK raises."""
        return in_band_error("anthropic", reason)

    def kept_whole(self, events: list[AnswerEvent]) -> bool:
        """Not streaming: the events are kept for the whole message (True), and nothing is written."""
        if self.streaming:
            return False
        self.kept += events
        return True

    def written(self, events: list[AnswerEvent], sent: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        for event in events:
            sent.extend(self.write(event))
        return sent

    def began(self, choice: Choice, start: list[AnswerEvent]) -> list[tuple[bytes, bytes]] | tuple:
        if self.kept_whole(start):
            return NOTHING
        return self.written(start, [(MESSAGE_START, self.message_start())])

    def said(self, update: Update, events: list[AnswerEvent]) -> list[tuple[bytes, bytes]] | tuple:
        if self.kept_whole(events):
            return NOTHING
        sent = []
        for event in events:
            if type(event) is TextDelta and self.kind == "text":  # most events: the next piece of text
                sent.append((BLOCK_DELTA, TEXT_DELTA_EVENT % (self.index, to_json(event.text))))
            else:
                sent.extend(self.write(event))
        return sent

    def said_text(self, update: Update) -> list[tuple[bytes, bytes]] | tuple:
        text = update.text
        if not self.streaming or self.kind != "text" or not text:
            return super().said_text(update)
        return ((BLOCK_DELTA, TEXT_DELTA_EVENT % (self.index, to_json(text))),)

    def ended(self, choice: Choice, events: list[AnswerEvent], reason: str) -> list[tuple[bytes, bytes]] | tuple:
        if self.kept_whole(events):
            return NOTHING
        sent = self.written(events, [])
        if self.index < 0:  # no content at all: Anthropic's empty answer is one empty text block
            sent.append(self.open("text"))
        sent.append((BLOCK_STOP, b'{"type":"content_block_stop","index":%d}' % self.index))
        sent.append((MESSAGE_DELTA, self.message_delta(*stop_reason(choice))))
        sent.append((MESSAGE_STOP, b'{"type":"message_stop"}'))
        return sent

    def answer(self) -> AnthropicMessage:
        [choice] = self.tracker.choices
        reason, sequence = stop_reason(choice)
        return AnthropicMessage(id=self.id, type="message", role="assistant", content=message_content(self.kept),
                                model=self.model, stop_reason=reason, stop_sequence=sequence,
                                usage=AnthropicUsage.model_validate_json(anthropic_usage_json(self.context)))

    def message_start(self) -> bytes:
        return b'{"type":"message_start","message":{"id":%s,"type":"message","role":"assistant","content":[],' \
               b'"model":%s,"stop_reason":null,"stop_sequence":null,"usage":%s}}' % (
                   to_json(self.id), to_json(self.model), anthropic_usage_json(self.context))

    def message_delta(self, reason: str, sequence: str | None) -> bytes:
        return b'{"type":"message_delta","delta":{"stop_reason":%s,"stop_sequence":%s},"usage":%s}' % (
            to_json(reason), to_json(sequence), anthropic_usage_json(self.context))

    def open(self, kind: str, block: bytes | None = None) -> tuple[bytes, bytes]:
        """Start the next content block (the caller has closed the open one)."""
        self.index += 1
        self.kind = kind
        return BLOCK_START, b'{"type":"content_block_start","index":%d,"content_block":%s}' % (
            self.index, block or EMPTY_BLOCKS[kind])

    def write(self, event: AnswerEvent) -> Iterator[tuple[bytes, bytes]]:
        """One answer event as Anthropic's events: a new block where the kind of content changes, then its delta."""
        if type(event) is CallArguments:
            if event.text:
                yield BLOCK_DELTA, b'{"type":"content_block_delta","index":%d,"delta":{"type":"input_json_delta",' \
                                   b'"partial_json":%s}}' % (self.call_blocks[event.index], to_json(event.text))
            return
        kind = "tool_use" if type(event) is CallStart else "thinking" if type(event) is ReasoningDelta else "text"
        if kind != self.kind or kind == "tool_use":
            if self.index >= 0:
                yield BLOCK_STOP, b'{"type":"content_block_stop","index":%d}' % self.index
            if kind == "tool_use":
                yield self.open(kind, b'{"type":"tool_use","id":%s,"name":%s,"input":{}}' % (
                    to_json(event.id), to_json(event.name)))
                self.call_blocks[event.index] = self.index
                return
            yield self.open(kind)
        if kind == "text":
            yield BLOCK_DELTA, TEXT_DELTA_EVENT % (self.index, to_json(event.text))
        else:
            yield BLOCK_DELTA, b'{"type":"content_block_delta","index":%d,"delta":{"type":"thinking_delta",' \
                               b'"thinking":%s}}' % (self.index, to_json(event.text))


def message_content(events: list[AnswerEvent]) -> list:
    """The whole answer's content blocks, from the same events a stream writes: consecutive text (or thinking)
    is one block, each call one tool_use block."""
    content: list = []
    arguments: dict[int, list[str]] = {}
    blocks: dict[int, AnthropicResponseToolUse] = {}
    for event in events:
        if type(event) is CallStart:
            blocks[event.index] = AnthropicResponseToolUse(type="tool_use", id=event.id, name=event.name, input={})
            arguments[event.index] = []
            content.append(blocks[event.index])
        elif type(event) is CallArguments:
            arguments[event.index].append(event.text)
        elif type(event) is ReasoningDelta:
            if content and type(content[-1]) is AnthropicResponseThinking:
                content[-1].thinking += event.text
            else:
                content.append(AnthropicResponseThinking(type="thinking", thinking=event.text, signature=""))
        elif content and type(content[-1]) is AnthropicResponseText:
            content[-1].text += event.text
        else:
            content.append(AnthropicResponseText(type="text", text=event.text))
    for index, block in blocks.items():
        block.input = tool_input("".join(arguments[index]))
    return content or [AnthropicResponseText(type="text", text="")]
