"""POST /v1/chat/completions and /v1/completions on a fake engine, in-process: the chunk bytes against the spec's
models, vLLM's extra parameters reaching the engine, tools with any model, tool calls streamed as generated,
and a reasoning model's thinking told apart.

The same behaviours against a real vLLM engine over real HTTP, with the official openai SDK, are in
tests/pipelines/llm/real_engine/test_vllm_extras.py and tests/pipelines/llm/real_engine/test_openai.py.
"""

from __future__ import annotations

import json

import pytest

from pipelines.llm.answers import CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api.chat_completion import delta_of
from pipelines.llm.api.openai_base import ChunkEnvelope
from pipelines.llm.schema import ChatCompletionChunk, ChunkChoice, ChunkDelta, ChunkToolCall, ChunkToolCallFunction
from pipelines.llm.tools import CALL_END, call_begin
from tests.support.apps import llm_app, llm_settings, ready_client, served_client
from tests.support.fake_engine import CHAT_TEMPLATE, FakeEngine, FakeTokenizer, scripted_text
from tests.support.fast_lane import IMPORTS_VLLM
from tests.support.http import QUESTION
from tests.support.tools import CHAT_WEATHER, CITY

MODEL = "fake-model"  # replaced by the served id in each request
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TEXTS = ["", 'say "hi"', "back\\slash", "line\nbreak\ttab", "\x00\x1f\x7f", "é, 北京, 🙂", "\u2028", "</script>"]


# 1. Golden bytes: every chunk is what pydantic writes of the spec's ChatCompletionChunk


def pydantic_chunk(envelope_usage: bool, delta: ChunkDelta, finish_reason: str | None = None) -> bytes:
    chunk = ChatCompletionChunk(id='chatcmpl-"x"', object="chat.completion.chunk", created=7, model="org/Modèl",
                                choices=[ChunkChoice(index=2, delta=delta, logprobs=None, finish_reason=finish_reason)])
    if envelope_usage:
        chunk.usage = None
    return chunk.model_dump_json(exclude_unset=True).encode()


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
@pytest.mark.parametrize("text", TEXTS)
def test_every_answer_event_is_the_chunk_pydantic_writes(text, usage):
    envelope = ChunkEnvelope("chat.completion.chunk", 'chatcmpl-"x"', 7, "org/Modèl", usage)

    def chunk(delta: bytes, finish_reason: str | None = None) -> bytes:
        return envelope.chunk(b'{"index":2,"delta":%s,"logprobs":null,"finish_reason":%s}' % (
            delta, json.dumps(finish_reason).encode()))

    assert chunk(delta_of(TextDelta(text))) == pydantic_chunk(usage, ChunkDelta(content=text))
    assert chunk(delta_of(ReasoningDelta(text))) == pydantic_chunk(
        usage, ChunkDelta(reasoning_content=text, reasoning=text))
    assert chunk(delta_of(CallStart(1, f"call_{text}", f"fn{text}"))) == pydantic_chunk(usage, ChunkDelta(
        tool_calls=[ChunkToolCall(index=1, id=f"call_{text}", type="function",
                                  function=ChunkToolCallFunction(name=f"fn{text}", arguments=""))]))
    assert chunk(delta_of(CallArguments(1, text))) == pydantic_chunk(usage, ChunkDelta(
        tool_calls=[ChunkToolCall(index=1, function=ChunkToolCallFunction(arguments=text))]))
    assert chunk(b"{}", "tool_calls") == pydantic_chunk(usage, ChunkDelta(), "tool_calls")


# 2. In-process on the fake engine


async def chat(client, **body) -> tuple[int, dict]:
    response = await client.post("/v1/chat/completions", json={"model": client.model, "messages": QUESTION, **body})
    return response.status, await response.json()


async def chat_stream(client, **body) -> list[dict]:
    response = await client.post("/v1/chat/completions",
                                 json={"model": client.model, "messages": QUESTION, "stream": True, **body})
    assert response.status == 200, await response.text()
    blocks = (await response.text()).split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-2]]


