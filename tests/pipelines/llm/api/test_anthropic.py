"""POST /v1/messages and /v1/messages/count_tokens on a fake engine, in-process: Anthropic's shapes, through
Anthropic's own SDK on a loopback port, and every rule around the engine.

The same behaviours against a real vLLM engine over real HTTP are in
tests/pipelines/llm/real_engine/test_anthropic.py.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent

from pipelines.llm.answers import CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api.anthropic import MessageReply, conversation, message_content
from pipelines.llm.replies import ReplyTracker
from pipelines.llm.schema import AnthropicMessagesRequest, AnthropicStreamEvent
from runner.pipeline import RequestContext
from runner.schema import AnthropicError
from tests.support.apps import assert_a_vanishing_client_aborts, llm_app, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import (
    DEFAULT_WORDS,
    FakeEngine,
    FakeTokenizer,
    RecordingParser,
    Script,
    hermes_call,
    scripted_text,
)
from tests.support.fast_lane import IMPORTS_VLLM
from tests.support.http import QUESTION
from tests.support.sdks import anthropic_sdk
from tests.support.tools import ANTHROPIC_WEATHER, CITY

TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
KEY = "s3cret"


# 1. The stream's events and the whole message, written from the same answer events


def events_of(reader_events: list, finish: str = "stop") -> tuple[list[tuple[bytes, bytes]], MessageReply]:
    """What MessageReply.write makes of answer events, with the block that is open at the end closed."""
    reply = MessageReply(reader=None, model="m", tracker=ReplyTracker(RequestContext(request_id="1")))
    written = []
    for event in reader_events:
        written.extend(reply.write(event))
    written.append((b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % reply.index))
    return written, reply


MIXED = [ReasoningDelta("Let me "), ReasoningDelta("think."), TextDelta("It is "), TextDelta("\"sunny\"\n"),
         CallStart(0, "call_1", "get_weather"), CallArguments(0, '{"city": '), CallArguments(0, '"Pa'),
         CallArguments(0, 'ris"}'), CallStart(1, "call_2", "get_time"), CallArguments(1, "{}"), TextDelta("é 🙂")]


def test_every_event_is_one_of_the_sdks_types_and_what_the_spec_describes():
    written, _ = events_of(MIXED)
    for name, document in written:
        data = json.loads(document)
        assert data["type"] == name.decode(), "the event line names the data's type"
        STREAM_EVENT.validate_python(data)  # strict: every field the SDK's type requires, of its type
        assert AnthropicStreamEvent.model_validate_json(document).model_dump(exclude_unset=True) == data
    assert [json.loads(document)["type"] for _, document in written] == [
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop"]


def test_the_sdks_accumulated_stream_is_the_whole_message():
    """Thinking, text, two calls with their input in pieces, text again: the SDK's snapshot of the stream
    and the whole message's content are the same blocks."""
    written, _ = events_of(MIXED)
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}}
    snapshot = accumulate_event(event=STREAM_EVENT.validate_python(start), current_snapshot=None, json_bufs={})
    buffers: dict[int, bytes] = {}
    for _, document in written:
        snapshot = accumulate_event(event=STREAM_EVENT.validate_python(json.loads(document)),
                                    current_snapshot=snapshot, json_bufs=buffers)
    whole = [block.model_dump() for block in message_content(MIXED)]
    assert [block.to_dict() for block in snapshot.content] == whole
    assert whole[2] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
    assert whole[0] == {"type": "thinking", "thinking": "Let me think.", "signature": ""}


def test_an_empty_answer_is_one_empty_text_block_and_a_cut_call_keeps_what_it_has():
    assert [block.model_dump() for block in message_content([])] == [{"type": "text", "text": ""}]
    cut = message_content([CallStart(0, "call_1", "get_weather"), CallArguments(0, '{"city": "Paris", "da')])
    assert cut[0].input == {"city": "Paris"}, "as the SDK reads an unfinished input_json_delta"


def test_the_error_event_is_anthropics_error():
    from pipelines.llm.api import in_band_error

    name, document = in_band_error("anthropic", 'generation failed: "quoted"\nline')
    assert name == b"error"
    assert json.loads(document) == {"type": "error", "error": {"type": "api_error",
                                                                "message": 'generation failed: "quoted"\nline'}}
    AnthropicError.model_validate_json(document)


# 2. Served in-process on the fake engine, through Anthropic's SDK


