"""The protocol modules must be what `make gen` makes of openapi.yaml today, each part in its own."""

import pytest

from runner import codegen


def test_every_module_is_generated_from_the_current_spec():
    sources = codegen.render()
    assert {path.relative_to(codegen.ROOT).as_posix() for path in sources} == {
        "runner/schema.py", "pipelines/llm/schema.py"
    }
    for path, source in sources.items():
        assert path.read_text() == source, f"{path} is stale: run `make gen`"


def part_spec(runner_uses_pipeline: bool = False) -> dict:
    return {
        "x-pipeline-modules": {"echo": "pipelines/echo_schema.py"},
        "paths": {
            "/echo": {"post": {"operationId": "echo", "x-pipeline": "echo", "requestBody": {
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EchoRequest"}}}}}},
            "/health": {"get": {"operationId": "health", "security": []}},
        },
        "components": {"schemas": {
            "Shared": {"type": "object", "properties": {"msg": {"type": "string"}}},
            "EchoRequest": {"x-pipeline": "echo", "type": "object",
                            "properties": {"text": {"type": "string"}, "note": {"$ref": "#/components/schemas/Shared"}}},
            "Health": {"type": "object", "properties": {
                "echo": {"$ref": "#/components/schemas/EchoRequest"} if runner_uses_pipeline else {"type": "string"}}},
        }},
    }


def test_each_part_gets_its_own_models_and_operations():
    pipeline_source = codegen.generate(part_spec(), "echo")
    runner_source = codegen.generate(part_spec())
    assert "class EchoRequest" in pipeline_source and "class Shared" not in pipeline_source
    assert "from runner.pipeline import Shared" in pipeline_source, "through the pipelines' contract"
    assert "operation_id='echo'" in pipeline_source and "operation_id='health'" not in pipeline_source
    assert "class EchoRequest" not in runner_source and "operation_id='echo'" not in runner_source


def test_the_runner_part_may_not_use_a_pipelines_models():
    with pytest.raises(codegen.SpecError, match="EchoRequest"):
        codegen.generate(part_spec(runner_uses_pipeline=True))


def test_a_part_without_a_module_is_refused():
    spec = part_spec()
    spec["x-pipeline-modules"] = {}
    with pytest.raises(codegen.SpecError, match="echo"):
        codegen.parts(spec)


def test_generator_refuses_what_it_cannot_express():
    spec = {"components": {"schemas": {"Odd": {"type": "object", "properties": {"x": {"type": "null"}}}}}, "paths": {}}
    with pytest.raises(codegen.SpecError):
        codegen.generate(spec)


def test_constraints_and_defaults_reach_the_models():
    from pipelines.llm.schema import LLMRequest

    fields = LLMRequest.model_fields
    assert fields["max_tokens"].default == 256
    assert fields["temperature"].default == 0.7
    assert LLMRequest.model_json_schema()["properties"]["top_p"]["exclusiveMinimum"] == 0


def test_integers_are_json_schema_integers():
    """5.0 and 1e2 are integers to JSON Schema, so to the spec's clients; 2.5, "5" and true are not."""
    import pydantic

    from pipelines.llm.schema import LLMRequest

    def max_tokens(raw: str) -> int:
        return LLMRequest.model_validate_json(f'{{"messages": [], "max_tokens": {raw}}}', strict=True).max_tokens

    assert max_tokens("5.0") == 5 and max_tokens("1e2") == 100
    for raw in ("2.5", '"5"', "true", "1e400"):
        with pytest.raises(pydantic.ValidationError, match="max_tokens"):
            max_tokens(raw)


def secured_spec(*security: dict) -> dict:
    return {
        "paths": {"/msg": {"post": {"operationId": "msg", "security": list(security)}}},
        "components": {"schemas": {}, "securitySchemes": {
            "HTTPBearer": {"type": "http", "scheme": "bearer"},
            "Key": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            "QueryKey": {"type": "apiKey", "in": "query", "name": "key"},
        }},
    }


def test_an_api_key_header_scheme_becomes_the_operations_key_header():
    source = codegen.generate(secured_spec({"HTTPBearer": []}, {"Key": []}))
    assert "key_headers=('x-api-key',)" in source and "authenticated=True" in source
    assert "key_headers" not in codegen.generate(secured_spec({"HTTPBearer": []}))


@pytest.mark.parametrize("security", [({"Key": []},), ({"QueryKey": []}, {"HTTPBearer": []}),
                                      ({"HTTPBearer": [], "Key": []},), ({"Nobody": []},)],
                         ids=["no bearer", "a query key", "both at once", "unknown"])
def test_security_the_route_layer_cannot_honour_is_refused(security):
    with pytest.raises(codegen.SpecError, match="msg"):
        codegen.generate(secured_spec(*security))


@pytest.mark.parametrize("field", [{"type": "array", "items": {"type": "string"}, "maxitems": 4},
                                   {"type": "string", "pattern": "^a$"},
                                   {"type": "string", "description": "a", "so on.": None}],
                         ids=["a misspelt bound", "a keyword the generator does not know", "a description YAML cut"])
def test_a_keyword_the_generator_cannot_honour_is_refused(field):
    spec = {"components": {"schemas": {"Odd": {"type": "object", "properties": {"x": field}}}}, "paths": {}}
    with pytest.raises(codegen.SpecError, match="unsupported keywords"):
        codegen.generate(spec)


def test_object_bounds_reach_the_models():
    """maxProperties bounds an object's keys' count, propertyNames their length, as pydantic's max_length."""
    import pydantic

    spec = {"components": {"schemas": {"Tagged": {"type": "object", "properties": {"tags": {
        "type": "object", "maxProperties": 2, "propertyNames": {"maxLength": 3},
        "additionalProperties": {"type": "string", "maxLength": 4}}}}}}, "paths": {}}
    namespace: dict = {}
    exec(codegen.generate(spec), namespace)
    tagged = namespace["Tagged"]
    tagged.model_rebuild(_types_namespace=namespace)
    assert tagged.model_validate({"tags": {"abc": "abcd", "d": ""}}).tags == {"abc": "abcd", "d": ""}
    for tags in ({"a": "", "b": "", "c": ""}, {"abcd": ""}, {"a": "abcde"}):
        with pytest.raises(pydantic.ValidationError, match="tags"):
            tagged.model_validate({"tags": tags})
