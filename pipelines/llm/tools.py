"""Tools a request offers the model, and how its tool_choice shapes the generation.

API-neutral: an API module turns its own tool declarations into
OpenAI-style function tools and its tool choice into one of OpenAI's, and gets
back the plan every API serves the same way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.pipeline import OperationError

# A chat template's tool-call syntax, and vLLM's parser for it (first match wins).
TOOL_CALL_SYNTAX = (
    ("<tool_call>", "hermes"),  # Qwen 2.5, Hermes, SmolLM3 and most others
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 to 3.3
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "granite"),
)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def tool_parser_for_template(chat_template: str) -> str | None:
    """The tool-call parser that fits a chat template, or None for a template that knows no tools."""
    for marker, name in TOOL_CALL_SYNTAX:
        if marker in chat_template:
            return name
    return None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools shape its generation and its answer."""

    mode: str = "text"  # "text", "named" (one forced function), "required" (one or more), "auto" (the model decides)
    name: str = ""  # the forced function, in "named" mode
    template_tools: list[dict] | None = None  # what the chat template is shown
    schema: dict[str, Any] | None = None  # the JSON schema the output must match; None: free text


def plan_tools(tools: Sequence[dict], choice: str | dict | None, parallel_tool_calls: bool | None,
               parser_available: bool, model_id: str) -> ToolPlan:
    """The plan for OpenAI-style function ``tools`` and ``tool_choice`` ("none", "auto", "required" or
    {"type": "function", "function": {"name"}})."""
    if not tools:
        if choice not in (None, "none"):
            raise OperationError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        if not parser_available:
            raise OperationError(
                f"tool_choice 'auto' needs a tool-call parser, and none fits {model_id!r} (its chat "
                "template names no tool-call syntax the runner knows): set TOOL_CALL_PARSER to one of vLLM's "
                "parsers, or ask for a named function or 'required', which work with any model",
                param="tool_choice",
            )
        return ToolPlan("auto", template_tools=list(tools))
    if choice == "required":
        calls = {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": function.get("parameters") or EMPTY_PARAMETERS,
                    },
                    "required": ["name", "parameters"],
                }
                for name, function in functions.items()
            ],
        }
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", template_tools=list(tools), schema=schema)
    name = choice["function"]["name"]
    if name not in functions:
        raise OperationError(f"tool_choice names the function {name!r}, which is not among the tools",
                             param="tool_choice")
    return ToolPlan("named", name=name, template_tools=list(tools),
                    schema=functions[name].get("parameters") or EMPTY_PARAMETERS)


def read_calls(plan: ToolPlan, text: str, cut: bool, parser=None, chat_body: dict | None = None
               ) -> tuple[str | None, list[tuple[str, str]]]:
    """A finished answer's content and its tool calls as (name, arguments JSON), by the plan.

    ``cut``: the answer stopped at the length limit, so constrained JSON may be
    unfinished; it is then kept as text. ``parser`` and ``chat_body`` (the
    request as OpenAI's chat body) serve the "auto" plan.
    """
    if plan.mode == "named":
        return None, [(plan.name, text)]
    if plan.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            if cut:
                return text, []
            raise RuntimeError("the constrained tool calls are not JSON") from None
        return None, [(call["name"], json.dumps(call["parameters"])) for call in calls]
    if plan.mode == "auto":
        return parser.extract(text, chat_body)
    return text, []
