"""POST /tokenize and /detokenize on a fake engine, in-process: vLLM's shapes, the chat prompt exactly as
/v1/chat/completions submits it, and nothing reaching the engine.

Against a real engine and its tokenizer: tests/pipelines/llm/real_engine/test_vllm_extras.py.
"""

from __future__ import annotations

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
