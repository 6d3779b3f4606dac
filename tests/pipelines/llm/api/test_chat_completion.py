"""POST /v1/chat/completions on a fake engine, in-process, through the official ``openai`` SDK.

The chunk bytes are held against the generated models; every request check is
shown to refuse before the engine. The same API against a real vLLM engine over
real HTTP is tests/pipelines/llm/real_engine/test_openai.py.
"""

from __future__ import annotations

import json

import openai
import pytest

from pipelines.llm.answers import CallArguments, CallStart, TextDelta
from pipelines.llm.api.chat_completion import ChatReply, delta_of
from pipelines.llm.api import in_band_error
from pipelines.llm.api.openai_base import ChunkEnvelope
from pipelines.llm.replies import LogprobEntry
from pipelines.llm.schema import (
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkToolCall,
    ChunkToolCallFunction,
    CompletionUsage,
    TokenLogprob,
    TopLogprob,
)
from runner.pipeline import RequestContext
from tests.support.apps import llm_app, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import (
    DEFAULT_WORDS,
    FakeEngine,
    FakeTokenizer,
    Script,
    scripted_text,
)
from tests.support.fast_lane import IMPORTS_VLLM
from tests.support.http import QUESTION, REFUSED_CHAT_FIELDS
from tests.support.sdks import openai_sdk
from tests.support.tools import CITY

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


# 1. Golden bytes: each chunk is what pydantic writes of the spec's ChatCompletionChunk


def envelope(include_usage: bool = False) -> ChunkEnvelope:
    return ChunkEnvelope("chat.completion.chunk", 'chatcmpl-"x"', 1700000000, "org/Modèl", include_usage)


def spec_chunk(choice: ChunkChoice | None, include_usage: bool = False, usage: CompletionUsage | None = None) -> bytes:
    fields = dict(id='chatcmpl-"x"', object="chat.completion.chunk", created=1700000000, model="org/Modèl",
                  choices=[choice] if choice else [])
    if include_usage:
        fields["usage"] = usage
    return ChatCompletionChunk(**fields).model_dump_json(exclude_unset=True).encode()


def spec_choice(delta: ChunkDelta, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None):
    return ChunkChoice(index=1, delta=delta, logprobs=logprobs, finish_reason=finish_reason)


class Reply(ChatReply):
    """A ChatReply with only what writing chunks needs."""

    def __init__(self, include_usage: bool = False, with_logprobs: bool = False) -> None:
        self.envelope = envelope(include_usage)
        self.with_logprobs = with_logprobs


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["", " word", 'q"uote\\ \n\u2028 é 🙂'])
def test_text_chunks_are_what_pydantic_writes(include_usage, text):
    reply = Reply(include_usage)
    assert reply.chunk(1, delta_of(TextDelta(text)), []) == spec_chunk(
        spec_choice(ChunkDelta(content=text)), include_usage)
    assert reply.chunk(1, b"{}", [], "length") == spec_chunk(spec_choice(ChunkDelta(), "length"), include_usage)
    assert reply.first_chunk(1, []) == spec_chunk(spec_choice(ChunkDelta(role="assistant", content="")), include_usage)


def test_tool_call_chunks_are_what_pydantic_writes():
    reply = Reply()
    start = CallStart(2, "call_1", "get_weather")
    assert reply.chunk(1, delta_of(start), []) == spec_chunk(spec_choice(ChunkDelta(tool_calls=[ChunkToolCall(
        index=2, id="call_1", type="function", function=ChunkToolCallFunction(name="get_weather", arguments=""))])))
    assert reply.first_chunk(1, [start]) == spec_chunk(spec_choice(ChunkDelta(role="assistant", tool_calls=[
        ChunkToolCall(index=2, id="call_1", type="function",
                      function=ChunkToolCallFunction(name="get_weather", arguments=""))])))
    assert reply.chunk(1, delta_of(CallArguments(2, '{"city": "Pa')), []) == spec_chunk(spec_choice(ChunkDelta(
        tool_calls=[ChunkToolCall(index=2, function=ChunkToolCallFunction(arguments='{"city": "Pa'))])))


def test_logprobs_and_usage_chunks_are_what_pydantic_writes():
    reply = Reply(include_usage=True, with_logprobs=True)
    entry = LogprobEntry("é", -0.5, (("é", -0.5), ("e", -1.5)))
    logprobs = ChoiceLogprobs(content=[TokenLogprob(token="é", logprob=-0.5, bytes=[195, 169], top_logprobs=[
        TopLogprob(token="é", logprob=-0.5, bytes=[195, 169]), TopLogprob(token="e", logprob=-1.5, bytes=[101])])])
    assert reply.chunk(1, delta_of(TextDelta("é")), [entry]) == spec_chunk(
        spec_choice(ChunkDelta(content="é"), logprobs=logprobs), include_usage=True)
    context = RequestContext(request_id="x", prompt_tokens=7, completion_tokens=3)
    assert reply.envelope.usage_chunk(context) == spec_chunk(
        None, include_usage=True, usage=CompletionUsage(prompt_tokens=7, completion_tokens=3, total_tokens=10))


