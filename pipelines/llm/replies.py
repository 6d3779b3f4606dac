"""The one reply assembler: what the engine's steps add up to, whatever the wire format.

A ``ReplyTracker`` follows one request's choices (several per prompt with ``n``,
several prompts in one completion request): their text, their tokens, their
logprobs and how each ended, and keeps the request's ``RequestContext`` (usage,
time to first token, finish reason) up to date as steps come. Each API module
writes what the tracker holds in its own wire format; the rules for usage,
finish reasons and logprobs live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.llm.engine import CompletionDelta, GenerationStep
from runner.pipeline import RequestContext

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
    started: bool = False  # a stream has sent this choice's first chunk

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True, slots=True)
class Update:
    """What one engine step added to one choice."""

    choice: Choice
    text: str
    logprobs: Sequence[LogprobEntry]
    token_ids: Sequence[int] = ()  # the step's new tokens (a reasoning parser reads them)

    @property
    def finished(self) -> bool:
        return self.choice.finish_reason is not None


def usage_of(context: RequestContext) -> tuple[int, int, int]:
    """Prompt, completion and total tokens, as every API reports them."""
    prompt, completion = context.prompt_tokens, context.completion_tokens
    return prompt, completion, prompt + completion


def usage_json(context: RequestContext) -> bytes:
    """OpenAI's and /llm's usage object, as JSON bytes (it is in every /llm stream event)."""
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % usage_of(context)


def finish_reason_of(delta: CompletionDelta) -> str | None:
    reason = delta.finish_reason
    if reason is None or reason in ("stop", "length"):
        return reason
    raise EngineStoppedEarly(f"the engine ended the request early ({reason})")


def choice_finish_reason(choice: Choice, called_tools: bool = False) -> str:
    """How one finished choice ended, for the client: the length limit wins over tool calls, which win over a stop."""
    if choice.finish_reason == "length":
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
        for delta in step.outputs:
            choice = self.choices[prompt * self.n + delta.index]
            context.count_tokens(len(delta.token_ids))
            choice.tokens += len(delta.token_ids)
            choice.parts.append(delta.text)
            entries = logprob_entries(delta, self.logprobs) if self.logprobs is not None else ()
            if entries:
                choice.logprobs.extend(entries)
            reason = finish_reason_of(delta)
            if reason is not None and choice.finish_reason is None:
                choice.finish_reason = reason
                if isinstance(delta.stop_reason, str):
                    choice.stop_sequence = delta.stop_reason
                self.unfinished -= 1
            updates.append(Update(choice, delta.text, entries, delta.token_ids))
        if not self.unfinished:
            context.finish_reason = overall_finish_reason([choice.finish_reason for choice in self.choices])
        return updates

    def settle(self, reasons: Sequence[str]) -> None:
        """The request's finish reason from the reasons its choices were given (tool calls decided at the end)."""
        self.context.finish_reason = overall_finish_reason(reasons)
