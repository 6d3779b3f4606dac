"""POST /v1/responses on a fake engine, in-process, through the official ``openai`` SDK: the answer, its stream,
its failures, and every bad input a 400 (or 404) in OpenAI's shape before the engine. The same behaviours against
a real vLLM engine over real HTTP are in tests/pipelines/llm/real_engine/test_responses.py."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import Response

from tests.support.apps import assert_a_vanishing_client_aborts, llm_app, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import DEFAULT_WORDS, FakeEngine, RecordingParser, Script, hermes_call, scripted_text
from tests.support.fast_lane import IMPORTS_VLLM
from tests.support.responses import TIME, TOOLS_TEMPLATE, decoded, parse_stream
from tests.support.sdks import streamed_call_arguments
from tests.support.tools import CITY, RESPONSES_WEATHER


# 2. Served in-process on the fake engine, through the official SDK


async def test_create_gives_the_text_and_exact_usage(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    answer = await openai_client.responses.create(model=model, input="What is the capital of France?", temperature=0)
    [submitted] = engine.submitted
    assert "<|user|>What is the capital of France?" in decoded(submitted.prompt)
    assert answer.object == "response" and answer.status == "completed" and answer.model == model
    assert answer.id.startswith("resp_") and answer.output_text == "Paris."
    [message] = answer.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    usage = answer.usage
    assert (usage.input_tokens, usage.output_tokens) == (len(submitted.prompt), len("Paris.") + 1)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    raw = await (await client.post("/v1/responses", json={"input": "Hi", "model": model})).json()
    Response.model_validate(raw)  # the SDK's type, validated rather than constructed
    assert raw["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


async def test_the_sdk_stream_gives_the_same_text_event_by_event(client, openai_client, engine, model):
    engine.script = scripted_text("Paris is the capital.")
    plain = await openai_client.responses.create(model=model, input="Where?", temperature=0)
    seen, deltas = [], []
    async with openai_client.responses.stream(model=model, input="Where?", temperature=0) as stream:
        async for event in stream:
            seen.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert seen == ["response.created", "response.in_progress", "response.output_item.added",
                    "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                    "response.output_text.done", "response.content_part.done", "response.output_item.done",
                    "response.completed"]
    assert "".join(deltas) == final.output_text == plain.output_text == "Paris is the capital."
    assert final.usage == plain.usage and final.status == "completed"
    response = await client.post("/v1/responses", json={"input": "Where?", "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_stream(await response.text())
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Paris is the capital."
    assert len({event["response"]["id"] for event in events if "response" in event}) == 1


async def test_max_output_tokens_ends_it_incomplete(client, openai_client, engine, model):
    answer = await openai_client.responses.create(model=model, input="Tell me a story.", max_output_tokens=5)
    assert engine.submitted[-1].sampling.max_tokens == 5
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert answer.output_text == "".join(DEFAULT_WORDS[:5]) and answer.usage.output_tokens == 5
    assert answer.output[0].status == "incomplete" and answer.max_output_tokens == 5
    events = parse_stream(await (await client.post(
        "/v1/responses", json={"input": "Tell me a story.", "max_output_tokens": 5, "stream": True})).text())
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    async with openai_client.responses.stream(model=model, input="Tell me a story.", max_output_tokens=5) as stream:
        last = [event async for event in stream][-1]
    assert last.type == "response.incomplete" and last.response.output[0].content[0].text == answer.output_text


async def test_the_sampling_fields_reach_the_engine(client, openai_client, engine, model):
    await openai_client.responses.create(model=model, input="Hi", temperature=0.3, top_p=0.5, max_output_tokens=7,
                                         extra_body={"top_k": 5, "seed": 11, "stop": ["x"], "repetition_penalty": 1.2})
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.top_k, sampling.seed,
            sampling.stop, sampling.repetition_penalty) == (0.3, 0.5, 7, 5, 11, ["x"], 1.2)
    answer = await openai_client.responses.create(model=model, input="Hi", stream=False)
    sampling = engine.submitted[-1].sampling
    prompt = len(engine.submitted[-1].prompt)
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, -1)
    assert sampling.max_tokens == engine.max_model_len - prompt, "OpenAI's default: all the room there is"
    assert (answer.temperature, answer.top_p, answer.max_output_tokens) == (1.0, 1.0, None)


async def test_text_format_constrains_the_output(client, openai_client, engine, model):
    engine.script = scripted_text('{"city": "Paris"}')
    answer = await openai_client.responses.create(model=model, input="Where?", text={"format": {
        "type": "json_schema", "name": "city", "schema": CITY, "strict": True}})
    assert engine.submitted[-1].sampling.json_schema == CITY and json.loads(answer.output_text) == {"city": "Paris"}
    assert answer.text.format.type == "json_schema"
    await openai_client.responses.create(model=model, input="Where?", text={"format": {"type": "json_object"}})
    assert engine.submitted[-1].sampling.json_object and engine.submitted[-1].sampling.json_schema is None
    await openai_client.responses.create(model=model, input="Where?", text={"format": {"type": "text"}},
                                         tool_choice="auto")
    assert not engine.submitted[-1].sampling.json_object and engine.submitted[-1].sampling.json_schema is None


async def test_a_named_function_call_streams_its_arguments(client, openai_client, engine, model):
    engine.script = scripted_text('{"city": "Paris"}')
    request = dict(model=model, input="Weather in Paris?", tools=[RESPONSES_WEATHER, TIME],
                   tool_choice={"type": "function", "name": "get_weather"})
    plain = await openai_client.responses.create(**request)
    assert engine.submitted[-1].sampling.json_schema == CITY
    assert '"name": "get_weather"' in decoded(engine.submitted[-1].prompt), "the template is shown the tools"
    [call] = plain.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == (
        "function_call", "get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert plain.tool_choice.name == "get_weather" and [tool.name for tool in plain.tools] == ["get_weather", "get_time"]
    deltas = []
    async with openai_client.responses.stream(**request) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
            if event.type == "response.function_call_arguments.done":
                assert event.arguments == "".join(deltas) and event.name == "get_weather"
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output[0].arguments == call.arguments
    assert len(deltas) > 1, "a named call's arguments are streamed as they are generated"


async def test_required_calls_are_function_call_items(client, openai_client, engine, model):
    engine.script = scripted_text('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                                  '{"name": "get_time", "parameters": {}}]')
    request = dict(model=model, input="Weather and time?", tools=[RESPONSES_WEATHER, TIME], tool_choice="required")
    plain = await openai_client.responses.create(**request)
    assert [(item.type, item.name, json.loads(item.arguments)) for item in plain.output] == [
        ("function_call", "get_weather", {"city": "Oslo"}), ("function_call", "get_time", {})]
    assert engine.submitted[-1].sampling.json_schema["type"] == "array"
    streamed_arguments, final = await streamed_call_arguments(openai_client, **request)
    # However the reader hands the arguments over (whole today, piece by piece once streamed), they add up.
    assert streamed_arguments == [item.arguments for item in final.output]
    assert [item.name for item in final.output] == ["get_weather", "get_time"]
    await openai_client.responses.create(**request, parallel_tool_calls=False)
    assert engine.submitted[-1].sampling.json_schema["maxItems"] == 1


@IMPORTS_VLLM
async def test_auto_with_a_parser_gives_calls_or_text(aiohttp_client, tmp_path):
    parser = RecordingParser()
    engine = FakeEngine(chat_template=TOOLS_TEMPLATE, tool_parsers={parser.name: parser},
                        script=scripted_text(hermes_call("get_weather", {"city": "Lima"})))
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        settings=llm_settings(TOOL_CALL_PARSER=parser.name)))
    body = {"input": [{"role": "user", "content": "Weather in Lima?"}], "tools": [RESPONSES_WEATHER],
            "instructions": "Be brief."}
    answer = await (await client.post("/v1/responses", json=body)).json()
    [call] = answer["output"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Lima"})
    [request] = parser.requests
    assert request["tool_choice"] == "auto" and request["tools"][0]["function"]["name"] == "get_weather"
    assert request["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Weather in Lima?"}]
    engine.script = scripted_text("It is sunny.")
    events = parse_stream(await (await client.post("/v1/responses", json={**body, "stream": True})).text())
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "It is sunny."


async def test_an_engine_that_dies_mid_stream_ends_it_with_response_failed(client, openai_client, engine, model):
    engine.script = Script(fail_at=3)
    response = await client.post("/v1/responses", json={"input": "Tell me a story.", "stream": True})
    events = parse_stream(await response.text())
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["error"]["message"].startswith("generation failed")
    assert failed["response"]["output"][0]["content"][0]["text"] == "".join(DEFAULT_WORDS[:3])
    assert failed["error"] == {"message": failed["response"]["error"]["message"], "type": "server_error",
                               "param": None, "code": None}, "OpenAI's error object, which the SDKs raise"
    assert failed["response"]["usage"]["output_tokens"] == 3


async def test_a_stream_past_request_timeout_fails_in_band_and_is_not_stored(aiohttp_client, tmp_path):
    engine = FakeEngine(step_seconds=0.02)
    app = llm_app(engine, tmp_path / "model", runner=runner_settings(REQUEST_TIMEOUT=0.3))
    client = await ready_client(aiohttp_client, app)
    events = parse_stream(await (await client.post("/v1/responses", json={"input": "Hi", "stream": True})).text())
    failed = events[-1]
    assert failed["type"] == "response.failed" and "REQUEST_TIMEOUT" in failed["error"]["message"]
    assert len(failed["response"]["output"][0]["content"][0]["text"]) > 0, "it streamed before the deadline"
    assert engine.submitted[-1].aborted, "the engine request was stopped"
    gone = await client.get(f"/v1/responses/{failed['response']['id']}")
    assert gone.status == 404, "a failed response is not stored"


async def test_the_sdk_raises_a_stream_that_fails_after_the_header(client, openai_client, engine, model):
    engine.script = Script(fail_at=3)
    received = []
    with pytest.raises(openai.APIError, match="generation failed"):
        async with openai_client.responses.stream(model=model, input="Tell me a story.") as stream:
            async for event in stream:
                received.append(event.type)
    assert received[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in received


async def test_a_plain_request_whose_engine_dies_is_a_500(client, engine):
    engine.script = Script(fail_at=2)
    response = await client.post("/v1/responses", json={"input": "Tell me a story."})
    assert response.status == 500
    assert (await response.json())["error"]["message"].startswith("generation failed")


async def test_a_client_that_goes_away_aborts_its_engine_request(client, engine):
    await assert_a_vanishing_client_aborts(client, engine, "/v1/responses", {"input": "Tell me a story."})


# 5. Every bad input is a 400 (or 404) in OpenAI's shape, before the engine


BAD = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user"}]}, "input.[0].content"),
    ({"input": [{"content": "hi"}]}, "input.[0].type"),
    ({"input": [{"type": "message", "content": "hi"}]}, "input.[0].role"),
    ({"input": [{"role": "tool", "content": "hi"}]}, "input.0.role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://127.0.0.1/a.png"}]}]},
     "input.[0].content.[0].type"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input.[1].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]}, "input.[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input.[0].output"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f"}]}]},
     "input.[0].output.[0].type"),
    ({"tools": [{"type": "web_search"}]}, "tools.[0].type"),
    ({"tools": [{"type": "function"}]}, "tools.[0].name"),
    ({"tools": [RESPONSES_WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [RESPONSES_WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"tools": [RESPONSES_WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"text": {"colour": "blue"}}, "text.colour"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"max_tool_calls": 3}, "max_tool_calls"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 4096}, "max_output_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[param for _, param in BAD])
async def test_bad_input_is_a_400_naming_the_parameter_before_the_engine(client, engine, extra, param):
    body = {"input": "Hi", **extra} if "input" not in extra and extra else extra
    response = await client.post("/v1/responses", json=body)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert engine.submitted == [], "nothing reached the engine"


async def test_the_sdk_raises_what_is_not_served(openai_client, engine, model):
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.responses.create(model=model, input="Hi", tools=[{"type": "web_search"}])
    assert refused.value.body["param"] == "tools.[0].type" and "web_search" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.responses.create(model=model, input="Hi", max_output_tokens=4096)
    assert refused.value.body["code"] == "context_length_exceeded"
    assert engine.submitted == []


async def test_another_model_and_a_malformed_body_are_refused(client, engine, model):
    response = await client.post("/v1/responses", json={"input": "Hi", "model": "other/model"})
    assert response.status == 404 and (await response.json())["error"]["code"] == "model_not_found"
    response = await client.post("/v1/responses", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
    response = await client.get("/v1/responses/resp_nobody")
    assert response.status == 404 and (await response.json())["error"]["param"] == "response_id"
    for served in ("", model):  # "" and the served id both mean the model served here
        assert (await client.post("/v1/responses", json={"input": "Hi", "model": served, "max_output_tokens": 1})).status == 200
    assert len(engine.submitted) == 2
