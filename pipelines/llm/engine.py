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
from pathlib import Path
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
    # vLLM's own sampling parameters (its OpenAI server's extras), in vLLM's meanings.
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: none asked for
    bad_words: list[str] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None
    # Structured outputs: at most one constraint of these.
    json_schema: dict[str, Any] | None = None  # the output must be JSON that matches it
    json_object: bool = False  # the output must be a JSON object
    regex: str | None = None
    choice: list[str] | None = None  # the output is one of these strings
    grammar: str | None = None  # an EBNF (or Lark) grammar
    structural_tag: dict[str, Any] | None = None  # xgrammar's structural tag: free text with constrained tags in it
    # How a JSON constraint treats whitespace and undeclared properties (vLLM's options).
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @property
    def heavy_checks(self) -> bool:
        """The engine's checks of this request take real CPU: a grammar to compile, bad words to tokenise."""
        return self.constrained_from_start or self.structural_tag is not None or bool(self.bad_words)

    @property
    def constrained_from_start(self) -> bool:
        """Every token is constrained, the first included: no room for free text (or a model's thinking) first."""
        return (self.json_schema is not None or self.json_object or self.regex is not None
                or self.choice is not None or self.grammar is not None)


class SamplingRefused(ValueError):
    """The engine refuses these sampling values (e.g. a temperature above 2); the message is the engine's, and
    ``param`` the request field it names, when it names one."""

    def __init__(self, msg: str, param: str | None = None) -> None:
        super().__init__(msg)
        self.param = param


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter the engine applies on top of the base model, for the requests that ask for it."""

    name: str
    id: int  # unique for the engine's life: the engine caches an adapter's weights under it
    path: Path  # a folder in PEFT's format (adapter_config.json and its weights)


class AdapterRefused(ValueError):
    """The engine cannot load this adapter; the message is the engine's."""


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
    # Per prompt token (the first has none): candidate token id -> its logprob; only when asked for.
    prompt_logprobs: Sequence[Mapping[int, TokenLogprob] | None] | None
    outputs: Sequence[CompletionDelta]
    finished: bool


class Tokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]: ...


# A piece of one tool call as a parser reads it: (the call's place, its name once known, a piece of its arguments).
CallPiece = tuple[int, str | None, str | None]


class ToolCallStream(Protocol):
    """One answer's tool calls read as the answer is generated (one per choice: it keeps state)."""

    def feed(self, text: str, token_ids: Sequence[int] | None) -> tuple[str, list[CallPiece]]:
        """This piece's answer text, and the pieces of calls it completed (``token_ids`` None: not known)."""
        ...

    def finish(self) -> list[CallPiece]:
        """What the parser held back until the end (the rest of the last call's arguments)."""
        ...


class ToolCallParser(Protocol):
    """Reads the tool calls out of a model's answer, in the model's own tool-call syntax."""

    name: str

    def extract(self, text: str, request: dict) -> tuple[str | None, list[tuple[str, str]]]:
        """The answer's content and its calls as (name, arguments JSON); ``request`` is the OpenAI chat body."""
        ...

    def stream(self, request: dict) -> ToolCallStream:
        """A reader for one answer as it is generated; ``request`` is the OpenAI chat body."""
        ...


class ReasoningStream(Protocol):
    """One answer's thinking told apart from its answer as it is generated (one per choice: it keeps state)."""

    def feed(self, text: str, token_ids: Sequence[int] | None, finished: bool = False) -> tuple[str, str]:
        """This piece as (thinking, answer) text; ``finished``: it is the answer's last piece (``token_ids`` None:
        not known)."""
        ...


class ReasoningParser(Protocol):
    """A reasoning model's thinking syntax (``<think>...</think>`` and the like)."""

    name: str

    def stream(self, prompt_token_ids: Sequence[int] | None) -> ReasoningStream:
        """A reader for one answer to this prompt (a prompt may already have closed the thinking)."""
        ...


class Engine(Protocol):
    """A running engine: the one way into the model."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    dtype: str  # the weights' dtype as the engine runs them (DTYPE=auto resolved), e.g. "float32"

    @property
    def errored(self) -> bool:
        """The engine has stopped for good (its process died or failed)."""
        ...

    def unfinished_requests(self) -> int: ...

    def generate(self, prompt: list[int], sampling: Sampling, request_id: str,
                 adapter: Adapter | None = None) -> AsyncIterator[GenerationStep]:
        """The steps of one request, on the base model or through ``adapter``.

        Raises SamplingRefused at once, before anything reaches the engine. The
        request is submitted when the iterator is first read, and aborted when
        it is closed before its last step.
        """
        ...

    async def add_adapter(self, adapter: Adapter) -> None:
        """Load ``adapter``'s weights so that requests may ask for it; AdapterRefused when the engine cannot."""
        ...

    async def remove_adapter(self, adapter: Adapter) -> None:
        """Drop ``adapter``'s weights; no request may ask for it any more."""
        ...

    def tool_parser_names(self) -> list[str]: ...

    def tool_parser(self, name: str) -> ToolCallParser: ...

    def reasoning_parser_names(self) -> list[str]: ...

    def reasoning_parser(self, name: str) -> ReasoningParser:
        """Raises ValueError when this model's tokenizer lacks what the parser needs."""
        ...

    def metrics_registry(self) -> CollectorRegistry | None:
        """The engine's own Prometheus series, if it keeps any."""
        ...

    def grammar_tokenizer_info(self) -> str | None:
        """xgrammar's TokenizerInfo of this model, serialized, for the time-limited grammar check
        (``pipelines.llm.grammar``); None when this engine compiles no grammars that way (nothing to check)."""
        ...

    def share(self, index: int) -> Any:
        """What API process ``index`` needs to join this engine (started for API_PROCESSES clients), picklable."""
        ...

    def lose(self) -> None:
        """A joined client (API_PROCESSES): the engine it joined is gone, which only the process that started it can
        see. Every request in flight fails as the engine's death fails it there, every new one too; ``errored``."""
        ...

    def shutdown(self) -> None: ...
