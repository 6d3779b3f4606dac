"""The one reply assembler: what the engine's steps add up to, whatever the wire format.

A ``ReplyTracker`` follows one request's choices (several per prompt with ``n``,
several prompts in one completion request): their text, their tokens, their
logprobs and how each ended, and keeps the request's ``RequestContext`` (usage,
time to first token, finish reason) up to date as steps come. Each API module
writes what the tracker holds in its own wire format; the rules for usage,
finish reasons and logprobs live here and nowhere else.

``Reply`` is the one read loop over a generation's steps: each choice's answer
events (read by its ``AnswerReader``) and its end go to the API's writer
hooks, which return the stream's events; an API's whole answer is what the same
hooks kept, read after the same loop ran, so a stream and a whole answer cannot
disagree. The engine request is closed in one place, at the loop's end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic_core import to_json

from pipelines.llm.answers import AnswerEvent, AnswerReader, TextDelta
from pipelines.llm.engine import CompletionDelta, GenerationStep
from runner.pipeline import EventStream, RequestContext

LOGPROB_FLOOR = -9999.0  # -inf is not JSON
# Per prompt token (None for the first, which nothing predicts): candidate token id -> (logprob, rank, its text).
PromptLogprobs = list[dict[int, tuple[float, int | None, str | None]] | None]


class EngineStoppedEarly(RuntimeError):
    """The engine ended a request for a reason other than a stop or the length limit (it aborted it)."""


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    """One generated token with its log-probability and the likeliest alternatives, best first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class Choice:
    """One choice being generated: what came so far, and how it ended."""

    index: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once the engine is done with it
    stop_sequence: str | None = None  # the request's stop string that ended it, if one did
    started: bool = False  # its first step has been read
    reason: str = ""  # once ended: its finish reason for the client (tool calls known)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def cut(self) -> bool:
        """The choice ended at the length limit (max_tokens or the model's)."""
        return self.finish_reason == "length"


class Update:
    """What one engine step added to one choice.

    A plain class with slots, made once per step and choice: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, which cost more than the rest of the step's bookkeeping.
    """

    __slots__ = ("choice", "text", "logprobs", "token_ids")

    def __init__(self, choice: Choice, text: str, logprobs: Sequence[LogprobEntry],
                 token_ids: Sequence[int] = ()) -> None:
        self.choice = choice
        self.text = text
        self.logprobs = logprobs
        self.token_ids = token_ids  # the step's new tokens (a reasoning parser reads them)

    @property
    def finished(self) -> bool:
        return self.choice.finish_reason is not None


def usage_of(context: RequestContext) -> tuple[int, int, int]:
    """Prompt, completion and total tokens, as every API reports them."""
    prompt, completion = context.prompt_tokens, context.completion_tokens
    return prompt, completion, prompt + completion


USAGE_JSON = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}'  # prompt, completion, total


def usage_json(context: RequestContext) -> bytes:
    """OpenAI's and /llm's usage object, as JSON bytes (it is in every /llm stream event)."""
    return USAGE_JSON % usage_of(context)


