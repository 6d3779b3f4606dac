"""``POST /llm``: the Livepeer network's chat endpoint, plain or streamed (the contract's shapes)."""

from __future__ import annotations

import time

from pydantic_core import to_json

from pipelines.llm.answers import AnswerEvent, AnswerReader, TextDelta
from pipelines.llm.api import LLMAPI
from pipelines.llm.conversation import require_turns, turn
from pipelines.llm.engine import Sampling
from pipelines.llm.replies import USAGE_JSON, NOTHING, Choice, Reply, ReplyTracker, Update, usage_json, usage_model
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from pipelines.llm.tools import ToolPlan
from runner.pipeline import EventStream, RequestContext


class LivepeerAPI(LLMAPI):
    SERVES = {"genLLM": "generate"}

    async def generate(self, request: LLMRequest, context: RequestContext) -> LLMResponse | EventStream:
        model = self.served(request.model, blank_is_base=True)  # "" means whatever this runner serves
        require_turns(request.messages)
        prompt = await self.generation.render_chat(
            [turn(index, message.role, message.content) for index, message in enumerate(request.messages)]
        )
        sampling = Sampling(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k
        )
        steps = await self.generation.start(prompt, sampling, context, model)
        # A reasoning model's thinking is left out: the network's clients know no field for it.
        reader = self.generation.answer_reader(TEXT, sampling, prompt) if self.generation.reasoning_parser else None
        reply = LivepeerReply(model.id, ReplyTracker(context, [len(prompt)]), reader)
        return await reply.reply(bool(request.stream), steps)


TEXT = ToolPlan()  # /llm offers no tools
# ``LivepeerReply.event`` of a token's text, after the event's head: usage (prompt, completion, total), the text.
TOKEN_EVENT = USAGE_JSON + b',"choices":[{"index":0,"finish_reason":"","delta":{"role":"assistant","content":%b}}]}'


class LivepeerReply(Reply):
    """One /llm request's answer: an LLMResponse, or the contract's stream of them as JSON bytes.

    With a ``reader`` (a reasoning model), the answer is the reader's text only.
    """

    def __init__(self, model: str, tracker: ReplyTracker, reader: AnswerReader | None = None) -> None:
        context = tracker.context
        self.tracker = tracker
        self.reader = reader
        self.readers = [reader] if reader is not None else None
        self.context = context
        self.completion_id = f"chatcmpl-{context.request_id}"
        self.model = model
        self.created = int(time.time())
        self.event_head = b'{"id":%s,"model":%s,"created":%d,"usage":' % (
            to_json(self.completion_id), to_json(model), self.created
        )
        # A token's event, but for its counts and text, is the same for every token: one format to fill in.
        self.token_event = self.event_head.replace(b"%", b"%%") + TOKEN_EVENT

    def event(self, content: str, finish_reason: str = "", error: str | None = None) -> bytes:
        """One stream event, as the JSON bytes pydantic would write of its LLMResponse.

        Every event of a stream is built here, without models: this runs once
        per token for every stream, and four models and their serialisation
        cost several times what these few byte operations do. ``to_json``
        escapes text as pydantic does; the running ``usage`` is read now.
        """
        document = self.event_head + usage_json(self.context) + (
            b',"choices":[{"index":0,"finish_reason":%s,"delta":{"role":"assistant","content":%s}}]'
        ) % (to_json(finish_reason), to_json(content))
        if error is not None:
            document += b',"error":{"msg":%s}' % to_json(error)
        return document + b"}"

    def error_event(self, reason: str) -> bytes:
        """The in-band ending of a failed stream: one choice, empty content, finish_reason "error"."""
        return self.event("", finish_reason="error", error=reason)

    def text_event(self, content: str) -> bytes:
        """``event(content)`` for a token's text (the hot path): the usage and the text filled into one template."""
        context = self.context
        prompt, completion = context.prompt_tokens, context.completion_tokens
        return self.token_event % (prompt, completion, prompt + completion, to_json(content))

    def said(self, update: Update, events: list[AnswerEvent] | None) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        if events is None:  # the hot path: the text as generated
            return (self.text_event(update.text),) if update.text else NOTHING
        return [self.text_event(event.text) for event in events if type(event) is TextDelta]

    def ended(self, choice: Choice, events: list[AnswerEvent], reason: str) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        sent = [self.text_event(event.text) for event in events if type(event) is TextDelta]
        sent.append(self.event("", finish_reason=self.context.finish_reason))
        return sent

    def answer(self) -> LLMResponse:
        [choice] = self.tracker.choices
        text = self.reader.content or "" if self.reader is not None else choice.text
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created,
            usage=usage_model(self.context, LLMTokenUsage),
            choices=[LLMChoice(index=0, message=LLMMessage(role="assistant", content=text),
                               finish_reason=self.context.finish_reason)],
        )
