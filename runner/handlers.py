"""Handlers for the spec's operations: the runner's own, and the adapter that
serves a pipeline's operations as JSON or as a Server-Sent Events stream."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from pipelines.base import EventStream, Operation, OperationError
from runner import __version__
from runner.keys import METRICS, NVML, REQUEST_ID, SETTINGS, STATE
from runner.routes import Handler, error_response, json_response
from runner.schema import HardwareInformation, HardwareStats, HealthCheck, Version
from runner.state import NotReady

log = structlog.get_logger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must pass each event on at once
}
SSE_DONE = b"data: [DONE]\n\n"


async def health(request: web.Request, _body: None) -> web.Response:
    return json_response(HealthCheck(status=request.app[STATE].health()))


async def version(request: web.Request, _body: None) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response(Version(pipeline=settings.pipeline, model_id=settings.model_id, version=__version__))


async def hardware_info(request: web.Request, _body: None) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response(
        HardwareInformation(
            pipeline=settings.pipeline, model_id=settings.model_id, gpu_info=request.app[NVML].compute_info()
        )
    )


async def hardware_stats(request: web.Request, _body: None) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response(
        HardwareStats(
            pipeline=settings.pipeline, model_id=settings.model_id, gpu_stats=request.app[NVML].utilization_info()
        )
    )


async def metrics(request: web.Request, _body: None) -> web.Response:
    return web.Response(body=generate_latest(request.app[METRICS]), headers={"Content-Type": CONTENT_TYPE_LATEST})


RUNNER_HANDLERS: dict[str, Handler] = {
    "health": health,
    "version": version,
    "hardwareInfo": hardware_info,
    "hardwareStats": hardware_stats,
    "metrics": metrics,
}


def encode_event(event: BaseModel | bytes) -> bytes:
    if isinstance(event, bytes):  # the pipeline serialised it already
        return b"data: " + event + b"\n\n"
    return b"data: " + event.__pydantic_serializer__.to_json(event, exclude_none=True) + b"\n\n"


async def send_event_stream(request: web.Request, stream: EventStream) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    events = stream.events
    try:
        async for event in events:
            await response.write(encode_event(event))
    except ConnectionResetError:
        log.info("request.client_gone", phase="streaming")
        return response
    except Exception as exc:  # after the header went out, failures are reported in-band
        log.error("request.stream_failed", reason=str(exc), exc_info=True)
        await response.write(encode_event(stream.error_event(failure_message(exc))))
    finally:
        await events.aclose()  # stops the generation if the stream ended early
    await response.write(SSE_DONE)
    await response.write_eof()
    return response


def failure_message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"generation failed: {text}"


def pipeline_handler(operation: Operation) -> Handler:
    async def handle(request: web.Request, body) -> web.StreamResponse:
        state = request.app[STATE]
        try:
            await state.wait_until_ready()
        except NotReady as exc:
            return error_response(503, str(exc))
        state.in_flight += 1
        try:
            result = await operation(body, request[REQUEST_ID])
            if isinstance(result, EventStream):
                return await send_event_stream(request, result)
            return json_response(result)
        except OperationError as exc:
            return error_response(exc.status, exc.msg)
        except (asyncio.CancelledError, ConnectionResetError):
            log.info("request.client_gone", phase="generating")
            raise
        except Exception as exc:
            log.error("request.failed", reason=str(exc), exc_info=True)
            return error_response(500, failure_message(exc))
        finally:
            state.in_flight -= 1

    return handle
