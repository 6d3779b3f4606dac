"""The OpenAI API end to end, through the official ``openai`` SDK, on real runners and real engines.

The default model answers where the text must make sense (the Paris question,
JSON answers, tool calls); the tiny random model where only the mechanics
count (it never stops before max_tokens at temperature 0); the guarded runner
(bearer token, small capacity, REQUEST_TIMEOUT=4 s, TOOL_CALL_PARSER=hermes)
for keys, overload, the in-band stream error and tool_choice "auto".
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import jsonschema
import openai
import pytest

from tests.support.http import IN_FLIGHT, QUESTION, REFUSED_CHAT_FIELDS, UNFINISHED, metric, wait_for_metric
from tests.support.runner_process import DEFAULT_MODEL_ID
from tests.support.runners import (
    GUARDED_AUTH_TOKEN,
    GUARDED_REQUEST_TIMEOUT,
    TINY_MAX_MODEL_LEN,
)
from tests.support.sdks import openai_sdk, served_model
from tests.support.tools import CHAT_WEATHER, CITY

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["zone"]},
    },
}


async def streamed_chat(sdk: openai.AsyncOpenAI, **request) -> tuple[dict[int, str], dict[int, str], list]:
    """Each choice's text and finish_reason from a streamed chat, and every chunk."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = []
    async for chunk in await sdk.chat.completions.create(stream=True, **request):
        chunks.append(chunk)
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


# 1. The default model: text, streaming, /v1/completions, models


async def test_the_sdk_gets_paris_and_the_stream_is_the_same_text(openai_default):
    plain = await openai_default.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0,
                                                         max_tokens=30)
    assert plain.object == "chat.completion" and plain.model == DEFAULT_MODEL_ID
    assert "Paris" in plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.role == "assistant"
    texts, reasons, chunks = await streamed_chat(
        openai_default, model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=30,
        stream_options={"include_usage": True},
    )
    assert texts == {0: plain.choices[0].message.content} and reasons == {0: "stop"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.usage for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


async def test_without_include_usage_no_chunk_has_usage(openai_default):
    _, _, chunks = await streamed_chat(openai_default, model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0,
                                       max_tokens=5)
    assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)


