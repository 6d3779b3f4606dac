"""OpenAI's Responses API end to end, through the official ``openai`` SDK, on real runners and real vLLM engines.

The default model where the text must make sense (the same answer as chat
completions, a function call round trip); the tiny random model where only the
mechanics count (a cut stream, the store's bound: it runs with
RESPONSES_STORE_SIZE=2); the guarded runner (bearer token, REQUEST_TIMEOUT=4 s,
TOOL_CALL_PARSER=hermes) for the in-band failure, keys and tool_choice "auto".
The many shapes and refusals around these are in tests/pipelines/llm/api/test_responses.py.
"""

from __future__ import annotations

import json

import aiohttp
import jsonschema
import openai
import pytest

from tests.support.http import IN_FLIGHT, SUBMITTED, UNFINISHED, metric, wait_for_metric
from tests.support.runner_process import DEFAULT_MODEL_ID
from tests.support.runners import GUARDED_AUTH_TOKEN, TINY_RESPONSES_STORE_BYTES, TINY_RESPONSES_STORE_SIZE
from tests.support.sdks import openai_sdk, served_model, streamed_call_arguments
from tests.support.tools import CITY, LONG_NOTE_ASK, RESPONSES_NOTE, RESPONSES_WEATHER

QUESTION = "What is the capital of France?"
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["zone"]}}


async def streamed(sdk: openai.AsyncOpenAI, **request):
    """The text deltas, every event's type and the final response of ``responses.stream``."""
    deltas, kinds = [], []
    async with sdk.responses.stream(**request) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    return deltas, kinds, final


# 1. The default model: the same answer as chat completions, a function call round trip


async def test_create_and_stream_give_the_same_text_as_chat_completions(openai_default):
    chat = await openai_default.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40)
    assert chat.choices[0].finish_reason == "stop", "the answer ends within the limit"
    plain = await openai_default.responses.create(model=DEFAULT_MODEL_ID, input=QUESTION, temperature=0,
                                                  max_output_tokens=40)
    assert plain.status == "completed" and plain.output_text == chat.choices[0].message.content
    assert "Paris" in plain.output_text
    assert (plain.usage.input_tokens, plain.usage.output_tokens, plain.usage.total_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
    deltas, kinds, final = await streamed(openai_default, model=DEFAULT_MODEL_ID, input=QUESTION, temperature=0,
                                          max_output_tokens=40)
    assert "".join(deltas) == final.output_text == plain.output_text
    assert len(deltas) > 1, "the text streams as it is generated"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert final.usage == plain.usage
    as_items = await openai_default.responses.create(model=DEFAULT_MODEL_ID, temperature=0, max_output_tokens=40,
                                                     input=[
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert as_items.output_text == plain.output_text, "a string input is one user message"


async def test_a_function_call_round_trip(openai_default):
    request = dict(model=DEFAULT_MODEL_ID, input="What is the weather in Paris?", temperature=0, max_output_tokens=60,
                   tools=[RESPONSES_WEATHER, TIME], tool_choice={"type": "function", "name": "get_weather"})
    asked = await openai_default.responses.create(**request)
    [call] = asked.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), CITY)
    answer = '{"city": "Paris", "weather": "sunny, 21 C"}'
    # As an agent that keeps the conversation itself sends it ...
    follow_up = await openai_default.responses.create(
        model=DEFAULT_MODEL_ID, temperature=0, max_output_tokens=40, tools=[RESPONSES_WEATHER], tool_choice="none",
        store=False,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": answer}])
    assert follow_up.output_text and follow_up.output[0].type == "message"
    # ... and as one that lets the runner keep it: the same prompt, so the same answer.
    continued = await openai_default.responses.create(
        model=DEFAULT_MODEL_ID, temperature=0, max_output_tokens=40, tools=[RESPONSES_WEATHER], tool_choice="none",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": answer}])
    assert continued.output_text == follow_up.output_text
    assert continued.usage.input_tokens == follow_up.usage.input_tokens


@pytest.mark.parametrize("tool_choice", ["named", "required"])
async def test_streamed_calls_add_up_to_the_plain_ones(openai_default, tool_choice):
    choice = {"type": "function", "name": "get_weather"} if tool_choice == "named" else "required"
    request = dict(model=DEFAULT_MODEL_ID, input="What is the weather in Paris?", temperature=0, max_output_tokens=80,
                   tools=[RESPONSES_WEATHER, TIME], tool_choice=choice)
    plain = await openai_default.responses.create(**request)
    assert plain.status == "completed" and plain.output and all(item.type == "function_call" for item in plain.output)
    streamed_arguments, final = await streamed_call_arguments(openai_default, **request)
    assert streamed_arguments == [item.arguments for item in final.output]
    assert [(item.name, json.loads(item.arguments)) for item in final.output] == [
        (item.name, json.loads(item.arguments)) for item in plain.output]
    for item in final.output:
        jsonschema.validate(json.loads(item.arguments), CITY if item.name == "get_weather" else TIME["parameters"])


CALLED_BEFORE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    {"role": "user", "content": "Weather in Berlin?"},
]


async def test_tools_left_to_a_model_without_tool_syntax_are_called_in_the_runners_syntax(openai_default):
    """tool_choice left out on a model whose template names no tool syntax: a 200, never a refusal; its earlier call
    is written back in the runner's syntax, so this small model follows it, and the streamed arguments arrive as
    generated and add up to the plain call's."""
    request = dict(model=DEFAULT_MODEL_ID, input=CALLED_BEFORE, tools=[RESPONSES_WEATHER], temperature=0,
                   max_output_tokens=60)
    plain = await openai_default.responses.create(**request)
    [call] = plain.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), CITY)
    pieces = []
    async with openai_default.responses.stream(**request) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
        final = await stream.get_final_response()
    assert [(item.name, item.arguments) for item in final.output] == [(call.name, call.arguments)]
    assert "".join(pieces) == call.arguments and len(pieces) > 3, pieces


