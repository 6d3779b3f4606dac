"""What the Responses API's tests share: the SDK's reading of its events and streams, and a template that shows
what the fake engine is handed."""

from __future__ import annotations

import json

import pydantic
from openai.types.responses import ResponseStreamEvent

from tests.support.fake_engine import FakeTokenizer

SDK_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
# Shows what the fake engine is handed: each turn's role and content, an assistant turn's calls, a tool turn's call id.
TOOLS_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}[call {{ c['id'] }} {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}]{% endfor %}"
    "{% if m.get('tool_call_id') %}[answers {{ m['tool_call_id'] }}]{% endif %}</s>{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sdk_event(document: dict):
    """The event as the SDK's own pydantic types read it: any missing or mistyped field fails here."""
    event = SDK_EVENT.validate_python(document)
    assert event.type == document["type"]
    return event


def parse_stream(body: str) -> list[dict]:
    """A stream's events, each framed as OpenAI frames them: ``event: <type>``, then its ``data:`` line."""
    blocks = body.split("\n\n")
    assert blocks[-1] == "", body[-300:]
    events = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}" and data.startswith("data: "), block
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        sdk_event(event)
    return events


def types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


def decoded(prompt: list[int]) -> str:
    return FakeTokenizer().decode(prompt)
