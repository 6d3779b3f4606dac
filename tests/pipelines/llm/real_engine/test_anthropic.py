"""Anthropic's Messages API end to end, through Anthropic's official SDK, on real runners and real engines.

The default model answers where the text must make sense (Paris, tool calls);
the tiny random model where only the mechanics count (it runs to max_tokens at
temperature 0); the guarded runner (AUTH_TOKEN, small capacity,
REQUEST_TIMEOUT=4 s) for keys, overload and the in-band stream error.
The many rules around them are tested on a fake engine in
tests/pipelines/llm/api/test_anthropic.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import anthropic
import jsonschema
import pytest

from tests.support.http import IN_FLIGHT, QUESTION, SUBMITTED, UNFINISHED, metric, wait_for_metric
from tests.support.runner_process import DEFAULT_MODEL_ID
from tests.support.runners import GUARDED_AUTH_TOKEN, GUARDED_REQUEST_TIMEOUT
from tests.support.sdks import anthropic_sdk, openai_sdk, served_model, streamed_tool_inputs
from tests.support.tools import ANTHROPIC_NOTE, ANTHROPIC_WEATHER, CITY, LONG_NOTE_ASK

TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {
    "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}
GREEDY = {"temperature": 0}  # Anthropic's SDK names no sampling fields any more: they go in the body


# 1. The default model: text, the stream, the same text as chat completions, count_tokens, stop sequences


async def test_create_and_stream_give_paris_and_the_same_text_as_chat_completions(anthropic_default, default_runner):
    message = await anthropic_default.messages.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=30,
                                                      extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == DEFAULT_MODEL_ID
    [block] = message.content
    assert block.type == "text" and "Paris" in block.text
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    async with anthropic_default.messages.stream(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=30,
                                                 extra_body=GREEDY) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == block.text
    assert final.model_dump(exclude={"id"}) == message.model_dump(exclude={"id"})
    async with openai_sdk(default_runner.url) as chat:
        answer = await chat.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=30,
                                                    temperature=0)
    assert answer.choices[0].message.content == block.text
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        message.usage.input_tokens, message.usage.output_tokens)


async def test_system_blocks_and_count_tokens_agree_with_the_engine(anthropic_default):
    request = dict(model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]}],
        system=[{"type": "text", "text": "You answer "}, {"type": "text", "text": "in one word."}])
    counted = await anthropic_default.messages.count_tokens(**request)
    message = await anthropic_default.messages.create(max_tokens=10, extra_body=GREEDY, **request)
    assert counted.input_tokens == message.usage.input_tokens > 0
    with_tools = dict(request, tools=[ANTHROPIC_WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    counted = await anthropic_default.messages.count_tokens(**with_tools)
    message = await anthropic_default.messages.create(max_tokens=30, extra_body=GREEDY, **with_tools)
    assert message.stop_reason == "tool_use" and counted.input_tokens == message.usage.input_tokens


async def test_a_stop_sequence_is_named_in_the_stop_reason(anthropic_default):
    free = await anthropic_default.messages.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=30,
                                                   extra_body=GREEDY)
    text = free.content[0].text
    word = "Paris" if "Paris" in text else text.split()[-1]
    stopped = await anthropic_default.messages.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=30,
                                                      stop_sequences=["\x00never", word], extra_body=GREEDY)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].text == text[: text.index(word)]
    short = await anthropic_default.messages.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=3,
                                                    extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


# 2. Tools: a named tool and `any`, plain and streamed, and a tool_use round trip


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}], ids=["tool", "any"])
async def test_forced_tool_use_input_matches_the_schema_plain_and_streamed(anthropic_default, choice):
    request = dict(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=80, tools=[ANTHROPIC_WEATHER, TIME],
                   tool_choice=choice, extra_body=GREEDY)
    message = await anthropic_default.messages.create(**request)
    assert message.stop_reason == "tool_use" and message.content
    for block in message.content:
        assert block.type == "tool_use" and block.id
        jsonschema.validate(block.input, CITY if block.name == "get_weather" else TIME["input_schema"])
    if choice["type"] == "tool":
        assert [block.name for block in message.content] == ["get_weather"]
    deltas, final = await streamed_tool_inputs(anthropic_default, **request)
    calls = [(block.type, block.name, block.input) for block in message.content]
    assert [(block.type, block.name, block.input) for block in final.content] == calls  # each call has its own id
    assert (final.stop_reason, final.usage) == (message.stop_reason, message.usage)
    assert {index: json.loads("".join(pieces)) for index, pieces in deltas.items()} == {
        index: block.input for index, block in enumerate(final.content)}, "the deltas add up to each input"
    if choice["type"] == "tool":
        assert len(deltas[0]) > 1, "a named tool's input streams as it is generated"


async def test_a_tool_use_round_trip_is_answered(anthropic_default):
    first = await anthropic_default.messages.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=60,
                                                    tools=[ANTHROPIC_WEATHER],
                                                    tool_choice={"type": "tool", "name": "get_weather"},
                                                    extra_body=GREEDY)
    [call] = first.content
    follow_up = [*QUESTION, {"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": '{"weather": "sunny, 21 C"}'}]}]
    async with anthropic_default.messages.stream(model=DEFAULT_MODEL_ID, messages=follow_up, max_tokens=30,
                                                 tools=[ANTHROPIC_WEATHER],
                                                 tool_choice={"type": "none"}, extra_body=GREEDY) as stream:
        answer = await stream.get_final_message()
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in answer.content] == ["text"] and answer.content[0].text


CALLED_BEFORE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
    {"role": "user", "content": "Weather in Berlin?"},
]


async def test_tools_left_to_a_model_without_tool_syntax_are_used_in_the_runners_syntax(anthropic_default):
    """tool_choice left out on a model whose template names no tool syntax: its earlier tool_use is written back
    in the runner's syntax, so this small model follows it; the streamed input_json_delta pieces arrive as
    generated and add up to the plain answer's input."""
    request = dict(model=DEFAULT_MODEL_ID, messages=CALLED_BEFORE, max_tokens=60, tools=[ANTHROPIC_WEATHER],
                   extra_body=GREEDY)
    message = await anthropic_default.messages.create(**request)
    assert message.stop_reason == "tool_use", message
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, CITY)
    streamed, final = await streamed_tool_inputs(anthropic_default, **request)
    assert [(block.name, block.input) for block in final.content if block.type == "tool_use"] == [
        (call.name, call.input)]
    [pieces] = [streamed[index] for index, block in enumerate(final.content) if block.type == "tool_use"]
    assert json.loads("".join(pieces)) == call.input and len(pieces) > 3, pieces


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "write_note"}, {"type": "any"}], ids=["tool", "any"])
async def test_a_long_forced_tool_use_streams_in_many_input_deltas(anthropic_default, choice):
    request = dict(model=DEFAULT_MODEL_ID, max_tokens=120, tools=[ANTHROPIC_NOTE], tool_choice=choice,
                   extra_body=GREEDY, messages=[{"role": "user", "content": LONG_NOTE_ASK}])
    streamed, final = await streamed_tool_inputs(anthropic_default, **request)
    pieces = streamed[0]
    assert final.usage.output_tokens >= 100
    assert len(pieces) >= 80, f"{len(pieces)} input deltas for {final.usage.output_tokens} tokens"
    [call] = final.content
    assert call.type == "tool_use" and call.name == "write_note"