@pytest.mark.parametrize("tool_choice", ["named", "required"])
async def test_a_long_forced_call_streams_in_many_argument_deltas(openai_default, tool_choice):
    choice = {"type": "function", "name": "write_note"} if tool_choice == "named" else "required"
    request = dict(model=DEFAULT_MODEL_ID, input=LONG_NOTE_ASK, tools=[RESPONSES_NOTE], tool_choice=choice,
                   temperature=0, max_output_tokens=120)
    deltas, final = [], None
    async with openai_default.responses.stream(**request) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):  # the SDK's final is completed only
                final = event.response
    [call] = final.output
    assert final.usage.output_tokens >= 100
    assert len(deltas) >= 80, f"{len(deltas)} argument deltas for {final.usage.output_tokens} tokens"
    assert "".join(deltas) == call.arguments


async def test_a_json_schema_answer_parses_and_matches(openai_default):
    answer = await openai_default.responses.create(
        model=DEFAULT_MODEL_ID, input=QUESTION, temperature=0, max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}})
    jsonschema.validate(json.loads(answer.output_text), CITY)


# 2. The tiny model: the store, refusals before the engine, a cut stream


async def test_the_store_keeps_the_last_responses_of_the_process(openai_tiny, tiny_runner):
    model = served_model(tiny_runner)
    kept = [await openai_tiny.responses.create(model=model, input="Hello", temperature=0, max_output_tokens=4)
            for _ in range(TINY_RESPONSES_STORE_SIZE + 1)]
    with pytest.raises(openai.NotFoundError) as gone:
        await openai_tiny.responses.retrieve(kept[0].id)
    assert gone.value.body["param"] == "response_id" and "RESPONSES_STORE_SIZE" in gone.value.body["message"]
    for response in kept[1:]:
        retrieved = await openai_tiny.responses.retrieve(response.id)
        assert retrieved.output_text == response.output_text and retrieved.usage == response.usage
    unkept = await openai_tiny.responses.create(model=model, input="Hello", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        await openai_tiny.responses.retrieve(unkept.id)
    assert (await openai_tiny.responses.retrieve(kept[-1].id)).id == kept[-1].id, "store false dropped nothing"


async def test_the_store_is_bounded_in_bytes_and_delete_removes_a_response(openai_tiny, tiny_runner):
    """RESPONSES_STORE_BYTES (16 kB here): two responses with 8 kB of metadata each (OpenAI's bound: 16 keys of 512
    characters) do not both fit, though the count (2) would keep them; DELETE forgets one at once."""
    model = served_model(tiny_runner)
    metadata = {f"key{number}": "v" * 500 for number in range(16)}
    first, second = [await openai_tiny.responses.create(model=model, input="Hello", max_output_tokens=2,
                                                        metadata=metadata) for _ in range(2)]
    with pytest.raises(openai.NotFoundError) as gone:
        await openai_tiny.responses.retrieve(first.id)
    assert "RESPONSES_STORE_BYTES" in gone.value.body["message"] and TINY_RESPONSES_STORE_BYTES < 2 * 8_000 + 2_000
    assert (await openai_tiny.responses.retrieve(second.id)).metadata == metadata
    await openai_tiny.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await openai_tiny.responses.retrieve(second.id)
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{tiny_runner.url}/v1/responses/{second.id}") as response:
            assert response.status == 404 and (await response.json())["error"]["param"] == "response_id"


@pytest.mark.parametrize(("request_", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools.[0].type"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://127.0.0.1/x.png"}]}]},
     "input.[0].content.[0].type"),
    ({"previous_response_id": "resp_never"}, "previous_response_id"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
])
async def test_refusals_name_the_parameter_before_the_engine(openai_tiny, tiny_runner, request_, param):
    async with aiohttp.ClientSession() as http:
        submitted = await metric(http, tiny_runner, SUBMITTED)
        body = {"model": served_model(tiny_runner), "input": "Hello", **request_}
        extra = body.pop("extra_body", {})
        with pytest.raises(openai.APIStatusError) as refused:
            await openai_tiny.responses.create(**body, extra_body=extra)
        assert refused.value.status_code == (404 if param == "previous_response_id" else 400)
        assert set(refused.value.body) == {"message", "type", "param", "code"}
        assert refused.value.body["param"] == param
        assert await metric(http, tiny_runner, SUBMITTED) == submitted


