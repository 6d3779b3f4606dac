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

from pipelines.llm.engine import Sampling, SamplingRefused

BOS, EOS = 256, 257  # the byte tokenizer's two special tokens; bytes are tokens 0-255
VOCAB_SIZE = 258
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_WORDS = [word + " " for word in "Once upon a time there was a runner that served every token it was asked for.".split()]


class FakeTokenizer:
    """One token per UTF-8 byte, "<s>" and "</s>" as single tokens, and a small chat template (jinja)."""

    def __init__(self, chat_template: str = CHAT_TEMPLATE) -> None:
        self.chat_template = chat_template
        self.template = Environment().from_string(chat_template)

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any) -> str:
        return self.template.render(messages=conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                    raise_exception=raise_template_error, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        for piece in re.split(r"(</?s>)", text):
            ids.extend([BOS] if piece == "<s>" else [EOS] if piece == "</s>" else piece.encode())
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token for token in token_ids if token < 256).decode(errors="replace")


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
    """Each choice generates its text (the last one for choices beyond), one character per token, then stops."""
    return Script(words=lambda prompt, sampling, choice: list(texts[min(choice, len(texts) - 1)]))


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
    aborted: bool = False
    finished: bool = False


class FakeEngine:
    """Follows ``pipelines.llm.engine.Engine``; every request it was handed is in ``submitted``."""

    def __init__(self, script: Script | None = None, max_model_len: int = 4096, step_seconds: float = 0.0,
                 chat_template: str = CHAT_TEMPLATE, tool_parsers: Mapping[str, Any] | None = None) -> None:
        self.script = script or Script()
        self.tokenizer = FakeTokenizer(chat_template)
        self.max_model_len = max_model_len
        self.vocab_size = VOCAB_SIZE
        self.step_seconds = step_seconds
        self.tool_parsers = dict(tool_parsers or {})
        self.submitted: list[Submitted] = []
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

    def unfinished_requests(self) -> int:
        return len(self.running)

    def generate(self, prompt: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[Step]:
        if sampling.temperature > 2:  # as vLLM refuses it
            raise SamplingRefused(f"temperature must be in [0, 2], got {sampling.temperature}.")
        if sampling.logprobs is not None and sampling.logprobs > 20:
            raise SamplingRefused(f"Requested sample logprobs of {sampling.logprobs}, which is greater than max allowed: 20")
        return self.steps(list(prompt), sampling, request_id)

    async def steps(self, prompt: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[Step]:
        request = Submitted(prompt, sampling, request_id)
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
                yield Step(prompt_token_ids=prompt if step_number == 0 else None, outputs=outputs, finished=finished)
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
        token_id = word.encode()[0] if word else EOS
        return Delta(index, word, [token_id], self.logprobs_of(sampling, word, token_id), choice.finish_reason,
                     choice.stop_reason)

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

    def metrics_registry(self) -> CollectorRegistry:
        return self.registry

    def shutdown(self) -> None:
        self.was_shut_down = True


MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "hidden_size": 128, "head_dim": 32}


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

    def engine_args(self, settings, model_path: Path, served_name: str, model_config: dict) -> SimpleNamespace:
        return SimpleNamespace(
            model=str(model_path), served_model_name=served_name, dtype=settings.dtype,
            enforce_eager=bool(settings.enforce_eager), enable_prefix_caching=settings.enable_prefix_caching,
            stream_interval=settings.stream_interval, kv_cache_memory_bytes=None,
            max_model_len=settings.max_model_len, tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size, nnodes=settings.nnodes,
            node_rank=settings.node_rank,
        )

    def start_engine(self, args: SimpleNamespace, environment: Mapping[str, str]) -> FakeEngine:
        self.args, self.environment = args, dict(environment)
        return self.engine

    def stop_engine_processes(self, grace: float) -> int:
        self.stopped_processes += 1
        return 0
