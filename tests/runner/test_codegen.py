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