def rendered(turns: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt the fake engine is handed: the template rendered, encoded without a second BOS."""
    tokenizer = FakeTokenizer()
    return tokenizer.encode(tokenizer.apply_chat_template(turns, tools=tools), add_special_tokens=False)


async def raw_stream(client, body: dict, **kwargs) -> list[tuple[str, dict]]:
    """The SSE stream as sent: each event's name and data, checking it is framed as Anthropic frames it."""
    response = await client.post("/v1/messages", json={**body, "stream": True}, **kwargs)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    text = (await response.read()).decode()
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "the stream ends with its last event"
    events = []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: "), block
        events.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return events


async def test_the_sdk_gets_the_text_with_exact_usage(client, engine, anthropic_client, model):
    message = await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=7,
                                                     extra_body={"temperature": 0})
    [submitted] = engine.submitted
    assert submitted.prompt == rendered(QUESTION)
    assert isinstance(message, Message) and message.id.startswith("msg_")
    assert message.role == "assistant" and message.type == "message" and message.model == model
    assert [block.model_dump(exclude_none=True) for block in message.content] == [
        {"type": "text", "text": "".join(DEFAULT_WORDS[:7])}]
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (len(submitted.prompt), 7)
    Message.model_validate((await (await client.post("/v1/messages", json={
        "model": model, "messages": QUESTION, "max_tokens": 3})).json()))  # strict: the SDK's own type


async def test_a_stream_is_anthropics_named_events_and_the_sdk_reads_the_same_message(client, engine, anthropic_client,
                                                                                      model):
    request = dict(model=model, messages=QUESTION, max_tokens=5)
    whole = await anthropic_client.messages.create(**request)
    events = await raw_stream(client, request)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 5, "content_block_stop",
                     "message_delta", "message_stop"]
    for name, data in events:
        assert data["type"] == name
        STREAM_EVENT.validate_python(data)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == \
        whole.usage.input_tokens
    assert [data["delta"] for _, data in events[2:7]] == [{"type": "text_delta", "text": word}
                                                         for word in DEFAULT_WORDS[:5]]
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                             "usage": {"input_tokens": whole.usage.input_tokens, "output_tokens": 5}}
    async with anthropic_client.messages.stream(**request) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == whole.content[0].text
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})


async def test_system_as_a_string_or_blocks_and_text_blocks_reach_the_template(client, engine, anthropic_client, model):
    await anthropic_client.messages.create(model=model, max_tokens=2, system="Be brief.", messages=QUESTION)
    await anthropic_client.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?", "cache_control": {"type": "ephemeral"}}]}],
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief.", "cache_control": {"type": "ephemeral"}}])
    assert engine.submitted[0].prompt == rendered([{"role": "system", "content": "Be brief."}, *QUESTION])
    assert engine.submitted[1].prompt == rendered([{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "What is\nthe capital?"}])


def test_tool_use_and_tool_result_blocks_become_the_templates_turns():
    request = AnthropicMessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "system": "Use tools.",
        "messages": [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call both.", "signature": "x"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no clock"}, {"type": "text", "text": "here"}]},
                {"type": "text", "text": "Thanks."}]},
            {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        ]})
    assert conversation(request) == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "no clock\nhere", "tool_call_id": "toolu_2"},
        {"role": "user", "content": "Thanks."},
        {"role": "system", "content": "Answer in French."},
    ]
    only_results = AnthropicMessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}]})
    assert conversation(only_results) == [{"role": "tool", "content": "", "tool_call_id": "toolu_1"}]


async def test_the_sampling_fields_reach_the_engine_with_anthropics_defaults(client, engine, anthropic_client, model):
    # Anthropic's SDK no longer names the sampling fields (its newest models refuse them); they go in the body.
    await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=3,
                                           metadata={"user_id": "someone"},
                                           extra_body={"temperature": 0.3, "top_p": 0.5, "top_k": 7})
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.3, 0.5, 7, 3)
    await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=3)
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.stop) == (1.0, 1.0, -1, [])
    assert sampling.json_schema is None and sampling.n == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_stop_sequences_and_the_end_of_the_answer_are_told_apart(client, engine, anthropic_client, model, stream):
    engine.script = Script(words=lambda *_: ["Paris ", "is ", "the ", "capital."])

    async def ask(**request):
        if not stream:
            return await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=50, **request)
        async with anthropic_client.messages.stream(model=model, messages=QUESTION, max_tokens=50,
                                                    **request) as streamed:
            return await streamed.get_final_message()

    stopped = await ask(stop_sequences=["never", "the"])
    assert stopped.content[0].text == "Paris is "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "the")
    assert engine.submitted[-1].sampling.stop == ["never", "the"]
    ended = await ask()
    assert ended.content[0].text == "Paris is the capital."
    assert (ended.stop_reason, ended.stop_sequence) == ("end_turn", None)


