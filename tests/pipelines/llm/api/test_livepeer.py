"""POST /llm on a fake engine, in-process: the contract's shapes, byte for byte, and every rule around the engine.

The same behaviours against a real vLLM engine over real HTTP are in
tests/pipelines/llm/real_engine/test_livepeer.py.
"""

from __future__ import annotations

import json

import pytest

from pipelines.llm.api.livepeer import LivepeerReply
from pipelines.llm.replies import ReplyTracker
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMResponse, LLMTokenUsage
from runner.pipeline import RequestContext
from runner.schema import APIErrorMessage
from tests.support.apps import assert_a_vanishing_client_aborts, llm_app, ready_client
from tests.support.fake_engine import (
    DEFAULT_WORDS,
    FakeEngine,
    FakeTokenizer,
    Script,
    scripted_text,
)
from tests.support.http import BAD_422, NOT_JSON_BODIES, QUESTION, STORY

TEXTS = [
    " capital",
    "",
    'say "hi"',
    "back\\slash",
    "line\nbreak\ttab\rreturn",
    "\x00\x01\x1f\x7f",
    "é, 北京, 🙂",
    "\u2028\u2029",
    "</script>",
]


def reply_for(context: RequestContext, model: str = "m") -> LivepeerReply:
    return LivepeerReply(model, ReplyTracker(context, [context.prompt_tokens]))


def pydantic_event(reply: LivepeerReply, content: str, finish_reason: str = "", error: str | None = None) -> bytes:
    """What pydantic writes of the LLMResponse the spec describes for this event."""
    prompt, completion = reply.context.prompt_tokens, reply.context.completion_tokens
    response = LLMResponse(
        id=reply.completion_id,
        model=reply.model,
        created=reply.created,
        usage=LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        choices=[LLMChoice(index=0, finish_reason=finish_reason, delta=LLMMessage(role="assistant", content=content))],
        error=None if error is None else APIErrorMessage(msg=error),
    )
    return response.model_dump_json(exclude_none=True).encode()


# 1. Golden bytes: every event is what pydantic writes of the spec's model


@pytest.mark.parametrize("text", TEXTS)
def test_text_event_is_what_pydantic_writes(text):
    context = RequestContext(request_id='"odd\\id"', prompt_tokens=37, completion_tokens=5)
    reply = reply_for(context, "org/Modèl-1")
    assert reply.event(text) == pydantic_event(reply, text)
    event = json.loads(reply.event(text))
    assert event["choices"][0]["delta"]["content"] == text
    assert event["usage"] == {"prompt_tokens": 37, "completion_tokens": 5, "total_tokens": 42}


def test_text_event_follows_the_running_usage():
    context = RequestContext(request_id="1", prompt_tokens=3)
    reply = reply_for(context)
    context.count_tokens(1)
    context.prompt_tokens = 4  # the engine's own count replaces the estimate
    assert reply.event("a") == pydantic_event(reply, "a")


@pytest.mark.parametrize("reason", ["generation failed: the engine died", 'quote " and \n newline'])
def test_error_event_carries_its_reason_in_the_spec_field(reason):
    reply = reply_for(RequestContext(request_id="1", prompt_tokens=3, completion_tokens=2))
    assert reply.error_event(reason) == pydantic_event(reply, "", "error", error=reason)
    event = json.loads(reply.error_event(reason))
    assert len(event["choices"]) == 1 and event["choices"][0]["finish_reason"] == "error"
    assert event["error"] == {"msg": reason}


def test_final_event_is_what_pydantic_writes():
    reply = reply_for(RequestContext(request_id="1", prompt_tokens=3, completion_tokens=2))
    assert reply.event("", finish_reason="length") == pydantic_event(reply, "", "length")


# 2. Served in-process on the fake engine


async def read_events(response) -> list[dict]:
    body = await response.text()
    blocks = body.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], body[-200:]
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks[:-2])
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-2]]


def rendered(messages: list[dict]) -> list[int]:
    """The prompt the fake engine is handed: the template rendered, encoded without a second BOS."""
    tokenizer = FakeTokenizer()
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


async def test_a_plain_reply_is_the_whole_text_with_exact_usage(client, engine):
    response = await client.post("/llm", json={"messages": STORY, "max_tokens": 7, "temperature": 0})
    assert response.status == 200
    body = await response.json()
    [submitted] = engine.submitted
    assert submitted.prompt == rendered(STORY), "the chat template once, one BOS"
    assert (submitted.sampling.max_tokens, submitted.sampling.temperature) == (7, 0)
    assert body["choices"] == [{"index": 0, "finish_reason": "length",
                                "message": {"role": "assistant", "content": "".join(DEFAULT_WORDS[:7])}}]
    assert body["usage"] == {"prompt_tokens": len(submitted.prompt), "completion_tokens": 7,
                             "total_tokens": len(submitted.prompt) + 7}
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)


async def test_the_sampling_fields_reach_the_engine_as_sent(client, engine):
    await client.post("/llm", json={"messages": QUESTION, "max_tokens": 3, "temperature": 0.3, "top_p": 0.5,
                                    "top_k": 7})
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.3, 0.5, 7, 3)
    await client.post("/llm", json={"messages": QUESTION})
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.7, 1.0, -1, 256)