async def test_completions_plain_streamed_and_echoed(openai_default):
    prompt = "The capital of France is"
    plain = await openai_default.completions.create(model=DEFAULT_MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and "Paris" in plain.choices[0].text
    assert plain.usage.completion_tokens == 8 and plain.choices[0].finish_reason == "length"
    streamed = [chunk async for chunk in await openai_default.completions.create(
        model=DEFAULT_MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stream=True)]
    assert "".join(chunk.choices[0].text for chunk in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    echoed = await openai_default.completions.create(model=DEFAULT_MODEL_ID, prompt=prompt, max_tokens=8, temperature=0,
                                                     echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    two = await openai_default.completions.create(model=DEFAULT_MODEL_ID, prompt=[prompt, "One, two,"], max_tokens=4,
                                                  temperature=0)
    assert [choice.index for choice in two.choices] == [0, 1]
    assert two.choices[0].text == plain.choices[0].text[: len(two.choices[0].text)]


async def test_six_prompts_in_one_request_run_together_not_one_after_the_other(openai_tiny, tiny_runner):
    """The engine takes a request only when its stream is first read: reading six one after the other would
    take as long as six requests sent one after the other. Read together, they share the engine's steps.
    Measured side by side, round after round, so that the machine's load weighs on both alike."""
    import time

    model, prompts = served_model(tiny_runner), [f"Story number {index}:" for index in range(6)]

    async def seconds(prompt) -> float:
        started = time.monotonic()
        answer = await openai_tiny.completions.create(model=model, prompt=prompt, max_tokens=64, temperature=0)
        assert answer.usage.completion_tokens == 64 * (len(prompt) if isinstance(prompt, list) else 1)
        return time.monotonic() - started

    await seconds(prompts)  # the prompts' prefixes enter the cache, as they then are for every measurement
    one_by_one, together = [], []
    for _ in range(3):
        one_by_one.append(sum([await seconds(prompt) for prompt in prompts]))
        together.append(await seconds(prompts))
    one_by_one, together = sorted(one_by_one)[1], sorted(together)[1]
    print(f"six prompts in one request: {together:.2f} s, as six requests one after the other: {one_by_one:.2f} s, "
          f"{together / one_by_one:.2f}x ({6 * together / one_by_one:.1f}x one prompt's time)")
    assert together < 0.7 * one_by_one, f"six prompts in one request took {together:.2f} s, one after the other " \
                                        f"{one_by_one:.2f} s"


async def test_models_lists_the_served_model(openai_default):
    listed = await openai_default.models.list()
    assert [model.id for model in listed.data] == [DEFAULT_MODEL_ID]
    model = await openai_default.models.retrieve(DEFAULT_MODEL_ID)
    assert model.id == DEFAULT_MODEL_ID and model.object == "model" and model.owned_by
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_default.models.retrieve("someone/else")
    assert missing.value.body["code"] == "model_not_found"


# 2. Structured output and tools (the default model, constrained decoding)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_json_schema_answer_parses_and_matches(openai_default, stream):
    request = dict(
        model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )
    if stream:
        texts, _, _ = await streamed_chat(openai_default, **request)
        text = texts[0]
    else:
        text = (await openai_default.chat.completions.create(**request)).choices[0].message.content
    jsonschema.validate(json.loads(text), CITY)


async def test_a_json_object_answer_is_an_object(openai_default):
    answer = await openai_default.chat.completions.create(
        model=DEFAULT_MODEL_ID, temperature=0, max_tokens=120, response_format={"type": "json_object"},
        frequency_penalty=1.0,  # this small model repeats keys until max_tokens without it
        messages=[{"role": "user", "content": 'Reply with JSON like {"capital": "..."} for France.'}],
    )
    text = answer.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    if answer.choices[0].finish_reason == "stop":  # a whole answer is a whole object
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("tool_choice", ["named", "required"])
async def test_forced_tool_calls_have_arguments_that_match_the_schema(openai_default, tool_choice):
    choice = {"type": "function", "function": {"name": "get_weather"}} if tool_choice == "named" else "required"
    request = dict(model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=80,
                   tools=[CHAT_WEATHER, TIME_TOOL], tool_choice=choice)
    answer = await openai_default.chat.completions.create(**request)
    [result] = answer.choices
    assert result.finish_reason == "tool_calls" and result.message.tool_calls
    for call in result.message.tool_calls:
        schema = CITY if call.function.name == "get_weather" else TIME_TOOL["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        assert call.id.startswith("call_") and call.type == "function"
    if tool_choice == "named":
        assert [call.function.name for call in result.message.tool_calls] == ["get_weather"]

    calls: dict[int, dict] = {}
    reasons = []
    async for chunk in await openai_default.chat.completions.create(stream=True, **request):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            kept = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            kept["name"] += delta_call.function.name or ""
            kept["arguments"] += delta_call.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls"
    assert [(call["name"], json.loads(call["arguments"])) for call in calls.values()] == [
        (call.function.name, json.loads(call.function.arguments)) for call in result.message.tool_calls
    ]


async def test_parallel_tool_calls_false_gives_one_call(openai_default):
    answer = await openai_default.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=80,
        tools=[CHAT_WEATHER, TIME_TOOL], tool_choice="required", parallel_tool_calls=False,
    )
    assert len(answer.choices[0].message.tool_calls) == 1


async def test_a_follow_up_with_the_tool_message_is_answered(openai_default):
    first = await openai_default.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=60, tools=[CHAT_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = first.choices[0].message.tool_calls[0]
    follow_up = [
        *QUESTION,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"city": "Paris", "weather": "sunny, 21 C"}'},
    ]
    answer = await openai_default.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=follow_up, temperature=0, max_tokens=30, tools=[CHAT_WEATHER],
        tool_choice="none",
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# 3. Sampling parameters (the tiny model: its text runs to max_tokens)


async def test_seed_makes_sampling_reproducible(openai_tiny, tiny_runner):
    request = dict(model=served_model(tiny_runner), messages=QUESTION, temperature=1.0, max_tokens=24)
    first = await openai_tiny.chat.completions.create(seed=1234, **request)
    again = await openai_tiny.chat.completions.create(seed=1234, **request)
    other = await openai_tiny.chat.completions.create(seed=4321, **request)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert other.choices[0].message.content != first.choices[0].message.content


async def test_n_gives_that_many_choices_plain_and_streamed(openai_tiny, tiny_runner):
    request = dict(model=served_model(tiny_runner), messages=QUESTION, temperature=1.0, max_tokens=12, n=3, seed=5)
    plain = await openai_tiny.chat.completions.create(**request)
    assert [choice.index for choice in plain.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in plain.choices}) > 1
    assert plain.usage.completion_tokens == 3 * 12
    texts, reasons, _ = await streamed_chat(openai_tiny, **request)
    assert sorted(texts) == [0, 1, 2] and reasons == {0: "length", 1: "length", 2: "length"}
    assert [texts[index] for index in range(3)] == [choice.message.content for choice in plain.choices]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_logprobs_have_one_entry_per_completion_token(openai_tiny, tiny_runner, stream):
    request = dict(model=served_model(tiny_runner), messages=QUESTION, temperature=0, max_tokens=10,
                   logprobs=True, top_logprobs=3)
    if stream:
        entries = []
        async for chunk in await openai_tiny.chat.completions.create(stream=True, **request):
            if chunk.choices and chunk.choices[0].logprobs:
                entries += chunk.choices[0].logprobs.content
        text = "".join(entry.token for entry in entries)
        tokens = 10
    else:
        answer = await openai_tiny.chat.completions.create(**request)
        entries = answer.choices[0].logprobs.content
        text, tokens = answer.choices[0].message.content, answer.usage.completion_tokens
    assert len(entries) == tokens == 10
    assert "".join(entry.token for entry in entries) == text
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token, "greedy: the sampled token is the likeliest"
        assert bytes(entry.bytes).decode() == entry.token


async def test_completion_logprobs_have_one_entry_per_token(openai_tiny, tiny_runner):
    answer = await openai_tiny.completions.create(model=served_model(tiny_runner), prompt="Once upon a time",
                                                  max_tokens=6, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [sum(len(token) for token in logprobs.tokens[:i]) for i in range(6)]


async def test_stop_ends_the_text_before_the_stop_string(openai_tiny, tiny_runner):
    model = served_model(tiny_runner)
    free = (await openai_tiny.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                      max_tokens=40)).choices[0]
    word = free.message.content[10:13]
    for stop in (word, [word, "\x00never"]):
        stopped = (await openai_tiny.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                             max_tokens=40, stop=stop)).choices[0]
        assert stopped.finish_reason == "stop"
        assert stopped.message.content == free.message.content[: free.message.content.index(word)]


async def test_logit_bias_steers_every_token(openai_tiny, tiny_runner):
    from transformers import AutoTokenizer

    [token_id] = AutoTokenizer.from_pretrained(tiny_runner.env["MODEL_ID"]).encode("e", add_special_tokens=False)
    biased = await openai_tiny.chat.completions.create(
        model=served_model(tiny_runner), messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
        logit_bias={str(token_id): 100},
    )
    assert biased.choices[0].message.content == "e" * 6


async def test_penalties_and_vllm_extras_change_what_greedy_decoding_gives(openai_tiny, tiny_runner):
    model = served_model(tiny_runner)
    base = dict(model=model, messages=QUESTION, temperature=0, max_tokens=40)
    plain = (await openai_tiny.chat.completions.create(**base)).choices[0].message.content
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                  {"extra_body": {"repetition_penalty": 2.0}}):
        changed = (await openai_tiny.chat.completions.create(**base, **extra)).choices[0].message.content
        assert changed != plain, extra
    for accepted in ({"top_p": 0.5}, {"extra_body": {"top_k": 5, "min_p": 0.1}}, {"user": "someone"},
                     {"max_completion_tokens": 40}):
        answer = await openai_tiny.chat.completions.create(**base, **accepted)
        assert answer.choices[0].message.content == plain, "greedy decoding is unchanged by these"
    shorter = await openai_tiny.chat.completions.create(**{**base, "max_tokens": 100}, max_completion_tokens=7)
    assert shorter.usage.completion_tokens == 7, "max_completion_tokens wins over max_tokens"


