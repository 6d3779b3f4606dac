"""POST /tokenize and /detokenize on a fake engine, in-process: vLLM's shapes, the chat prompt exactly as
/v1/chat/completions submits it, and nothing reaching the engine.

Against a real engine and its tokenizer: tests/pipelines/llm/real_engine/test_vllm_extras.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.fake_engine import FakeTokenizer
from tests.support.http import QUESTION

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


async def post(client, path: str, body: dict) -> tuple[int, dict]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


async def test_a_prompt_is_counted_as_completions_encodes_it(client, engine):
    status, body = await post(client, "/tokenize", {"prompt": "Hi <s>"})
    assert status == 200
    assert body == {"count": 5, "max_model_len": 4096, "tokens": [256, 72, 105, 32, 256], "token_strs": None}
    status, body = await post(client, "/tokenize", {"prompt": "Hi", "add_special_tokens": False,
                                                    "return_token_strs": True, "model": client.model})
    assert body == {"count": 2, "max_model_len": 4096, "tokens": [72, 105], "token_strs": ["H", "i"]}
    assert engine.submitted == [], "only the tokenizer is used"


async def test_messages_are_the_prompt_chat_completions_submits(client, engine):
    for extra in ({}, {"tools": [WEATHER]}, {"add_generation_prompt": False},
                  {"messages": [*QUESTION, {"role": "assistant", "content": "It is"}], "continue_final_message": True}):
        status, counted = await post(client, "/tokenize", {"messages": QUESTION, **extra})
        assert status == 200, counted
        response = await client.post("/v1/chat/completions", json={"model": client.model, "messages": QUESTION,
                                                                   "max_tokens": 1, **extra})
        assert response.status == 200
        assert counted["tokens"] == engine.submitted[-1].prompt and counted["count"] == len(counted["tokens"]), extra


async def test_detokenize_gives_the_text_back(client, engine):
    status, tokenized = await post(client, "/tokenize", {"prompt": "é, 北京 <think>"})
    status, body = await post(client, "/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200 and body == {"prompt": FakeTokenizer().decode(tokenized["tokens"])}
    assert body["prompt"] == "<s>é, 北京 <think>"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "a", "messages": QUESTION}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "tools": [WEATHER]}, 400, "tools"),
    ("/tokenize", {"prompt": "a", "chat_template": "x"}, 400, "chat_template"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "truncate": 3}, 400, "truncate"),
    ("/tokenize", {"prompt": "a", "model": "someone/else"}, 404, "model"),
    ("/detokenize", {"tokens": [72, 260]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [1], "model": "someone/else"}, 404, "model"),
])
async def test_bad_requests_are_openai_shaped_errors(client, path, body, status, param):
    got, answer = await post(client, path, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


class SlowTokenizer(FakeTokenizer):
    """Each encode and each chat template takes 0.3 s, as a 900 KB text does for a real tokenizer (whose Rust code
    leaves the GIL while it works, as time.sleep does)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(0.3)
        return super().encode(text, add_special_tokens)

    def apply_chat_template(self, conversation, **kwargs) -> str:
        time.sleep(0.3)
        return super().apply_chat_template(conversation, **kwargs)


async def test_tokenizer_work_never_holds_the_event_loop(client, engine):
    """/ready answers at once while tokenising and templating calls run: they are on a worker thread (measured before:
    four 900 KB /tokenize calls at once held a /ready poll for 1.46 s)."""
    engine.tokenizer = SlowTokenizer()
    loop = asyncio.get_running_loop()
    calls = [asyncio.ensure_future(client.post("/tokenize", json={"prompt": "x" * 1000})) for _ in range(3)]
    calls += [asyncio.ensure_future(client.post("/tokenize", json={"messages": QUESTION})),
              asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": client.model,
                                                                              "messages": QUESTION, "max_tokens": 1}))]
    await asyncio.sleep(0.05)
    slowest, polls = 0.0, 0
    while not all(call.done() for call in calls):
        started = loop.time()
        assert (await client.get("/ready")).status == 200
        slowest, polls = max(slowest, loop.time() - started), polls + 1
        await asyncio.sleep(0.02)
    assert [(await call).status for call in calls] == [200] * 5
    assert polls >= 10 and slowest < 0.15, f"slowest /ready of {polls}: {slowest:.3f} s"


async def test_a_large_body_is_validated_off_the_loop(client, monkeypatch):
    from runner.keys import OFFLOAD
    from runner.offload import LARGE_BODY_BYTES

    pool = client.app[OFFLOAD]
    calls = []
    run = pool.run

    async def counted(function, *args, **kwargs):
        calls.append(function)
        return await run(function, *args, **kwargs)

    monkeypatch.setattr(pool, "run", counted)
    assert (await client.post("/tokenize", json={"prompt": "x" * 100})).status == 200
    assert calls == [], "a small body is validated at once"
    assert (await client.post("/tokenize", json={"prompt": "x" * LARGE_BODY_BYTES})).status == 200
    assert len(calls) == 1