async def test_a_stream_follows_the_contract(client, engine):
    response = await client.post("/llm", json={"messages": STORY, "max_tokens": 5, "stream": True})
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = await read_events(response)
    *content, last = events
    assert [event["choices"][0]["delta"] for event in content] == [
        {"role": "assistant", "content": word} for word in DEFAULT_WORDS[:5]]
    assert all(event["choices"][0]["finish_reason"] == "" and len(event["choices"]) == 1 for event in content)
    assert [event["usage"]["completion_tokens"] for event in events] == [1, 2, 3, 4, 5, 5]
    assert last["choices"] == [{"index": 0, "finish_reason": "length", "delta": {"role": "assistant", "content": ""}}]
    assert len({event["id"] for event in events}) == 1


async def test_a_model_that_stops_early_says_stop(client, engine):
    engine.script = scripted_text("Paris.")
    body = await (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 50})).json()
    assert body["choices"][0]["message"]["content"] == "Paris." and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len("Paris.") + 1, "the end-of-sequence token counts"


async def test_the_model_field_must_be_empty_or_the_served_id(client, engine, tmp_path):
    served = str(tmp_path / "model")
    for model in ("", served):
        assert (await client.post("/llm", json={"messages": QUESTION, "model": model, "max_tokens": 2})).status == 200
    response = await client.post("/llm", json={"messages": QUESTION, "model": "other/model", "max_tokens": 2})
    assert response.status == 400
    message = (await response.json())["detail"]["msg"]
    assert "other/model" in message and served in message
    assert len(engine.submitted) == 2


async def test_bad_input_is_refused_before_the_engine(client, engine):
    for body, loc in BAD_422:
        response = await client.post("/llm", json=body)
        assert response.status == 422, body
        assert loc in [error["loc"] for error in (await response.json())["detail"]], body
    for data, content_type in NOT_JSON_BODIES:
        response = await client.post("/llm", data=data, headers={"Content-Type": content_type})
        assert response.status == 422 and (await response.json())["detail"][0]["loc"] == ["body"]
    for body, said in (({"messages": []}, "at least one message"),
                       ({"messages": [{"role": "wizard", "content": "hi"}]}, "wizard"),
                       ({"messages": [{"role": "tool", "content": "hi"}]}, "tool_call_id"),
                       ({"messages": QUESTION, "max_tokens": 4096}, "MAX_MODEL_LEN"),
                       ({"messages": QUESTION, "temperature": 2.5}, "temperature")):
        response = await client.post("/llm", json=body)
        assert response.status == 400 and said in (await response.json())["detail"]["msg"], body
    response = await client.post("/llm", json={"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert response.status == 413 and "msg" in (await response.json())["detail"]
    assert engine.submitted == [], "nothing reached the engine"
    assert (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 2})).status == 200


async def test_a_conversation_the_chat_template_refuses_is_a_400(aiohttp_client, tmp_path):
    strict = FakeEngine(chat_template=(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
        "{% endif %}{{ m.content }}{% endfor %}"))
    client = await ready_client(aiohttp_client, llm_app(strict, tmp_path / "model"))
    strict.submitted.clear()  # the warm-up's request
    response = await client.post("/llm", json={"messages": [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"}]})
    assert response.status == 400 and "roles must alternate" in (await response.json())["detail"]["msg"]
    assert strict.submitted == []


async def test_a_client_that_goes_away_aborts_its_engine_request(client, engine):
    await assert_a_vanishing_client_aborts(client, engine, "/llm", {"messages": STORY, "max_tokens": 4000})


async def test_an_engine_that_dies_ends_requests_with_errors_and_health_says_error(client, engine):
    engine.script = Script(fail_at=3)
    response = await client.post("/llm", json={"messages": STORY, "max_tokens": 50, "stream": True})
    events = await read_events(response)
    assert events[-1]["choices"] == [{"index": 0, "finish_reason": "error", "delta": {"role": "assistant", "content": ""}}]
    assert events[-1]["error"]["msg"].startswith("generation failed")
    assert not any(event["choices"][0]["finish_reason"] for event in events[:-1])
    assert (await (await client.get("/health")).json())["status"] == "ERROR"
    response = await client.post("/llm", json={"messages": QUESTION})
    assert response.status == 503 and "engine" in (await response.json())["detail"]["msg"]


async def test_a_plain_request_whose_engine_dies_is_a_500(client, engine):
    engine.script = Script(fail_at=2)
    response = await client.post("/llm", json={"messages": STORY, "max_tokens": 50})
    assert response.status == 500 and "generation failed" in (await response.json())["detail"]["msg"]


async def test_an_engine_that_gives_up_on_a_request_is_a_failure_not_a_stop(client, engine):
    engine.script = Script(abort_at=2)
    response = await client.post("/llm", json={"messages": STORY, "max_tokens": 50, "stream": True})
    events = await read_events(response)
    assert events[-1]["choices"][0]["finish_reason"] == "error"
    assert "ended the request early (abort)" in events[-1]["error"]["msg"]


async def test_the_warm_up_went_through_the_engine_before_the_first_request(aiohttp_client, engine, tmp_path):
    await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model"))
    [warm_up] = engine.submitted
    assert warm_up.sampling.max_tokens == 4 and warm_up.finished
