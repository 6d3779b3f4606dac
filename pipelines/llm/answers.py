"""What one choice's generated text means, whatever API it is written for.

A model's raw text may hold an answer, tool calls and (for reasoning models)
its thinking. An ``AnswerReader`` follows one choice's text as it is generated
and turns it into API-neutral events (text, thinking, a tool call's start, a
piece of its arguments), by the request's tool plan; every API writes these
events in its own wire format (chat deltas, Responses events, Messages
blocks), and reads the finished answer (content, calls) from the same reader,
so the streamed and the whole answer can never disagree: a call's arguments
are the pieces its events carried, and a whole answer is read by feeding the
reader the same pieces.

The text goes through two stages. A reasoning model's thinking is told apart
first (vLLM's reasoning parser, which reads token ids: feed each piece with
its token ids). The answer after it is read by the plan: as text; as one
forced call's arguments ("named"); as the constrained JSON array of
"required" calls, read as it grows (a call starts once its name is known,
then its arguments stream as generated); as "auto" calls in the model's own
syntax through vLLM's parser's streaming mode, or in the runner's own syntax
(tools.py), read here as it grows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.llm.engine import CallPiece, ReasoningParser, ReasoningStream, ToolCallParser, ToolCallStream
from pipelines.llm.tools import CALL_END, CALL_OPEN, ToolPlan, call_begin, call_id


# A chat template's thinking syntax, and vLLM's reasoning parser for it (the first whose markers are all there).
REASONING_SYNTAX = (
    (("[THINK]",), "mistral"),  # Magistral
    (("<seed:think>",), "seed_oss"),
    (("<think>", "enable_thinking"), "qwen3"),  # Qwen3 (thinking on unless enable_thinking is false)
    (("<think>",), "deepseek_r1"),  # DeepSeek-R1 and its distillations
)


def reasoning_parser_for_template(chat_template: str) -> str | None:
    """The reasoning parser that fits a chat template, or None for a template that names no thinking syntax."""
    for markers, name in REASONING_SYNTAX:
        if all(marker in chat_template for marker in markers):
            return name
    return None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int  # the call's place among the choice's calls
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str  # the next piece of the call's arguments (JSON); the pieces add up to the whole arguments


AnswerEvent = TextDelta | ReasoningDelta | CallStart | CallArguments


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


class ToolCallsMalformed(RuntimeError):
    """A constrained answer that is not what its constraint allows (the engine failed it)."""


@dataclass
class AnswerReader:
    """One choice's text, read as it comes: ``feed`` each piece, ``finish`` once the choice has ended."""

    plan: ToolPlan
    parser: ToolCallParser | None = None  # the model's tool-call syntax, for the "auto" plan
    chat_body: dict | None = None  # the request as OpenAI's chat body, which vLLM's parsers read
    content: str | None = None  # the answer's text, once finished (None: there is none, only calls or thinking)
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    reasoning_parser: ReasoningParser | None = None  # a reasoning model's thinking syntax: its thinking is told apart
    prompt_token_ids: Sequence[int] | None = None  # the prompt, which may already have closed the thinking
    answer: list[str] = field(default_factory=list, repr=False)  # the answer's text pieces
    thinking: ReasoningStream | None = field(default=None, repr=False)
    calls_reader: RequiredCalls | TaggedCalls | ParsedCalls | None = field(default=None, repr=False)
    plain: bool = field(default=False, init=False, repr=False)  # the text plan, no thinking: each piece is text

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            self.thinking = self.reasoning_parser.stream(self.prompt_token_ids)
        plan = self.plan
        self.plain = plan.mode == "text" and self.thinking is None
        if plan.mode == "required":
            self.calls_reader = RequiredCalls()
        elif plan.mode == "auto" and plan.own_syntax:
            self.calls_reader = TaggedCalls(plan.functions)
        elif plan.mode == "auto":
            if self.parser is None:
                raise ValueError("the auto plan in the model's own syntax needs its tool-call parser")
            self.calls_reader = ParsedCalls(self.parser.stream(self.chat_body or {}))

    def feed(self, piece: str, token_ids: Sequence[int] | None = None) -> list[AnswerEvent]:
        """The events of one generated piece; ``token_ids``: its tokens (needed to tell a model's thinking apart)."""
        if self.plain:  # the most common reader: read_answer's text plan and record's text, inline
            if piece:
                self.answer.append(piece)
                return [TextDelta(piece)]
            return []
        events: list[AnswerEvent] = []
        if self.thinking is not None:
            thought, piece = self.thinking.feed(piece, token_ids)
            if thought:
                events.append(self.record(ReasoningDelta(thought)))
            token_ids = None if thought else token_ids
        return self.read_answer(piece, token_ids, events)

    def keep_text(self, piece: str) -> None:
        """``feed`` of a ``plain`` reader, keeping the piece without saying it: its one event is the piece as text
        (``Reply``'s read loop writes it from the piece, without the event object)."""
        if piece:
            self.answer.append(piece)

    def start(self) -> list[AnswerEvent]:
        """What can be said before the first token (a forced call's name)."""
        return self.read_answer("", None, []) if self.plan.mode == "named" else []

    def finish(self, cut: bool) -> list[AnswerEvent]:
        """The events held back until the end; ``cut``: the answer stopped at the length limit."""
        events: list[AnswerEvent] = []
        if self.thinking is not None:
            thought, rest = self.thinking.feed("", (), finished=True)
            if thought:
                events.append(self.record(ReasoningDelta(thought)))
            self.read_answer(rest, None, events)
        mode = self.plan.mode
        if mode == "named" and not self.calls:
            self.read_answer("", None, events)
        elif self.calls_reader is not None:
            events += [self.record(event) for event in self.calls_reader.finish(cut)]
        content = "".join(self.answer)
        self.content = content if content or (mode in ("text", "auto") and not self.calls and not self.reasoning) \
            else None
        return events

    def read_answer(self, piece: str, token_ids: Sequence[int] | None, events: list[AnswerEvent]) -> list[AnswerEvent]:
        mode = self.plan.mode
        if mode == "text":
            if piece:
                events.append(self.record(TextDelta(piece)))
        elif mode == "named":
            if not self.calls:  # the forced call's name is known before its first argument is generated
                events.append(self.record(CallStart(0, call_id(), self.plan.name)))
            if piece:
                events.append(self.record(CallArguments(0, piece)))
        else:
            events += [self.record(event) for event in self.calls_reader.feed(piece, token_ids)]
        return events

    def record(self, event: AnswerEvent) -> AnswerEvent:
        """Keep what the event says: the whole answer is what its events added up to."""
        if isinstance(event, TextDelta):
            self.answer.append(event.text)
        elif isinstance(event, CallArguments):
            self.calls[event.index].arguments += event.text
        elif isinstance(event, CallStart):
            self.calls.append(ToolCall(event.id, event.name))
        else:
            self.reasoning += event.text
        return event