def added_up(chunks: list[dict]) -> dict:
    """What the openai SDK's stream helpers add up: content, thinking, and each call's name and arguments."""
    content, thinking, calls, deltas = "", "", {}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            thinking += delta.get("reasoning_content") or ""
            assert delta.get("reasoning") == delta.get("reasoning_content")
            for call in delta.get("tool_calls", []):
                kept = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                kept["name"] += call.get("function", {}).get("name") or ""
                kept["arguments"] += call.get("function", {}).get("arguments") or ""
                deltas[call["index"]] = deltas.get(call["index"], 0) + bool(call.get("function", {}).get("arguments"))
    return {"content": content, "reasoning": thinking, "calls": list(calls.values()), "argument_deltas": deltas}


VLLM_SAMPLING = {
    "ignore_eos": True, "min_tokens": 3, "stop_token_ids": [7, 9], "include_stop_str_in_output": True,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "bad_words": ["bad"],
    "allowed_token_ids": [65, 66, 67], "prompt_logprobs": 2,
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_vllms_sampling_parameters_reach_the_engine(client, engine, path):
    body = {"model": client.model, "max_tokens": 5, **VLLM_SAMPLING}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "Once"})
    response = await client.post(path, json=body)
    assert response.status == 200, await response.text()
    sampling = engine.submitted[-1].sampling
    assert {name: getattr(sampling, name) for name in VLLM_SAMPLING} == VLLM_SAMPLING
    answer = await response.json()
    prompt = engine.submitted[-1].prompt
    logprobs = answer["prompt_logprobs"] if "chat" in path else answer["choices"][0]["prompt_logprobs"]
    assert logprobs[0] is None and len(logprobs) == len(prompt)
    assert logprobs[1] == {str(prompt[1]): {"logprob": -0.5, "rank": 1, "decoded_token": chr(prompt[1])}}
    response = await client.post(path, json={**body, "ignore_eos": None, "min_tokens": None, "stop_token_ids": None,
                                              "include_stop_str_in_output": None, "skip_special_tokens": None,
                                              "spaces_between_special_tokens": None, "bad_words": None,
                                              "allowed_token_ids": None, "prompt_logprobs": None})
    sampling = engine.submitted[-1].sampling
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.stop_token_ids, sampling.skip_special_tokens,
            sampling.spaces_between_special_tokens, sampling.allowed_token_ids, sampling.prompt_logprobs) == (
        False, 0, [], True, True, None, None), "null is vLLM's default"
    assert "prompt_logprobs" not in json.dumps(await response.json())


STRUCTURED = [
    ({"regex": "[a-z]+"}, {"regex": "[a-z]+"}),
    ({"choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
    ({"json": CITY}, {"json_schema": CITY}),
    ({"json": json.dumps(CITY)}, {"json_schema": CITY}),
    ({"json_object": True}, {"json_object": True}),
    ({"structural_tag": '{"type": "structural_tag", "format": {"type": "any_text"}}'},
     {"structural_tag": {"type": "structural_tag", "format": {"type": "any_text"}}}),
    ({"regex": "a", "disable_any_whitespace": True, "whitespace_pattern": " ?"},
     {"regex": "a", "disable_any_whitespace": True, "whitespace_pattern": " ?"}),
]


@pytest.mark.parametrize(("given", "expected"), STRUCTURED)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_structured_outputs_reach_the_engine(client, engine, path, given, expected):
    body = {"model": client.model, "max_tokens": 3, "structured_outputs": given}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "Once"})
    response = await client.post(path, json=body)
    assert response.status == 200, await response.text()
    sampling = engine.submitted[-1].sampling
    assert {name: getattr(sampling, name) for name in expected} == expected


