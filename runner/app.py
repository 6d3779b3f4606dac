"""The aiohttp application: ``create_app(settings)`` builds the whole runner."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator

import aiohttp
import pydantic
import structlog
from aiohttp import web

from runner import __version__
from runner.handlers import RUNNER_HANDLERS, pipeline_handler
from runner.hardware import NVML as NVMLReader
from runner.keys import LIVE_RUNNER, METRICS, NVML, OFFLOAD, REQUEST_ID, SETTINGS, STATE
from runner.live_runner import UNREGISTER_TIMEOUT, LiveRunnerSettings, Registration, gpu_entry
from runner.metrics import RunnerMetrics
from runner.offload import Offload
from runner.pipeline import Pipeline, PipelineUnavailable, pipeline_class
from runner.processes import (
    PROCESS_HEADER,
    APIProcesses,
    ExtraConfig,
    ProcessesCollector,
    SharedState,
    asking_primary,
    summing_metrics,
)
from runner.routes import Handler, RouteBindingError, bind_operations, error_middleware
from runner.schema import OPERATIONS as RUNNER_OPERATIONS
from runner.settings import RunnerSettings, token_set
from runner.state import Load, RunnerState

log = structlog.get_logger(__name__)


# What go-livepeer's Live Runner proxy adds to each request it passes on, and the log keys they go under.
# Its Livepeer-Session-Token is a credential: it is never read, let alone logged.
SESSION_HEADERS = {"Livepeer-Session-Id": "session_id", "Livepeer-Runner-Route": "runner_route"}
SESSION_HEADER_LENGTH = 128  # a client that reaches the runner directly may send anything
# A request id the runner takes from X-Request-ID: printable ASCII (it goes into answer ids, headers and logs), at most
# this long (as the session headers). Any other is replaced by one of the runner's own, and the log says so.
REQUEST_ID_LENGTH = 128
REQUEST_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,%d}" % REQUEST_ID_LENGTH)


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID when it is printable ASCII of at most REQUEST_ID_LENGTH characters, else a new one."""
    given = request.headers.get("X-Request-ID")
    if given and REQUEST_ID_PATTERN.fullmatch(given):
        return given
    request_id = os.urandom(16).hex()  # a uuid4's 32 hex digits, without building the UUID object
    if given:
        log.warning("request.id_replaced", request_id=request_id, given_length=len(given),
                    why=f"X-Request-ID must be printable ASCII without spaces, at most {REQUEST_ID_LENGTH} characters")
    return request_id


@web.middleware
async def request_context_middleware(request: web.Request, handler) -> web.StreamResponse:
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    context = {"request_id": request_id}
    for header, key in SESSION_HEADERS.items():
        if value := request.headers.get(header):
            context[key] = value[:SESSION_HEADER_LENGTH]
    # Bound for the rest of the request, not reset: aiohttp runs each request in a task of its own, on a copy of
    # the connection's context, so nothing bound here outlives it.
    structlog.contextvars.bind_contextvars(**context)
    return await handler(request)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


async def nvml_ctx(app: web.Application) -> AsyncIterator[None]:
    app[NVML] = NVMLReader()
    yield
    app[NVML].close()


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the pipeline in the background (the server answers /health meanwhile); stop it at the end.

    A stop while loading cancels the load, and closing the pipeline then stops
    whatever the load had started.
    """
    state = app[STATE]
    if state.load is Load.FAILED:  # nothing to load: the runner could not build its pipeline, or not validly
        yield
        return
    loading = asyncio.create_task(state.load_pipeline(), name="pipeline-load")
    yield
    loading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    await state.pipeline.close()
    log.info("pipeline.closed")


def processes_ctx(processes: APIProcesses):
    """The extra API processes: started once the pipeline is loaded; gone (killed if need be) before it closes."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]

        def start_when_ready() -> None:
            if state.ready and not processes.processes and not state.draining:
                try:
                    processes.start(state.pipeline, state)
                except Exception as exc:  # a start failure, with the reason: never a half-served runner saying IDLE
                    log.error("api_process.start_failed", exc_info=True)
                    processes.kill("the other processes could not start")
                    state.fail(f"API_PROCESSES={processes.count}: the extra API processes could not start: {exc}")

        state.on_change(start_when_ready)
        yield
        await processes.close()

    return ctx