# 3. The guarded runner: keys, errors, overload, the in-band error


async def test_the_key_works_as_api_key_as_x_api_key_and_a_wrong_one_is_refused(guarded_runner, anthropic_guarded):
    model = served_model(guarded_runner)
    message = await anthropic_guarded.messages.create(model=model, messages=QUESTION, max_tokens=4, extra_body=GREEDY)
    assert message.usage.output_tokens == 4 and message.stop_reason == "max_tokens"
    async with anthropic_guarded.messages.stream(model=model, messages=QUESTION, max_tokens=4,
                                                 extra_body=GREEDY) as stream:
        assert (await stream.get_final_message()).content[0].text == message.content[0].text
    async with anthropic_sdk(guarded_runner.url, api_key=None,
                             default_headers={"x-api-key": GUARDED_AUTH_TOKEN}) as sdk:
        counted = await sdk.messages.count_tokens(model=model, messages=QUESTION)
        assert counted.input_tokens == message.usage.input_tokens
    for credentials in ({"api_key": "wrong-key"}, {"api_key": None, "default_headers": {"x-api-key": "wrong-key"}}):
        async with anthropic_sdk(guarded_runner.url, **credentials) as sdk:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await sdk.messages.create(model=model, messages=QUESTION, max_tokens=4)
        assert refused.value.status_code == 401
        assert refused.value.body["error"]["type"] == "authentication_error"
    async with aiohttp.ClientSession() as http:  # Anthropic's header is not OpenAI's: /v1/chat/completions refuses it
        async with http.post(f"{guarded_runner.url}/v1/chat/completions", headers={"x-api-key": GUARDED_AUTH_TOKEN},
                             json={"model": model, "messages": QUESTION, "max_tokens": 2}) as response:
            assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"


