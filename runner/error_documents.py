"""The error documents of the APIs the runner speaks, as their SDKs read them.

Used by the route layer for refusals and by pipelines (through runner.pipeline) for a
stream's failed ending; it depends on the generated schema only, so both can import it.
"""

from __future__ import annotations

from runner.schema import AnthropicError, AnthropicErrorDetail, OpenAIError, OpenAIErrorDetail


def openai_error_document(status: int, msg: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error document, as its SDKs read it in an error response and in a stream's failed ending."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    detail = OpenAIErrorDetail(message=msg, type=kind, param=param, code=code)
    return OpenAIError(error=detail).model_dump_json().encode()  # param and code are null, not left out


# Anthropic's error type for each status (https://docs.anthropic.com/en/api/errors); its SDK raises by status.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}


def anthropic_error_document(status: int, msg: str) -> bytes:
    """Anthropic's error document, as its SDK reads it in an error response and in a stream's ``error`` event."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return AnthropicError(type="error", error=AnthropicErrorDetail(type=kind, message=msg)).model_dump_json().encode()