async def test_a_named_tool_streams_its_input_as_json_deltas(client, engine, anthropic_client, model):
    engine.script = scripted_text('{"city": "Paris"}')
    request = dict(model=model, messages=QUESTION, max_tokens=50, tools=[ANTHROPIC_WEATHER, TIME],
                   tool_choice={"type": "tool", "name": "get_weather"})
    message = await anthropic_client.messages.create(**request)
    assert engine.submitted[-1].sampling.json_schema == CITY
    assert engine.submitted[-1].prompt == rendered(QUESTION, [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                          "parameters": CITY}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["input_schema"]}}])
    [call] = message.content
    assert (call.type, call.name, call.input, message.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"},
                                                                      "tool_use")
    events = await raw_stream(client, request)
    assert events[1][1]["content_block"] == {"type": "tool_use", "id": events[1][1]["content_block"]["id"],
                                             "name": "get_weather", "input": {}}
    pieces = [data["delta"]["partial_json"] for name, data in events if name == "content_block_delta"]
    assert len(pieces) == len('{"city": "Paris"}'), "one delta per generated token"
    assert json.loads("".join(pieces)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_any_calls_one_or_more_tools_and_the_deltas_add_up_to_the_input(client, engine, anthropic_client, model,
                                                                              stream):
    engine.script = scripted_text('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                  '{"name": "get_time", "parameters": {"zone": "CET"}}]')
    request = dict(model=model, messages=QUESTION, max_tokens=200, tools=[ANTHROPIC_WEATHER, TIME],
                   tool_choice={"type": "any"})
    if stream:
        inputs: dict[int, str] = {}
        async with anthropic_client.messages.stream(**request) as streamed:
            async for event in streamed:
                if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                    inputs[event.index] = inputs.get(event.index, "") + event.delta.partial_json
            message = await streamed.get_final_message()
        assert {index: json.loads(text) for index, text in inputs.items()} == {
            index: block.input for index, block in enumerate(message.content)}
    else:
        message = await anthropic_client.messages.create(**request)
    assert [(block.type, block.name, block.input) for block in message.content] == [
        ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_time", {"zone": "CET"})]
    assert message.stop_reason == "tool_use"
    assert "maxItems" not in engine.submitted[-1].sampling.json_schema
    await anthropic_client.messages.create(**{**request,
                                              "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})
    assert engine.submitted[-1].sampling.json_schema["maxItems"] == 1


async def test_none_hides_the_tools_from_the_template(client, engine, anthropic_client, model):
    message = await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=3,
                                                     tools=[ANTHROPIC_WEATHER], tool_choice={"type": "none"})
    assert engine.submitted[-1].prompt == rendered(QUESTION)
    assert message.content[0].type == "text" and message.stop_reason == "max_tokens"


@IMPORTS_VLLM
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_auto_with_the_models_parser_gives_a_tool_use_or_text(aiohttp_client, tmp_path, stream):
    parser = RecordingParser()
    engine = FakeEngine(tool_parsers={parser.name: parser})
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        llm_settings(TOOL_CALL_PARSER=parser.name)))
    model = str(tmp_path / "model")
    async with anthropic_sdk(str(client.make_url(""))) as anthropic_client:
        for text, expected in ((hermes_call("get_weather", {"city": "Paris"}), ("tool_use", {"city": "Paris"})),
                               ("Paris.", ("text", "Paris."))):
            engine.script = scripted_text(text)
            request = dict(model=model, messages=QUESTION, max_tokens=100, tools=[ANTHROPIC_WEATHER])  # auto by default
            if stream:
                async with anthropic_client.messages.stream(**request) as streamed:
                    message = await streamed.get_final_message()
            else:
                message = await anthropic_client.messages.create(**request)
            [block] = message.content
            assert (block.type, block.input if block.type == "tool_use" else block.text) == expected
            assert message.stop_reason == ("tool_use" if expected[0] == "tool_use" else "end_turn")
    body = parser.requests[-1]
    assert body["tool_choice"] == "auto" and body["tools"][0]["function"]["name"] == "get_weather"
    assert body["messages"] == QUESTION


async def test_count_tokens_is_the_prompt_the_engine_would_get(client, engine, anthropic_client, model):
    for tools, choice in (([], None), ([ANTHROPIC_WEATHER], {"type": "tool", "name": "get_weather"}),
                          ([ANTHROPIC_WEATHER], {"type": "none"})):
        extra = {"tools": tools} if tools else {}
        extra |= {"tool_choice": choice} if choice else {}
        counted = await anthropic_client.messages.count_tokens(model=model, messages=QUESTION, system="Be brief.",
                                                               **extra)
        assert isinstance(counted, MessageTokensCount)
        engine.script = scripted_text('{"city": "Paris"}')
        message = await anthropic_client.messages.create(model=model, messages=QUESTION, system="Be brief.",
                                                         max_tokens=40, **extra)
        assert counted.input_tokens == message.usage.input_tokens == len(engine.submitted[-1].prompt)
    submitted = len(engine.submitted)
    await anthropic_client.messages.count_tokens(model=model, messages=QUESTION)
    assert len(engine.submitted) == submitted, "counting generates nothing"


# 3. Errors: Anthropic's shape and status codes, none of them reaching the engine


def assert_anthropic_error(body: dict, kind: str, said: str = "") -> None:
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    assert said in body["error"]["message"], body


BAD = [
    ({"max_tokens": None}, "max_tokens: Field required"),
    ({"messages": None}, "messages: Field required"),
    ({"model": None}, "model: Field required"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content: a user message needs at least one"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4096}, "MAX_MODEL_LEN"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stream": "yes"}, "stream"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking: Extra inputs are not permitted"),
    ({"stop_sequences": "end"}, "stop_sequences"),
    ({"system": [{"type": "image", "source": {}}]}, "system"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
     "messages.0.content.0.type: content blocks of type 'image' are not served"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "belongs in an assistant message"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
     "belongs in a user message"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
     "messages.1.content.0.id: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": [{"type": "image"}]}]}]}, "content.0.type"),
    ({"tools": [ANTHROPIC_WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tools": [ANTHROPIC_WEATHER], "tool_choice": {"type": "tool", "name": "get_time"}}, "get_time"),
    ({"tool_choice": {"type": "any"}}, "tool_choice needs tools"),
    ({"tools": [ANTHROPIC_WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools.0.type: 'web_search_20250305' is one of Anthropic's server tools, which are not served"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: Field required"),
]


@pytest.mark.parametrize(("change", "said"), BAD, ids=[said for _, said in BAD])
async def test_bad_requests_are_400_invalid_request_error_before_the_engine(client, engine, model, change, said):
    body = {"model": model, "messages": QUESTION, "max_tokens": 8}
    body = {key: value for key, value in (body | change).items() if value is not None}
    response = await client.post("/v1/messages", json=body)
    assert response.status == 400, await response.text()
    assert_anthropic_error(await response.json(), "invalid_request_error", said)
    assert engine.submitted == [], "nothing reached the engine"


async def test_the_sdk_raises_its_own_errors(client, engine, anthropic_client, model):
    with pytest.raises(anthropic.BadRequestError) as refused:
        await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=8,
                                               extra_body={"temperature": 3})
    assert refused.value.status_code == 400 and refused.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await anthropic_client.messages.create(model="claude-opus-4", messages=QUESTION, max_tokens=8)
    assert_anthropic_error(missing.value.body, "not_found_error", "claude-opus-4")
    assert model in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        await anthropic_client.messages.count_tokens(model="claude-opus-4", messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError):
        await anthropic_client.messages.count_tokens(model=model, messages=[])
    assert engine.submitted == []


async def test_bodies_that_are_not_json_or_too_large_and_paths_and_methods_it_lacks(aiohttp_client, engine, tmp_path):
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        runner=runner_settings(MAX_REQUEST_BYTES=4096)))
    for data, content_type in ((b'{"model": ', "application/json"), (b"{}", "text/plain")):
        response = await client.post("/v1/messages", data=data, headers={"Content-Type": content_type})
        assert response.status == 400
        assert_anthropic_error(await response.json(), "invalid_request_error")
    response = await client.post("/v1/messages", json={"model": "m", "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "x" * 8192}]})
    assert response.status == 413
    assert_anthropic_error(await response.json(), "request_too_large")
    response = await client.get("/v1/messages")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert_anthropic_error(await response.json(), "invalid_request_error")
    for path in ("/v1/messages/batches", "/v1/messages/count_tokens/x"):
        response = await client.post(path, json={})
        assert response.status == 404
        assert_anthropic_error(await response.json(), "not_found_error")
    # /v1 is OpenAI's too: what is neither's keeps OpenAI's shape, and the rest theirs.
    response = await client.post("/v1/embeddings", json={})
    assert response.status == 404 and set((await response.json())["error"]) == {"message", "type", "param", "code"}
    response = await client.get("/v1/chat/completions")
    assert response.status == 405 and "param" in (await response.json())["error"]
    response = await client.get("/nope")
    assert response.status == 404 and await response.json() == {"detail": {"msg": "Not Found"}}


async def test_the_key_is_taken_as_x_api_key_or_bearer_on_the_messages_operations_only(aiohttp_client, engine,
                                                                                         tmp_path):
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        runner=runner_settings(AUTH_TOKEN=KEY)))
    model = str(tmp_path / "model")
    body = {"model": model, "messages": QUESTION, "max_tokens": 2}
    for headers in ({"x-api-key": KEY}, {"X-Api-Key": f" {KEY} "}, {"Authorization": f"Bearer {KEY}"},
                    {"Authorization": "Bearer wrong", "x-api-key": KEY}):
        assert (await client.post("/v1/messages", json=body, headers=headers)).status == 200, headers
        response = await client.post("/v1/messages/count_tokens", json={"model": model, "messages": QUESTION},
                                     headers=headers)
        assert response.status == 200, headers
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"x-api-key": f"Bearer {KEY}"}):
        response = await client.post("/v1/messages", json=body, headers=headers)
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert_anthropic_error(await response.json(), "authentication_error", "x-api-key")
    # Anthropic's header is the Messages operations' alone: OpenAI's API and /llm take the bearer token only.
    chat = {"model": model, "messages": QUESTION, "max_tokens": 2}
    response = await client.post("/v1/chat/completions", json=chat, headers={"x-api-key": KEY})
    assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"
    response = await client.post("/llm", json={"messages": QUESTION}, headers={"x-api-key": KEY})
    assert response.status == 401 and "msg" in (await response.json())["detail"]
    async with anthropic_sdk(str(client.make_url("")), api_key=KEY) as anthropic_client:
        assert (await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=2)).content
    async with anthropic_sdk(str(client.make_url("")), api_key=None,
                             default_headers={"x-api-key": KEY}) as anthropic_client:  # as older SDKs send it
        assert (await anthropic_client.messages.count_tokens(model=model, messages=QUESTION)).input_tokens
    async with anthropic_sdk(str(client.make_url("")), api_key="wrong") as anthropic_client:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await anthropic_client.messages.create(model=model, messages=QUESTION, max_tokens=2)
    assert refused.value.body["error"]["type"] == "authentication_error"