def usage_model(context: RequestContext, model: type) -> Any:
    """OpenAI's and /llm's usage object as its response model ``model`` (CompletionUsage, LLMTokenUsage)."""
    prompt, completion, total = usage_of(context)
    return model(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def anthropic_usage_json(context: RequestContext) -> bytes:
    """Anthropic's usage object, as JSON bytes (every Messages stream's start and end carries it)."""
    return b'{"input_tokens":%d,"output_tokens":%d}' % (context.prompt_tokens, context.completion_tokens)


def finish_reason_of(delta: CompletionDelta) -> str | None:
    reason = delta.finish_reason
    if reason is None or reason in ("stop", "length"):
        return reason
    raise EngineStoppedEarly(f"the engine ended the request early ({reason})")


def choice_finish_reason(choice: Choice, called_tools: bool = False) -> str:
    """How one finished choice ended, for the client: the length limit wins over tool calls, which win over a stop."""
    if choice.cut:
        return "length"
    return "tool_calls" if called_tools else "stop"


def overall_finish_reason(reasons: Sequence[str]) -> str:
    """The request's finish reason (logs, metrics, /llm) from its choices' reasons."""
    for reason in ("tool_calls", "length"):
        if reason in reasons:
            return reason
    return "stop"


def logprob_entries(delta: CompletionDelta, top: int) -> list[LogprobEntry]:
    """The logprobs of one step's tokens, each with its ``top`` likeliest alternatives."""
    entries = []
    for token_id, candidates in zip(delta.token_ids, delta.logprobs or ()):
        sampled = candidates[token_id]
        ranked = sorted((c for c in candidates.values() if c.rank is not None and c.rank <= top),
                        key=lambda c: c.rank)[:top]
        entries.append(LogprobEntry(
            token=sampled.decoded_token or "",
            logprob=max(sampled.logprob, LOGPROB_FLOOR),
            top=tuple((c.decoded_token or "", max(c.logprob, LOGPROB_FLOOR)) for c in ranked),
        ))
    return entries


def prompt_logprob_entries(steps: Sequence) -> PromptLogprobs:
    return [None if candidates is None else {
        token_id: (max(candidate.logprob, LOGPROB_FLOOR), candidate.rank, candidate.decoded_token)
        for token_id, candidate in candidates.items()} for candidates in steps]


class ReplyTracker:
    """One request's choices as the engine's steps fill them in.

    ``prompt_lengths`` are the prompts as submitted (one per engine request);
    each has ``n`` choices, numbered prompt by prompt as OpenAI numbers them.
    ``logprobs`` is how many alternatives each token's entry keeps, or None
    when the request asked for no logprobs.
    """

    def __init__(self, context: RequestContext, prompt_lengths: Sequence[int] = (0,), n: int = 1,
                 logprobs: int | None = None) -> None:
        self.context = context
        self.n = n
        self.logprobs = logprobs
        self.prompt_lengths = list(prompt_lengths)
        self.choices = [Choice(index) for index in range(len(self.prompt_lengths) * n)]
        self.unfinished = len(self.choices)
        self.prompt_logprobs: list[PromptLogprobs | None] = [None] * len(self.prompt_lengths)  # when asked for

    def take(self, step: GenerationStep, prompt: int = 0) -> list[Update]:
        """Count one engine step of one prompt; what it added to each choice.

        Raises EngineStoppedEarly when the engine gave up on a choice.
        """
        context = self.context
        if step.prompt_token_ids is not None:  # what the engine saw, not what we meant to send
            seen = len(step.prompt_token_ids)
            context.prompt_tokens += seen - self.prompt_lengths[prompt]
            self.prompt_lengths[prompt] = seen
        if step.prompt_logprobs:  # on the first step only, when asked for
            self.prompt_logprobs[prompt] = prompt_logprob_entries(step.prompt_logprobs)
        updates = []
        choices, first = self.choices, prompt * self.n
        for delta in step.outputs:
            choice = choices[first + delta.index]
            token_ids, text = delta.token_ids, delta.text
            tokens = len(token_ids)
            context.count_tokens(tokens)
            choice.tokens += tokens
            choice.parts.append(text)
            entries = logprob_entries(delta, self.logprobs) if self.logprobs is not None else ()
            if entries:
                choice.logprobs.extend(entries)
            if delta.finish_reason is not None:  # most steps end nothing: the reason's rules only for the last
                reason = finish_reason_of(delta)
                if choice.finish_reason is None:
                    choice.finish_reason = reason
                    if isinstance(delta.stop_reason, str):
                        choice.stop_sequence = delta.stop_reason
                    self.unfinished -= 1
            updates.append(Update(choice, text, entries, token_ids))
        if not self.unfinished:
            context.finish_reason = overall_finish_reason([choice.finish_reason for choice in self.choices])
        return updates

    def settle(self, reasons: Sequence[str]) -> None:
        """The request's finish reason from the reasons its choices were given (tool calls decided at the end)."""
        self.context.finish_reason = overall_finish_reason(reasons)


NOTHING: tuple = ()  # what a hook returns when it writes nothing (shared, never a new object)
TEXT_MARK = "\ue000text\ue000"  # private-use characters around a word: JSON writes it as it is


def text_frame(written: bytes) -> tuple[bytes, bytes]:
    """An event's bytes before and after its text, cut out of the event as its writer wrote it with ``TEXT_MARK`` for
    the text: a hot path then writes ``head + to_json(text) + tail``, the writer's own bytes, built once. The mark is
    looked for last, behind the ids and names an event may start with."""
    head, mark, tail = written.rpartition(to_json(TEXT_MARK))
    if not mark:
        raise ValueError("the event was not written with TEXT_MARK for its text")
    return head, tail


class Reply:
    """One request's answer in one API's wire format: the one read loop, and the writer hooks an API fills in.

    ``readers``: one ``AnswerReader`` per choice, or None where the answer is the text as generated (no tools, no
    thinking to tell apart). ``streaming``: the hooks write the stream's events; a whole answer runs the same
    loop and hooks with it False (they then keep what the answer says and write nothing), then ``answer()``
    reads what they kept. Each hook returns a sequence of the stream's events (bytes, or (name, bytes) pairs
    where ``NAMED``).
    """

    NAMED: ClassVar[bool] = False  # the events are (name, data) pairs, framed with their name

    tracker: ReplyTracker
    readers: list[AnswerReader] | None = None
    streaming: bool = True

    def opening(self, starts: list[list[AnswerEvent]]) -> Sequence:
        """Before the first step; ``starts``: what each choice's answer says before its first token."""
        return NOTHING

    def began(self, choice: Choice, start: list[AnswerEvent]) -> Sequence:
        """A choice's first step has come (``start``: what its answer says before its first token)."""
        return NOTHING

    def said(self, update: Update, events: list[AnswerEvent] | None) -> Sequence:
        """One step of one choice: its answer events, or None without readers (the text is ``update.text``)."""
        raise NotImplementedError

    def said_text(self, update: Update) -> Sequence:
        """One step of a choice whose reader is ``plain`` (the text plan, no thinking): its one answer event would be
        ``TextDelta(update.text)``, none for an empty piece. The reader has kept the text. An API whose hot path
        writes text may write it from ``update.text`` here, without the event object; by default, ``said``."""
        return self.said(update, [TextDelta(update.text)] if update.text else [])

    def ended(self, choice: Choice, events: list[AnswerEvent], reason: str) -> Sequence:
        """A choice has ended: the events its reader held back, and its finish reason for the client."""
        return NOTHING

    def closing(self) -> Sequence:
        """Every choice has ended (the request's finish reason is settled)."""
        return NOTHING

    def answer(self) -> Any:
        """The whole answer, from what the hooks kept."""
        raise NotImplementedError

    def error_event(self, reason: str) -> Any:
        """The in-band ending of a stream that failed after its header went out."""
        raise NotImplementedError

    async def events(self, steps: AsyncIterator) -> AsyncIterator:
        """The one read loop: the steps (or (prompt, step) pairs of several prompts) through the readers into the
        hooks; closing it early, or its end, closes the steps (an unfinished engine request is aborted)."""
        tracker, readers, said, said_text = self.tracker, self.readers, self.said, self.said_text  # once per step
        try:
            starts = [reader.start() for reader in readers] if readers is not None else []
            for data in self.opening(starts):
                yield data
            async for step in steps:
                prompt = 0
                if type(step) is tuple:
                    prompt, step = step
                for update in tracker.take(step, prompt):
                    choice = update.choice
                    reader = readers[choice.index] if readers is not None else None
                    if not choice.started:
                        choice.started = True
                        for data in self.began(choice, starts[choice.index] if reader is not None else []):
                            yield data
                    if reader is None:
                        sent = said(update, None)
                    elif reader.plain:  # the most common reader, once per token: no event object, no list
                        reader.keep_text(update.text)
                        sent = said_text(update)
                    else:
                        sent = said(update, reader.feed(update.text, update.token_ids))
                    for data in sent:
                        yield data
                    if choice.finish_reason is not None:
                        if reader is None:
                            events, reason = [], choice_finish_reason(choice)
                        else:
                            events = reader.finish(cut=choice.cut)
                            reason = choice_finish_reason(choice, bool(reader.calls))
                        choice.reason = reason
                        for data in self.ended(choice, events, reason):
                            yield data
            if readers is not None:  # tool calls are known only once each answer has ended
                tracker.settle([choice.reason for choice in tracker.choices])
            for data in self.closing():
                yield data
        finally:
            await steps.aclose()

    async def whole(self, steps: AsyncIterator) -> Any:
        """The whole answer: the same loop and hooks as the stream, not streaming, then what they kept."""
        self.streaming = False
        async for _ in self.events(steps):
            pass
        return self.answer()

    async def reply(self, stream: bool, steps: AsyncIterator) -> Any:
        """The answer as the request asked: a stream of events, or the whole answer."""
        if stream:
            return EventStream(events=self.events(steps), error_event=self.error_event, named=self.NAMED)
        return await self.whole(steps)
