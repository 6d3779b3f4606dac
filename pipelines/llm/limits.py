"""The bounds the llm pipeline's code holds a request to, beyond what openapi.yaml's schemas say.

openapi.yaml bounds every list and string a request carries (``maxItems``,
``maxLength``, ``maxProperties``), and the route layer refuses a body past one
before any code runs. What a schema cannot say lives here: how deep and how
large a JSON document given inside a string or as a JSON schema may be, and
how many prompts one request may hold. docs/limits.md lists every bound with
its setting and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from runner.pipeline import OperationError

# How deeply a JSON document a request gives as text (tool call arguments, structured_outputs.json) or as a schema
# may nest. pydantic's own parser stops request bodies at 200 levels; Python's json stops near 1,000 with a
# RecursionError, and chat templates and grammar compilers walk what they are given recursively.
MAX_JSON_DEPTH = 64
# OpenAI's documented Structured Outputs limits, for every JSON schema that constrains an answer (response_format,
# structured_outputs.json, the parameters of the tools a request may force): the grammar compiled from a schema
# grows with these. Properties are bounded tighter than OpenAI's 5,000: xgrammar's compile time grows faster than
# their count (one object of 100 properties compiled in 0.08 s on a 2-core CPU, 1,000 in 4.9 s, 2,000 in 99 s),
# and vLLM's engine compiles with no time limit.
MAX_SCHEMA_PROPERTIES = 1000  # object properties, all schemas of the request together
MAX_SCHEMA_ENUM_VALUES = 1000  # enum and const values, all together
MAX_SCHEMA_STRING_CHARS = 120_000  # characters of property names, definition names, enum and const values


# openapi.yaml's maxLength of each path parameter (tests/pipelines/llm/test_limits.py holds the two equal):
# aiohttp alone would take up to its 8,190-byte request line. A model id as the body's `model` field; a response id
# is "resp_" and 32 hex digits here, and OpenAI's are shorter than 128 characters.
PATH_PARAMETER_LENGTHS = {"model": 256, "response_id": 128}


def path_parameter(params: dict[str, str], name: str) -> str:
    """The path parameter ``name``; 400 naming it past its maxLength."""
    value = params.get(name, "")
    limit = PATH_PARAMETER_LENGTHS[name]
    if len(value) > limit:
        raise OperationError(f"{name} is {len(value)} characters long: at most {limit} are allowed (docs/limits.md)",
                             param=name)
    return value


class TooDeep(ValueError):
    pass


def depth_of(document: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``document`` nests (a scalar is 0); TooDeep past ``limit``. Iterative: no recursion to run out of."""
    deepest = 0
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            raise TooDeep(f"nests more than {limit} levels deep")
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def json_document(text: str, what: str, param: str) -> Any:
    """``text`` parsed as JSON, at most MAX_JSON_DEPTH deep; a 400 naming ``param`` for anything else."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise OperationError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep", param=param) from None
    except ValueError:
        raise OperationError(f"{what} is not JSON", param=param) from None
    check_depth(document, what, param)
    return document


def check_depth(document: Any, what: str, param: str | None) -> None:
    try:
        depth_of(document)
    except TooDeep as exc:
        raise OperationError(f"{what} {exc} (at most {MAX_JSON_DEPTH})", param=param) from None


def check_schemas(schemas: Iterable[Any], what: str, param: str | None) -> None:
    """The JSON schemas that constrain one answer, within MAX_JSON_DEPTH and OpenAI's Structured Outputs limits.

    Counted over all of them together (a request that may force any of 128
    tools compiles one grammar of all their parameters).
    """
    properties = enum_values = chars = 0
    for schema in schemas:
        check_depth(schema, what, param)
        pending = [schema]
        while pending:
            value = pending.pop()
            if isinstance(value, list):
                pending.extend(value)
                continue
            if not isinstance(value, dict):
                continue
            for key in ("properties", "$defs", "definitions", "patternProperties"):
                named = value.get(key)
                if isinstance(named, dict):
                    if key == "properties":
                        properties += len(named)
                    chars += sum(len(name) for name in named)
            for key in ("enum", "const"):
                if key in value:
                    values = value[key] if key == "enum" and isinstance(value[key], list) else [value[key]]
                    enum_values += len(values)
                    chars += sum(len(item) if isinstance(item, str) else len(json.dumps(item)) for item in values)
            pending.extend(value.values())
    for count, limit, unit in ((properties, MAX_SCHEMA_PROPERTIES, "object properties"),
                               (enum_values, MAX_SCHEMA_ENUM_VALUES, "enum and const values"),
                               (chars, MAX_SCHEMA_STRING_CHARS, "characters of names, enum and const values")):
        if count > limit:
            raise OperationError(f"{what} has {count} {unit}: at most {limit} are allowed (docs/limits.md)",
                                 param=param)
