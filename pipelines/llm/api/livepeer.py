"""``POST /llm``: the Livepeer network's chat endpoint, plain or streamed (the contract's shapes)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from pydantic_core import to_json

from pipelines.llm import schema
from pipelines.llm.answers import AnswerReader, TextDelta
from pipelines.llm.api import LLMAPI, spec_operations
from pipelines.llm.conversation import require_turns, turn
from pipelines.llm.engine import GenerationStep, Sampling
from pipelines.llm.replies import ReplyTracker, usage_json, usage_of
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from pipelines.llm.tools import ToolPlan
from runner.pipeline import EventStream, OperationError, RequestContext, Serve


class LivepeerAPI(LLMAPI):
    OPERATIONS = spec_operations(schema.OPERATIONS, "genLLM")

    def operations(self) -> Mapping[str, Serve]:
        return {"genLLM": self.generate}

    async def generate(self, request: LLMRequest, context: RequestContext) -> LLMResponse | EventStream:
        # "" means whatever this runner serves; any other name must be one it serves.
        model = self.models.base if not request.model else self.models.find(request.model)
        if model is None:
            raise OperationError(f"model {request.model!r} is not served here; this runner serves {self.models.names()}")
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
        if request.stream:
            return EventStream(events=reply.events(steps), error_event=reply.error_event)
        return await reply.whole(steps)


TEXT = ToolPlan()  # /llm offers no tools


class LivepeerReply:
    """One /llm request's answer: an LLMResponse, or the contract's stream of them as JSON bytes.

    With a ``reader`` (a reasoning model), the answer is the reader's text only.
    """

    def __init__(self, model: str, tracker: ReplyTracker, reader: AnswerReader | None = None) -> None:
        context = tracker.context
        self.tracker = tracker
        self.reader = reader
        self.context = context
        self.completion_id = f"chatcmpl-{context.request_id}"
        self.model = model
        self.created = int(time.time())
        self.event_head = b'{"id":%s,"model":%s,"created":%d,"usage":' % (
            to_json(self.completion_id), to_json(model), self.created
        )

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

    async def whole(self, steps: AsyncIterator[GenerationStep]) -> LLMResponse:
        reader = self.reader
        async for step in steps:
            for update in self.tracker.take(step):
                if reader is not None:
                    reader.feed(update.text, update.token_ids)
        [choice] = self.tracker.choices
        text = choice.text
        if reader is not None:
            reader.finish(cut=choice.finish_reason == "length")
            text = reader.content or ""
        prompt, completion, total = usage_of(self.context)
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created,
            usage=LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total),
            choices=[LLMChoice(index=0, message=LLMMessage(role="assistant", content=text),
                               finish_reason=self.context.finish_reason)],
        )

    async def events(self, steps: AsyncIterator[GenerationStep]) -> AsyncIterator[bytes]:
        reader = self.reader
        try:
            async for step in steps:
                for update in self.tracker.take(step):
                    if reader is not None:
                        for event in reader.feed(update.text, update.token_ids):
                            if isinstance(event, TextDelta):
                                yield self.event(event.text)
                        if update.finished:
                            for event in reader.finish(cut=update.choice.finish_reason == "length"):
                                if isinstance(event, TextDelta):
                                    yield self.event(event.text)
                    elif update.text:
                        yield self.event(update.text)
                    if update.finished:
                        yield self.event("", finish_reason=self.context.finish_reason)
        finally:
            await steps.aclose()  # aborts the engine request if the stream stopped early
