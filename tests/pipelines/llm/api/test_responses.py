"""POST /v1/responses and GET /v1/responses/{id} on a fake engine, in-process: shapes, the store, every refusal.

Every event and every response is checked against the official ``openai``
SDK's own types, and the SDK itself (``responses.create``, ``.stream``,
``.retrieve``) is driven against the in-process server on a loopback port.
The same behaviours against a real vLLM engine over real HTTP are in
tests/pipelines/llm/real_engine/test_responses.py.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from pipelines.llm.answers import CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api import installed_apis
from pipelines.llm.api.responses import Output, ResponsesAPI, ResponsesSettings
from runner.app import create_app
from runner.keys import STATE
from tests.support.apps import llm_app, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import (
    DEFAULT_WORDS,
    FakeEngine,
    FakeTokenizer,
    RecordingParser,
    Script,
    hermes_call,
    scripted_text,
)
from tests.support.sdks import streamed_call_arguments
from tests.support.tools import CITY, RESPONSES_WEATHER

SDK_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
# Shows what the fake engine is handed: each turn's role and content, an assistant turn's calls, a tool turn's call id.
TOOLS_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}[call {{ c['id'] }} {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}]{% endfor %}"
    "{% if m.get('tool_call_id') %}[answers {{ m['tool_call_id'] }}]{% endif %}</s>{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sdk_event(document: dict):
    """The event as the SDK's own pydantic types read it: any missing or mistyped field fails here."""
    event = SDK_EVENT.validate_python(document)
    assert event.type == document["type"]
    return event


def parse_stream(body: str) -> list[dict]:
    """A stream's events, each framed as OpenAI frames them: ``event: <type>``, then its ``data:`` line."""
    blocks = body.split("\n\n")
    assert blocks[-1] == "", body[-300:]
    events = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}" and data.startswith("data: "), block
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        sdk_event(event)
    return events


def types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


def decoded(prompt: list[int]) -> str:
    return FakeTokenizer().decode(prompt)


# 1. The output items and their events, unit by unit


def test_every_kind_of_event_is_one_the_sdk_parses_in_the_order_it_expects():
    output = Output(streaming=True)
    sent = []
    for event in [ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Hel"), TextDelta("lo"),
                  CallStart(0, "call_a", "get_weather"), CallArguments(0, '{"city"'), CallArguments(0, ': "Paris"}'),
                  CallStart(1, "call_b", "get_time"), CallArguments(1, "{}")]:
        sent += output.take(event)
    sent += output.close(cut=False)
    events = [json.loads(data) for _, data in sent]
    assert [name.decode() for name, _ in sent] == [event["type"] for event in events], "each event under its type"
    for event in events:
        sdk_event(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert types(events) == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
    ]
    assert [event["output_index"] for event in events if "output_index" in event] == \
        [0] * 7 + [1] * 7 + [2, 2, 2, 3, 3, 2, 2, 3, 3]
    reasoning, message, weather, clock = [Response.model_validate(
        {"id": "r", "object": "response", "created_at": 0, "model": "m", "parallel_tool_calls": True,
         "tool_choice": "auto", "tools": [], "output": [item.model_dump()]}).output[0] for item in output.models()]
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Thinking."
    assert message.type == "message" and message.content[0].text == "Hello" and message.status == "completed"
    assert (weather.call_id, weather.name, json.loads(weather.arguments)) == ("call_a", "get_weather", {"city": "Paris"})
    assert (clock.call_id, clock.arguments, clock.status) == ("call_b", "{}", "completed")


def test_an_answer_cut_at_the_length_limit_leaves_its_open_items_incomplete():
    output = Output(streaming=True)
    sent = output.take(TextDelta("Once upon")) + output.close(cut=True)
    done = json.loads(sent[-1][1])
    assert done["type"] == "response.output_item.done" and done["item"]["status"] == "incomplete"


