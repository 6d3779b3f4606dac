"""What one choice's generated text means, whatever API it is written for.

A model's raw text may hold an answer, tool calls and (for reasoning models)
its thinking. An ``AnswerReader`` follows one choice's text as it is generated
and turns it into API-neutral events (text, thinking, a tool call's start, a
piece of its arguments), by the request's tool plan; every API writes these
events in its own wire format (chat deltas, Responses events, Messages
blocks), and reads the finished answer (content, calls) from the same reader,
so the streamed and the whole answer can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.llm.engine import ToolCallParser
from pipelines.llm.tools import ToolPlan, call_id, read_calls


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


@dataclass
class AnswerReader:
    """One choice's text, read as it comes: ``feed`` each piece, ``finish`` once the choice has ended."""

    plan: ToolPlan
    parser: ToolCallParser | None = None  # the model's tool-call syntax, for the "auto" plan
    chat_body: dict | None = None  # the request as OpenAI's chat body, which vLLM's parsers read
    text: str = ""
    content: str | None = None  # the answer's text, once finished (None: there is none, only calls)
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, piece: str) -> list[AnswerEvent]:
        self.text += piece
        mode = self.plan.mode
        if mode == "text":
            return [TextDelta(piece)] if piece else []
        if mode == "named":
            events: list[AnswerEvent] = []
            if not self.calls:  # the forced call's name is known before its first argument is generated
                self.calls.append(ToolCall(call_id(), self.plan.name))
                events.append(CallStart(0, self.calls[0].id, self.plan.name))
            if piece:
                self.calls[0].arguments += piece
                events.append(CallArguments(0, piece))
            return events
        return []  # "required" and "auto": read once the answer is whole

    def start(self) -> list[AnswerEvent]:
        """What can be said before the first token (a forced call's name)."""
        return self.feed("") if self.plan.mode == "named" else []

    def finish(self, cut: bool) -> list[AnswerEvent]:
        """The events held back until the end; ``cut``: the answer stopped at the length limit."""
        mode = self.plan.mode
        if mode == "text":
            self.content = self.text
            return []
        if mode == "named":
            self.content = None
            return self.start() if not self.calls else []
        content, found = read_calls(self.plan, self.text, cut, self.parser, self.chat_body)
        self.content = content
        events: list[AnswerEvent] = [TextDelta(content)] if content else []
        for name, arguments in found:
            call = ToolCall(call_id(), name, arguments)
            self.calls.append(call)
            events += [CallStart(len(self.calls) - 1, call.id, name), CallArguments(len(self.calls) - 1, arguments)]
        return events
