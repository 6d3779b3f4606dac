"""A conversation as the chat template reads it: the turns every chat-shaped API builds.

The roles the templates know, what each turn must carry and how it is written
for the template are decided here once, whichever API the messages came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipelines.llm.limits import json_document
from runner.pipeline import OperationError

# The roles a request may give, as the chat templates know them: "developer" is OpenAI's newer name for "system".
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def require_turns(messages: Sequence[Any], param: str = "messages") -> None:
    if not messages:
        raise OperationError(f"{param} must hold at least one message", param=param)


def turn(index: int, role: str, content: str | None, *, tool_call_id: str | None = None, name: str | None = None,
         tool_calls: Sequence[tuple[str, str, str]] = ()) -> dict:
    """One turn for the template; ``tool_calls`` are the (id, name, arguments JSON) an assistant turn made."""
    if role not in TEMPLATE_ROLES:
        raise OperationError(f"messages[{index}].role is {role!r}; it must be one of {', '.join(TEMPLATE_ROLES)}",
                             param=f"messages.[{index}].role")
    written: dict[str, Any] = {"role": TEMPLATE_ROLES[role], "content": content or ""}
    if role == "tool":
        if not tool_call_id:
            raise OperationError("a tool message needs the tool_call_id it answers",
                                 param=f"messages.[{index}].tool_call_id")
        written["tool_call_id"] = tool_call_id
    if name:
        written["name"] = name
    if tool_calls:
        calls = []
        for call_id, function, arguments in tool_calls:
            parsed = json_document(arguments, f"the arguments of tool call {call_id!r}",
                                   f"messages.[{index}].tool_calls")
            # Chat templates take the arguments as an object, as Hugging Face's do.
            calls.append({"id": call_id, "type": "function", "function": {"name": function, "arguments": parsed}})
        written["tool_calls"] = calls
    return written


def with_system_text(turns: list[dict], text: str) -> list[dict]:
    """The turns with ``text`` in the system turn: added to the first one if it leads, else a new one in front."""
    if turns and turns[0]["role"] == "system":
        first = dict(turns[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def chat_body(model_id: str, turns: list[dict], tools: list[dict] | None) -> dict:
    """A request as OpenAI's chat body, which vLLM's tool-call parsers read (the "auto" plan): the turns as chat
    messages, each earlier call's arguments as the JSON string OpenAI's messages carry."""
    messages = []
    for written in turns:
        if "tool_calls" in written:
            written = {**written, "tool_calls": [
                {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
                for call in written["tool_calls"]]}
        messages.append(written)
    return {"model": model_id, "messages": messages, "tools": tools, "tool_choice": "auto"}
