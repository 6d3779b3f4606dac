"""A fake engine that follows the llm pipeline's ``Engine`` protocol, for the many tests around it.

It replays realistic steps, shaped as vLLM's ``RequestOutput`` in its DELTA kind:
the prompt's token ids on the first step, then one token per choice per step
with its text, token id and (when asked) logprobs with ranked alternatives,
``finish_reason`` "length" at ``max_tokens`` or "stop" where a stop string or the
script ends it, and failures (the engine dying mid-request, or giving up on a
request with "abort"). What each request generates is a ``Script``: by default
a fixed sentence, word by word, so the text is known in advance; a test may
hand in its own. The fake never proves what the real engine does: every
behaviour these tests cover is also proven once against vLLM over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jinja2 import Environment
from prometheus_client import CollectorRegistry

from pipelines.llm.engine import Adapter, AdapterRefused, Sampling, SamplingRefused
from pipelines.llm.layout import eight_bit_quantization

BOS, EOS = 256, 257  # the byte tokenizer's special tokens; bytes are tokens 0-255
THINK, END_THINK = 258, 259  # a reasoning model's markers, as vLLM's reasoning parsers find them in the vocabulary
SPECIAL_TOKENS = {"<s>": BOS, "</s>": EOS, "<think>": THINK, "</think>": END_THINK}
SPECIAL_TEXT = {token_id: text for text, token_id in SPECIAL_TOKENS.items()}
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(text) for text in SPECIAL_TOKENS) + ")")
VOCAB_SIZE = 260
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_WORDS = [word + " " for word in "Once upon a time there was a runner that served every token it was asked for.".split()]


class FakeTokenizer:
    """One token per UTF-8 byte, "<s>", "</s>", "<think>" and "</think>" as single tokens, and a small chat
    template (jinja), rendered as Hugging Face's tokenizers render one."""

    def __init__(self, chat_template: str = CHAT_TEMPLATE) -> None:
        self.chat_template = chat_template
        self.template = Environment().from_string(chat_template)

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        text = self.template.render(messages=conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                    raise_exception=raise_template_error, **kwargs)
        if continue_final_message:  # as Hugging Face's: the text ends where the last message's content does
            final = conversation[-1]["content"]
            text = text[: text.rindex(final) + len(final)]
        return text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        for piece in SPECIAL_PATTERN.split(text):
            ids.extend([SPECIAL_TOKENS[piece]] if piece in SPECIAL_TOKENS else piece.encode())
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        pieces, run = [], bytearray()
        for token in token_ids:
            if token < 256:
                run.append(token)
                continue
            pieces.append(run.decode(errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                pieces.append(SPECIAL_TEXT[token])
        pieces.append(run.decode(errors="replace"))
        return "".join(pieces)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return [SPECIAL_TEXT[token] if token >= 256 else bytes([token]).decode("latin-1") for token in token_ids]

    def get_vocab(self) -> dict[str, int]:
        return {**{bytes([token]).decode("latin-1"): token for token in range(256)}, **SPECIAL_TOKENS}

    def __len__(self) -> int:
        return VOCAB_SIZE


def token_id_of(word: str) -> int:
    """The token a scripted word stands for: a special token's id, else its first byte (EOS for nothing)."""
    return SPECIAL_TOKENS.get(word, word.encode()[0] if word else EOS)


def raise_template_error(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None  # the stop string that ended the choice, as vLLM reports it


@dataclass
class Step:
    prompt_token_ids: list[int] | None
    outputs: list[Delta]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class EngineDied(RuntimeError):
    """What a request of a dead engine raises (vLLM raises EngineDeadError)."""


@dataclass
class Script:
    """What the fake generates for a request: ``words(prompt, sampling, choice)`` gives each choice's tokens.

    A choice stops with "stop" when its words run out before ``max_tokens``;
    ``fail_at`` makes the engine die after that many steps; ``abort_at`` makes it
    give up on the request (finish reason "abort") at that step.
    """

    words: Callable[[list[int], Sampling, int], Sequence[str]] | None = None
    fail_at: int | None = None
    abort_at: int | None = None

    def tokens(self, prompt: list[int], sampling: Sampling, choice: int) -> Sequence[str]:
        if self.words is not None:
            return self.words(prompt, sampling, choice)
        # Endless by default (it runs to max_tokens); choices of a sampled request differ, as sampled ones would.
        offset = choice if sampling.temperature > 0 else 0
        return _Endless(DEFAULT_WORDS, offset)


class _Endless(Sequence):
    def __init__(self, words: list[str], offset: int) -> None:
        self.words, self.offset = words, offset

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index):  # type: ignore[override]
        return self.words[(index + self.offset) % len(self.words)]


def scripted_text(*texts: str) -> Script:
    """Each choice generates its text (the last one for choices beyond), one character per token (a special
    token's text, e.g. "<think>", as one token), then stops."""
    return Script(words=lambda prompt, sampling, choice: characters(texts[min(choice, len(texts) - 1)]))


def characters(text: str) -> list[str]:
    return [char for piece in SPECIAL_PATTERN.split(text)
            for char in ([piece] if piece in SPECIAL_TOKENS else list(piece))]


@dataclass
class ChoiceScript:
    words: Sequence[str]
    count: int = 0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass
class Submitted:
    prompt: list[int]
    sampling: Sampling
    request_id: str
    adapter: Adapter | None = None  # the LoRA adapter the request asked for; None: the base model
    aborted: bool = False
    finished: bool = False


class FakeEngine:
    """Follows ``pipelines.llm.engine.Engine``; every request it was handed is in ``submitted``."""

    def __init__(self, script: Script | None = None, max_model_len: int = 4096, step_seconds: float = 0.0,
                 chat_template: str = CHAT_TEMPLATE, tool_parsers: Mapping[str, Any] | None = None,
                 reasoning_parsers: Mapping[str, Any] | None = None) -> None:
        self.script = script or Script()
        self.tokenizer = FakeTokenizer(chat_template)
        self.max_model_len = max_model_len
        self.vocab_size = VOCAB_SIZE
        self.dtype = "float32"
        self.step_seconds = step_seconds
        self.tool_parsers = dict(tool_parsers or {})
        self.reasoning_parsers = dict(reasoning_parsers or {})
        self.submitted: list[Submitted] = []
        self.adapters: dict[int, Adapter] = {}  # loaded, by id
        self.refused_adapters: dict[str, str] = {}  # adapter name -> the reason the engine gives for refusing it
        self.running: set[str] = set()
        self.dead = False
        self.was_shut_down = False
        self.registry = CollectorRegistry()

    @property
    def errored(self) -> bool:
        return self.dead

    def die(self) -> None:
        """The engine's process dies: every running request fails, and so does every new one."""
        self.dead = True

    def lose(self) -> None:
        """A joined client told that its engine is gone: as its death."""
        self.die()

    def unfinished_requests(self) -> int:
        return len(self.running)

    def generate(self, prompt: list[int], sampling: Sampling, request_id: str,
                 adapter: Adapter | None = None) -> AsyncIterator[Step]:
        if sampling.temperature > 2:  # as vLLM refuses it
            raise SamplingRefused(f"temperature must be in [0, 2], got {sampling.temperature}.")
        if sampling.logprobs is not None and sampling.logprobs > 20:
            raise SamplingRefused(f"Requested sample logprobs of {sampling.logprobs}, which is greater than max allowed: 20")
        for name in ("stop_token_ids", "allowed_token_ids"):
            if any(token >= self.vocab_size for token in getattr(sampling, name) or ()):
                raise SamplingRefused(f"{name} contains out-of-vocab token id")
        if sampling.min_tokens > sampling.max_tokens:
            raise SamplingRefused(f"min_tokens must be less than or equal to max_tokens={sampling.max_tokens}, "
                                  f"got {sampling.min_tokens}.")
        return self.steps(list(prompt), sampling, request_id, adapter)

    def grammar_tokenizer_info(self) -> None:  # compiles no grammars: the grammar check has nothing to do
        return None

    async def add_adapter(self, adapter: Adapter) -> None:
        if adapter.name in self.refused_adapters:
            raise AdapterRefused(self.refused_adapters[adapter.name])
        self.adapters[adapter.id] = adapter

    async def remove_adapter(self, adapter: Adapter) -> None:
        self.adapters.pop(adapter.id, None)

    async def steps(self, prompt: list[int], sampling: Sampling, request_id: str,
                    adapter: Adapter | None = None) -> AsyncIterator[Step]:
        request = Submitted(prompt, sampling, request_id, adapter)
        self.submitted.append(request)
        if self.dead:
            raise EngineDied("the engine is dead")
        self.running.add(request_id)
        choices = [ChoiceScript(self.script.tokens(prompt, sampling, index)) for index in range(sampling.n)]
        step_number = 0
        try:
            while any(choice.finish_reason is None for choice in choices):
                await asyncio.sleep(self.step_seconds)
                if self.dead or self.script.fail_at == step_number:
                    self.dead = True
                    raise EngineDied("the engine's process died")
                outputs = [self.next_token(index, choice, sampling)
                           for index, choice in enumerate(choices) if choice.finish_reason is None]
                if self.script.abort_at == step_number:
                    for delta, choice in zip(outputs, choices):
                        delta.finish_reason = choice.finish_reason = "abort"
                finished = all(choice.finish_reason is not None for choice in choices)
                yield Step(prompt_token_ids=prompt if step_number == 0 else None, outputs=outputs, finished=finished,
                           prompt_logprobs=self.prompt_logprobs_of(prompt, sampling) if step_number == 0 else None)
                step_number += 1
            request.finished = True
        finally:
            request.aborted = not request.finished
            self.running.discard(request_id)

    def next_token(self, index: int, choice: ChoiceScript, sampling: Sampling) -> Delta:
        if choice.count >= len(choice.words):  # the script ran out: the model stopped
            choice.finish_reason = "stop"
            return Delta(index, "", [EOS], self.logprobs_of(sampling, "</s>", EOS), "stop")
        word = choice.words[choice.count]
        choice.count += 1
        choice.text += word
        for stop in sampling.stop:
            if stop in choice.text:  # as vLLM does: the text ends before the stop string
                kept = choice.text.index(stop)
                word = word[: max(0, len(word) - (len(choice.text) - kept))]
                choice.text = choice.text[:kept]
                choice.finish_reason, choice.stop_reason = "stop", stop
                break
        if choice.finish_reason is None and choice.count >= sampling.max_tokens:
            choice.finish_reason = "length"
        token_id = token_id_of(word)
        return Delta(index, word, [token_id], self.logprobs_of(sampling, word, token_id), choice.finish_reason,
                     choice.stop_reason)

    def prompt_logprobs_of(self, prompt: list[int], sampling: Sampling) -> list[dict[int, Logprob] | None] | None:
        """As vLLM's: nothing for the first prompt token, then each token with a made-up logprob."""
        if sampling.prompt_logprobs is None:
            return None
        return [None] + [{token: Logprob(-0.5, 1, self.tokenizer.decode([token]))} for token in prompt[1:]]

    @staticmethod
    def logprobs_of(sampling: Sampling, word: str, token_id: int) -> list[dict[int, Logprob]] | None:
        if sampling.logprobs is None:
            return None
        candidates = {token_id: Logprob(-0.25, 1, word)}
        for rank in range(2, sampling.logprobs + 2):
            alternative = (token_id + rank) % 256
            candidates.setdefault(alternative, Logprob(-0.25 * rank * rank, rank, chr(alternative)))
        return [candidates]

    def tool_parser_names(self) -> list[str]:
        return sorted(self.tool_parsers)

    def tool_parser(self, name: str):
        return self.tool_parsers[name]

    def reasoning_parser_names(self) -> list[str]:
        return sorted(self.reasoning_parsers)

    def reasoning_parser(self, name: str):
        parser = self.reasoning_parsers[name]
        if isinstance(parser, Exception):  # a parser this tokenizer cannot serve
            raise parser
        return parser

    def metrics_registry(self) -> CollectorRegistry:
        return self.registry

    def share(self, index: int) -> dict:
        return {"index": index}

    def shutdown(self) -> None:
        self.was_shut_down = True


MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "hidden_size": 128, "head_dim": 32, "intermediate_size": 256}


def fake_model_dir(folder: Path, config: dict | None = None) -> Path:
    """A local model folder as the host finds one: a config.json is all it reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or MODEL_CONFIG))
    return folder


class FakeBackend:
    """The host's backend, handing out one fake engine: what the host decides is recorded, nothing starts."""

    def __init__(self, engine: FakeEngine, platform: str = "cpu") -> None:
        self.engine = engine
        self.device_type = platform
        self.args: SimpleNamespace | None = None
        self.environment: dict[str, str] | None = None
        self.stopped_processes = 0

    def platform(self) -> str:
        return self.device_type

    def engine_args(self, settings, model_path: Path, served_name: str, model_config: dict, gpu=None) -> SimpleNamespace:
        return SimpleNamespace(
            model=str(model_path), served_model_name=served_name, dtype=settings.dtype,
            quantization=eight_bit_quantization(settings, model_config, gpu),
            enforce_eager=bool(settings.enforce_eager), enable_prefix_caching=settings.enable_prefix_caching,
            stream_interval=settings.stream_interval, kv_cache_memory_bytes=None,
            max_model_len=settings.max_model_len, tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size, nnodes=settings.nnodes,
            node_rank=settings.node_rank, enable_lora=settings.lora_enabled,
            max_loras=settings.lora_slots if settings.lora_enabled else None, max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.lora_cpu_slots if settings.lora_enabled else None,
        )

    def start_engine(self, args: SimpleNamespace, environment: Mapping[str, str], clients: int = 1) -> FakeEngine:
        self.args, self.environment, self.clients = args, dict(environment), clients
        return self.engine

    def join_engine(self, share) -> FakeEngine:
        """Another API process's client of the engine (API_PROCESSES): the fake has no engine to share, so its own."""
        self.joined = share
        return self.engine

    def stop_engine_processes(self, grace: float) -> int:
        self.stopped_processes += 1
        return 0


class RecordingParser:
    """vLLM's hermes tool-call parser (``<tool_call>{json}</tool_call>``) over the fake tokenizer, keeping every
    chat body an API handed it. It imports vLLM: a test that makes one carries tests/support/fast_lane.py's IMPORTS_VLLM."""

    name = "hermes"

    def __init__(self) -> None:
        from pipelines.llm.vllm_backend.tool_parsers import ToolCallParser

        self.parser = ToolCallParser("hermes", FakeTokenizer())
        self.requests: list[dict] = []

    def extract(self, text: str, request: dict) -> tuple[str | None, list[tuple[str, str]]]:
        self.requests.append(request)
        return self.parser.extract(text, request)

    def stream(self, request: dict):
        self.requests.append(request)
        return self.parser.stream(request)


def hermes_call(name: str, arguments: dict) -> str:
    """One call in the hermes syntax, as a model that speaks it writes it."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