async def test_text_parts_are_read_and_other_parts_refused(openai_tiny, tiny_runner):
    model = served_model(tiny_runner)
    as_string = await openai_tiny.chat.completions.create(
        model=model, temperature=0, max_tokens=8, messages=[{"role": "user", "content": "Hello\nthere"}])
    as_parts = await openai_tiny.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    developer = await openai_tiny.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    system = await openai_tiny.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert developer.choices[0].message.content == system.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_tiny.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    assert "image_url" in refused.value.body["message"]


# 4. Errors: OpenAI's shape and status codes, none of them reaching the engine


def assert_openai_error(body: dict, param: str | None = None) -> None:
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["message"] and body["type"] in ("invalid_request_error", "server_error")
    if param is not None:
        assert body["param"] == param, body


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        *REFUSED_CHAT_FIELDS,
        ({"max_tokens": TINY_MAX_MODEL_LEN}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ],
)
async def test_bad_parameters_are_400_with_the_param_before_the_engine(openai_tiny, tiny_runner, request_, param):
    async with aiohttp.ClientSession() as http:
        submitted = await metric(http, tiny_runner, "livepeer_runner_engine_requests_total")
        body = {"model": served_model(tiny_runner), "messages": QUESTION, **request_}
        extra = body.pop("extra_body", {})
        with pytest.raises(openai.BadRequestError) as refused:
            await openai_tiny.chat.completions.create(**body, extra_body=extra)
        assert refused.value.status_code == 400
        assert_openai_error(refused.value.body, param)
        assert await metric(http, tiny_runner, "livepeer_runner_engine_requests_total") == submitted


