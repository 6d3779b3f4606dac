"""The route layer: binds a handler to every operation the runner serves.

The operations and their request models are generated from the spec (the
runner's own in ``runner/schema.py``, each pipeline's in a module of its own),
so the HTTP surface cannot drift from it: an operation without a handler, a
handler without an operation, or two operations on one route stop the app from
being built. Bodies are parsed and validated here, before any handler runs, and every
error leaves in the spec's shapes.
"""

from __future__ import annotations

import hmac
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import pydantic
from aiohttp import web

from runner.error_documents import anthropic_error_document, openai_error_document
from runner.keys import OFFLOAD
from runner.offload import LARGE_BODY_BYTES
from runner.operations import Operation
from runner.schema import (
    OPERATIONS,
    APIErrorMessage,
    HTTPError,
    HTTPValidationError,
    ValidationError,
)

Handler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


class RouteBindingError(RuntimeError):
    pass


def json_response(model: pydantic.BaseModel, status: int = 200, **kwargs: Any) -> web.Response:
    """The model as JSON: what was set, a null included (a required nullable field), and nothing left unset."""
    return web.Response(
        body=model.model_dump_json(exclude_unset=True, by_alias=True),
        status=status,
        content_type="application/json",
        **kwargs,
    )


def error_response(status: int, msg: str, **kwargs: Any) -> web.Response:
    return json_response(HTTPError(detail=APIErrorMessage(msg=msg)), status=status, **kwargs)


def validation_error_response(errors: Iterable[ValidationError]) -> web.Response:
    return json_response(HTTPValidationError(detail=list(errors)), status=422)