def test_the_in_band_error_is_openais_error_document():
    assert json.loads(in_band_error("openai", 'the engine "died"')) == {
        "error": {"message": 'the engine "died"', "type": "server_error", "param": None, "code": None}}


# 2. Served in-process, through the official SDK


async def streamed(openai_client, **request) -> tuple[dict[int, str], dict[int, str], list]:
    texts, reasons, chunks = {}, {}, []
    async for chunk in await openai_client.chat.completions.create(stream=True, **request):
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


async def test_plain_and_streamed_answers_agree_and_usage_is_exact(openai_client, engine, model):
    plain = await openai_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0)
    prompt = engine.submitted[0].prompt
    assert plain.choices[0].message.content == "".join(DEFAULT_WORDS[:6])
    assert plain.choices[0].finish_reason == "length" and plain.object == "chat.completion"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(prompt), 6)
    texts, reasons, chunks = await streamed(openai_client, model=model, messages=QUESTION, max_tokens=6, temperature=0,
                                            stream_options={"include_usage": True})
    assert texts == {0: plain.choices[0].message.content} and reasons == {0: "length"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.usage for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


async def test_the_request_becomes_the_sampling_the_engine_is_asked_for(openai_client, engine, model):
    await openai_client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0.5, top_p=0.9, n=2, stop="x", seed=7, presence_penalty=1,
        frequency_penalty=-1, logit_bias={"101": 5}, max_tokens=100, max_completion_tokens=5, logprobs=True,
        top_logprobs=2, extra_body={"top_k": 3, "min_p": 0.1, "repetition_penalty": 1.2})
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.n, sampling.stop, sampling.seed) == (0.5, 0.9, 2, ["x"], 7)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias) == (1, -1, {101: 5})
    assert (sampling.max_tokens, sampling.logprobs) == (5, 2), "max_completion_tokens wins over max_tokens"
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty) == (3, 0.1, 1.2)
    await openai_client.chat.completions.create(model=model, messages=QUESTION)
    sampling = engine.submitted[-1].sampling
    assert sampling.max_tokens == engine.max_model_len - len(engine.submitted[-1].prompt), "all the room left"
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.n, sampling.logprobs) == (1, 1, -1, 1, None)


async def test_roles_and_text_parts_reach_the_template_as_the_model_knows_them(openai_client, engine, model):
    tokenizer = FakeTokenizer()
    await openai_client.chat.completions.create(model=model, max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}])
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello\nthere"}])
    assert engine.submitted[-1].prompt == tokenizer.encode(expected, add_special_tokens=False)


async def test_n_choices_stream_each_with_its_own_index(openai_client, engine, model):
    texts, reasons, _ = await streamed(openai_client, model=model, messages=QUESTION, max_tokens=4, n=3, temperature=1)
    plain = await openai_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, n=3,
                                                        temperature=1)
    assert [choice.message.content for choice in plain.choices] == [texts[i] for i in range(3)]
    assert reasons == {0: "length", 1: "length", 2: "length"} and plain.usage.completion_tokens == 12


async def test_logprobs_have_one_entry_per_token_plain_and_streamed(openai_client, model):
    request = dict(model=model, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    plain = await openai_client.chat.completions.create(**request)
    entries = plain.choices[0].logprobs.content
    assert "".join(entry.token for entry in entries) == plain.choices[0].message.content and len(entries) == 5
    assert all(len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token for entry in entries)
    streamed_entries = []
    async for chunk in await openai_client.chat.completions.create(stream=True, **request):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_entries += chunk.choices[0].logprobs.content
    assert streamed_entries == entries


async def test_a_named_tool_call_streams_its_arguments_as_generated(openai_client, engine, model):
    arguments = '{"city": "Paris"}'
    engine.script = scripted_text(arguments)
    request = dict(model=model, messages=QUESTION, tools=[WEATHER_TOOL, TIME_TOOL],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    plain = await openai_client.chat.completions.create(**request)
    assert engine.submitted[-1].sampling.json_schema == CITY, "the arguments are constrained to the schema"
    [call] = plain.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, plain.choices[0].finish_reason) == (
        "get_weather", arguments, "tool_calls")
    assert plain.choices[0].message.content is None
    pieces, names, reasons = [], [], []
    async for chunk in await openai_client.chat.completions.create(stream=True, **request):
        for delta in chunk.choices[0].delta.tool_calls or []:
            names += [delta.function.name] if delta.function.name else []
            pieces += [delta.function.arguments] if delta.function.arguments else []
        reasons.append(chunk.choices[0].finish_reason)
    assert names == ["get_weather"] and "".join(pieces) == arguments and len(pieces) > 1
    assert reasons[-1] == "tool_calls"


async def test_required_tool_calls_are_read_from_their_constrained_json(openai_client, engine, model):
    engine.script = scripted_text(json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}},
                                              {"name": "get_time", "parameters": {}}]))
    request = dict(model=model, messages=QUESTION, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    plain = await openai_client.chat.completions.create(**request)
    schema = engine.submitted[-1].sampling.json_schema
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in plain.choices[0].message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    streamed_calls: dict[int, dict] = {}
    async for chunk in await openai_client.chat.completions.create(stream=True, **request):
        for delta in chunk.choices[0].delta.tool_calls or []:
            kept = streamed_calls.setdefault(delta.index, {"name": "", "arguments": ""})
            kept["name"] += delta.function.name or ""
            kept["arguments"] += delta.function.arguments or ""
    assert [(call["name"], json.loads(call["arguments"])) for call in streamed_calls.values()] == calls
    await openai_client.chat.completions.create(parallel_tool_calls=False, **request)
    assert engine.submitted[-1].sampling.json_schema["maxItems"] == 1


async def test_a_length_cut_required_answer_keeps_its_text(openai_client, engine, model):
    cut = '[{"name": "get_weather", "parameters": {"ci'
    engine.script = scripted_text(cut)
    answer = await openai_client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER_TOOL],
                                                         tool_choice="required", max_tokens=10)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content == cut[:10]
    assert answer.choices[0].message.tool_calls is None