async def test_too_long_for_the_model_is_400_context_length_exceeded(openai_tiny, tiny_runner):
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_tiny.chat.completions.create(model=served_model(tiny_runner), messages=QUESTION,
                                                  max_tokens=TINY_MAX_MODEL_LEN)
    assert refused.value.body["code"] == "context_length_exceeded" and "MAX_MODEL_LEN" in refused.value.body["message"]


async def test_unknown_model_is_404_and_unknown_path_is_openai_shaped(openai_tiny, tiny_runner):
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_tiny.chat.completions.create(model="nobody/nothing", messages=QUESTION)
    assert_openai_error(missing.value.body, "model")
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_tiny.completions.create(model="nobody/nothing", prompt="hi")
    assert missing.value.body["code"] == "model_not_found"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tiny_runner.url}/v1/embeddings", json={}) as response:
            assert response.status == 404
            assert_openai_error((await response.json())["error"])
        async with http.post(f"{tiny_runner.url}/v1/chat/completions", data=b"{not json",
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400
            assert_openai_error((await response.json())["error"])


async def test_a_missing_or_wrong_key_is_401_in_openai_shape(guarded_runner, openai_guarded):
    async with openai_sdk(guarded_runner.url, "wrong-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.chat.completions.create(model=served_model(guarded_runner), messages=QUESTION)
    assert_openai_error(refused.value.body)
    assert refused.value.body["code"] == "invalid_api_key"
    async with aiohttp.ClientSession() as http:  # no key at all: the SDK would not even send it
        async with http.post(f"{guarded_runner.url}/v1/chat/completions", json={"model": "m", "messages": []}) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            assert_openai_error((await response.json())["error"])
    listed = await openai_guarded.models.list()
    assert [model.id for model in listed.data] == [served_model(guarded_runner)], "the right key is let in"


async def test_overload_is_503_with_retry_after(guarded_runner, openai_guarded):
    model = served_model(guarded_runner)
    long = dict(model=model, messages=QUESTION, temperature=0, max_tokens=4000)
    holders = [asyncio.create_task(openai_guarded.chat.completions.create(**long)) for _ in range(4)]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}) as http:
            await wait_for_metric(http, guarded_runner, IN_FLIGHT, 4, within=GUARDED_REQUEST_TIMEOUT / 2)
        with pytest.raises(openai.InternalServerError) as refused:
            await openai_guarded.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert_openai_error(refused.value.body)
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


async def test_a_stream_that_fails_after_the_header_raises_in_the_sdk(guarded_runner, openai_guarded):
    """Past REQUEST_TIMEOUT the stream ends with an in-band error event that the SDK raises, then [DONE]."""
    stream = await openai_guarded.chat.completions.create(
        model=served_model(guarded_runner), messages=QUESTION, temperature=0, max_tokens=4000, stream=True)
    received = 0
    with pytest.raises(openai.APIError, match="REQUEST_TIMEOUT"):
        async for _ in stream:
            received += 1
    assert received > 1, "it streamed before the deadline"


async def test_auto_with_a_parser_reads_tool_calls_or_gives_the_text(guarded_runner, openai_guarded):
    """TOOL_CALL_PARSER=hermes: the tiny model writes no <tool_call>, so its answer is plain content."""
    answer = await openai_guarded.chat.completions.create(
        model=served_model(guarded_runner), messages=QUESTION, temperature=0, max_tokens=8, tools=[CHAT_WEATHER])
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# 5. A cut stream frees the engine


async def test_a_cut_v1_stream_frees_the_engine(tiny_runner):
    async with aiohttp.ClientSession() as http:
        async with openai_sdk(tiny_runner.url) as sdk:
            stream = await sdk.chat.completions.create(
                model=served_model(tiny_runner), messages=QUESTION, temperature=0, max_tokens=4000, stream=True)
            async for _ in stream:
                break
            await wait_for_metric(http, tiny_runner, UNFINISHED, 1, within=10)
            await stream.close()
        await wait_for_metric(http, tiny_runner, UNFINISHED, 0, within=10)
        await wait_for_metric(http, tiny_runner, IN_FLIGHT, 0, within=10)
