"""What the route layer needs to know of one operation of openapi.yaml."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    path: str
    request_model: type[BaseModel] | None
    authenticated: bool
    # How its errors are written: "livepeer" ({"detail": ...}, 422 for a bad body),
    # "openai" ({"error": {"message", "type", "param", "code"}}, 400 for a bad body) or
    # "anthropic" ({"type": "error", "error": {"type", "message"}}, 400 for a bad body).
    error_shape: str = "livepeer"
    # Request headers that may carry the API key besides `Authorization: Bearer` (the
    # spec's apiKey security schemes in a header, lower case), e.g. Anthropic's x-api-key.
    key_headers: tuple[str, ...] = ()
