"""The streamed text events that ReplyBuilder writes without models are byte for byte what pydantic writes."""

from __future__ import annotations

import json

import pytest

from pipelines.base import RequestContext
from pipelines.llm import ReplyBuilder
from runner.handlers import encode_event

TEXTS = [
    " capital",
    "",
    'say "hi"',
    "back\\slash",
    "line\nbreak\ttab\rreturn",
    "\x00\x01\x1f\x7f",
    "é, 北京, 🙂",
    "\u2028\u2029",
    "</script>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_event_is_what_pydantic_writes(text):
    context = RequestContext(request_id='"odd\\id"', prompt_tokens=37, completion_tokens=5)
    reply = ReplyBuilder("org/Modèl-1", context)
    assert encode_event(reply.text_event(text)) == encode_event(reply.chunk(text))
    event = json.loads(reply.text_event(text))
    assert event["choices"][0]["delta"]["content"] == text
    assert event["usage"] == {"prompt_tokens": 37, "completion_tokens": 5, "total_tokens": 42}


def test_text_event_follows_the_running_usage():
    context = RequestContext(request_id="1", prompt_tokens=3)
    reply = ReplyBuilder("m", context)
    context.count_tokens(1)
    context.prompt_tokens = 4  # the engine's own count replaces the estimate
    assert encode_event(reply.text_event("a")) == encode_event(reply.chunk("a"))
