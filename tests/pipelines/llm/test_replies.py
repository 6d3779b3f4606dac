"""The one reply assembler: usage, finish reasons and logprobs from engine steps, for every wire format."""

from __future__ import annotations

import json

import pytest

from pipelines.llm.answers import AnswerReader, CallArguments
from pipelines.llm.replies import (
    NOTHING,
    EngineStoppedEarly,
    LogprobEntry,
    Reply,
    ReplyTracker,
    choice_finish_reason,
    overall_finish_reason,
    usage_json,
)
from pipelines.llm.schema import ChatCompletionChunk, Completion, LLMResponse
from pipelines.llm.tools import ToolPlan
from runner.pipeline import RequestContext
from tests.support.apps import served_client
from tests.support.fake_engine import Delta, FakeEngine, Logprob, Step, scripted_text


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


# The one read loop


class Recorder(Reply):
    """A Reply that writes each hook call as an event, and keeps the same calls for its whole answer."""

    def __init__(self, tracker: ReplyTracker, readers: list[AnswerReader] | None = None) -> None:
        self.tracker, self.readers, self.kept = tracker, readers, []

    def note(self, *what) -> tuple:
        if self.streaming:
            return (what,)
        self.kept.append(what)
        return NOTHING

    def opening(self, starts):
        return self.note("opening", [[type(event).__name__ for event in start] for start in starts])

    def began(self, choice, start):
        return self.note("began", choice.index)

    def said(self, update, events):
        return self.note("said", update.choice.index, update.text if events is None else events)

    def ended(self, choice, events, reason):
        return self.note("ended", choice.index, events, reason, self.tracker.context.finish_reason)

    def closing(self):
        return self.note("closing", self.tracker.context.finish_reason)

    def answer(self):
        return self.kept


class Steps:
    """Engine steps as an async iterator that says whether it was closed, and how far it was read."""

    def __init__(self, steps: list) -> None:
        self.steps, self.read, self.closed = steps, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.read == len(self.steps):
            raise StopAsyncIteration
        self.read += 1
        return self.steps[self.read - 1]

    async def aclose(self) -> None:
        self.closed = True


def two_choices() -> list:
    return [step(Delta(0, "a", [1], None, None), Delta(1, "b", [2], None, None), prompt=[9]),
            step(Delta(1, "c", [3], None, "stop")),
            step(Delta(0, "d", [4], None, "length"), finished=True)]


async def test_the_read_loop_calls_the_hooks_in_order_and_the_whole_answer_is_the_same_calls():
    streamed_steps = Steps(two_choices())
    streamed = [event async for event in Recorder(ReplyTracker(RequestContext(request_id="x"), [1], n=2))
                .events(streamed_steps)]
    assert streamed == [("opening", []), ("began", 0), ("said", 0, "a"), ("began", 1), ("said", 1, "b"),
                        ("said", 1, "c"), ("ended", 1, [], "stop", ""),
                        ("said", 0, "d"), ("ended", 0, [], "length", "length"), ("closing", "length")]
    assert streamed_steps.closed, "the loop closes the engine's steps at its end"
    whole_steps = Steps(two_choices())
    assert await Recorder(ReplyTracker(RequestContext(request_id="x"), [1], n=2)).whole(whole_steps) == streamed
    assert whole_steps.closed


async def test_readers_start_once_their_calls_decide_the_finish_reason_and_an_early_close_closes_the_steps():
    plan = ToolPlan("named", name="get_weather")
    reader = AnswerReader(plan)
    steps = Steps([step(Delta(0, '{"city"', [1], None, None), prompt=[9]),
                   step(Delta(0, ': "Paris"}', [2], None, "stop"), finished=True)])
    reply = Recorder(ReplyTracker(RequestContext(request_id="x"), [1]), [reader])
    events = [event async for event in reply.events(steps)]
    assert events[0] == ("opening", [["CallStart"]]), "what the answer says before its first token, once"
    assert [event[2] for event in events if event[0] == "said"] == [[CallArguments(0, '{"city"')],
                                                                     [CallArguments(0, ': "Paris"}')]]
    assert events[-2][:4] == ("ended", 0, [], "tool_calls") and events[-1] == ("closing", "tool_calls")
    assert len(reader.calls) == 1 and reader.calls[0].arguments == '{"city": "Paris"}'

    early = Steps([step(Delta(0, "a", [1], None, None), prompt=[9]), step(Delta(0, "b", [2], None, None))])
    stream = Recorder(ReplyTracker(RequestContext(request_id="x"), [1])).events(early)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert early.closed and early.read == 1, "a stream stopped early closes (aborts) the engine's steps"


# The hot paths' bytes: each token's event written from bytes built once per request (``text_frame``, /llm's
# template) is byte for byte what pydantic writes of the spec's model of that event: no space, key order or escape
# of its own. Text of one character a token, each needing what JSON needs (quotes, escapes, control characters,
# non-ASCII, U+2028, the mark's own private-use characters).
HOT_TEXT = 'say "hi", back\\slash, line\nbreak\ttab \x00\x1f\x7f é 北京 🙂 \u2028 </script> \ue000text\ue000 %d %b'


@pytest.mark.parametrize("path", ["/llm", "/v1/chat/completions", "/v1/completions"])
async def test_each_streamed_text_event_is_the_bytes_pydantic_writes_of_it(aiohttp_client, tmp_path, path):
    engine = FakeEngine(scripted_text(HOT_TEXT))
    client = await served_client(aiohttp_client, engine, tmp_path)
    body = {"model": client.model, "max_tokens": 200, "stream": True}
    body |= {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = await client.post(path, json=body)
    assert response.status == 200
    raw = await response.read()
    events = [event[len(b"data: "):] for event in raw.split(b"\n\n") if event.startswith(b"data: {")]
    model = {"/llm": LLMResponse, "/v1/chat/completions": ChatCompletionChunk, "/v1/completions": Completion}[path]
    assert len(events) > len(HOT_TEXT)  # a token's event each, and the ones around them
    for event in events:
        assert model.model_validate_json(event).model_dump_json(exclude_unset=True).encode() == event
    texts = [json.loads(event)["choices"][0] for event in events]
    said = "".join(choice.get("text") or (choice.get("delta") or {}).get("content") or "" for choice in texts)
    assert said == HOT_TEXT
