"""The Responses output items and the stream events that build them, unit by unit: every event is one the
official ``openai`` SDK parses, in the order it expects."""

from __future__ import annotations

import json

from openai.types.responses import Response

from pipelines.llm.answers import CallArguments, CallStart, ReasoningDelta, TextDelta
from pipelines.llm.api.responses import Output
from tests.support.responses import sdk_event, types


# 1. The output items and their events, unit by unit


def test_every_kind_of_event_is_one_the_sdk_parses_in_the_order_it_expects():
    output = Output(streaming=True)
    sent = []
    for event in [ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Hel"), TextDelta("lo"),
                  CallStart(0, "call_a", "get_weather"), CallArguments(0, '{"city"'), CallArguments(0, ': "Paris"}'),
                  CallStart(1, "call_b", "get_time"), CallArguments(1, "{}")]:
        sent += output.take(event)
    sent += output.close(cut=False)
    events = [json.loads(data) for _, data in sent]
    assert [name.decode() for name, _ in sent] == [event["type"] for event in events], "each event under its type"
    for event in events:
        sdk_event(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert types(events) == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
    ]
    assert [event["output_index"] for event in events if "output_index" in event] == \
        [0] * 7 + [1] * 7 + [2, 2, 2, 3, 3, 2, 2, 3, 3]
    reasoning, message, weather, clock = [Response.model_validate(
        {"id": "r", "object": "response", "created_at": 0, "model": "m", "parallel_tool_calls": True,
         "tool_choice": "auto", "tools": [], "output": [item.model_dump()]}).output[0] for item in output.models()]
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Thinking."
    assert message.type == "message" and message.content[0].text == "Hello" and message.status == "completed"
    assert (weather.call_id, weather.name, json.loads(weather.arguments)) == ("call_a", "get_weather", {"city": "Paris"})
    assert (clock.call_id, clock.arguments, clock.status) == ("call_b", "{}", "completed")


def test_an_answer_cut_at_the_length_limit_leaves_its_open_items_incomplete():
    output = Output(streaming=True)
    sent = output.take(TextDelta("Once upon")) + output.close(cut=True)
    done = json.loads(sent[-1][1])
    assert done["type"] == "response.output_item.done" and done["item"]["status"] == "incomplete"


def test_an_answer_that_says_nothing_is_one_empty_message():
    output = Output(streaming=True)
    events = [sdk_event(json.loads(data)) for _, data in output.close(cut=False)]
    assert [event.type for event in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done"]
    [message] = output.models()
    assert message.content[0].text == "" and message.status == "completed"


def test_the_whole_answer_builds_the_same_items_without_events():
    streamed, whole = Output(streaming=True), Output(streaming=False)
    script = [TextDelta("Sure."), CallStart(0, "call_a", "get_weather"), CallArguments(0, '{"city": "Rome"}')]
    for event in script:
        streamed.take(event)
        assert whole.take(event) == []
    streamed.close(cut=False)
    assert whole.close(cut=False) == []
    strip = lambda items: [item.model_dump(exclude={"id"}) for item in items]  # noqa: E731
    assert strip(streamed.models()) == strip(whole.models())
