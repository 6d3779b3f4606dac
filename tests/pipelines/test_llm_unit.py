"""The llm pipeline's serving logic without an engine: the stream events it writes and its request checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.llm import LLMPipeline, ReplyBuilder
from pipelines.llm_schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from runner.pipeline import OperationError, RequestContext
from runner.schema import APIErrorMessage

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


def pydantic_event(reply: ReplyBuilder, content: str, finish_reason: str = "", error: str | None = None) -> bytes:
    """What pydantic writes of the LLMResponse the spec describes for this event."""
    prompt, completion = reply.context.prompt_tokens, reply.context.completion_tokens
    response = LLMResponse(
        id=reply.completion_id,
        model=reply.model,
        created=reply.created,
        usage=LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        choices=[LLMChoice(index=0, finish_reason=finish_reason, delta=LLMMessage(role="assistant", content=content))],
        error=None if error is None else APIErrorMessage(msg=error),
    )
    return response.model_dump_json(exclude_none=True).encode()


@pytest.mark.parametrize("text", TEXTS)
def test_text_event_is_what_pydantic_writes(text):
    context = RequestContext(request_id='"odd\\id"', prompt_tokens=37, completion_tokens=5)
    reply = ReplyBuilder("org/Modèl-1", context)
    assert reply.event(text) == pydantic_event(reply, text)
    event = json.loads(reply.event(text))
    assert event["choices"][0]["delta"]["content"] == text
    assert event["usage"] == {"prompt_tokens": 37, "completion_tokens": 5, "total_tokens": 42}


def test_text_event_follows_the_running_usage():
    context = RequestContext(request_id="1", prompt_tokens=3)
    reply = ReplyBuilder("m", context)
    context.count_tokens(1)
    context.prompt_tokens = 4  # the engine's own count replaces the estimate
    assert reply.event("a") == pydantic_event(reply, "a")


@pytest.mark.parametrize("reason", ["generation failed: the engine died", 'quote " and \n newline'])
def test_error_event_carries_its_reason_in_the_spec_field(reason):
    reply = ReplyBuilder("m", RequestContext(request_id="1", prompt_tokens=3, completion_tokens=2))
    assert reply.error_event(reason) == pydantic_event(reply, "", "error", error=reason)
    event = json.loads(reply.error_event(reason))
    assert len(event["choices"]) == 1 and event["choices"][0]["finish_reason"] == "error"
    assert event["error"] == {"msg": reason}


def test_final_event_is_what_pydantic_writes():
    reply = ReplyBuilder("m", RequestContext(request_id="1", prompt_tokens=3, completion_tokens=2))
    assert reply.event("", finish_reason="length") == pydantic_event(reply, "", "length")


def test_a_conversation_the_chat_template_refuses_is_a_400():
    from jinja2 import Environment

    strict = Environment().from_string(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )

    def raise_exception(message):
        from jinja2 import TemplateError

        raise TemplateError(message)

    class StrictTokenizer:
        def apply_chat_template(self, conversation, **_):
            return strict.render(messages=conversation, raise_exception=raise_exception)

    pipeline = LLMPipeline("strict", Path("."))
    pipeline.engine = SimpleNamespace(tokenizer=StrictTokenizer(), max_model_len=100)
    twice = [LLMMessage(role="user", content="a"), LLMMessage(role="user", content="b")]
    with pytest.raises(OperationError, match="roles must alternate") as refused:
        pipeline.render_chat(pipeline.check(LLMRequest(messages=twice)))
    assert refused.value.status == 400
