"""Every API's whole answer and its stream, over the same engine steps, say the same thing.

Each of the five answer-writing APIs (/llm, chat completions, completions,
Responses, Anthropic Messages) is asked the same request twice on the fake
engine's same script, once whole and once streamed; the stream, folded here as
its clients fold it, must give the whole answer: the text, the tool calls, the
finish reason and the usage. So too when the length limit cuts the answer, and
when the engine dies mid-way (the whole answer's error and the stream's in-band
error event give the same reason). A stream the client stops early aborts its
engine request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from pydantic_core import from_json

from pipelines.llm.schema import (
    AnthropicMessagesRequest,
    ChatCompletionRequest,
    CompletionRequest,
    LLMRequest,
    ResponsesRequest,
)
from runner.keys import STATE
from runner.pipeline import EventStream, RequestContext
from tests.support.fake_engine import Script, scripted_text

QUESTION = "What is the capital of France?"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def sse(text: str) -> list[tuple[str | None, str]]:
    """A stream's events as (name, data): the name None where it has no ``event:`` line."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        if data is not None:
            events.append((name, data))
    return events


def data_events(text: str) -> list[dict]:
    """An OpenAI-framed stream's JSON events, up to its ``data: [DONE]`` (which it must end with)."""
    events = sse(text)
    assert events[-1] == (None, "[DONE]"), "an OpenAI-framed stream ends with data: [DONE]"
    return [json.loads(data) for _, data in events[:-1]]


def named_events(text: str) -> list[dict]:
    """A stream of named events: each event's name is its data's type."""
    events = []
    for name, data in sse(text):
        document = json.loads(data)
        assert name == document["type"], "each event is named by its type"
        events.append(document)
    return events


# Each API: its path, its request, the whole answer as what both must say, and the stream folded to the same.


def llm_whole(answer: dict) -> dict:
    [choice] = answer["choices"]
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"], "usage": answer["usage"]}


def llm_stream(text: str) -> dict:
    events = data_events(text)
    assert all(len(event["choices"]) == 1 for event in events), "every /llm event has exactly one choice"
    return {"text": "".join(event["choices"][0]["delta"]["content"] for event in events),
            "finish_reason": events[-1]["choices"][0]["finish_reason"], "usage": events[-1]["usage"]}


def chat_whole(answer: dict) -> dict:
    choices = {}
    for choice in answer["choices"]:
        message = choice["message"]
        choices[choice["index"]] = {
            "content": message.get("content"), "reasoning": message.get("reasoning_content"),
            "calls": [(call["function"]["name"], call["function"]["arguments"]) for call in message.get("tool_calls") or ()],
            "finish_reason": choice["finish_reason"]}
    return {"choices": choices, "usage": answer["usage"]}


def chat_stream(text: str) -> dict:
    events = data_events(text)
    choices: dict[int, dict] = {}
    calls: dict[int, dict[int, list]] = {}
    for event in events:
        for choice in event["choices"]:
            folded = choices.setdefault(choice["index"], {"content": None, "reasoning": None, "calls": [],
                                                          "finish_reason": None})
            delta = choice["delta"]
            if delta.get("content") is not None:
                folded["content"] = (folded["content"] or "") + delta["content"]
            if delta.get("reasoning_content") is not None:
                folded["reasoning"] = (folded["reasoning"] or "") + delta["reasoning_content"]
            for call in delta.get("tool_calls") or ():
                place = calls.setdefault(choice["index"], {}).setdefault(call["index"], ["", ""])
                place[0] += call["function"].get("name") or ""
                place[1] += call["function"].get("arguments") or ""
            folded["finish_reason"] = choice["finish_reason"] or folded["finish_reason"]
    for index, places in calls.items():
        choices[index]["calls"] = [tuple(place) for place in places.values()]
        if choices[index]["content"] == "":  # the first chunk's role carries content "" before a call's name
            choices[index]["content"] = None
    return {"choices": choices, "usage": events[-1]["usage"]}


def completion_whole(answer: dict) -> dict:
    return {"choices": {choice["index"]: (choice["text"], choice["finish_reason"]) for choice in answer["choices"]},
            "usage": answer["usage"]}


def completion_stream(text: str) -> dict:
    events = data_events(text)
    choices: dict[int, list] = {}
    for event in events:
        for choice in event["choices"]:
            folded = choices.setdefault(choice["index"], ["", None])
            folded[0] += choice["text"]
            folded[1] = choice["finish_reason"] or folded[1]
    return {"choices": {index: tuple(folded) for index, folded in choices.items()}, "usage": events[-1]["usage"]}


