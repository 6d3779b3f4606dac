"""Generate the protocol modules from ``openapi.yaml``: ``python -m runner.codegen``.

The spec is the single source of truth for the HTTP surface. This turns its
component schemas into pydantic models and its operations into tables that the
route layer binds handlers to. The spec is cut in parts: what carries no
``x-pipeline`` is the runner's own (``runner/schema.py``); what carries
``x-pipeline: NAME`` belongs to that pipeline, whose module the spec's
``x-pipeline-modules`` names. A pipeline's models may use the runner's (its
module imports them from ``runner/pipeline.py``, the pipelines' contract, which
re-exports them), never the other way round. Only the parts of JSON Schema
the spec uses are supported; anything else is an error here rather than a
silently wrong model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
RUNNER_PART = None  # the operations and components without x-pipeline
RUNNER_MODULE = "runner/schema.py"
CONTRACT_MODULE = "runner/pipeline.py"  # where a pipeline's module imports the runner's models it uses

HEADER = '''\
# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.jsontypes import Integer
from runner.operations import Operation
'''

# JSON Schema's integer is any number without a fractional part, 5.0 included.
SCALARS = {"string": "str", "integer": "Integer", "number": "float", "boolean": "bool"}
CONSTRAINTS = {
    "minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
    "minItems": "min_length", "maxItems": "max_length", "minLength": "min_length", "maxLength": "max_length",
    "minProperties": "min_length", "maxProperties": "max_length",
}
ANNOTATIONS = {"description", "title", "examples"}  # say nothing of the type
# Every keyword a schema may use here; any other (a misspelt bound, a description that YAML cut into a key of its own)
# would leave the models silently looser than the spec.
KEYWORDS = ANNOTATIONS | set(CONSTRAINTS) | {
    "type", "anyOf", "$ref", "enum", "const", "items", "properties", "required", "additionalProperties",
    "propertyNames", "default", "x-pipeline",
}
# Field names that BaseModel's own attributes would shadow: generated as NAME_ with the alias NAME.
RESERVED = {"schema", "json", "copy", "dict", "validate", "construct", "fields"}
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


class SpecError(ValueError):
    pass


def ref_name(ref: str) -> str:
    prefix = "#/components/schemas/"
    if not ref.startswith(prefix):
        raise SpecError(f"unsupported $ref {ref!r}")
    return ref[len(prefix):]


def type_expr(schema: dict[str, Any], in_any_of: bool = False, constrained: bool = True) -> str:
    """The annotation for ``schema``; its constraints ride along (Annotated) unless the caller writes them."""
    unknown = sorted(str(key) for key in set(schema) - KEYWORDS)
    if unknown:
        raise SpecError(f"unsupported keywords {unknown} in {schema!r}")
    constraints = [f"{CONSTRAINTS[key]}={schema[key]!r}" for key in CONSTRAINTS if key in schema]
    if constrained and constraints:
        inner = type_expr(schema, in_any_of, constrained=False)
        return f"Annotated[{inner}, Field({', '.join(constraints)})]"
    if "$ref" in schema:
        return ref_name(schema["$ref"])
    if "anyOf" in schema:
        return " | ".join(type_expr(option, in_any_of=True) for option in schema["anyOf"])
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(value) for value in schema["enum"]) + "]"
    if "const" in schema:
        return f"Literal[{schema['const']!r}]"
    if not set(schema) - ANNOTATIONS:  # the empty schema: any JSON value
        return "Any"
    kind = schema.get("type")
    if kind == "null" and in_any_of:  # nullable: anyOf [X, {type: "null"}]
        return "None"
    if kind == "array":
        return f"list[{type_expr(schema['items'])}]"
    if kind == "object":
        if "properties" in schema:
            raise SpecError("an inline object with properties must be a component of its own")
        values = schema.get("additionalProperties", True)
        names = schema.get("propertyNames", {})  # the keys' own bounds, e.g. {maxLength: 64}
        if set(names) - {"type", "minLength", "maxLength"} or names.get("type", "string") != "string":
            raise SpecError(f"propertyNames may only bound a key's length, not {names!r}")
        keys = type_expr({**names, "type": "string"})
        if values is True:  # a free-form object, e.g. a JSON schema or a function's parameters
            return f"dict[{keys}, Any]"
        if not isinstance(values, dict):
            raise SpecError("an inline object needs additionalProperties with a schema")
        return f"dict[{keys}, {type_expr(values)}]"
    if kind in SCALARS:
        return SCALARS[kind]
    raise SpecError(f"unsupported schema {schema!r}")


def field_line(name: str, schema: dict[str, Any], required: bool) -> str:
    annotation = type_expr(schema, constrained=False)
    args = [f"{CONSTRAINTS[key]}={schema[key]!r}" for key in CONSTRAINTS if key in schema]
    if name in RESERVED:
        args.append(f"alias={name!r}")
        name += "_"
    if "default" in schema:
        default = schema["default"]
    elif required:
        default = ...
    else:
        if "None" not in annotation.split(" | "):
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
    unknown = sorted(str(key) for key in set(schema) - KEYWORDS)
    if unknown:
        raise SpecError(f"component {name!r}: unsupported keywords {unknown}")
    required = set(schema.get("required", []))
    lines = [f"class {name}(BaseModel):"]
    if "description" in schema:
        lines.append(f"    {schema['description']!r}")
        lines.append("")
    if schema.get("additionalProperties") is False:  # an unknown field is an error, not ignored
        lines.append('    model_config = ConfigDict(extra="forbid")')
        lines.append("")
    for field, field_schema in schema["properties"].items():
        lines.append(field_line(field, field_schema, field in required))
    return "\n".join(lines)


def operations_source(spec: dict[str, Any], part: str | None) -> str:
    default_security = spec.get("security", [])
    lines = ["OPERATIONS: tuple[Operation, ...] = ("]
    for path, path_item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method not in path_item or path_item[method].get("x-pipeline") != part:
                continue
            operation = path_item[method]
            body_schema = (
                operation.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("schema")
            )
            request_model = ref_name(body_schema["$ref"]) if body_schema else None
            security = operation.get("security", default_security)
            headers = key_headers(spec, operation["operationId"], security)
            lines += [
                "    Operation(",
                f"        operation_id={operation['operationId']!r},",
                f"        method={method.upper()!r},",
                f"        path={path!r},",
                f"        request_model={request_model},",
                f"        authenticated={bool(security)!r},",
                f"        error_shape={operation.get('x-error-shape', 'livepeer')!r},",
                *([f"        key_headers={headers!r},"] if headers else []),
                "    ),",
            ]
    lines.append(")")
    return "\n".join(lines)


def key_headers(spec: dict[str, Any], operation_id: str, security: list[dict[str, list]]) -> tuple[str, ...]:
    """The headers besides the bearer token that may carry an operation's key: its apiKey schemes in a header.

    The route layer always takes the bearer token of an authenticated
    operation, so its security must offer the bearer scheme; the schemes are
    alternatives (OpenAPI's list of requirements), each of one scheme.
    """
    schemes = spec.get("components", {}).get("securitySchemes", {})
    bearer, headers = False, []
    for requirement in security:
        if len(requirement) != 1:
            raise SpecError(f"{operation_id}: each security requirement must name one scheme, not {requirement!r}")
        [name] = requirement
        scheme = schemes.get(name)
        if scheme is None:
            raise SpecError(f"{operation_id}: unknown security scheme {name!r}")
        if scheme.get("type") == "http" and scheme.get("scheme") == "bearer":
            bearer = True
        elif scheme.get("type") == "apiKey" and scheme.get("in") == "header":
            headers.append(scheme["name"].lower())
        else:
            raise SpecError(f"{operation_id}: security scheme {name!r} is neither a bearer token nor a header key")
    if security and not bearer:
        raise SpecError(f"{operation_id}: an authenticated operation must accept the bearer token")
    return tuple(headers)


def part_of(item: dict[str, Any]) -> str | None:
    return item.get("x-pipeline")


def parts(spec: dict[str, Any]) -> dict[str | None, str]:
    """Each part of the spec with the module generated for it, relative to the root."""
    modules: dict[str | None, str] = {RUNNER_PART: RUNNER_MODULE}
    modules.update(spec.get("x-pipeline-modules", {}))
    used = {part_of(schema) for schema in spec["components"]["schemas"].values()}
    used |= {part_of(op) for item in spec["paths"].values() for m, op in item.items() if m in HTTP_METHODS}
    unnamed = sorted(str(part) for part in used - modules.keys())
    if unnamed:
        raise SpecError(f"x-pipeline-modules names no module for the parts {unnamed}")
    return modules


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def generate(spec: dict[str, Any], part: str | None = RUNNER_PART) -> str:
    """The module of one part: its models, in dependency order, and its operations."""
    schemas = spec["components"]["schemas"]
    own = [name for name in dependency_order(schemas) if part_of(schemas[name]) == part]
    borrowed: set[str] = set()
    for name in own:
        for dependency in dependencies(schemas[name]):
            owner = part_of(schemas[dependency])
            if owner == part:
                continue
            if owner is not RUNNER_PART:
                raise SpecError(f"{name!r} ({part or 'runner'}) uses {dependency!r} of the pipeline {owner!r}")
            borrowed.add(dependency)
    header = HEADER
    if borrowed:
        header += f"from {module_name(CONTRACT_MODULE)} import {', '.join(sorted(borrowed))}\n"
    models = [model_source(name, schemas[name]) for name in own]
    return header + "\n\n" + "\n\n\n".join(models) + "\n\n\n" + operations_source(spec, part) + "\n"


def render(spec_path: Path = SPEC_PATH) -> dict[Path, str]:
    """Every generated module's path and source."""
    spec = yaml.safe_load(spec_path.read_text())
    return {ROOT / module: generate(spec, part) for part, module in parts(spec).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated module is stale")
    args = parser.parse_args(argv)
    sources = render()
    if args.check:
        stale = [path for path, source in sources.items() if not path.exists() or path.read_text() != source]
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run `make gen`", file=sys.stderr)
        return 1 if stale else 0
    for path, source in sources.items():
        path.write_text(source)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