def process_header(index: int):
    async def add(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[PROCESS_HEADER] = str(index)

    return add


async def live_runner_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registration with the orchestrator beside the server; unregister at the end if SIGTERM has not."""
    registration = app[LIVE_RUNNER]
    headers = {"User-Agent": f"livepeer-llm-runner/{__version__}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        registration.start(http, gpu_entry(app[NVML].compute_info()))
        yield
        await registration.leave()


async def leave_network(app: web.Application) -> None:
    """On SIGTERM, before the drain: stop heartbeating and unregister (within UNREGISTER_TIMEOUT)."""
    await app[LIVE_RUNNER].leave(UNREGISTER_TIMEOUT)


def read_live_runner_settings() -> tuple[LiveRunnerSettings, str | None]:
    """The Live Runner settings from the environment now, at start, and why they are invalid, if they are."""
    try:
        return LiveRunnerSettings(), None
    except pydantic.ValidationError as exc:
        return LiveRunnerSettings.model_construct(), f"invalid live runner settings: {exc}"


def build_pipeline(settings: RunnerSettings) -> tuple[Pipeline | None, str | None]:
    """The pipeline PIPELINE names, with its own settings read from the environment now, at start.

    Also the reason it cannot serve, if any. A pipeline whose settings are
    invalid is still built, on its defaults, so that its routes exist and answer
    503 with the reason; it is never loaded.
    """
    try:
        cls = pipeline_class(settings.pipeline)
    except PipelineUnavailable as exc:
        return None, str(exc)
    error = None
    try:
        pipeline_settings = cls.settings_class() if cls.settings_class is not None else None
    except pydantic.ValidationError as exc:
        pipeline_settings, error = cls.settings_class.model_construct(), f"invalid {settings.pipeline} settings: {exc}"
    try:
        pipeline = cls(settings.model_id, settings.model_dir, pipeline_settings)
    except Exception as exc:  # e.g. one of its parts cannot be imported: a start failure, not a traceback
        return None, f"pipeline {settings.pipeline!r} cannot be built: {exc}"
    if settings.api_processes > 1 and error is None:
        try:
            pipeline.share_engine(settings.api_processes)
        except ValueError as exc:
            error = f"API_PROCESSES={settings.api_processes}: {exc}"
    return pipeline, error


def pipeline_handlers(pipeline: Pipeline) -> dict[str, Handler]:
    served = pipeline.operations()
    operations = {operation.operation_id: operation for operation in pipeline.OPERATIONS}
    declared = set(operations)
    if served.keys() != declared:
        raise RouteBindingError(
            f"pipeline {pipeline.name!r} declares the operations {sorted(declared)} "
            f"but serves {sorted(served)}"
        )
    clash = sorted(declared & RUNNER_HANDLERS.keys())
    if clash:
        raise RouteBindingError(f"pipeline {pipeline.name!r} redefines the runner's operations {clash}")
    return {operation_id: pipeline_handler(operations[operation_id], serve) for operation_id, serve in served.items()}


def create_app(
    settings: RunnerSettings,
    pipeline: Pipeline | None = None,
    start_error: str | None = None,
    live_runner: LiveRunnerSettings | None = None,
    processes: APIProcesses | None = None,
    extra: ExtraConfig | None = None,
) -> web.Application:
    """The runner for ``settings``; with ``start_error`` one that says ERROR with that reason and serves nothing else.

    The Live Runner settings are read from the environment unless given. With
    API_PROCESSES > 1, ``processes`` makes this the primary process, and
    ``extra`` one of the others (runner/processes.py): an extra registers
    nowhere and asks the primary for /health, /ready and /metrics.
    """
    if pipeline is None and start_error is None:
        pipeline, start_error = build_pipeline(settings)
    if extra is not None:
        live_runner = LiveRunnerSettings.model_construct(orchestrator=None)  # the primary's registration is the one
    if live_runner is None:
        live_runner, live_runner_error = read_live_runner_settings()
        start_error = start_error or live_runner_error
    if start_error is not None:
        log.error("runner.cannot_serve", reason=start_error)
    handlers = dict(RUNNER_HANDLERS)
    operations = list(RUNNER_OPERATIONS)
    if pipeline is not None:
        handlers.update(pipeline_handlers(pipeline))
        operations.extend(pipeline.OPERATIONS)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[request_context_middleware, error_middleware(operations)],
    )
    if processes is not None:
        state = SharedState(pipeline, settings.load_wait_timeout, processes.shared, 0, start_error=start_error)
    elif extra is not None:
        state = SharedState(pipeline, settings.load_wait_timeout, extra.shared, extra.index, start_error=start_error)
    else:
        state = RunnerState(pipeline, load_wait_timeout=settings.load_wait_timeout, start_error=start_error)
    if extra is not None:
        for operation_id in ("health", "ready", "readyz", "metrics"):
            handlers[operation_id] = asking_primary(extra.primary_path)
    if processes is not None:
        handlers["metrics"] = summing_metrics(handlers["metrics"], processes)
    registration = Registration(live_runner, state, app_name=f"{settings.pipeline}/{settings.model_id}")
    app[SETTINGS] = settings
    app[STATE] = state
    app[LIVE_RUNNER] = registration
    app[METRICS] = RunnerMetrics(state, registration.record)
    app[OFFLOAD] = Offload(name="request-bodies")
    token = settings.auth_token.get_secret_value() if token_set(settings.auth_token) else None
    bind_operations(app, handlers, auth_token=token, operations=operations)

    app.on_response_prepare.append(add_request_id_header)
    app.cleanup_ctx.extend([nvml_ctx, pipeline_ctx])
    if processes is not None or extra is not None:
        app.on_response_prepare.append(process_header(0 if extra is None else extra.index))
    if processes is not None:
        app[METRICS].registry.register(ProcessesCollector(processes.shared))
        app.cleanup_ctx.append(processes_ctx(processes))  # after the pipeline's: the extras end before the engine
    if live_runner.enabled and start_error is None:
        app.cleanup_ctx.append(live_runner_ctx)  # after the NVML reader it asks for the GPU; torn down first
    return app
