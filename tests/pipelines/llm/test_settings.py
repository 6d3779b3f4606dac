"""The llm pipeline's settings: the documented names, defaults and bounds, checked without an engine."""

from __future__ import annotations

import pytest
import structlog
from pydantic import ValidationError

from pipelines.llm.settings import LLMSettings


def settings(**env: str) -> LLMSettings:
    return LLMSettings(**env)


def test_defaults_are_the_contracts():
    defaults = settings()
    assert (defaults.use_8bit, defaults.pipeline_parallel_size, defaults.tensor_parallel_size) == (False, 1, 1)
    assert (defaults.max_model_len, defaults.max_num_batched_tokens, defaults.max_num_seqs) == (8192, 8192, 128)
    assert defaults.gpu_memory_utilization == 0.85
    assert defaults.max_in_flight == 256, "the queue behind the batch is as deep as the batch"


def test_environment_names_are_the_documented_ones(monkeypatch):
    monkeypatch.setenv("MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("MAX_NUM_SEQS", "8")
    monkeypatch.setenv("MAX_WAITING_REQUESTS", "2")
    loaded = LLMSettings()
    assert loaded.max_model_len == 4096 and loaded.max_in_flight == 10


def test_batched_tokens_are_raised_to_the_longest_sequence_with_a_warning():
    with structlog.testing.capture_logs() as logs:
        raised = settings(MAX_MODEL_LEN="16384", MAX_NUM_BATCHED_TOKENS="4096")
    assert raised.max_num_batched_tokens == 16384
    assert [entry["event"] for entry in logs] == ["settings.max_num_batched_tokens.raised"]


@pytest.mark.parametrize("value", ["0", "1.01", "-0.5", "lots"])
def test_memory_share_must_be_in_zero_one(value):
    with pytest.raises(ValidationError, match="GPU_MEMORY_UTILIZATION"):
        settings(GPU_MEMORY_UTILIZATION=value)


def test_memory_share_of_one_is_allowed():
    assert settings(GPU_MEMORY_UTILIZATION="1").gpu_memory_utilization == 1


@pytest.mark.parametrize("name", ["TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "MAX_NUM_SEQS"])
def test_sizes_are_positive(name):
    with pytest.raises(ValidationError, match=name):
        settings(**{name: "0"})


def test_prefix_caching_is_on_and_one_token_per_event_unless_asked():
    defaults = settings()
    assert defaults.enable_prefix_caching is True and defaults.stream_interval == 1
    chosen = settings(ENABLE_PREFIX_CACHING="false", STREAM_INTERVAL="4")
    assert chosen.enable_prefix_caching is False and chosen.stream_interval == 4
    with pytest.raises(ValidationError):
        settings(STREAM_INTERVAL="0")
