"""The official SDKs as the tests drive a runner: OpenAI's and Anthropic's clients, no retries, one timeout."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from tests.support.runner_process import RunnerProcess

TIMEOUT = 300  # seconds: a long generation on the CPU engine stays well within it


def openai_sdk(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    """OpenAI's client for the runner at this URL (its /v1 routes)."""
    return openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)


def anthropic_sdk(url: str, api_key: str | None = "unused", **kwargs: Any) -> anthropic.AsyncAnthropic:
    """Anthropic's client for the runner at this URL (its /v1/messages routes)."""
    return anthropic.AsyncAnthropic(base_url=url.rstrip("/"), api_key=api_key, max_retries=0, timeout=TIMEOUT,
                                    **kwargs)


def served_model(runner: RunnerProcess) -> str:
    """The model id this runner serves (its MODEL_ID)."""
    return runner.env["MODEL_ID"]