class JSONValue:
    """Follows one JSON value character by character, to tell where it ends."""

    __slots__ = ("kind", "depth", "in_string", "escaped", "done")

    def __init__(self) -> None:
        self.kind = ""  # "string", "nested" (object or array) or "scalar", from its first character
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def take(self, char: str) -> bool:
        """Whether ``char`` belongs to the value; False: the value (a scalar) ended before it."""
        if not self.kind:
            self.kind = "string" if char == '"' else "nested" if char in "{[" else "scalar"
            self.in_string = self.kind == "string"
            self.depth = self.kind == "nested"
            return True
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                self.done = self.kind == "string"
            return True
        if self.kind == "scalar":
            if char in ",}] \t\r\n":
                self.done = True
                return False
            return True
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class RequiredCalls:
    """The "required" plan's constrained JSON, ``[{"name": ..., "parameters": {...}}, ...]``, read as it grows."""

    def __init__(self) -> None:
        self.level = 0  # 0: before the array, 1: in it, 2: in a call's object
        self.ended = False  # the array is closed
        self.key: JSONValue | None = None
        self.key_text = ""
        self.value: JSONValue | None = None
        self.value_text = ""
        self.after_key = False  # between a key and its ':' (and the value's first character)
        self.name: str | None = None
        self.held = ""  # arguments generated before the call's name
        self.started = False  # this call's CallStart went out
        self.calls = 0
        self.bad = False
        self.text = ""

    def feed(self, piece: str, token_ids: Sequence[int] | None = None) -> list[AnswerEvent]:
        self.text += piece
        events: list[AnswerEvent] = []
        arguments: list[str] = []
        for char in piece:
            self.take(char, events, arguments)
        self.flush(events, arguments)
        return events

    def flush(self, events: list[AnswerEvent], arguments: list[str]) -> None:
        if arguments:
            events.append(CallArguments(self.calls - 1, "".join(arguments)))
            arguments.clear()

    def take(self, char: str, events: list[AnswerEvent], arguments: list[str]) -> None:
        if self.value is not None:
            if self.value.take(char):
                if self.key_text == "parameters":
                    if self.started:
                        arguments.append(char)
                    else:
                        self.held += char
                else:
                    self.value_text += char
                if not self.value.done:
                    return
                char = ""
            self.end_value(events, arguments)
            if not char:
                return
        if self.key is not None:
            self.key.take(char)
            self.key_text += char
            if self.key.done:
                self.key, self.key_text, self.after_key = None, json.loads(self.key_text), True
            return
        if char in " \t\r\n":
            return
        if self.level == 0:
            self.level, self.bad = (1, self.bad) if char == "[" else (0, True)
        elif self.level == 1:
            if char == "{":
                self.level, self.name, self.held, self.started = 2, None, "", False
            elif char == "]":
                self.level, self.ended = 0, True
            elif char != ",":
                self.bad = True
        elif self.after_key:
            if char != ":":
                self.after_key = False
                self.value, self.value_text = JSONValue(), ""
                self.take(char, events, arguments)
        elif char == '"':
            self.key, self.key_text = JSONValue(), ""
            self.key.take(char)
            self.key_text = char
        elif char == "}":
            if self.name is None:
                self.bad = True
            self.level = 1
        elif char != ",":
            self.bad = True

    def end_value(self, events: list[AnswerEvent], arguments: list[str]) -> None:
        if self.key_text == "name":
            self.name = json.loads(self.value_text)
            self.calls += 1
            self.started = True
            events.append(CallStart(self.calls - 1, call_id(), self.name))
            if self.held:
                arguments.append(self.held)
                self.held = ""
        elif self.key_text == "parameters":
            self.flush(events, arguments)
        self.value, self.value_text, self.key_text = None, "", ""

    def finish(self, cut: bool) -> list[AnswerEvent]:
        if (self.bad or not self.ended) and not cut:
            raise ToolCallsMalformed("the constrained tool calls are not the JSON array they must be")
        if not self.calls and self.text:  # cut before a call was named: what there is, is text
            return [TextDelta(self.text)]
        return []


