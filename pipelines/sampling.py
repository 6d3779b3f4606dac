"""What a request asks of the engine's sampler, in plain values: the one description
both the /llm and the OpenAI operations build, and the engine adapter turns
into vLLM's SamplingParams (``VLLMEngine.sampling_params``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sampling:
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