async def test_a_cut_responses_stream_frees_the_engine(tiny_runner):
    async with aiohttp.ClientSession() as http:
        async with openai_sdk(tiny_runner.url) as sdk:
            stream = await sdk.responses.create(model=served_model(tiny_runner), input="Hello", temperature=0,
                                                max_output_tokens=4000, stream=True)
            async for event in stream:
                if event.type == "response.output_text.delta":
                    break
            await wait_for_metric(http, tiny_runner, UNFINISHED, 1, within=10)
            await stream.close()
        await wait_for_metric(http, tiny_runner, UNFINISHED, 0, within=10)
        await wait_for_metric(http, tiny_runner, IN_FLIGHT, 0, within=10)


# 3. The guarded runner: the in-band failure, keys, tool_choice "auto" with vLLM's parser


async def test_a_stream_that_fails_after_the_header_raises_in_the_sdk(guarded_runner, openai_guarded):
    """Past REQUEST_TIMEOUT the stream ends with response.failed, which the SDK raises."""
    received = []
    with pytest.raises(openai.APIError, match="REQUEST_TIMEOUT"):
        async with openai_guarded.responses.stream(model=served_model(guarded_runner), input="Hello", temperature=0,
                                                   max_output_tokens=4000) as stream:
            async for event in stream:
                received.append(event.type)
    assert received.count("response.output_text.delta") > 1, "it streamed before the deadline"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}) as http:
        await wait_for_metric(http, guarded_runner, UNFINISHED, 0, within=10)


async def test_a_wrong_key_is_401_and_the_right_one_is_let_in(guarded_runner, openai_guarded):
    async with openai_sdk(guarded_runner.url, "wrong-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.responses.create(model=served_model(guarded_runner), input="Hello")
        assert refused.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await sdk.responses.retrieve("resp_any")
    answer = await openai_guarded.responses.create(model=served_model(guarded_runner), input="Hello",
                                                   max_output_tokens=2)
    assert (await openai_guarded.responses.retrieve(answer.id)).id == answer.id


async def test_auto_with_vllms_parser_reads_calls_or_gives_the_text(guarded_runner, openai_guarded):
    """TOOL_CALL_PARSER=hermes reads the whole answer; the tiny model writes no <tool_call>, so it is text."""
    answer = await openai_guarded.responses.create(
        model=served_model(guarded_runner), temperature=0, max_output_tokens=8, tools=[RESPONSES_WEATHER],
        instructions="You may call tools.", input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "-3 C"},
            {"role": "user", "content": "And now?"}])
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert answer.output_text and [item.type for item in answer.output] == ["message"]