async def test_a_runner_that_cannot_serve_is_503_overloaded_error(aiohttp_client, tmp_path):
    engine = FakeEngine()
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model"))
    engine.die()
    response = await client.post("/v1/messages", json={"model": str(tmp_path / "model"), "messages": QUESTION,
                                                       "max_tokens": 2})
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    assert_anthropic_error(await response.json(), "overloaded_error", "engine")


# 4. Failures and clients that leave


async def test_an_engine_that_dies_mid_stream_ends_it_with_an_error_event(client, engine, anthropic_client, model):
    engine.script = Script(fail_at=3)
    events = await raw_stream(client, {"model": model, "messages": QUESTION, "max_tokens": 50})
    assert [name for name, _ in events] == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                            "error"]
    assert_anthropic_error(events[-1][1], "api_error", "generation failed")
    assert (await (await client.get("/health")).json())["status"] == "ERROR"


async def test_the_sdk_raises_a_streams_error_event(client, engine, anthropic_client, model):
    engine.script = Script(fail_at=3)
    received = []
    with pytest.raises(anthropic.APIStatusError, match="generation failed"):
        async with anthropic_client.messages.stream(model=model, messages=QUESTION, max_tokens=50) as stream:
            async for event in stream:
                received.append(event.type)
    assert "message_start" in received and "message_stop" not in received


async def test_a_plain_request_whose_engine_dies_is_a_500_api_error(client, engine, model):
    engine.script = Script(fail_at=2)
    response = await client.post("/v1/messages", json={"model": model, "messages": QUESTION, "max_tokens": 50})
    assert response.status == 500
    assert_anthropic_error(await response.json(), "api_error", "generation failed")


async def test_a_client_that_goes_away_aborts_its_engine_request(client, engine, model):
    await assert_a_vanishing_client_aborts(client, engine, "/v1/messages",
                                           {"model": model, "messages": QUESTION, "max_tokens": 4000})


async def test_the_sdk_closing_a_stream_aborts_its_engine_request(client, engine, anthropic_client, model):
    engine.step_seconds = 0.01
    async with anthropic_client.messages.stream(model=model, messages=QUESTION, max_tokens=4000) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                break
    async with asyncio.timeout(2):
        while engine.running:
            await asyncio.sleep(0.01)
    assert engine.submitted[-1].aborted

