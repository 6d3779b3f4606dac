"""A response's output items (message, reasoning, function call) as the answer's events build them, and the stream
events that say so (vLLM's ``streaming_events``)."""

from __future__ import annotations

import uuid

from pydantic_core import to_json

from pipelines.llm.answers import AnswerEvent, CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.schema import (
    ResponsesFunctionCall,
    ResponsesOutputMessage,
    ResponsesOutputText,
    ResponsesReasoningItem,
    ResponsesReasoningText,
)


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
