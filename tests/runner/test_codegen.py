"""runner/schema.py must be what `make gen` makes of openapi.yaml today."""

import pytest

from runner import codegen


def test_schema_module_is_generated_from_the_current_spec():
    assert codegen.OUTPUT_PATH.read_text() == codegen.render(), "runner/schema.py is stale: run `make gen`"


def test_generator_refuses_what_it_cannot_express():
    spec = {"components": {"schemas": {"Odd": {"type": "object", "properties": {"x": {"type": "null"}}}}}, "paths": {}}
    with pytest.raises(codegen.SpecError):
        codegen.generate(spec)


def test_constraints_and_defaults_reach_the_models():
    from runner.schema import LLMRequest

    fields = LLMRequest.model_fields
    assert fields["max_tokens"].default == 256
    assert fields["temperature"].default == 0.7
    assert LLMRequest.model_json_schema()["properties"]["top_p"]["exclusiveMinimum"] == 0


def test_integers_are_json_schema_integers():
    """5.0 and 1e2 are integers to JSON Schema, so to the spec's clients; 2.5, "5" and true are not."""
    import pydantic

    from runner.schema import LLMRequest

    def max_tokens(raw: str) -> int:
        return LLMRequest.model_validate_json(f'{{"messages": [], "max_tokens": {raw}}}', strict=True).max_tokens

    assert max_tokens("5.0") == 5 and max_tokens("1e2") == 100
    for raw in ("2.5", '"5"', "true", "1e400"):
        with pytest.raises(pydantic.ValidationError, match="max_tokens"):
            max_tokens(raw)