def body_errors(exc: pydantic.ValidationError) -> list[ValidationError]:
    return [
        ValidationError(loc=["body", *error["loc"]], msg=error["msg"], type=error["type"])
        for error in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


class InvalidBody(Exception):
    def __init__(self, errors: list[ValidationError]) -> None:
        super().__init__(errors)
        self.errors = errors


async def parse_body(request: web.Request, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    """Read and validate a JSON body; raise InvalidBody when it does not match the spec."""
    if request.content_type != "application/json":
        raise InvalidBody(
            [ValidationError(loc=["body"], msg="Content-Type must be application/json", type="content_type")]
        )
    raw = await request.read()  # raises 413 beyond the app's client_max_size
    try:
        # Strict: the spec's types are the contract; "0.5" is not a number, "yes" not a boolean.
        if len(raw) >= LARGE_BODY_BYTES:  # a large body takes milliseconds to validate: not on the loop
            return await request.app[OFFLOAD].run(model.model_validate_json, raw, strict=True)
        return model.model_validate_json(raw, strict=True)
    except pydantic.ValidationError as exc:
        raise InvalidBody(body_errors(exc)) from None


class LivepeerErrors:
    """The Livepeer runner's error shapes: ``{"detail": {"msg"}}``, and 422 with every field for a bad body."""

    def error(self, status: int, msg: str, param: str | None = None, code: str | None = None, **kwargs: Any):
        return error_response(status, msg, **kwargs)

    def invalid_body(self, errors: list[ValidationError]) -> web.Response:
        return validation_error_response(errors)


def telling_error(errors: list[ValidationError]) -> tuple[ValidationError, str | None]:
    """The body error that says most, and the request field it names (dotted, e.g. ``messages.0.content``)."""
    # Of a union's failures ("not a string", "more than 4 items"), the one that says most.
    first = min(errors, key=lambda error: (error.type.endswith("_type"), -len(error.loc)))
    # pydantic names the union member it tried (stop.list[str], tool_choice.NamedToolChoice): not a param.
    location = [str(part) for part in first.loc[1:] if not UNION_MEMBER.fullmatch(str(part))]
    if "[key]" in location:  # a key past its bound (logit_bias, metadata): the object is the param, not the key
        location = location[:location.index("[key]") - 1]
    location = [part[:LOCATION_PART_LENGTH] for part in location]  # a client's key is echoed at most this long
    return first, ".".join(location) or None


class OpenAIErrors:
    """OpenAI's error shape, which its SDKs read on every error: ``{"error": {"message", "type", "param", "code"}}``."""

    def error(self, status: int, msg: str, param: str | None = None, code: str | None = None, **kwargs: Any):
        body = openai_error_document(status, msg, param, code)
        return web.Response(body=body, status=status, content_type="application/json", **kwargs)

    def invalid_body(self, errors: list[ValidationError]) -> web.Response:
        first, param = telling_error(errors)
        if first.type == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        else:
            msg = f"{param}: {first.msg}" if param else first.msg
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more)"
        return self.error(400, msg, param=param)


class AnthropicErrors:
    """Anthropic's error shape, which its SDK reads on every error: ``{"type": "error", "error": {"type", "message"}}``."""

    def error(self, status: int, msg: str, param: str | None = None, code: str | None = None, **kwargs: Any):
        body = anthropic_error_document(status, msg)
        return web.Response(body=body, status=status, content_type="application/json", **kwargs)

    def invalid_body(self, errors: list[ValidationError]) -> web.Response:
        first, param = telling_error(errors)
        msg = f"{param}: {first.msg}" if param else first.msg  # as Anthropic words it: "max_tokens: Field required"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more)"
        return self.error(400, msg, param=param)


LOCATION_PART_LENGTH = 64
UNION_MEMBER = re.compile(r"[A-Z]\w*|str|int|float|bool|none|literal\[.*\]|(list|dict|function-\w+)\[.*\]")
ERROR_SHAPES = {"livepeer": LivepeerErrors(), "openai": OpenAIErrors(), "anthropic": AnthropicErrors()}
ErrorShape = LivepeerErrors | OpenAIErrors | AnthropicErrors


def same_secret(presented: str, token: str) -> bool:
    """Whether a header's value is the token, in constant time; a value of any bytes (aiohttp decodes headers as
    Latin-1 or with surrogates) is compared, never raised on."""
    return hmac.compare_digest(presented.strip().encode("utf-8", "surrogatepass"), token.encode())


def bearer_token_matches(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and same_secret(presented, token)


def key_matches(request: web.Request, token: str, key_headers: tuple[str, ...] = ()) -> bool:
    """The bearer token, or the key in one of the operation's own key headers (Anthropic's x-api-key)."""
    if bearer_token_matches(request, token):
        return True
    return any(same_secret(request.headers[name], token) for name in key_headers if name in request.headers)


def endpoint(operation: Operation, handler: Handler, auth_token: str | None) -> Callable:
    errors = ERROR_SHAPES[operation.error_shape]
    key_headers = operation.key_headers
    refusal = "Invalid bearer token" if not key_headers else (
        f"Invalid API key: send it as `Authorization: Bearer <key>` or in the {' or '.join(key_headers)} header")

    async def handle(request: web.Request) -> web.StreamResponse:
        if operation.authenticated and auth_token and not key_matches(request, auth_token, key_headers):
            return errors.error(401, refusal, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        body = None
        if operation.request_model is not None:
            try:
                body = await parse_body(request, operation.request_model)
            except InvalidBody as invalid:
                return errors.invalid_body(invalid.errors)
        return await handler(request, body)

    handle.__name__ = operation.operation_id
    return handle


def bind_operations(
    app: web.Application,
    handlers: Mapping[str, Handler],
    auth_token: str | None = None,
    operations: Iterable[Operation] = OPERATIONS,
) -> None:
    operations = tuple(operations)
    routes = [(operation.method, operation.path) for operation in operations]
    ids = [operation.operation_id for operation in operations]
    for kind, seen in (("route", routes), ("operationId", ids)):
        twice = sorted({str(item) for item in seen if seen.count(item) > 1})
        if twice:
            raise RouteBindingError(f"more than one operation has the {kind} {', '.join(twice)}")
    spec_ids = set(ids)
    unbound = sorted(spec_ids - handlers.keys())
    unknown = sorted(handlers.keys() - spec_ids)
    if unbound or unknown:
        raise RouteBindingError(
            f"the operations and their handlers disagree: operations without a handler {unbound}, "
            f"handlers without an operation {unknown}"
        )
    for operation in operations:
        app.router.add_route(
            operation.method, route_path(operation.path), endpoint(operation, handlers[operation.operation_id], auth_token)
        )


def route_path(spec_path: str) -> str:
    """aiohttp's form of a spec path: a parameter may hold slashes (``/v1/models/{model}`` takes ``org/name``)."""
    return re.sub(r"\{(\w+)\}", r"{\1:.+}", spec_path)


def shared_segments(path: list[str], spec_path: list[str]) -> int:
    """How many leading segments a request path shares with an operation's (a ``{parameter}`` matches any)."""
    shared = 0
    for part, spec_part in zip(path, spec_path):
        if part != spec_part and not spec_part.startswith("{"):
            break
        shared += 1
    return shared


def error_shape_for(path: str, operations: Iterable[Operation]) -> ErrorShape:
    """The error shape of the API a path belongs to: that of the operation whose path it shares most of.

    /v1 holds more than one API (OpenAI's, Anthropic's): /v1/messages/batches
    is Anthropic's. Where operations of several shapes share as much of it
    (/v1/embeddings), the shape most of them use: /v1 is mostly OpenAI's. A
    path that shares no segment with any operation is the runner's.
    """
    parts = path.strip("/").split("/")
    best, votes = 0, Counter(["livepeer"])
    for operation in operations:
        shared = shared_segments(parts, operation.path.strip("/").split("/"))
        if shared > best:
            best, votes = shared, Counter()
        if shared == best and shared:
            votes[operation.error_shape] += 1
    return ERROR_SHAPES[votes.most_common(1)[0][0]]


def error_middleware(operations: Iterable[Operation]) -> Callable:
    """Answers aiohttp's own errors (404, 405, 413, ...) in the shape of the API the path belongs to."""
    operations = tuple(operations)

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kept = {name: exc.headers[name] for name in ("Allow", "Retry-After") if name in exc.headers}
            return error_shape_for(request.path, operations).error(exc.status, exc.reason, headers=kept)

    return middleware