async def test_completions_take_response_format_as_vllm_does(client, engine):
    response = await client.post("/v1/completions", json={
        "model": client.model, "prompt": "Once", "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}})
    assert response.status == 200 and engine.submitted[-1].sampling.json_schema == CITY


async def test_truncate_prompt_tokens_keeps_the_last_tokens_unless_right(client, engine):
    status, _ = await chat(client, max_tokens=2)
    whole = engine.submitted[-1].prompt
    for side, kept in ((None, whole[-5:]), ("left", whole[-5:]), ("right", whole[:5])):
        status, body = await chat(client, max_tokens=2, truncate_prompt_tokens=5,
                                  **({"truncation_side": side} if side else {}))
        assert status == 200 and engine.submitted[-1].prompt == kept and body["usage"]["prompt_tokens"] == 5
    await chat(client, max_tokens=2, truncate_prompt_tokens=-1)
    assert engine.submitted[-1].prompt == whole, "-1: as many as fit, which the whole prompt does"
    response = await client.post("/v1/completions", json={"model": client.model, "prompt": "Once upon a time",
                                                           "max_tokens": 2, "truncate_prompt_tokens": 3})
    assert response.status == 200 and engine.submitted[-1].prompt == list(b"ime")


def rendered(messages, **kwargs) -> list[int]:
    tokenizer = FakeTokenizer(kwargs.pop("template", CHAT_TEMPLATE))
    return tokenizer.encode(tokenizer.apply_chat_template(messages, **kwargs), add_special_tokens=False)


ASSISTANT_STARTED = [*QUESTION, {"role": "assistant", "content": "The capital is"}]


async def test_the_chat_template_steps_follow_vllms_parameters(aiohttp_client, tmp_path):
    template = CHAT_TEMPLATE + "{% if mood is defined %}[{{ mood }}]{% endif %}{% if documents %}{{ documents }}{% endif %}"
    engine = FakeEngine(chat_template=template)
    client = await served_client(aiohttp_client, engine, tmp_path)
    await chat(client, max_tokens=2, chat_template_kwargs={"mood": "calm"})
    assert engine.submitted[-1].prompt == rendered(QUESTION, template=template, mood="calm")
    await chat(client, max_tokens=2, documents=[{"title": "a", "text": "b"}])
    assert engine.submitted[-1].prompt == rendered(QUESTION, template=template, documents=[{"title": "a", "text": "b"}])
    await chat(client, max_tokens=2, add_generation_prompt=False)
    assert engine.submitted[-1].prompt == rendered(QUESTION, template=template, add_generation_prompt=False)
    await chat(client, max_tokens=2, add_special_tokens=True)
    assert engine.submitted[-1].prompt == [256, *rendered(QUESTION, template=template)]
    status, _ = await chat(client, max_tokens=2, messages=ASSISTANT_STARTED, continue_final_message=True)
    prompt = engine.submitted[-1].prompt
    assert status == 200 and bytes(prompt[-len("The capital is"):]) == b"The capital is", "the last message is open"
    await chat(client, max_tokens=2, reasoning_effort="none")
    assert engine.submitted[-1].prompt == rendered(QUESTION, template=template), "reasoning_effort is for the template"
    for body, said in (({"chat_template_kwargs": {"chat_template": "x"}}, "chat_template"),
                       ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
                       ({"chat_template": "{{ messages }}"}, "chat_template"),
                       ({"continue_final_message": True, "add_generation_prompt": True,
                         "messages": ASSISTANT_STARTED}, "continue_final_message"),
                       ({"continue_final_message": True}, "assistant message last")):
        submitted = len(engine.submitted)
        status, answer = await chat(client, **body)
        assert status == 400 and said in answer["error"]["message"], (body, answer)
        assert len(engine.submitted) == submitted


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_echo_puts_the_continued_message_in_front(client, engine, stream):
    engine.script = scripted_text(" Paris.")
    body = {"messages": ASSISTANT_STARTED, "continue_final_message": True, "echo": True, "max_tokens": 20}
    if stream:
        chunks = await chat_stream(client, **body)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[1]["choices"][0]["delta"] == {"content": "The capital is"}
        content = added_up(chunks)["content"]
    else:
        content = (await chat(client, **body))[1]["choices"][0]["message"]["content"]
    assert content == "The capital is Paris."
    status, answer = await chat(client, echo=True, max_tokens=3)
    assert answer["choices"][0]["message"]["content"] == " Pa", "a user message last is not echoed"


REFUSED = [
    ({"guided_json": CITY}, "guided_json", "Unrecognized request argument"),
    ({"best_of": 2}, "best_of", "Unrecognized request argument"),
    ({"use_beam_search": True}, "use_beam_search", "beam search"),
    ({"priority": 1}, "priority", "priority"),
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs", "stream"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one constraint"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs", "both"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON"),
    ({"structured_outputs": {"nothing": 1}}, "structured_outputs.nothing", "Unrecognized"),
    ({"min_tokens": 9, "max_tokens": 3}, None, "min_tokens"),
    ({"allowed_token_ids": [999999]}, None, "out-of-vocab"),
    ({"truncate_prompt_tokens": 4096}, "truncate_prompt_tokens", "MAX_MODEL_LEN"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "no prompt"),
]


@pytest.mark.parametrize(("body", "param", "said"), REFUSED)
async def test_what_neither_openai_nor_vllm_serves_here_is_a_400_before_the_engine(client, engine, body, param, said):
    status, answer = await chat(client, **{"max_tokens": 3, **body})
    assert status == 400, answer
    assert said in answer["error"]["message"] and (param is None or answer["error"]["param"] == param), answer
    assert engine.submitted == []


# 3. Tools with any model, and tool calls streamed as generated


async def test_tools_with_tool_choice_left_out_are_served_by_a_model_without_tool_syntax(client, engine):
    engine.script = scripted_text("I can answer that myself: Paris.")
    status, answer = await chat(client, tools=[CHAT_WEATHER, TIME], max_tokens=50)
    assert status == 200, answer
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "I can answer that myself: Paris."}
    assert answer["choices"][0]["finish_reason"] == "stop"
    [submitted] = engine.submitted
    tag = submitted.sampling.structural_tag["format"]
    assert tag["triggers"] == ["<tool_call>"] and [t["begin"] for t in tag["tags"]] == [
        call_begin("get_weather"), call_begin("get_time")]
    text = bytes(token for token in submitted.prompt if token < 256).decode()
    assert "<|system|>\nYou can call these functions" in text and "The weather in a city" in text
    assert "<|tools|>" not in text, "the template, which knows no tools, is not handed them"