def test_an_answer_that_says_nothing_is_one_empty_message():
    output = Output(streaming=True)
    events = [sdk_event(json.loads(data)) for _, data in output.close(cut=False)]
    assert [event.type for event in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done"]
    [message] = output.models()
    assert message.content[0].text == "" and message.status == "completed"


def test_the_whole_answer_builds_the_same_items_without_events():
    streamed, whole = Output(streaming=True), Output(streaming=False)
    script = [TextDelta("Sure."), CallStart(0, "call_a", "get_weather"), CallArguments(0, '{"city": "Rome"}')]
    for event in script:
        streamed.take(event)
        assert whole.take(event) == []
    streamed.close(cut=False)
    assert whole.close(cut=False) == []
    strip = lambda items: [item.model_dump(exclude={"id"}) for item in items]  # noqa: E731
    assert strip(streamed.models()) == strip(whole.models())


# 2. Served in-process on the fake engine, through the official SDK


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(chat_template=TOOLS_TEMPLATE)


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
    engine.step_seconds = 0.01

    async def call(stream: bool) -> None:
        async with client.post("/v1/responses", json={"input": "Tell me a story.", "stream": stream}) as response:
            await response.read()

    for stream in (False, True):
        request = asyncio.ensure_future(call(stream))
        while not engine.running:
            await asyncio.sleep(0.01)
        request.cancel()
        async with asyncio.timeout(2):
            while engine.running:
                await asyncio.sleep(0.01)
        assert engine.submitted[-1].aborted
    assert (await (await client.get("/health")).json())["status"] == "IDLE"


# 3. The conversation: items as the template's turns


async def test_items_become_the_templates_turns(client, openai_client, engine, model):
    engine.script = scripted_text("Done.")
    await openai_client.responses.create(model=model, instructions="Be brief.", tools=[RESPONSES_WEATHER],
                                         tool_choice="none", input=[
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in"}, {"type": "input_text", "text": "Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "-3 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "2 C"}]},
    ])
    prompt = decoded(engine.submitted[-1].prompt)
    assert prompt.startswith(
        "<|system|>Be brief.</s>"
        "<|system|>Use metric units.</s>"
        "<|user|>Weather in\nOslo?</s>"
        '<|assistant|>Let me check.[call call_1 get_weather {"city": "Oslo"}][call call_2 get_weather {"city": "Bergen"}]</s>'
        "<|tool|>-3 C[answers call_1]</s>"
        "<|tool|>2 C[answers call_2]</s>"), prompt
    assert "hmm" not in prompt, "earlier thinking is not shown again"
    assert engine.submitted[-1].sampling.json_schema is None, "tool_choice none: free text"


async def test_previous_response_id_continues_the_conversation(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    first = await openai_client.responses.create(model=model, instructions="Be brief.", input="Capital of France?")
    engine.script = scripted_text("Madrid.")
    second = await openai_client.responses.create(model=model, instructions="Answer in one word.",
                                                  input="And of Spain?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert decoded(engine.submitted[-1].prompt).startswith(
        "<|system|>Answer in one word.</s><|user|>Capital of France?</s><|assistant|>Paris.</s><|user|>And of Spain?</s>"
        "<|assistant|>"
    ), "the earlier input and output, not the earlier instructions"
    await openai_client.responses.create(model=model, input="And of Italy?", previous_response_id=second.id)
    assert decoded(engine.submitted[-1].prompt).startswith(
        "<|user|>Capital of France?</s><|assistant|>Paris.</s><|user|>And of Spain?</s><|assistant|>Madrid.</s>"
        "<|user|>And of Italy?</s>")


async def test_a_function_call_round_trip_through_previous_response_id(client, openai_client, engine, model):
    engine.script = scripted_text('{"city": "Oslo"}')
    asked = await openai_client.responses.create(model=model, input="Weather in Oslo?", tools=[RESPONSES_WEATHER],
                                                 tool_choice={"type": "function", "name": "get_weather"})
    [call] = asked.output
    engine.script = scripted_text("It is -3 C in Oslo.")
    answered = await openai_client.responses.create(model=model, previous_response_id=asked.id,
                                                    tools=[RESPONSES_WEATHER], tool_choice="none",
                                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                                            "output": '{"temperature": "-3 C"}'}])
    assert answered.output_text == "It is -3 C in Oslo."
    assert decoded(engine.submitted[-1].prompt).startswith(
        f'<|user|>Weather in Oslo?</s><|assistant|>[call {call.call_id} get_weather {{"city": "Oslo"}}]</s>'
        f'<|tool|>{{"temperature": "-3 C"}}[answers {call.call_id}]</s><|assistant|>')


# 4. The store: GET, store false, its bound, 404s


