"""POST /v1/completions on a fake engine, in-process, through the official ``openai`` SDK.

Several prompts of one request are in the engine together and their choices
stream interleaved, each choice's chunks in order. The real engine's side
(six prompts in one request against one) is tests/pipelines/llm/real_engine/test_openai.py.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from pipelines.llm.api.completion import CompletionReply
from pipelines.llm.api.openai_base import ChunkEnvelope
from pipelines.llm.replies import Choice, ReplyTracker
from pipelines.llm.schema import Completion, CompletionChoice, CompletionLogprobs
from runner.pipeline import RequestContext
from tests.support.fake_engine import BOS, DEFAULT_WORDS


def test_a_chunk_is_what_pydantic_writes_of_the_spec_model():
    reply = CompletionReply("m", None, ReplyTracker(RequestContext(request_id="x")), include_usage=True)
    reply.envelope = ChunkEnvelope("text_completion", "cmpl-x", 1700000000, "m", include_usage=True)
    choice = Choice(index=3, finish_reason="length")
    logprobs = CompletionLogprobs(tokens=["é"], token_logprobs=[-0.5], top_logprobs=[{"é": -0.5}], text_offset=[4])
    expected = Completion(id="cmpl-x", object="text_completion", created=1700000000, model="m", usage=None, choices=[
        CompletionChoice(index=3, text='a "b"', logprobs=logprobs, finish_reason="length")])
    assert reply.choice_chunk(choice, 'a "b"', logprobs) == expected.model_dump_json(exclude_unset=True).encode()


async def test_several_prompts_run_in_the_engine_together(openai_client, engine, model):
    engine.step_seconds = 0.01
    most_at_once = 0

    async def watch() -> None:
        nonlocal most_at_once
        while True:
            most_at_once = max(most_at_once, engine.unfinished_requests())
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        answer = await openai_client.completions.create(model=model, prompt=["a", "b", "c", "d", "e", "f"],
                                                        max_tokens=8)
    finally:
        watcher.cancel()
    assert most_at_once == 6, "all six prompts are in the engine at once"
    assert [choice.index for choice in answer.choices] == list(range(6))
    assert answer.usage.prompt_tokens == 6 * 2 and answer.usage.completion_tokens == 6 * 8


async def test_a_stream_interleaves_the_prompts_choices_each_in_order(openai_client, engine, model):
    chunks = [chunk async for chunk in await openai_client.completions.create(
        model=model, prompt=["a", "b"], n=2, max_tokens=3, temperature=1, stream=True,
        stream_options={"include_usage": True})]
    *choice_chunks, usage = chunks
    order = [chunk.choices[0].index for chunk in choice_chunks]
    assert sorted(set(order)) == [0, 1, 2, 3]
    assert order[:4] != [0, 0, 0, 1], "interleaved as generated, not prompt after prompt"
    texts = {index: "".join(c.choices[0].text for c in choice_chunks if c.choices[0].index == index) for index in range(4)}
    plain = await openai_client.completions.create(model=model, prompt=["a", "b"], n=2, max_tokens=3, temperature=1)
    assert texts == {choice.index: choice.text for choice in plain.choices}
    assert [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].index == 2][-1] == "length"
    assert usage.choices == [] and usage.usage == plain.usage


async def test_echo_and_logprobs(openai_client, engine, model):
    echoed = await openai_client.completions.create(model=model, prompt="Once", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "Once" + "".join(DEFAULT_WORDS[:3])
    assert engine.submitted[-1].prompt == [BOS, *b"Once"], "a raw prompt gets the model's own special tokens"
    answer = await openai_client.completions.create(model=model, prompt="Once", max_tokens=4, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text and len(logprobs.token_logprobs) == 4
    assert logprobs.text_offset == [sum(len(token) for token in logprobs.tokens[:i]) for i in range(4)]
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    chunks = [chunk async for chunk in await openai_client.completions.create(model=model, prompt="Once", max_tokens=4,
                                                                              logprobs=2, stream=True)]
    assert [offset for chunk in chunks for offset in chunk.choices[0].logprobs.text_offset] == logprobs.text_offset


@pytest.mark.parametrize(("request_", "param"), [
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 4096}, "max_tokens"),
    ({"prompt": ["a", "x" * 4090]}, "max_tokens"),
])
async def test_bad_requests_are_400_before_the_engine(openai_client, engine, model, request_, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.completions.create(**{"model": model, "prompt": "a", **request_})
    assert refused.value.body["param"] == param
    assert engine.submitted == [], "not even the first prompt of a refused request was submitted"


async def test_a_cut_stream_aborts_every_prompts_request(openai_client, engine, model):
    engine.step_seconds = 0.01
    stream = await openai_client.completions.create(model=model, prompt=["a", "b", "c"], max_tokens=4000, stream=True)
    async for _ in stream:
        break
    await stream.close()
    async with asyncio.timeout(2):
        while engine.running:
            await asyncio.sleep(0.01)
    assert all(request.aborted for request in engine.submitted)
