"""The aiohttp application: ``create_app(settings)`` builds the whole runner."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from pipelines.base import Pipeline, pipeline_class
from runner.handlers import RUNNER_HANDLERS, pipeline_handler
from runner.hardware import NVML as NVMLReader
from runner.keys import METRICS, NVML, REQUEST_ID, SETTINGS, STATE
from runner.metrics import RunnerMetrics
from runner.routes import RouteBindingError, bind_operations, error_middleware
from runner.settings import RunnerSettings
from runner.state import RunnerState

log = structlog.get_logger(__name__)


@web.middleware
async def request_context_middleware(request: web.Request, handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        return await handler(request)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


async def nvml_ctx(app: web.Application) -> AsyncIterator[None]:
    app[NVML] = NVMLReader()
    yield
    app[NVML].close()


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the pipeline in the background: the server answers /health meanwhile."""
    state = app[STATE]
    loading = asyncio.create_task(state.load(), name="pipeline-load")
    yield
    loading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    await state.pipeline.close()
    log.info("pipeline.closed")


def create_app(settings: RunnerSettings, pipeline: Pipeline | None = None) -> web.Application:
    if pipeline is None:
        pipeline = pipeline_class(settings.pipeline)(settings.model_id, settings.model_dir)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[request_context_middleware, error_middleware],
    )
    state = RunnerState(pipeline=pipeline, load_wait_timeout=settings.load_wait_timeout)
    app[SETTINGS] = settings
    app[STATE] = state
    app[METRICS] = RunnerMetrics(state)

    handlers = dict(RUNNER_HANDLERS)
    for operation_id, operation in pipeline.operations().items():
        if operation_id in handlers:
            raise RouteBindingError(f"pipeline {pipeline.name!r} redefines the runner's operation {operation_id!r}")
        handlers[operation_id] = pipeline_handler(operation_id, operation)
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    bind_operations(app, handlers, auth_token=token)

    app.on_response_prepare.append(add_request_id_header)
    app.cleanup_ctx.extend([nvml_ctx, pipeline_ctx])
    return app
