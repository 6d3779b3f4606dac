"""Tools a request offers the model, and how its tool_choice shapes the generation.

API-neutral: an API module turns its own tool declarations into
OpenAI-style function tools and its tool choice into one of OpenAI's, and gets
back the plan every API serves the same way:

- "named" (one forced function) and "required" (one or more calls): the output
  is JSON constrained by a schema from its first token, so any model calls the
  tools right;
- "auto" (the model decides, also when tool_choice is left out): where the
  chat template has a tool-call syntax vLLM knows, the template describes the
  tools and vLLM's parser reads the calls; elsewhere the runner's own syntax
  (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), taught in a
  system turn and constrained to the function's schema once the model opens a
  call (a structural tag), so any model can call a tool or answer in text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.llm.limits import check_schemas
from runner.pipeline import OperationError

# A chat template's tool-call syntax, and vLLM's parser for it (first match wins).
TOOL_CALL_SYNTAX = (
    ("<tool_call>", "hermes"),  # Qwen 2.5, Hermes, SmolLM3 and most others
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 to 3.3
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "granite"),
)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

# The runner's own tool-call syntax, for models whose template knows none (Hermes's, which many models have seen).
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


def call_begin(name: str) -> str:
    """What the model writes before a call's arguments, in the runner's own syntax."""
    return f'{CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": '


CALL_END = "}" + CALL_CLOSE  # what closes a call, after its arguments


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
    schema: dict[str, Any] | None = None  # the JSON schema the output must match from its first token; None: free text
    # "auto" in the runner's own syntax: the names it may call, the system text that teaches it, and the structural
    # tag that constrains each call once the model opens it (xgrammar's format, as vLLM takes it).
    own_syntax: bool = False
    functions: tuple[str, ...] = ()
    instructions: str | None = None
    structural_tag: dict[str, Any] | None = None


def plan_tools(tools: Sequence[dict], choice: str | dict | None, parallel_tool_calls: bool | None,
               parser_available: bool, model_id: str = "") -> ToolPlan:
    """The plan for OpenAI-style function ``tools`` and ``tool_choice`` ("none", "auto", "required" or
    {"type": "function", "function": {"name"}}); ``parser_available``: the model's template has a tool-call
    syntax vLLM parses."""
    if not tools:
        if choice not in (None, "none"):
            raise OperationError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    check_schemas([function.get("parameters") for function in functions.values()], "the tools' parameters", "tools")
    single = parallel_tool_calls is False
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        if parser_available:
            return ToolPlan("auto", template_tools=list(tools))
        return ToolPlan("auto", own_syntax=True, functions=tuple(functions), instructions=describe_tools(functions),
                        structural_tag={"type": "structural_tag", "format": {
                            "type": "triggered_tags", "triggers": [CALL_OPEN], "tags": call_tags(functions),
                            "at_least_one": False, "stop_after_first": single}})
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
        if single:
            schema["maxItems"] = 1
        return ToolPlan("required", template_tools=list(tools), schema=schema)
    name = choice["function"]["name"]
    if name not in functions:
        raise OperationError(f"tool_choice names the function {name!r}, which is not among the tools",
                             param="tool_choice")
    return ToolPlan("named", name=name, template_tools=list(tools),
                    schema=functions[name].get("parameters") or EMPTY_PARAMETERS)


def call_tags(functions: dict[str, dict]) -> list[dict]:
    """One tag per function: its opening, its arguments constrained to its schema, its closing."""
    return [{"type": "tag", "begin": call_begin(name),
             "content": {"type": "json_schema", "json_schema": function.get("parameters") or EMPTY_PARAMETERS},
             "end": CALL_END}
            for name, function in functions.items()]


def describe_tools(functions: dict[str, dict]) -> str:
    """The system text that teaches a model the runner's own tool-call syntax."""
    listed = "\n".join(json.dumps({key: function[key] for key in ("name", "description", "parameters")
                                   if function.get(key) is not None}) for function in functions.values())
    return (
        "You can call these functions (each is its name, what it does and its parameters as a JSON schema):\n"
        f"{listed}\n"
        f'To call a function, write {CALL_OPEN}{{"name": <the function\'s name>, "arguments": <its arguments as '
        f"a JSON object>}}{CALL_CLOSE}. Otherwise, answer in text."
    )


def written_calls(turns: list[dict]) -> list[dict]:
    """The turns with each assistant turn's tool calls written into its text in the runner's own syntax, for a
    template that knows no tool calls (it would leave them out, and the model would not see what it called)."""
    written = []
    for turn in turns:
        if turn.get("tool_calls"):
            turn = dict(turn)
            calls = "".join(f"{call_begin(call['function']['name'])}{json.dumps(call['function']['arguments'])}"
                            f"{CALL_END}" for call in turn.pop("tool_calls"))
            turn["content"] = (turn["content"] or "") + calls
        written.append(turn)
    return written


def plan_constraint(plan: ToolPlan, answer_schema: dict[str, Any] | None = None,
                    json_object: bool = False) -> dict[str, Any]:
    """The ``Sampling`` constraint of a tool plan beside the answer's own format, for every API: a forced call's
    JSON (whatever the answer's format); own-syntax calls constrained where the model opens them, else the answer
    (its JSON, when it must be JSON); with no such tools, the answer's format."""
    if plan.schema is not None:
        return {"json_schema": plan.schema}
    if plan.structural_tag is not None:
        if answer_schema is None and not json_object:
            return {"structural_tag": plan.structural_tag}
        return {"structural_tag": with_answer_format(plan, answer_schema if answer_schema is not None
                                                     else {"type": "object"})}
    return {**({"json_schema": answer_schema} if answer_schema is not None else {}),
            **({"json_object": True} if json_object else {})}


def with_answer_format(plan: ToolPlan, answer_schema: dict[str, Any]) -> dict[str, Any]:
    """The own-syntax plan's structural tag when the answer itself must be JSON: one or more calls, or the JSON."""
    tag = plan.structural_tag["format"]
    calls = {"type": "tags_with_separator", "tags": tag["tags"], "separator": "", "at_least_one": True,
             "stop_after_first": tag["stop_after_first"]}
    return {"type": "structural_tag", "format": {"type": "or", "elements": [
        calls, {"type": "json_schema", "json_schema": answer_schema}]}}
