"""The one path into the engine: checks before submission, and several prompts submitted together."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.llm.engine import Sampling
from pipelines.llm.generation import Generation, merged
from pipelines.llm.served_models import ServedModels
from runner.pipeline import OperationError, RequestContext
from tests.support.fake_engine import FakeEngine

MODELS = ServedModels("m")


def generation(engine: FakeEngine) -> Generation:
    served = Generation()
    served.use(engine, None)
    return served


async def test_a_prompt_too_long_for_the_model_is_refused_before_the_engine():
    engine = FakeEngine(max_model_len=100)
    context = RequestContext(request_id="x")
    with pytest.raises(OperationError) as refused:
        await generation(engine).start([1] * 90, Sampling(max_tokens=11), context, MODELS.base, "max_completion_tokens")
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_completion_tokens"
    assert "MAX_MODEL_LEN" in refused.value.msg and context.prompt_tokens == 0


async def test_an_empty_prompt_is_refused_before_the_engine():
    engine = FakeEngine()
    with pytest.raises(OperationError, match="prompt is empty"):
        await generation(engine).start([], Sampling(max_tokens=1), RequestContext("x"), MODELS.base)
    assert engine.submitted == []


async def test_sampling_the_engine_refuses_is_a_400_with_its_message():
    with pytest.raises(OperationError, match="temperature"):
        await generation(FakeEngine()).start([1], Sampling(max_tokens=1, temperature=3), RequestContext("x"), MODELS.base)


async def test_start_all_checks_every_prompt_before_submitting_any():
    engine = FakeEngine(max_model_len=100)
    served = generation(engine)
    with pytest.raises(OperationError):
        await served.start_all([([1], Sampling(max_tokens=5)), ([1] * 99, Sampling(max_tokens=5))],
                         RequestContext("x"), MODELS.base)
    assert served.submitted == 0 and engine.submitted == []


async def test_merged_reads_every_request_at_once_and_closing_it_aborts_them_all():
    engine = FakeEngine(step_seconds=0.01)
    served = generation(engine)
    context = RequestContext("x")
    steps = await served.start_all([([1], Sampling(max_tokens=1000)) for _ in range(3)], context, MODELS.base)
    places = []
    async for place, _ in steps:
        places.append(place)
        if len(places) == 6:
            break
    assert sorted(set(places)) == [0, 1, 2] and engine.unfinished_requests() == 3
    await steps.aclose()
    await asyncio.sleep(0)
    assert engine.unfinished_requests() == 0 and all(request.aborted for request in engine.submitted)
    assert context.model == "m" and context.prompt_tokens == 3


async def test_merged_of_one_is_that_one_in_order():
    async def numbers():
        for number in range(3):
            yield number

    assert [item async for item in merged([numbers()])] == [(0, 0), (0, 1), (0, 2)]


async def test_a_constrained_request_is_handed_to_the_engine_off_the_loop():
    """vLLM's checks of a grammar-constrained request compile the grammar: that is done on a worker thread."""
    import threading

    engine = FakeEngine()
    threads = []
    generate = engine.generate

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return generate(*args, **kwargs)

    engine.generate = recorded
    served = generation(engine)
    for sampling in (Sampling(max_tokens=2), Sampling(max_tokens=2, json_schema={"type": "object"}),
                     Sampling(max_tokens=2, bad_words=["x"])):
        steps = await served.start([1], sampling, RequestContext("x"), MODELS.base)
        await steps.aclose()
    assert threads == [True, False, False], "a plain request is handed over at once, a heavy one off the loop"
