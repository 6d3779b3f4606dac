"""JSON Schema's scalar types where pydantic's strict ones differ from them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def integral_number(value: Any) -> Any:
    # 5.0 and 1e2 are integers to JSON Schema (and to openapi.yaml's clients); 2.5 is not.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# Strict validation still refuses "5", true and 2.5.
Integer = Annotated[int, BeforeValidator(integral_number)]