async def test_a_stored_response_is_retrieved_as_it_was_answered(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    body = await (await client.post("/v1/responses", json={"input": "Capital?", "metadata": {"k": "v"}})).json()
    response = await client.get(f"/v1/responses/{body['id']}")
    assert response.status == 200 and await response.json() == body
    retrieved = await openai_client.responses.retrieve(body["id"])
    assert retrieved.output_text == "Paris." and retrieved.metadata == {"k": "v"} and retrieved.store
    events = parse_stream(await (await client.post("/v1/responses", json={"input": "Capital?", "stream": True})).text())
    streamed = events[-1]["response"]
    assert await (await client.get(f"/v1/responses/{streamed['id']}")).json() == streamed


async def test_store_false_keeps_nothing(client, openai_client, engine, model):
    answer = await openai_client.responses.create(model=model, input="Hi", store=False, max_output_tokens=2)
    assert answer.store is False
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.retrieve(answer.id)
    assert missing.value.body["param"] == "response_id" and answer.id in missing.value.body["message"]
    submitted = len(engine.submitted)
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.create(model=model, input="Hi", previous_response_id=answer.id)
    assert missing.value.body["param"] == "previous_response_id"
    assert len(engine.submitted) == submitted, "nothing reached the engine"


def small_store(size: int, store_bytes: int | None = None) -> type[ResponsesAPI]:
    settings = {"RESPONSES_STORE_SIZE": size} | ({} if store_bytes is None else {"RESPONSES_STORE_BYTES": store_bytes})

    class SmallStore(ResponsesAPI):
        def __init__(self, generation, models) -> None:
            super().__init__(generation, models, ResponsesSettings(**settings))

    return SmallStore


async def small_store_client(aiohttp_client, tmp_path, size: int, store_bytes: int | None = None):
    apis = [api for api in installed_apis() if api is not ResponsesAPI] + [small_store(size, store_bytes)]
    return await ready_client(aiohttp_client, llm_app(FakeEngine(), tmp_path / "model", apis=apis))


@pytest.mark.parametrize("size", [0, 2])
async def test_the_store_keeps_the_last_responses_only(aiohttp_client, tmp_path, size):
    client = await small_store_client(aiohttp_client, tmp_path, size)
    ids = []
    for _ in range(3):
        ids.append((await (await client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2})).json())["id"])
    statuses = [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids]
    assert statuses == ([404, 200, 200] if size == 2 else [404, 404, 404])
    gone = await (await client.get(f"/v1/responses/{ids[0]}")).json()
    assert set(gone["error"]) == {"message", "type", "param", "code"} and "RESPONSES_STORE_SIZE" in gone["error"]["message"]


async def test_the_store_is_bounded_in_bytes_the_oldest_dropped_first(aiohttp_client, tmp_path):
    """A caller's large inputs must not fill the process's memory: RESPONSES_STORE_BYTES bounds what is kept."""
    client = await small_store_client(aiohttp_client, tmp_path, size=100, store_bytes=9_000)
    ids = []
    for _ in range(4):  # 3 kB of input each, about 4 kB stored: two fit in 9 kB
        body = {"input": "x" * 3_000, "max_output_tokens": 2}
        ids.append((await (await client.post("/v1/responses", json=body)).json())["id"])
    statuses = [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids]
    assert statuses == [404, 404, 200, 200]
    store = next(api for api in client.app[STATE].pipeline.apis if isinstance(api, ResponsesAPI)).store
    assert 6_000 < store.bytes <= 9_000
    gone = await (await client.get(f"/v1/responses/{ids[0]}")).json()
    assert "RESPONSES_STORE_BYTES" in gone["error"]["message"]
    store.max_bytes = 3_500  # now smaller than one such response
    huge = await (await client.post("/v1/responses", json={"input": "x" * 3_000, "max_output_tokens": 2})).json()
    assert huge["store"] is True and (await client.get(f"/v1/responses/{huge['id']}")).status == 404, \
        "a response larger than the whole store is not kept"
    assert [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids[2:]] == [200, 200], \
        "and it drops nothing to make room"


async def test_delete_removes_a_stored_response(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    answer = await openai_client.responses.create(model=model, input="Capital?", max_output_tokens=4)
    deleted = await client.delete(f"/v1/responses/{answer.id}")
    assert deleted.status == 200 and await deleted.json() == {"id": answer.id, "object": "response", "deleted": True}
    assert (await client.get(f"/v1/responses/{answer.id}")).status == 404
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.create(model=model, input="And?", previous_response_id=answer.id)
    assert missing.value.body["param"] == "previous_response_id"
    again = await client.delete(f"/v1/responses/{answer.id}")
    assert again.status == 404 and (await again.json())["error"]["param"] == "response_id"
    other = await openai_client.responses.create(model=model, input="Capital?", max_output_tokens=4)
    await openai_client.responses.delete(other.id)  # the SDK's own call
    with pytest.raises(openai.NotFoundError):
        await openai_client.responses.retrieve(other.id)


def test_the_store_bounds_are_read_from_the_environment_at_start(monkeypatch):
    monkeypatch.setenv("RESPONSES_STORE_SIZE", "7")
    monkeypatch.setenv("RESPONSES_STORE_BYTES", "4096")
    assert (ResponsesSettings().store_size, ResponsesSettings().store_bytes) == (7, 4096)


async def test_an_invalid_store_size_is_health_error_with_the_reason(aiohttp_client, monkeypatch, tmp_path):
    monkeypatch.setenv("RESPONSES_STORE_SIZE", "-1")
    app = create_app(runner_settings(MODEL_ID=str(tmp_path / "model"), MODEL_DIR=str(tmp_path)))
    client = await aiohttp_client(app)
    assert (await (await client.get("/health")).json())["status"] == "ERROR"
    assert "RESPONSES_STORE_SIZE" in app[STATE].load_error


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
