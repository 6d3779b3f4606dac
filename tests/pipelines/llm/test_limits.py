"""pipelines/llm/limits.py: the bounds a schema cannot say, and the path parameters' bounds that openapi.yaml says."""

from __future__ import annotations

import pytest
import yaml

from pipelines.llm.limits import PATH_PARAMETER_LENGTHS, path_parameter
from runner.pipeline import OperationError
from tests.support.runner_process import ROOT


def test_every_path_parameter_is_bounded_in_the_spec_as_in_the_code():
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    bounds = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert "maxLength" in parameter["schema"], (method, path, parameter["name"])
                    bounds.setdefault(parameter["name"], set()).add(parameter["schema"]["maxLength"])
    assert {name: {limit} for name, limit in PATH_PARAMETER_LENGTHS.items()} == bounds


@pytest.mark.parametrize("name", sorted(PATH_PARAMETER_LENGTHS))
def test_a_path_parameter_past_its_bound_is_a_400_naming_it(name):
    limit = PATH_PARAMETER_LENGTHS[name]
    assert path_parameter({name: "x" * limit}, name) == "x" * limit
    with pytest.raises(OperationError) as refused:
        path_parameter({name: "x" * (limit + 1)}, name)
    assert refused.value.status == 400 and refused.value.param == name
    assert f"at most {limit}" in str(refused.value)
