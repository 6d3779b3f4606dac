"""What the llm pipeline asks of an engine, and what it reads back. No vLLM here.

Everything above the engine (generation, replies, the API modules) depends on
these protocols only. The vLLM adapter (``pipelines.llm.vllm_backend``) follows
them, and so does the tests' fake engine. The output protocols name exactly the
attributes of vLLM's own ``RequestOutput`` in its DELTA kind that the pipeline
reads, so the adapter hands vLLM's objects over as they are: nothing is copied
per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry


@dataclass
class Sampling:
    """What a request asks of the engine's sampler, in plain values: every API builds one."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 and 0: off
    min_p: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # alternatives per token; 0: the sampled token's own logprob only
    json_schema: dict[str, Any] | None = None  # the output must be JSON that matches it
    json_object: bool = False  # the output must be a JSON object


class SamplingRefused(ValueError):
    """The engine refuses these sampling values (e.g. a temperature above 2); the message is the engine's."""


class TokenLogprob(Protocol):
    """One candidate token's log-probability (vLLM's ``Logprob``)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


class CompletionDelta(Protocol):
    """What one choice gained in one engine step (vLLM's ``CompletionOutput``, DELTA kind)."""

    index: int
    text: str
    token_ids: Sequence[int]
    # One mapping per new token: candidate token id -> its logprob; None unless asked for.
    logprobs: Sequence[Mapping[int, TokenLogprob]] | None
    # None while generating; "stop" or "length" when done; anything else is the engine giving up.
    finish_reason: str | None
    # What stopped it, once done with "stop": the stop string it matched, a stop token's id, or None (end of sequence).
    stop_reason: int | str | None


class GenerationStep(Protocol):
    """One engine step of one request (vLLM's ``RequestOutput``)."""

    prompt_token_ids: Sequence[int] | None  # the prompt as the engine saw it
    outputs: Sequence[CompletionDelta]
    finished: bool


class Tokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ToolCallParser(Protocol):
    """Reads the tool calls out of a model's whole answer, in the model's own tool-call syntax."""

    name: str

    def extract(self, text: str, request: dict) -> tuple[str | None, list[tuple[str, str]]]:
        """The answer's content and its calls as (name, arguments JSON); ``request`` is the OpenAI chat body."""
        ...


class Engine(Protocol):
    """A running engine: the one way into the model."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int

    @property
    def errored(self) -> bool:
        """The engine has stopped for good (its process died or failed)."""
        ...

    def unfinished_requests(self) -> int: ...

    def generate(self, prompt: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[GenerationStep]:
        """The steps of one request. Raises SamplingRefused at once, before anything reaches the engine.

        The request is submitted when the iterator is first read, and aborted
        when it is closed before its last step.
        """
        ...

    def tool_parser_names(self) -> list[str]: ...

    def tool_parser(self, name: str) -> ToolCallParser: ...

    def metrics_registry(self) -> CollectorRegistry | None:
        """The engine's own Prometheus series, if it keeps any."""
        ...

    def shutdown(self) -> None: ...
