"""Generate ``runner/schema.py`` from ``openapi.yaml``: ``python -m runner.codegen``.

The spec is the single source of truth for the HTTP surface. This turns its
component schemas into pydantic models and its operations into a table that the
route layer binds handlers to. Only the parts of JSON Schema the spec uses are
supported; anything else is an error here rather than a silently wrong model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
OUTPUT_PATH = Path(__file__).resolve().parent / "schema.py"

HEADER = '''\
# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from runner.jsontypes import Integer
from runner.operations import Operation
'''

# JSON Schema's integer is any number without a fractional part, 5.0 included.
SCALARS = {"string": "str", "integer": "Integer", "number": "float", "boolean": "bool"}
CONSTRAINTS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt"}
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


class SpecError(ValueError):
    pass


def ref_name(ref: str) -> str:
    prefix = "#/components/schemas/"
    if not ref.startswith(prefix):
        raise SpecError(f"unsupported $ref {ref!r}")
    return ref[len(prefix):]


def type_expr(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return ref_name(schema["$ref"])
    if "anyOf" in schema:
        return " | ".join(type_expr(option) for option in schema["anyOf"])
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(value) for value in schema["enum"]) + "]"
    kind = schema.get("type")
    if kind == "array":
        return f"list[{type_expr(schema['items'])}]"
    if kind == "object":
        values = schema.get("additionalProperties")
        if not isinstance(values, dict):
            raise SpecError("an inline object needs additionalProperties with a schema")
        return f"dict[str, {type_expr(values)}]"
    if kind in SCALARS:
        return SCALARS[kind]
    raise SpecError(f"unsupported schema {schema!r}")


def field_line(name: str, schema: dict[str, Any], required: bool) -> str:
    annotation = type_expr(schema)
    args = [f"{CONSTRAINTS[key]}={schema[key]!r}" for key in CONSTRAINTS if key in schema]
    if "default" in schema:
        default = schema["default"]
    elif required:
        default = ...
    else:
        annotation += " | None"
        default = None
    if not args:
        return f"    {name}: {annotation}" + ("" if default is ... else f" = {default!r}")
    default_arg = [] if default is ... else [f"default={default!r}"]
    return f"    {name}: {annotation} = Field({', '.join(default_arg + args)})"


def dependencies(schema: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    if isinstance(schema, dict):
        if "$ref" in schema:
            found.add(ref_name(schema["$ref"]))
        for value in schema.values():
            found |= dependencies(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= dependencies(value)
    return found


def dependency_order(schemas: dict[str, dict[str, Any]]) -> list[str]:
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise SpecError(f"recursive schema {name!r} is not supported")
        if name not in schemas:
            raise SpecError(f"$ref to unknown schema {name!r}")
        visiting.add(name)
        for dependency in sorted(dependencies(schemas[name])):
            visit(dependency)
        visiting.discard(name)
        ordered.append(name)

    for name in schemas:
        visit(name)
    return ordered


def model_source(name: str, schema: dict[str, Any]) -> str:
    if schema.get("type") != "object" or "properties" not in schema:
        raise SpecError(f"component {name!r} must be an object with properties")
    required = set(schema.get("required", []))
    lines = [f"class {name}(BaseModel):"]
    if "description" in schema:
        lines.append(f"    {schema['description']!r}")
        lines.append("")
    for field, field_schema in schema["properties"].items():
        lines.append(field_line(field, field_schema, field in required))
    return "\n".join(lines)


def operations_source(spec: dict[str, Any]) -> str:
    default_security = spec.get("security", [])
    lines = ["OPERATIONS: tuple[Operation, ...] = ("]
    for path, path_item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method not in path_item:
                continue
            operation = path_item[method]
            body_schema = (
                operation.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("schema")
            )
            request_model = ref_name(body_schema["$ref"]) if body_schema else None
            authenticated = bool(operation.get("security", default_security))
            lines += [
                "    Operation(",
                f"        operation_id={operation['operationId']!r},",
                f"        method={method.upper()!r},",
                f"        path={path!r},",
                f"        request_model={request_model},",
                f"        authenticated={authenticated!r},",
                "    ),",
            ]
    lines.append(")")
    return "\n".join(lines)


def generate(spec: dict[str, Any]) -> str:
    schemas = spec["components"]["schemas"]
    models = [model_source(name, schemas[name]) for name in dependency_order(schemas)]
    return HEADER + "\n\n" + "\n\n\n".join(models) + "\n\n\n" + operations_source(spec) + "\n"


def render(spec_path: Path = SPEC_PATH) -> str:
    return generate(yaml.safe_load(spec_path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if schema.py is stale")
    args = parser.parse_args(argv)
    source = render()
    if args.check:
        if OUTPUT_PATH.read_text() != source:
            print(f"{OUTPUT_PATH} is stale: run `make gen`", file=sys.stderr)
            return 1
        return 0
    OUTPUT_PATH.write_text(source)
    print(f"wrote {OUTPUT_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
