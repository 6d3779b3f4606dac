"""The conversation a Responses request rebuilds: its input items (and a stored response's history) as the chat
template's turns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pipelines.llm.api import bad
from pipelines.llm.conversation import turn
from pipelines.llm.limits import json_document
from pipelines.llm.schema import ResponsesContentPart, ResponsesInputItem
from runner.pipeline import OperationError

TEXT_PARTS = ("input_text", "output_text", "text")  # the content parts read as text, whatever the role


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
