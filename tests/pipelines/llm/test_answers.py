"""The answer reader: one choice's text into text, thinking and tool-call events, whatever the API.

Every plan is read the same however the text is cut into pieces: the events a
stream sends add up to the answer a plain request gets. vLLM's own tool-call
and reasoning parsers are used as the backend hands them over (on the fake
engine's byte tokenizer, which has the reasoning markers as tokens).
"""

from __future__ import annotations

import json
import random

import pytest

from pipelines.llm.answers import (
    AnswerReader,
    CallArguments,
    CallStart,
    ReasoningDelta,
    TextDelta,
    ToolCallsMalformed,
    reasoning_parser_for_template,
)
from pipelines.llm.tools import CALL_END, call_begin, plan_tools
from tests.support.fake_engine import FakeTokenizer, characters
from tests.support.fast_lane import IMPORTS_VLLM

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, TIME]
TOKENIZER = FakeTokenizer()


def pieces(text: str, cuts: int, seed: int) -> list[str]:
    """``text`` cut at ``cuts`` random places (never inside a special token)."""
    tokens = characters(text)
    places = sorted(random.Random(seed).sample(range(1, len(tokens)), min(cuts, len(tokens) - 1)))
    return ["".join(tokens[start:end]) for start, end in zip([0, *places], [*places, len(tokens)])]


def read(reader: AnswerReader, parts: list[str], cut: bool = False) -> list:
    events = list(reader.start())
    for part in parts:
        events += reader.feed(part, TOKENIZER.encode(part, add_special_tokens=False))
    return events + reader.finish(cut)


def summary(reader: AnswerReader) -> tuple:
    return reader.content, reader.reasoning, [(call.name, call.arguments) for call in reader.calls]


def added_up(events: list) -> tuple:
    """What a client adds up from the events, as a chat client adds up deltas."""
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    thinking = "".join(event.text for event in events if isinstance(event, ReasoningDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, CallStart):
            calls[event.index] = [event.name, ""]
        elif isinstance(event, CallArguments):
            calls[event.index][1] += event.text
    return text, thinking, [tuple(call) for call in calls.values()]


def assert_same_however_cut(make, text: str, cut: bool = False) -> AnswerReader:
    """Whole, one character at a time, and cut at random places: the same answer, and the events add up to it."""
    whole = make()
    read(whole, [text], cut)
    for cuts in (len(text), 3, 17):
        for seed in range(3):
            reader = make()
            events = read(reader, pieces(text, cuts, seed), cut)
            assert summary(reader) == summary(whole), (cuts, seed)
            content, thinking, calls = added_up(events)
            assert (content or None, thinking, calls) == (whole.content or None, whole.reasoning,
                                                          summary(whole)[2]), (cuts, seed)
    return whole


# 1. The plans


def test_text_is_passed_on_as_it_comes():
    reader = AnswerReader(plan_tools([], None, None, False))
    assert reader.feed("Hel") == [TextDelta("Hel")] and reader.feed("") == [] and reader.feed("lo") == [TextDelta("lo")]
    assert reader.finish(cut=False) == [] and reader.content == "Hello" and not reader.calls


def test_a_named_call_starts_before_its_first_argument_and_streams_them():
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None, False)
    reader = AnswerReader(plan)
    [start] = reader.start()
    assert isinstance(start, CallStart) and start.name == "get_time" and start.index == 0
    assert reader.feed('{"zone"') == [CallArguments(0, '{"zone"')]
    reader.feed(': "UTC"}')
    reader.finish(cut=False)
    assert summary(reader) == (None, "", [("get_time", '{"zone": "UTC"}')])


REQUIRED = ('[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}]"}},\n'
            ' {"parameters": {"zone": "UTC", "n": [1, {"a": 2}]}, "name": "get_time"}]')


