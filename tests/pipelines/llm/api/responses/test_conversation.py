"""A Responses request's conversation: its items, and a previous response's, as the chat template's turns."""

from __future__ import annotations

from tests.support.fake_engine import scripted_text
from tests.support.responses import decoded
from tests.support.tools import RESPONSES_WEATHER


# 3. The conversation: items as the template's turns


async def test_items_become_the_templates_turns(client, openai_client, engine, model):
    engine.script = scripted_text("Done.")
    await openai_client.responses.create(model=model, instructions="Be brief.", tools=[RESPONSES_WEATHER],
                                         tool_choice="none", input=[
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in"}, {"type": "input_text", "text": "Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "-3 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "2 C"}]},
    ])
    prompt = decoded(engine.submitted[-1].prompt)
    assert prompt.startswith(
        "<|system|>Be brief.</s>"
        "<|system|>Use metric units.</s>"
        "<|user|>Weather in\nOslo?</s>"
        '<|assistant|>Let me check.[call call_1 get_weather {"city": "Oslo"}][call call_2 get_weather {"city": "Bergen"}]</s>'
        "<|tool|>-3 C[answers call_1]</s>"
        "<|tool|>2 C[answers call_2]</s>"), prompt
    assert "hmm" not in prompt, "earlier thinking is not shown again"
    assert engine.submitted[-1].sampling.json_schema is None, "tool_choice none: free text"


async def test_previous_response_id_continues_the_conversation(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    first = await openai_client.responses.create(model=model, instructions="Be brief.", input="Capital of France?")
    engine.script = scripted_text("Madrid.")
    second = await openai_client.responses.create(model=model, instructions="Answer in one word.",
                                                  input="And of Spain?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert decoded(engine.submitted[-1].prompt).startswith(
        "<|system|>Answer in one word.</s><|user|>Capital of France?</s><|assistant|>Paris.</s><|user|>And of Spain?</s>"
        "<|assistant|>"
    ), "the earlier input and output, not the earlier instructions"
    await openai_client.responses.create(model=model, input="And of Italy?", previous_response_id=second.id)
    assert decoded(engine.submitted[-1].prompt).startswith(
        "<|user|>Capital of France?</s><|assistant|>Paris.</s><|user|>And of Spain?</s><|assistant|>Madrid.</s>"
        "<|user|>And of Italy?</s>")


async def test_a_function_call_round_trip_through_previous_response_id(client, openai_client, engine, model):
    engine.script = scripted_text('{"city": "Oslo"}')
    asked = await openai_client.responses.create(model=model, input="Weather in Oslo?", tools=[RESPONSES_WEATHER],
                                                 tool_choice={"type": "function", "name": "get_weather"})
    [call] = asked.output
    engine.script = scripted_text("It is -3 C in Oslo.")
    answered = await openai_client.responses.create(model=model, previous_response_id=asked.id,
                                                    tools=[RESPONSES_WEATHER], tool_choice="none",
                                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                                            "output": '{"temperature": "-3 C"}'}])
    assert answered.output_text == "It is -3 C in Oslo."
    assert decoded(engine.submitted[-1].prompt).startswith(
        f'<|user|>Weather in Oslo?</s><|assistant|>[call {call.call_id} get_weather {{"city": "Oslo"}}]</s>'
        f'<|tool|>{{"temperature": "-3 C"}}[answers {call.call_id}]</s><|assistant|>')