OWN_CALL = f'Checking. {call_begin("get_weather")}{{"city": "Paris, the capital of France"}}{CALL_END}'


async def test_an_own_syntax_call_streams_its_arguments_as_generated(client, engine):
    engine.script = scripted_text(OWN_CALL)
    status, plain = await chat(client, tools=[CHAT_WEATHER, TIME], tool_choice="auto", max_tokens=200)
    message = plain["choices"][0]["message"]
    assert message["content"] == "Checking. " and plain["choices"][0]["finish_reason"] == "tool_calls"
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris, the capital of France"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"
    chunks = await chat_stream(client, tools=[CHAT_WEATHER, TIME], max_tokens=200)
    streamed = added_up(chunks)
    assert streamed["content"] == "Checking. "
    assert streamed["calls"] == [call["function"]]
    assert streamed["argument_deltas"][0] == len(call["function"]["arguments"]), "one delta per token"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'


async def test_required_calls_stream_their_arguments_as_generated(client, engine):
    engine.script = scripted_text(REQUIRED)
    status, plain = await chat(client, tools=[CHAT_WEATHER, TIME], tool_choice="required", max_tokens=200)
    calls = [call["function"] for call in plain["choices"][0]["message"]["tool_calls"]]
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                     {"name": "get_time", "arguments": '{"zone": "CET"}'}]
    assert plain["choices"][0]["message"]["content"] is None
    chunks = await chat_stream(client, tools=[CHAT_WEATHER, TIME], tool_choice="required", max_tokens=200)
    streamed = added_up(chunks)
    assert streamed["calls"] == calls and streamed["argument_deltas"] == {0: len('{"city": "Paris"}'),
                                                                         1: len('{"zone": "CET"}')}
    starts = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", []) if "id" in call]
    assert [start["function"] for start in starts] == [{"name": "get_weather", "arguments": ""},
                                                       {"name": "get_time", "arguments": ""}]


