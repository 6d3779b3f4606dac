"""The one reply assembler: usage, finish reasons and logprobs from engine steps, for every wire format."""

from __future__ import annotations

import pytest

from pipelines.llm.replies import (
    EngineStoppedEarly,
    LogprobEntry,
    ReplyTracker,
    choice_finish_reason,
    overall_finish_reason,
    usage_json,
)
from runner.pipeline import RequestContext
from tests.support.fake_engine import Delta, Logprob, Step


def step(*deltas: Delta, prompt: list[int] | None = None, finished: bool = False) -> Step:
    return Step(prompt_token_ids=prompt, outputs=list(deltas), finished=finished)


def test_usage_follows_the_engines_counts_and_the_prompt_it_saw():
    context = RequestContext(request_id="x", prompt_tokens=5)  # as submitted
    tracker = ReplyTracker(context, [5])
    tracker.take(step(Delta(0, "a", [1], None, None), prompt=[1, 2, 3, 4, 5, 6]))
    assert (context.prompt_tokens, context.completion_tokens) == (6, 1), "the engine's own prompt count wins"
    tracker.take(step(Delta(0, "bc", [2, 3], None, "length"), finished=True))
    assert usage_json(context) == b'{"prompt_tokens":6,"completion_tokens":3,"total_tokens":9}'
    assert context.finish_reason == "length" and tracker.choices[0].text == "abc" and tracker.choices[0].tokens == 3
    assert context.first_token_at is not None


def test_several_prompts_with_n_choices_each_are_numbered_prompt_by_prompt():
    context = RequestContext(request_id="x", prompt_tokens=4)
    tracker = ReplyTracker(context, [2, 2], n=2)
    tracker.take(step(Delta(1, "x", [1], None, "stop"), prompt=[7, 7, 7]), prompt=1)
    assert tracker.choices[3].text == "x" and context.prompt_tokens == 5
    assert context.finish_reason == "", "the request is not over while a choice runs"
    for place, index in ((0, 0), (0, 1), (1, 0)):
        tracker.take(step(Delta(index, "y", [1], None, "length")), prompt=place)
    assert context.finish_reason == "length"


def test_an_engine_that_gives_up_is_an_error_not_a_finish_reason():
    tracker = ReplyTracker(RequestContext(request_id="x"))
    with pytest.raises(EngineStoppedEarly, match="abort"):
        tracker.take(step(Delta(0, "", [], None, "abort")))


def test_finish_reasons_are_decided_in_one_order():
    assert overall_finish_reason(["stop", "length", "tool_calls"]) == "tool_calls"
    assert overall_finish_reason(["stop", "length"]) == "length"
    assert overall_finish_reason(["stop"]) == "stop"
    tracker = ReplyTracker(RequestContext(request_id="x"))
    tracker.take(step(Delta(0, "{}", [1], None, "length")))
    assert choice_finish_reason(tracker.choices[0], called_tools=True) == "length", "a cut call is not a call"
    tracker.settle(["tool_calls"])
    assert tracker.context.finish_reason == "tool_calls"


def test_logprob_entries_keep_the_asked_number_of_ranked_alternatives():
    tracker = ReplyTracker(RequestContext(request_id="x"), logprobs=1)
    candidates = {5: Logprob(-0.1, 1, "a"), 6: Logprob(-2.0, 2, "b"), 7: Logprob(float("-inf"), 3, None)}
    [update] = tracker.take(step(Delta(0, "a", [5], [candidates], None)))
    assert update.logprobs == [LogprobEntry("a", -0.1, (("a", -0.1),))]
    tracker = ReplyTracker(RequestContext(request_id="x"), logprobs=3)
    [update] = tracker.take(step(Delta(0, "?", [7], [candidates], None)))
    assert update.logprobs[0].logprob == -9999.0, "-inf is not JSON"
    assert [token for token, _ in update.logprobs[0].top] == ["a", "b", ""]
