"""``POST /v1/completions``: OpenAI's (legacy) text completions, JSON or SSE chunks.

Several prompts in one request run in the engine at once; a stream interleaves
their choices as they are generated, each choice's chunks in order and told
apart by ``index`` (prompt by prompt, ``n`` each), as OpenAI orders them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic_core import to_json

from pipelines.llm.api import RequestSize, bad
from pipelines.llm.api.openai_base import (
    ChunkEnvelope,
    OpenAIAPI,
    OpenAIReply,
    prompt_logprobs_json,
    response_format_constraint,
    structured_outputs,
)
from pipelines.llm.replies import (
    NOTHING,
    TEXT_MARK,
    Choice,
    LogprobEntry,
    ReplyTracker,
    Update,
    text_frame,
    usage_model,
)
from pipelines.llm.schema import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionUsage
from runner.pipeline import RequestContext


class CompletionAPI(OpenAIAPI):
    SERVES = {"createCompletion": "completion"}

    def request_size(self, operation_id: str, request: CompletionRequest) -> RequestSize:
        prompts = 1 if isinstance(request.prompt, str) else len(request.prompt)
        n, best_of = request.n or 1, request.best_of or 1
        return RequestSize(prompts, max(n, best_of), "prompt", "best_of" if best_of > n else "n")

    async def completion(self, request: CompletionRequest, context: RequestContext):
        model = self.served(request.model)
        texts = prompts(request)
        include_usage = self.include_usage(request)
        constraint = structured_outputs(request, *response_format_constraint(request.response_format))
        runs = []
        for text in texts:
            prompt = await self.generation.encode(text, add_special_tokens=request.add_special_tokens is not False)
            prompt = self.generation.truncate(prompt, request.truncate_prompt_tokens, request.truncation_side)
            runs.append((prompt, self.sampling(request, self.max_tokens(request.max_tokens, prompt),
                                               logprobs=request.logprobs, **constraint)))
        steps = await self.generation.start_all(runs, context, model)
        tracker = ReplyTracker(context, [len(prompt) for prompt, _ in runs], n=request.n or 1,
                               logprobs=request.logprobs)
        reply = CompletionReply(model.id, texts if request.echo else None, tracker, include_usage)
        return await reply.reply(bool(request.stream), steps)


def prompts(request: CompletionRequest) -> list[str]:
    if request.suffix is not None:
        raise bad("suffix is not supported", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise bad("best_of is supported only equal to n", "best_of")
    if request.echo and request.logprobs is not None:
        raise bad("echo with logprobs is not supported", "echo")
    texts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    if any(not text for text in texts):
        raise bad("a prompt must not be empty", "prompt")
    return texts


def completion_logprobs(entries: Sequence[LogprobEntry], offset: int) -> CompletionLogprobs:
    """OpenAI's completion logprobs for tokens whose text starts ``offset`` characters into the choice."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[dict(entry.top) for entry in entries],
        text_offset=offsets,
    )


class CompletionReply(OpenAIReply):
    """One completion request's tracked choices as a Completion, or as a stream of chunks (the text as generated:
    no answer readers)."""

    def __init__(self, model: str, echoed: list[str] | None, tracker: ReplyTracker, include_usage: bool) -> None:
        self.model = model
        self.echoed = echoed  # the prompts, when each choice's text starts with its prompt
        self.tracker = tracker
        self.context = tracker.context
        self.with_logprobs = tracker.logprobs is not None
        self.id = f"cmpl-{self.context.request_id}"
        self.created = int(time.time())
        self.envelope = ChunkEnvelope("text_completion", self.id, self.created, model, include_usage)
        self.echoing = ""  # the prompt that goes in front of a choice's first chunk
        self.offsets: dict[int, int] = {}  # per choice, the characters its chunks' logprobs have covered
        # Per choice, an unfinished text chunk's bytes around its text (no logprobs: the hot path).
        self.text_frames = {choice.index: text_frame(self.choice_chunk(choice, TEXT_MARK, None))
                            for choice in tracker.choices} if not self.with_logprobs else {}

    def echo(self, choice: Choice) -> str:
        return self.echoed[choice.index // self.tracker.n] if self.echoed else ""

    def began(self, choice: Choice, start: list) -> tuple:
        self.echoing = self.echo(choice)
        return NOTHING

    def said(self, update: Update, events: None) -> list[bytes] | tuple:
        if not self.streaming:
            return NOTHING
        choice, text = update.choice, update.text
        if text and not self.with_logprobs and not self.echoing and choice.finish_reason is None:  # the hot path
            head, tail = self.text_frames[choice.index]
            return (head + to_json(text) + tail,)
        logprobs = None
        if self.with_logprobs:  # the text's offset: the choice's characters before this step's (kept, not re-joined)
            offset = self.offsets.get(choice.index, 0)
            self.offsets[choice.index] = offset + len(text)
            logprobs = completion_logprobs(update.logprobs, offset)
        if self.echoing:
            text, self.echoing = self.echoing + text, ""
        if text or logprobs is not None or update.finished:
            return [self.choice_chunk(choice, text, logprobs)]
        return NOTHING

    def answer(self) -> Completion:
        choices = []
        for choice in self.tracker.choices:
            extra = {}
            prompt_logprobs = self.tracker.prompt_logprobs[choice.index // self.tracker.n]
            if prompt_logprobs is not None:
                extra["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs)
            choices.append(CompletionChoice(
                index=choice.index, text=self.echo(choice) + choice.text,
                logprobs=completion_logprobs(choice.logprobs, 0) if self.with_logprobs else None,
                finish_reason=choice.finish_reason, **extra))
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model,
                          choices=choices, usage=usage_model(self.context, CompletionUsage))

    def choice_chunk(self, choice: Choice, text: str, logprobs: CompletionLogprobs | None) -> bytes:
        return self.envelope.chunk(b'{"index":%d,"text":%s,"logprobs":%s,"finish_reason":%s}' % (
            choice.index, to_json(text), b"null" if logprobs is None else to_json(logprobs),
            to_json(choice.finish_reason)
        ))