HERMES = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@IMPORTS_VLLM
async def test_auto_with_the_models_own_syntax_streams_through_vllms_parser(aiohttp_client, tmp_path):
    from pipelines.llm.vllm_backend.tool_parsers import ToolCallParser

    engine = FakeEngine(scripted_text(HERMES), tool_parsers={"hermes": ToolCallParser("hermes", FakeTokenizer())})
    client = await served_client(aiohttp_client, engine, tmp_path, llm_settings(TOOL_CALL_PARSER="hermes"))
    status, plain = await chat(client, tools=[CHAT_WEATHER], max_tokens=100)
    [call] = plain["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert plain["choices"][0]["message"]["content"] == "Sure. "
    assert engine.submitted[-1].sampling.structural_tag is None, "vLLM's parser reads the model's own syntax freely"
    text = bytes(token for token in engine.submitted[-1].prompt if token < 256).decode()
    assert "<|tools|>" in text and "You can call" not in text, "the template describes the tools"
    streamed = added_up(await chat_stream(client, tools=[CHAT_WEATHER], max_tokens=100))
    assert streamed["calls"] == [call["function"]] and streamed["argument_deltas"][0] > 3


# 4. A reasoning model's thinking


THINKING = "<think>The user asks about France.</think>Paris."


async def thinking_client(aiohttp_client, tmp_path, engine: FakeEngine | None = None, **settings):
    from pipelines.llm.vllm_backend.reasoning_parsers import ReasoningParser

    engine = engine or FakeEngine(scripted_text(THINKING))
    engine.reasoning_parsers.setdefault("deepseek_r1", ReasoningParser("deepseek_r1", engine.tokenizer))
    return engine, await served_client(aiohttp_client, engine, tmp_path, llm_settings(**settings))


@IMPORTS_VLLM
async def test_the_thinking_goes_to_reasoning_content_and_usage_counts_it(aiohttp_client, tmp_path):
    engine, client = await thinking_client(aiohttp_client, tmp_path, REASONING_PARSER="deepseek_r1")
    status, plain = await chat(client, max_tokens=100)
    message = plain["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Paris.", "reasoning_content": "The user asks about France.",
                       "reasoning": "The user asks about France."}
    generated = len("The user asks about France.Paris.") + 3  # two markers and the end-of-sequence token
    assert plain["usage"]["completion_tokens"] == generated
    chunks = await chat_stream(client, max_tokens=100, stream_options={"include_usage": True})
    streamed = added_up(chunks)
    assert (streamed["reasoning"], streamed["content"]) == ("The user asks about France.", "Paris.")
    kinds = [next(iter(chunk["choices"][0]["delta"])) for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"]]
    assert kinds.index("content", 1) > max(i for i, kind in enumerate(kinds) if kind == "reasoning_content")
    assert chunks[-1]["usage"]["completion_tokens"] == generated
    status, hidden = await chat(client, max_tokens=100, include_reasoning=False)
    assert hidden["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert not added_up(await chat_stream(client, max_tokens=100, include_reasoning=False))["reasoning"]


@IMPORTS_VLLM
async def test_llm_sends_the_answer_only(aiohttp_client, tmp_path):
    engine, client = await thinking_client(aiohttp_client, tmp_path, REASONING_PARSER="deepseek_r1")
    body = await (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 100})).json()
    assert body["choices"][0]["message"]["content"] == "Paris."
    assert body["usage"]["completion_tokens"] == len("The user asks about France.Paris.") + 3
    response = await client.post("/llm", json={"messages": QUESTION, "max_tokens": 100, "stream": True})
    events = [json.loads(block.removeprefix("data: ")) for block in (await response.text()).split("\n\n")[:-2]]
    assert "".join(event["choices"][0]["delta"]["content"] for event in events) == "Paris."
    assert all(event["choices"][0]["delta"]["content"] for event in events[:-1]), "no empty events for the thinking"
    assert events[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


@IMPORTS_VLLM
async def test_a_constrained_answer_has_no_room_to_think(aiohttp_client, tmp_path):
    engine, client = await thinking_client(aiohttp_client, tmp_path, REASONING_PARSER="deepseek_r1")
    engine.script = scripted_text('{"city": "Paris"}')
    status, answer = await chat(client, max_tokens=50, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": CITY}})
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": '{"city": "Paris"}'}


@IMPORTS_VLLM
async def test_a_template_that_closed_the_thinking_leaves_all_to_the_answer(aiohttp_client, tmp_path):
    template = CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}</think>{% endif %}"
    engine = FakeEngine(scripted_text("Paris."), chat_template=template)
    engine, client = await thinking_client(aiohttp_client, tmp_path, engine, REASONING_PARSER="deepseek_r1")
    status, answer = await chat(client, max_tokens=50, chat_template_kwargs={"enable_thinking": False})
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    status, answer = await chat(client, max_tokens=50)
    assert answer["choices"][0]["message"]["reasoning_content"] == "Paris.", "unclosed: it is all thinking"
    assert answer["choices"][0]["message"]["content"] is None


@IMPORTS_VLLM
async def test_the_reasoning_parser_is_chosen_from_the_chat_template(aiohttp_client, tmp_path):
    engine = FakeEngine(scripted_text(THINKING), chat_template=CHAT_TEMPLATE + "{{ '<think>' }}")
    engine, client = await thinking_client(aiohttp_client, tmp_path, engine)
    status, answer = await chat(client, max_tokens=100)
    assert answer["choices"][0]["message"]["reasoning_content"] == "The user asks about France."


async def test_a_template_chosen_parser_the_tokenizer_cannot_serve_is_left_out(aiohttp_client, tmp_path):
    engine = FakeEngine(scripted_text(THINKING), chat_template=CHAT_TEMPLATE + "{{ '<think>' }}",
                        reasoning_parsers={"deepseek_r1": ValueError("no think tokens")})
    client = await served_client(aiohttp_client, engine, tmp_path)
    status, answer = await chat(client, max_tokens=100)
    assert status == 200 and answer["choices"][0]["message"]["content"] == THINKING


@pytest.mark.parametrize(("name", "parsers", "said"), [
    ("nonesuch", {"deepseek_r1": None, "qwen3": None}, "not one of vLLM's reasoning parsers: deepseek_r1, qwen3"),
    ("deepseek_r1", {"deepseek_r1": ValueError("no <think> token")}, "does not fit this model: no <think> token"),
])
async def test_a_reasoning_parser_that_cannot_serve_fails_the_start(aiohttp_client, tmp_path, name, parsers, said):
    engine = FakeEngine(reasoning_parsers=parsers)
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                        llm_settings(REASONING_PARSER=name)))
    assert (await (await client.get("/health")).json())["status"] == "ERROR"
    response = await client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION})
    assert response.status == 503 and said in (await response.json())["error"]["message"]


async def test_n_choices_each_get_their_own_reader(client, engine):
    engine.script = scripted_text(OWN_CALL, "No call here.")
    status, answer = await chat(client, tools=[CHAT_WEATHER], n=2, max_tokens=200)
    first, second = answer["choices"]
    assert first["finish_reason"] == "tool_calls" and second["message"] == {"role": "assistant",
                                                                            "content": "No call here."}
    assert first["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert answer["usage"]["completion_tokens"] == len(OWN_CALL) + len("No call here.") + 2
