"""The official SDKs as the tests drive a runner: OpenAI's and Anthropic's clients, no retries, one timeout."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
from anthropic.types import Message
from openai.types.responses import Response

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


async def streamed_call_arguments(sdk: openai.AsyncOpenAI, **request: Any) -> tuple[list[str], Response]:
    """A Responses stream's function-call arguments as its delta events add them up, one per output item in order,
    and the final response."""
    arguments: dict[int, str] = {}
    async with sdk.responses.stream(**request) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                arguments[event.output_index] = arguments.get(event.output_index, "") + event.delta
        final = await stream.get_final_response()
    return [arguments[index] for index in sorted(arguments)], final


async def streamed_tool_inputs(sdk: anthropic.AsyncAnthropic, **request: Any) -> tuple[dict[int, list[str]], Message]:
    """A Messages stream's input_json_delta pieces, by content block, and the final message."""
    pieces: dict[int, list[str]] = {}
    async with sdk.messages.stream(**request) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                pieces.setdefault(event.index, []).append(event.delta.partial_json)
        final = await stream.get_final_message()
    return pieces, final