def test_required_calls_start_once_named_and_their_arguments_stream_as_generated():
    plan = plan_tools(TOOLS, "required", None, False)
    reader = assert_same_however_cut(lambda: AnswerReader(plan), REQUIRED)
    assert summary(reader) == (None, "", [("get_weather", '{"city": "Pa\\"ris}]"}'),
                                          ("get_time", '{"zone": "UTC", "n": [1, {"a": 2}]}')])
    for call in reader.calls:
        json.loads(call.arguments)
    streamed = AnswerReader(plan)
    events = read(streamed, list(REQUIRED))
    first = [event for event in events if getattr(event, "index", None) == 0]
    assert isinstance(first[0], CallStart), "the call starts before its arguments"
    assert sum(isinstance(event, CallArguments) for event in first) == len('{"city": "Pa\\"ris}]"}'), \
        "one piece per character fed"
    assert isinstance(events[-1], CallArguments) and events[-1].index == 1, \
        "arguments generated before the name are sent right after it"


def test_required_json_that_breaks_its_constraint_is_an_error_unless_cut():
    plan = plan_tools(TOOLS, "required", None, False)
    with pytest.raises(ToolCallsMalformed):
        read(AnswerReader(plan), ['[{"name": "get_time", "parameters": {}}'])
    cut = AnswerReader(plan)
    read(cut, ['[{"name": "get_time", "parameters": {"zone": "U'], cut=True)
    assert summary(cut) == (None, "", [("get_time", '{"zone": "U')]), "a cut call keeps what it has"
    early = AnswerReader(plan)
    assert added_up(read(early, ['[{"name": "get_'], cut=True))[0] == '[{"name": "get_'
    assert summary(early) == ('[{"name": "get_', "", []), "cut before a name: the text is the answer"


OWN = (f'Let me check. <tool <tool_call>x</tool_call> {call_begin("get_weather")}{{"city": "Paris"}}{CALL_END}'
       f' and {call_begin("get_time")} 5 {CALL_END}Done. <tool_ca')


def test_auto_in_the_runners_own_syntax_reads_calls_among_text():
    plan = plan_tools(TOOLS, None, None, False)
    assert plan.mode == "auto" and plan.own_syntax and plan.template_tools is None
    reader = assert_same_however_cut(lambda: AnswerReader(plan), OWN)
    assert summary(reader) == ("Let me check. <tool <tool_call>x</tool_call>  and Done. <tool_ca", "",
                               [("get_weather", '{"city": "Paris"}'), ("get_time", "5")])


def test_auto_in_the_runners_own_syntax_keeps_a_cut_call():
    plan = plan_tools(TOOLS, "auto", None, False)
    reader = AnswerReader(plan)
    read(reader, [f'Hi {call_begin("get_weather")}{{"ci'], cut=True)
    assert summary(reader) == ("Hi ", "", [("get_weather", '{"ci')])


def test_the_own_syntax_plan_teaches_and_constrains_each_call():
    plan = plan_tools(TOOLS, None, False, False)
    assert "get_weather" in plan.instructions and "The weather" in plan.instructions
    assert "<tool_call>" in plan.instructions
    tag = plan.structural_tag["format"]
    assert tag["type"] == "triggered_tags" and tag["triggers"] == ["<tool_call>"] and tag["stop_after_first"]
    assert [(t["begin"], t["content"]["json_schema"], t["end"]) for t in tag["tags"]] == [
        (call_begin("get_weather"), CITY, CALL_END), (call_begin("get_time"), {"type": "object"}, CALL_END)]
    assert plan_tools(TOOLS, None, None, True).own_syntax is False, "a template with a known syntax keeps vLLM's"


HERMES = ('I will look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')