async def test_bad_requests_are_anthropic_errors_before_the_engine(guarded_runner, anthropic_guarded):
    model = served_model(guarded_runner)
    async with aiohttp.ClientSession(headers={"x-api-key": GUARDED_AUTH_TOKEN}) as http:
        submitted = await metric(http, guarded_runner, SUBMITTED)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await anthropic_guarded.messages.create(model=model, messages=QUESTION, max_tokens=8, thinking={
                "type": "enabled", "budget_tokens": 2048})
        assert refused.value.body == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "thinking: Extra inputs are not permitted"}}
        with pytest.raises(anthropic.BadRequestError, match="MAX_MODEL_LEN"):
            await anthropic_guarded.messages.create(model=model, messages=QUESTION, max_tokens=100_000)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await anthropic_guarded.messages.create(model="claude-sonnet-4-5", messages=QUESTION, max_tokens=8)
        assert missing.value.body["error"]["type"] == "not_found_error"
        async with http.post(f"{guarded_runner.url}/v1/messages/batches", json={}) as response:
            assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
        assert await metric(http, guarded_runner, SUBMITTED) == submitted, "nothing reached the engine"


async def test_overload_is_503_overloaded_error_with_retry_after(guarded_runner, anthropic_guarded):
    model = served_model(guarded_runner)
    long = dict(model=model, messages=QUESTION, max_tokens=4000, extra_body=GREEDY)
    holders = [asyncio.create_task(anthropic_guarded.messages.create(**long)) for _ in range(4)]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}) as http:
            await wait_for_metric(http, guarded_runner, IN_FLIGHT, 4, within=GUARDED_REQUEST_TIMEOUT / 2)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await anthropic_guarded.messages.create(model=model, messages=QUESTION, max_tokens=2)
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert refused.value.body["error"]["type"] == "overloaded_error"
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


async def test_a_stream_that_fails_after_the_header_raises_in_the_sdk(guarded_runner, anthropic_guarded):
    """Past REQUEST_TIMEOUT the stream ends with Anthropic's `error` event, which the SDK raises."""
    received = []
    with pytest.raises(anthropic.APIStatusError, match="REQUEST_TIMEOUT") as failed:
        async with anthropic_guarded.messages.stream(model=served_model(guarded_runner), messages=QUESTION,
                                                     max_tokens=4000, extra_body=GREEDY) as stream:
            async for event in stream:
                received.append(event.type)
    assert received.count("content_block_delta") > 1, "it streamed before the deadline"
    assert "message_stop" not in received and failed.value.body["error"]["type"] == "api_error"


# 4. A cut stream frees the engine


async def test_a_stream_cut_by_the_client_frees_the_engine(tiny_runner):
    async with aiohttp.ClientSession() as http:
        async with anthropic_sdk(tiny_runner.url) as sdk:
            async with sdk.messages.stream(model=served_model(tiny_runner), messages=QUESTION, max_tokens=4000,
                                           extra_body=GREEDY) as stream:
                async for event in stream:
                    if event.type == "content_block_delta":
                        break
                await wait_for_metric(http, tiny_runner, UNFINISHED, 1, within=10)
        await wait_for_metric(http, tiny_runner, UNFINISHED, 0, within=10)
        await wait_for_metric(http, tiny_runner, IN_FLIGHT, 0, within=10)