def response_items(output: list[dict]) -> list:
    items = []
    for item in output:
        if item["type"] == "function_call":
            items.append(("function_call", item["name"], item["arguments"], item["status"]))
        else:
            items.append((item["type"], "".join(part["text"] for part in item["content"]), item["status"]))
    return items


def responses_whole(answer: dict) -> dict:
    return {"status": answer["status"], "output": response_items(answer["output"]), "usage": answer["usage"],
            "incomplete": answer.get("incomplete_details")}


def responses_stream(text: str) -> dict:
    events = named_events(text)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    items: dict[int, dict] = {}
    for event in events:  # the output as the deltas build it
        kind = event["type"]
        if kind == "response.output_item.added":
            items[event["output_index"]] = {**event["item"], "text": "", "arguments": ""}
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            items[event["output_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[event["output_index"]]["arguments"] += event["delta"]
        elif kind == "response.output_item.done":
            items[event["output_index"]]["status"] = event["item"]["status"]
    last = events[-1]
    assert last["type"] in ("response.completed", "response.incomplete")
    built = [("function_call", item["name"], item["arguments"], item["status"])
             if item["type"] == "function_call" else (item["type"], item["text"], item["status"])
             for _, item in sorted(items.items())]
    assert built == response_items(last["response"]["output"]), "the deltas build the final event's output"
    return responses_whole(last["response"])


def without_ids(blocks: list[dict]) -> list[dict]:
    """Content blocks without the tool_use ids, which each answer draws afresh."""
    return [{name: value for name, value in block.items() if name != "id"} for block in blocks]


def anthropic_whole(answer: dict) -> dict:
    return {"content": without_ids(answer["content"]), "stop_reason": answer["stop_reason"],
            "stop_sequence": answer["stop_sequence"], "usage": answer["usage"]}


def anthropic_stream(text: str) -> dict:
    events = named_events(text)
    blocks: dict[int, dict] = {}
    inputs: dict[int, str] = {}
    folded: dict = {}
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
        elif kind == "content_block_delta":
            delta, block = event["delta"], blocks[event["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                inputs[event["index"]] = inputs.get(event["index"], "") + delta["partial_json"]
        elif kind == "message_delta":
            folded = {"stop_reason": event["delta"]["stop_reason"], "stop_sequence": event["delta"]["stop_sequence"],
                      "usage": event["usage"]}
    for index, partial in inputs.items():  # read as far as it goes, as Anthropic's SDK reads a cut input
        blocks[index]["input"] = from_json(partial, allow_partial=True)
    assert events[-1]["type"] == "message_stop"
    return {"content": without_ids([block for _, block in sorted(blocks.items())]), **folded}


@dataclass(frozen=True)
class API:
    name: str
    path: str
    body: Callable[[str, int], dict]  # (model, max_tokens) -> the request
    model: type
    whole: Callable[[dict], dict]
    stream: Callable[[str], dict]
    error: Callable[[dict], str]  # a whole answer's error body -> its message
    stream_error: Callable[[str], str]  # a failed stream -> its in-band error's message
    streamed: tuple = ()  # what a streamed request adds: OpenAI's completions send their usage when asked

    def stream_body(self, model: str, max_tokens: int) -> dict:
        return {**self.body(model, max_tokens), "stream": True, **dict(self.streamed)}


def openai_in_band(text: str) -> str:
    events = sse(text)
    assert events[-1] == (None, "[DONE]")
    return json.loads(events[-2][1])["error"]["message"]


def llm_in_band(text: str) -> str:
    last = data_events(text)[-1]
    assert last["choices"][0]["finish_reason"] == "error"
    return last["error"]["msg"]


def responses_in_band(text: str) -> str:
    last = named_events(text)[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    return last["error"]["message"]


def anthropic_in_band(text: str) -> str:
    last = named_events(text)[-1]
    assert last["type"] == "error"
    return last["error"]["message"]


USAGE = (("stream_options", {"include_usage": True}),)
APIS = [
    API("llm", "/llm",
        lambda model, max_tokens: {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens},
        LLMRequest, llm_whole, llm_stream, lambda body: body["detail"]["msg"], llm_in_band),
    API("chat", "/v1/chat/completions",
        lambda model, max_tokens: {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens, "n": 2, "temperature": 0.5},
        ChatCompletionRequest, chat_whole, chat_stream, lambda body: body["error"]["message"], openai_in_band, USAGE),
    API("chat tool call", "/v1/chat/completions",
        lambda model, max_tokens: {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens, "tools": [WEATHER],
                                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ChatCompletionRequest, chat_whole, chat_stream, lambda body: body["error"]["message"], openai_in_band, USAGE),
    API("completions", "/v1/completions",
        lambda model, max_tokens: {"model": model, "prompt": [QUESTION, "And of Italy?"], "max_tokens": max_tokens,
                                   "n": 2, "temperature": 0.5},
        CompletionRequest, completion_whole, completion_stream, lambda body: body["error"]["message"],
        openai_in_band, USAGE),
    API("responses", "/v1/responses",
        lambda model, max_tokens: {"model": model, "input": QUESTION, "max_output_tokens": max_tokens},
        ResponsesRequest, responses_whole, responses_stream, lambda body: body["error"]["message"],
        responses_in_band),
    API("responses tool call", "/v1/responses",
        lambda model, max_tokens: {"model": model, "input": QUESTION, "max_output_tokens": max_tokens,
                                   "tools": [{"type": "function", **WEATHER["function"]}],
                                   "tool_choice": {"type": "function", "name": "get_weather"}},
        ResponsesRequest, responses_whole, responses_stream, lambda body: body["error"]["message"],
        responses_in_band),
    API("anthropic", "/v1/messages",
        lambda model, max_tokens: {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens},
        AnthropicMessagesRequest, anthropic_whole, anthropic_stream, lambda body: body["error"]["message"],
        anthropic_in_band),
    API("anthropic tool call", "/v1/messages",
        lambda model, max_tokens: {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                   "max_tokens": max_tokens,
                                   "tools": [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
                                   "tool_choice": {"type": "tool", "name": "get_weather"}},
        AnthropicMessagesRequest, anthropic_whole, anthropic_stream, lambda body: body["error"]["message"],
        anthropic_in_band),
]
BY_NAME = pytest.mark.parametrize("api", APIS, ids=[api.name for api in APIS])


async def whole_and_streamed(client, api: API, model: str, max_tokens: int) -> tuple[dict, dict]:
    answer = await client.post(api.path, json=api.body(model, max_tokens))
    assert answer.status == 200, await answer.text()
    streamed = await client.post(api.path, json=api.stream_body(model, max_tokens))
    assert streamed.status == 200, await streamed.text()
    return api.whole(await answer.json()), api.stream(await streamed.text())


def script_for(api: API) -> Script:
    if "tool call" in api.name:
        return scripted_text('{"city": "Paris"}')
    return scripted_text("Paris is the capital.", "Rome, of course.")


@BY_NAME
async def test_the_whole_answer_and_the_stream_agree(client, engine, model, api):
    engine.script = script_for(api)
    whole, streamed = await whole_and_streamed(client, api, model, 256)
    assert streamed == whole
    assert "Paris" in json.dumps(whole), "the answer is there, not two empty ones"


@BY_NAME
async def test_an_answer_cut_at_the_length_limit_agrees_too(client, engine, model, api):
    engine.script = script_for(api)
    whole, streamed = await whole_and_streamed(client, api, model, 7)
    assert streamed == whole
    cut = {"length", "max_tokens", "incomplete"}
    assert cut & set(json.dumps(whole).replace('"', " ").split()), "the answer says it was cut"


@BY_NAME
async def test_an_engine_that_dies_fails_both_with_the_same_reason(client, engine, model, api):
    engine.script = Script(words=script_for(api).words, fail_at=3)
    answer = await client.post(api.path, json=api.body(model, 256))
    assert answer.status == 500
    reason = api.error(await answer.json())
    engine.dead = False  # the fake engine's next request runs again
    streamed = await client.post(api.path, json=api.stream_body(model, 256))
    assert streamed.status == 200, "the header went out before the engine died"
    assert api.stream_error(await streamed.text()) == reason
    assert "died" in reason


@BY_NAME
async def test_a_stream_stopped_early_aborts_its_engine_request(client, engine, model, api):
    engine.script = Script()  # endless: it runs to max_tokens unless stopped
    serve = client.app[STATE].pipeline.operations()[operation_of(client, api)]
    request = api.model.model_validate(api.stream_body(model, 200))
    stream = await serve(request, RequestContext(request_id="early"))
    assert isinstance(stream, EventStream)
    events = stream.events
    while not engine.submitted:  # until the engine has the request (Responses says two events before it)
        await anext(events)
    for _ in range(2):
        await anext(events)
    await events.aclose()
    assert engine.submitted and all(submitted.aborted for submitted in engine.submitted)
    assert not engine.running


def operation_of(client, api: API) -> str:
    pipeline = client.app[STATE].pipeline
    [operation] = [operation.operation_id for operation in pipeline.OPERATIONS
                   if operation.path == api.path and operation.method.lower() == "post"]
    return operation