@IMPORTS_VLLM
def test_auto_in_the_models_own_syntax_streams_through_vllms_parser():
    from pipelines.llm.vllm_backend.tool_parsers import ToolCallParser

    plan = plan_tools(TOOLS, None, None, True)
    parser = ToolCallParser("hermes", TOKENIZER)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    reader = AnswerReader(plan, parser, body)
    events = read(reader, characters(HERMES))
    assert summary(reader)[2] == [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "UTC"}')]
    assert reader.content == "I will look. "
    arguments = [event for event in events if isinstance(event, CallArguments) and event.index == 0]
    assert len(arguments) > 5, "the arguments stream as generated"
    assert added_up(events)[2] == summary(reader)[2]
    whole = AnswerReader(plan, parser, body)
    read(whole, [HERMES])
    assert summary(whole) == summary(reader)


# 2. Thinking


def deepseek():
    from pipelines.llm.vllm_backend.reasoning_parsers import ReasoningParser

    return ReasoningParser("deepseek_r1", TOKENIZER)


@IMPORTS_VLLM
def test_thinking_is_told_apart_by_vllms_parser_however_cut():
    plan = plan_tools([], None, None, False)
    reader = assert_same_however_cut(lambda: AnswerReader(plan, reasoning_parser=deepseek()),
                                     "<think>Paris is in France.</think>Paris.")
    assert summary(reader) == ("Paris.", "Paris is in France.", [])


@IMPORTS_VLLM
def test_a_prompt_that_closed_the_thinking_leaves_all_to_the_answer():
    prompt = TOKENIZER.encode("<|assistant|>\n</think>\n\n", add_special_tokens=False)
    reader = AnswerReader(plan_tools([], None, None, False), reasoning_parser=deepseek(), prompt_token_ids=prompt)
    read(reader, characters("Paris."))
    assert summary(reader) == ("Paris.", "", [])
    unclosed = AnswerReader(plan_tools([], None, None, False), reasoning_parser=deepseek(), prompt_token_ids=[1, 2])
    read(unclosed, characters("still thinking"), cut=True)
    assert summary(unclosed) == (None, "still thinking", []), "no end marker yet: all thinking, no answer"


@IMPORTS_VLLM
def test_text_without_its_tokens_is_encoded_to_find_the_markers():
    reader = AnswerReader(plan_tools([], None, None, False), reasoning_parser=deepseek())
    reader.feed("<think>hm</think>yes")
    reader.finish(cut=False)
    assert summary(reader) == ("yes", "hm", [])


@IMPORTS_VLLM
def test_calls_after_the_thinking_are_read_by_the_plan():
    plan = plan_tools(TOOLS, None, None, False)
    text = f'<think>I need the weather.</think>{call_begin("get_weather")}{{"city": "Oslo"}}{CALL_END}'
    reader = assert_same_however_cut(lambda: AnswerReader(plan, reasoning_parser=deepseek()), text)
    assert summary(reader) == (None, "I need the weather.", [("get_weather", '{"city": "Oslo"}')])


@IMPORTS_VLLM
def test_the_thinking_syntax_is_chosen_from_the_chat_template():
    assert reasoning_parser_for_template("{{ '<think>' }}{% if enable_thinking %}") == "qwen3"
    assert reasoning_parser_for_template("<｜Assistant｜><think>\n") == "deepseek_r1"
    assert reasoning_parser_for_template("[THINK]") == "mistral"
    assert reasoning_parser_for_template("{{ '</think>' }} <|assistant|>") is None
    from pipelines.llm.vllm_backend.reasoning_parsers import ReasoningParser

    with pytest.raises(ValueError, match="think"):
        ReasoningParser("deepseek_r1", FakeTokenizer.__new__(NoMarkers))


class NoMarkers(FakeTokenizer):
    def get_vocab(self) -> dict[str, int]:
        return {"a": 1}


def test_earlier_calls_are_written_in_the_own_syntax_for_a_template_that_knows_no_calls():
    from pipelines.llm.tools import written_calls

    turns = [{"role": "user", "content": "Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert written_calls(turns) == [turns[0], {"role": "assistant", "content": (
        f'{call_begin("get_weather")}{{"city": "Paris"}}{CALL_END}')}, turns[2]]
    assert "tool_calls" in turns[1], "the request's turns are left as they were"