class TaggedCalls:
    """"auto" calls in the runner's own syntax, among text: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``.

    Text is passed on as it comes, except a tail that may be the start of a
    call's opening; a call starts once its opening names one of the functions,
    and its arguments are passed on as generated up to where their JSON ends.
    """

    def __init__(self, functions: Sequence[str]) -> None:
        self.openings = {call_begin(name): name for name in functions}
        self.state = "text"  # "text", "head" (a call's opening), "arguments", "end" (its closing)
        self.held = ""  # text that may be a call's opening, or the opening so far, or the closing so far
        self.value: JSONValue | None = None
        self.calls = 0

    def feed(self, piece: str, token_ids: Sequence[int] | None = None) -> list[AnswerEvent]:
        events: list[AnswerEvent] = []
        text = self.held + piece
        self.held = ""
        while text:
            text = getattr(self, f"read_{self.state}")(text, events)
        return events

    def read_text(self, text: str, events: list[AnswerEvent]) -> str:
        found = text.find(CALL_OPEN)
        if found < 0:
            keep = partial_suffix(text, CALL_OPEN)
            said, self.held = text[: len(text) - keep], text[len(text) - keep:]
            if said:
                events.append(TextDelta(said))
            return ""
        if found:
            events.append(TextDelta(text[:found]))
        self.state = "head"
        return text[found:]

    def read_head(self, text: str, events: list[AnswerEvent]) -> str:
        for opening, name in self.openings.items():
            if text.startswith(opening):
                events.append(CallStart(self.calls, call_id(), name))
                self.calls += 1
                self.state, self.value = "arguments", JSONValue()
                return text[len(opening):]
        if any(opening.startswith(text) for opening in self.openings):
            self.held = text  # the opening so far
            return ""
        # Not an opening after all (an unconstrained model): the marker is text.
        events.append(TextDelta(CALL_OPEN))
        self.state = "text"
        return text[len(CALL_OPEN):]

    def read_arguments(self, text: str, events: list[AnswerEvent]) -> str:
        value = self.value
        start = len(text) - len(text.lstrip(" \t\r\n")) if not value.kind else 0  # before the JSON starts
        taken = start
        for char in text[start:]:
            if not value.take(char):
                break
            taken += 1
            if value.done:
                break
        if taken > start:
            events.append(CallArguments(self.calls - 1, text[start:taken]))
        if value.done:
            self.state = "end"
        return text[taken:]

    def read_end(self, text: str, events: list[AnswerEvent]) -> str:
        text = text.lstrip(" \t\r\n") if not self.held else text
        if text.startswith(CALL_END):
            self.state = "text"
            return text[len(CALL_END):]
        if CALL_END.startswith(text):
            self.held = text
            return ""
        self.state = "text"  # an unconstrained model that did not close the call: what follows is text
        return text

    def finish(self, cut: bool) -> list[AnswerEvent]:
        held, self.held = self.held, ""
        if self.state in ("text", "head") and held:
            return [TextDelta(held)]
        return []


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a beginning of ``marker``."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ParsedCalls:
    """"auto" calls in the model's own syntax, read by vLLM's parser in its streaming mode."""

    def __init__(self, stream: ToolCallStream) -> None:
        self.stream = stream
        self.places: dict[int, int] = {}  # the parser's call index -> the call's place among this answer's
        self.held: dict[int, str] = {}  # arguments of a call whose name the parser has not given yet

    def feed(self, piece: str, token_ids: Sequence[int] | None = None) -> list[AnswerEvent]:
        if not piece and not token_ids:
            return []
        text, pieces = self.stream.feed(piece, token_ids)
        events: list[AnswerEvent] = [TextDelta(text)] if text else []
        return self.calls(pieces, events)

    def calls(self, pieces: list[CallPiece], events: list[AnswerEvent]) -> list[AnswerEvent]:
        for index, name, arguments in pieces:
            if index not in self.places:
                if not name:
                    self.held[index] = self.held.get(index, "") + (arguments or "")
                    continue
                self.places[index] = len(self.places)
                events.append(CallStart(self.places[index], call_id(), name))
                arguments = self.held.pop(index, "") + (arguments or "")
            if arguments:
                events.append(CallArguments(self.places[index], arguments))
        return events

    def finish(self, cut: bool) -> list[AnswerEvent]:
        return self.calls(self.stream.finish(), [])