async def test_tool_choice_none_shows_the_template_no_tools(openai_client, engine, model):
    await openai_client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER_TOOL],
                                                tool_choice="none", max_tokens=2)
    assert b"get_weather" not in bytes(t for t in engine.submitted[-1].prompt if t < 256)
    await openai_client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER_TOOL],
                                                tool_choice="required", max_tokens=2)
    assert b"get_weather" in bytes(t for t in engine.submitted[-1].prompt if t < 256)


async def test_a_conversation_with_a_call_and_its_result_reaches_the_template(openai_client, engine, model):
    await openai_client.chat.completions.create(model=model, max_tokens=2, messages=[
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    text = bytes(t for t in engine.submitted[-1].prompt if t < 256).decode()
    assert "<|tool|>\nsunny" in text


BAD = [
    *REFUSED_CHAT_FIELDS,
    ({"max_tokens": 4096}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.[0].content.[0].type"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages.[0].tool_calls"),
]


@pytest.mark.parametrize(("request_", "param"), BAD)
async def test_bad_parameters_are_400_with_the_param_before_the_engine(openai_client, engine, model, request_, param):
    body = {"model": model, "messages": QUESTION, **request_}
    extra = body.pop("extra_body", {})
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.chat.completions.create(**body, extra_body=extra)
    assert set(refused.value.body) == {"message", "type", "param", "code"}
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    assert engine.submitted == []


@IMPORTS_VLLM
async def test_tool_choice_auto_reads_calls_with_the_models_parser_or_gives_the_text(aiohttp_client, tmp_path):
    from pipelines.llm.vllm_backend.tool_parsers import ToolCallParser

    engine = FakeEngine(tool_parsers={"hermes": ToolCallParser("hermes", FakeTokenizer())})
    served = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        llm_settings(TOOL_CALL_PARSER="hermes")))
    async with openai_sdk(str(served.make_url(""))) as openai_client:
        engine.script = scripted_text('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
        answer = await openai_client.chat.completions.create(model=str(tmp_path / "model"), messages=QUESTION,
                                                             tools=[WEATHER_TOOL])
        [call] = answer.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert answer.choices[0].finish_reason == "tool_calls"
        engine.script = scripted_text("Just text.")
        answer = await openai_client.chat.completions.create(model=str(tmp_path / "model"), messages=QUESTION,
                                                             tools=[WEATHER_TOOL])
        assert answer.choices[0].message.content == "Just text." and answer.choices[0].finish_reason == "stop"
        assert not answer.choices[0].message.tool_calls


async def test_another_model_is_404_model_not_found(openai_client, engine):
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.chat.completions.create(model="someone/else", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert engine.submitted == []


async def test_a_stream_that_fails_after_the_header_raises_in_the_sdk(openai_client, engine, model):
    engine.script = Script(fail_at=3)
    received = 0
    with pytest.raises(openai.APIError, match="generation failed"):
        async for _ in await openai_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=50,
                                                                   stream=True):
            received += 1
    assert received > 1


async def test_a_missing_or_wrong_key_is_401_in_openais_shape(aiohttp_client, engine, tmp_path, model):
    served = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        runner=runner_settings(AUTH_TOKEN="right")))
    for key in ("wrong", "right"):
        async with openai_sdk(str(served.make_url("")), key) as openai_client:
            if key == "wrong":
                with pytest.raises(openai.AuthenticationError) as refused:
                    await openai_client.chat.completions.create(model=model, messages=QUESTION)
                assert refused.value.body["code"] == "invalid_api_key"
            else:
                assert (await openai_client.chat.completions.create(model=model, messages=QUESTION,
                                                                    max_tokens=1)).choices
