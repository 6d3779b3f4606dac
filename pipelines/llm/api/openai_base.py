"""What the OpenAI-shaped APIs share: model lookup, request checks, sampling fields and stream framing."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

from pipelines.llm.api import LLMAPI
from pipelines.llm.engine import Sampling
from pipelines.llm.replies import usage_json
from pipelines.llm.served_models import ServedModel
from runner.pipeline import OperationError, RequestContext
from runner.routes import openai_error_document


def bad(msg: str, param: str | None = None) -> OperationError:
    return OperationError(msg, status=400, param=param)


def error_event(reason: str) -> bytes:
    """The in-band ending of a failed stream, in the shape the OpenAI SDKs raise as an APIError."""
    return openai_error_document(500, reason)


class ChunkEnvelope:
    """What every streamed chunk of one OpenAI answer shares, prebuilt once per request as bytes."""

    def __init__(self, object_name: str, answer_id: str, created: int, model: str, include_usage: bool) -> None:
        self.head = b'{"id":%s,"object":%s,"created":%d,"model":%s,"choices":[' % (
            to_json(answer_id), to_json(object_name), created, to_json(model)
        )
        self.tail = b'],"usage":null}' if include_usage else b"]}"
        self.include_usage = include_usage

    def chunk(self, choice: bytes) -> bytes:
        return self.head + choice + self.tail

    def usage_chunk(self, context: RequestContext) -> bytes:
        """The last chunk when stream_options.include_usage asks for it: no choices, the usage."""
        return self.head + b'],"usage":' + usage_json(context) + b"}"


class OpenAIAPI(LLMAPI):
    """The shared checks and sampling fields of OpenAI's chat and text completions."""

    def served(self, name: str) -> ServedModel:
        model = self.models.find(name)
        if model is None:
            raise OperationError(
                f"The model '{name}' does not exist; this runner serves {self.models.names()}",
                status=404, param="model", code="model_not_found",
            )
        return model

    @staticmethod
    def include_usage(request: Any) -> bool:
        if request.stream_options is not None and not request.stream:
            raise bad("stream_options needs stream: true", "stream_options")
        return bool(request.stream_options and request.stream_options.include_usage)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = self.generation.vocab_size
        parsed = {}
        for key, value in bias.items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
                raise bad(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})", "logit_bias")
            parsed[int(key)] = value
        return parsed

    def max_tokens(self, requested: int | None, prompt: list[int]) -> int:
        # OpenAI's default: as many as the model has room for after the prompt.
        return requested if requested is not None else max(1, self.generation.max_model_len - len(prompt))

    def sampling(self, request: Any, max_tokens: int, **only: Any) -> Sampling:
        """The sampling fields both OpenAI requests share, OpenAI's defaults for those left out, and ``only`` theirs."""
        stop = request.stop
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            min_p=request.min_p or 0.0,
            n=request.n or 1,
            stop=[] if stop is None else [stop] if isinstance(stop, str) else list(stop),
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=self.logit_bias(request.logit_bias),
            **only,
        )
