"""``POST /llm``: the Livepeer network's chat endpoint, plain or streamed (the contract's shapes)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from pydantic_core import to_json

from pipelines.llm import schema
from pipelines.llm.api import LLMAPI, spec_operations
from pipelines.llm.conversation import require_turns, turn
from pipelines.llm.engine import GenerationStep, Sampling
from pipelines.llm.replies import ReplyTracker, usage_json, usage_of
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
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
        prompt = self.generation.render_chat(
            [turn(index, message.role, message.content) for index, message in enumerate(request.messages)]
        )
        sampling = Sampling(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k
        )
        steps = self.generation.start(prompt, sampling, context, model)
        reply = LivepeerReply(model.id, ReplyTracker(context, [len(prompt)]))
        if request.stream:
            return EventStream(events=reply.events(steps), error_event=reply.error_event)
        return await reply.whole(steps)


class LivepeerReply:
    """One /llm request's answer: an LLMResponse, or the contract's stream of them as JSON bytes."""

    def __init__(self, model: str, tracker: ReplyTracker) -> None:
        context = tracker.context
        self.tracker = tracker
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
        async for step in steps:
            self.tracker.take(step)
        [choice] = self.tracker.choices
        prompt, completion, total = usage_of(self.context)
        return LLMResponse(
            id=self.completion_id, model=self.model, created=self.created,
            usage=LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total),
            choices=[LLMChoice(index=0, message=LLMMessage(role="assistant", content=choice.text),
                               finish_reason=self.context.finish_reason)],
        )

    async def events(self, steps: AsyncIterator[GenerationStep]) -> AsyncIterator[bytes]:
        try:
            async for step in steps:
                for update in self.tracker.take(step):
                    if update.text:
                        yield self.event(update.text)
                    if update.finished:
                        yield self.event("", finish_reason=self.context.finish_reason)
        finally:
            await steps.aclose()  # aborts the engine request if the stream stopped early
