"""Handlers for the spec's operations: the runner's own, and the adapter that
serves a pipeline's operations as JSON or as a Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from prometheus_client import CONTENT_TYPE_LATEST
from runner import __version__
from runner.keys import METRICS, NVML, REQUEST_ID, SETTINGS, STATE
from runner.pipeline import EventStream, OperationError, RequestContext, Serve
from runner.operations import Operation
from runner.routes import ERROR_SHAPES, ErrorShape, Handler, json_response
from runner.schema import HardwareInformation, HardwareStats, HealthCheck, Version
from runner.state import NotReady

log = structlog.get_logger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must pass each event on at once
}
SSE_DONE = b"data: [DONE]\n\n"
# How long past its request's deadline a stream waits for a client that has
# stopped reading, to hand it the stream's ending, before letting it go.
STALLED_CLIENT_GRACE = 5.0
# How long a stream cut for a stalled client keeps its connection, its ending buffered, for the client to read
# it: the request and its admission slot are let go at once, the connection is aborted after this.
CUT_CONNECTION_LINGER = 5.0


async def health(request: web.Request, _body: None) -> web.Response:
    return json_response(HealthCheck(status=request.app[STATE].health()))


async def ready(request: web.Request, _body: None) -> web.Response:
    """/health's body, with the status code saying whether a request sent now would be served."""
    state = request.app[STATE]
    return json_response(HealthCheck(status=state.health()), status=200 if state.accepting() else 503)


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
    """The runner's series, then the engine's: made on a worker thread (RunnerMetrics.exposition), off the loop."""
    pipeline = request.app[STATE].pipeline
    engine_registry = pipeline.metrics_registry() if pipeline is not None else None
    body = await request.app[METRICS].exposition(engine_registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


RUNNER_HANDLERS: dict[str, Handler] = {
    "health": health,
    "ready": ready,
    "readyz": ready,
    "version": version,
    "hardwareInfo": hardware_info,
    "hardwareStats": hardware_stats,
    "metrics": metrics,
}


def sse_event(document: bytes) -> bytes:
    """One Server-Sent Event whose data is one JSON document (it holds no raw newline)."""
    return b"data: " + document + b"\n\n"


def sse_named_event(event: tuple[bytes, bytes]) -> bytes:
    """One Server-Sent Event with its name: ``event: <name>``, then the data line of its JSON document."""
    name, document = event
    return b"event: " + name + b"\ndata: " + document + b"\n\n"


def sse_chunk(document: bytes) -> bytes:
    """``sse_event(document)`` as one HTTP/1.1 chunk (its size in hex, the event, CRLF), framed in one go."""
    return b"%x\r\ndata: %b\n\n\r\n" % (len(document) + 8, document)


def sse_named_chunk(event: tuple[bytes, bytes]) -> bytes:
    """``sse_named_event(event)`` as one HTTP/1.1 chunk."""
    name, document = event
    return b"%x\r\nevent: %b\ndata: %b\n\n\r\n" % (len(name) + len(document) + 16, name, document)


AIOHTTP_DRAIN_BYTES = 0x10000  # aiohttp's StreamWriter.write drains once this many bytes went out since the last


CLIENT_GONE = 499  # nginx's code for a client that closed the connection; never sent, only counted


class ClientGone(Exception):
    """The client closed the connection mid-stream, or stalled; ``response`` is the one it left.

    ``lingering``: what is still to be done on the connection once the request is let go (a cut stream's ending,
    waiting for its client for a bounded time).
    """

    def __init__(self, response: web.StreamResponse, lingering: Awaitable[None] | None = None) -> None:
        super().__init__()
        self.response = response
        self.lingering = lingering


class ClientStalled(Exception):
    """The client read nothing for WRITE_STALL_TIMEOUT seconds: its stream is cut."""


class PacedStreamWriter:
    """Writes a stream to a client that may read slowly, or stop reading.

    A write waits (aiohttp's drain) while the client is behind, which holds the
    stream back instead of buffering it. That wait runs as a task of its own,
    so the request's deadline stops the generation without cancelling it:
    aiohttp's drain does not recover from a cancelled wait. A write that waits
    longer than WRITE_STALL_TIMEOUT (``stall_timeout``) raises ClientStalled:
    the stream is cut, its ending left in the connection's buffer for a client
    that reads again, and the request (its admission slot) is let go at once.
    Otherwise the ending waits for the client until STALLED_CLIENT_GRACE seconds
    past the deadline, or WRITE_STALL_TIMEOUT, whichever comes first.

    ``send`` writes one event: to a client that keeps up (the usual case), as one
    HTTP/1.1 chunk the runner frames itself and hands to the transport at once,
    with nothing to await (``direct``); otherwise through aiohttp's writer.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse, deadline: float,
                 stall_timeout: float | None = None, payload: AbstractStreamWriter | None = None,
                 named: bool = False) -> None:
        self.response = response
        self.let_go_at = deadline + STALLED_CLIENT_GRACE
        self.stall_timeout = stall_timeout
        self.stalled = False
        self.pending: asyncio.Future | None = None
        self.transport = transport = request.transport  # the connection's own, looked up once
        self.low_water, self.high_water = transport.get_write_buffer_limits() if transport is not None else (0, 0)
        self.payload = payload  # what response.prepare() gave: aiohttp's writer of this body
        self.frame, self.chunk = (sse_named_event, sse_named_chunk) if named else (sse_event, sse_chunk)
        # The direct lane needs the body aiohttp writes for a StreamResponse on HTTP/1.1: its StreamWriter,
        # chunked, uncompressed, of no declared length (an HTTP/1.0 client's body is not chunked).
        self.direct = (transport is not None and type(payload) is StreamWriter and payload.chunked
                       and payload.length is None and not response.compression)

    def client_is_behind(self, size: int) -> bool:
        """Whether writing ``size`` bytes now may wait for the client.

        A write waits only while the transport has paused the protocol: from the
        moment its buffer passes the high-water mark until it drains to the low
        one. At or below the low mark it is not paused, so only this write
        itself passing the high mark can make it wait. (uvloop's low mark is 16
        bytes: testing each event against it sent every write down the slow path.)
        aiohttp never changes a transport's marks, so they are read once.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # the write fails at once, it does not wait
        buffered = transport.get_write_buffer_size()
        return buffered > self.low_water or buffered + size > self.high_water

    def send(self, event) -> Awaitable[None] | None:
        """Write one event (a document, or a named event's pair); None when it is written, else what to await.

        The direct lane's test is ``client_is_behind``'s, written out: it runs for every event.
        """
        transport = self.transport
        if self.direct and not transport.is_closing():
            chunk = self.chunk(event)
            buffered = transport.get_write_buffer_size()
            if buffered <= self.low_water and buffered + len(chunk) <= self.high_water:
                self.to_socket(chunk)
                return None
        return self.write(self.frame(event))

    def to_socket(self, chunk: bytes) -> None:
        """The socket write of one chunk, with aiohttp's own byte counts of the body kept as its writer keeps them.

        aiohttp's writer drains once AIOHTTP_DRAIN_BYTES were written since the last drain; a drain waits only
        while the transport is paused, and this chunk passed ``client_is_behind``: it would not wait.
        """
        payload = self.payload
        size = len(chunk)
        payload.output_size += size
        payload.buffer_size += size
        if payload.buffer_size > AIOHTTP_DRAIN_BYTES:
            payload.buffer_size = 0
        self.transport.write(chunk)

    def write(self, data: bytes) -> Awaitable[None]:
        if not self.client_is_behind(len(data)):
            return self.response.write(data)  # goes straight to the socket: nothing to wait for
        return self.write_when_caught_up(data)

    async def write_when_caught_up(self, data: bytes) -> None:
        self.pending = asyncio.ensure_future(self.response.write(data))
        self.pending.add_done_callback(lambda write: write.cancelled() or write.exception())
        done, _ = await asyncio.wait({self.pending}, timeout=self.stall_timeout)
        if not done:
            self.stalled = True
            raise ClientStalled(f"the client read nothing for WRITE_STALL_TIMEOUT ({self.stall_timeout:g} s): "
                                "the stream was cut")
        self.pending = None
        done.pop().result()  # a client gone raises here

    async def finish(self, ending: bytes) -> None:
        if self.stalled:
            self.cut(ending)
        loop = asyncio.get_running_loop()
        try:
            stall_at = loop.time() + self.stall_timeout if self.stall_timeout is not None else self.let_go_at
            async with asyncio.timeout_at(min(self.let_go_at, stall_at)):
                if self.pending is not None:
                    await self.pending
                await self.response.write_eof(ending)  # the ending and the body's end in one write
        except (TimeoutError, ConnectionError):
            if self.transport is not None:
                self.transport.abort()
            log.info("request.client_stalled", grace_s=STALLED_CLIENT_GRACE)
            raise ClientGone(self.response) from None

    def cut(self, ending: bytes) -> None:
        """A stalled client's stream ends here, and the request is let go now (ClientGone): its ending is left to
        ``linger``, behind what already waits in the connection's buffer, for a client that reads again."""
        log.info("request.client_stalled", write_stall_timeout_s=self.stall_timeout)
        raise ClientGone(self.response, self.linger(ending))

    async def linger(self, ending: bytes) -> None:
        """The cut stream's ending and end, for CUT_CONNECTION_LINGER seconds at most; then the connection is aborted."""
        try:
            async with asyncio.timeout(CUT_CONNECTION_LINGER):
                await self.response.write_eof(ending)  # written at once; then it waits for the client to read
        except (TimeoutError, ConnectionError):
            if self.transport is not None:
                self.transport.abort()


class EventStreamSender:
    """A streamed answer on its way out: the header, each event as it comes, then the ending.

    Its events are written under the request's deadline (``serve_admitted``'s,
    the one its generation started under); a failure after the header has gone
    out becomes the stream's in-band ending (``fail``).
    """

    def __init__(self, request: web.Request, stream: EventStream, context: RequestContext, deadline: float) -> None:
        self.request, self.stream, self.context, self.deadline = request, stream, context, deadline
        self.writer: PacedStreamWriter | None = None
        self.ending = b"" if stream.named else SSE_DONE

    async def pump(self) -> None:
        request, stream = self.request, self.stream
        response = web.StreamResponse(headers=SSE_HEADERS)
        payload = await response.prepare(request)
        writer = self.writer = PacedStreamWriter(request, response, self.deadline,
                                                 request.app[SETTINGS].write_stall_timeout, payload, stream.named)
        send = writer.send
        try:
            async for event in stream.events:
                waiting = send(event)
                if waiting is not None:
                    await waiting
        except ConnectionResetError:
            raise ClientGone(response) from None
        except Exception as exc:  # after the header went out, failures are reported in-band
            # A TimeoutError here is the pipeline's own; the request's deadline ends the stream in serve_admitted.
            if isinstance(exc, TimeoutError):
                reason = request.app[STATE].cut_reason or timeout_reason(request.app[SETTINGS].request_timeout)
            else:
                reason = str(exc) if isinstance(exc, ClientStalled) else failure_message(exc)
            self.fail(reason, exc_info=not isinstance(exc, (TimeoutError, ClientStalled)))

    async def close(self) -> None:
        """Stop the generation if the stream ended early (its events' ``aclose``): called past the deadline's scope,
        so that a deadline never cuts the stopping short."""
        await self.stream.events.aclose()

    def fail(self, reason: str, exc_info: bool = False) -> None:
        log.error("request.stream_failed", reason=reason, exc_info=exc_info)
        self.context.finish_reason = "error"
        self.ending = self.writer.frame(self.stream.error_event(reason)) + self.ending

    async def finish(self) -> web.StreamResponse:
        await self.writer.finish(self.ending)
        return self.writer.response


def timeout_reason(timeout: float) -> str:
    return f"the request took longer than REQUEST_TIMEOUT ({timeout:g} s) and was stopped"


def failure_message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"generation failed: {text}"


async def serve_operation(request: web.Request, body, serve: Serve, context: RequestContext, errors: ErrorShape,
                          operation_id: str = ""):
    settings, state = request.app[SETTINGS], request.app[STATE]
    try:
        units = max(1, state.pipeline.admission_units(operation_id, body)) if state.pipeline is not None else 1
    except OperationError as exc:  # a request too large to be admitted ever
        log.info("request.refused", status=exc.status, reason=exc.msg)
        return errors.error(exc.status, exc.msg, param=exc.param, code=exc.code)
    try:
        with state.admit(units):
            return await serve_admitted(request, body, serve, context, settings.request_timeout, errors)
    except NotReady as exc:
        return errors.error(503, str(exc), headers={"Retry-After": "1"})


async def serve_admitted(
    request: web.Request, body, serve: Serve, context: RequestContext, timeout: float, errors: ErrorShape
):
    """Serve an admitted request under one deadline, its answer's generation and, for a stream, its writing.

    Past the deadline (or the drain's cut on SIGTERM, ``state.drain``) a request whose header has not gone out is
    answered 500; a stream gets its in-band ending instead.
    """
    state = request.app[STATE]
    sender = None
    try:
        await state.wait_until_ready()
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                async with state.deadline(deadline):
                    result = await serve(body, context)
                    if not isinstance(result, EventStream):
                        return json_response(result)
                    sender = EventStreamSender(request, result, context, deadline)
                    # In a task of its own: each event resumes the pump's frames only, not the dozen of the
                    # handler's chain of awaits above it (aiohttp's and the runner's); the deadline, which cancels
                    # this task, cancels the pump with it.
                    await asyncio.ensure_future(sender.pump())
            finally:
                if sender is not None:
                    await sender.close()
        except TimeoutError:
            reason = state.cut_reason or timeout_reason(timeout)
            if sender is None or sender.writer is None:
                if state.cut_reason is not None:
                    log.error("request.cut", reason=reason)
                else:
                    log.error("request.timeout", seconds=timeout)
                return errors.error(500, reason)
            sender.fail(reason)
        return await sender.finish()
    except OperationError as exc:
        log.info("request.refused", status=exc.status, reason=exc.msg)
        return errors.error(exc.status, exc.msg, param=exc.param, code=exc.code)
    except (asyncio.CancelledError, ClientGone, NotReady):
        raise
    except Exception as exc:
        log.error("request.failed", reason=str(exc), exc_info=True)
        return errors.error(500, failure_message(exc))


def pipeline_handler(operation: Operation, serve: Serve) -> Handler:
    """Serves a pipeline operation, then counts and logs it, whatever became of it."""
    operation_id, errors = operation.operation_id, ERROR_SHAPES[operation.error_shape]

    async def handle(request: web.Request, body) -> web.StreamResponse:
        started = time.monotonic()
        context = RequestContext(request_id=request[REQUEST_ID], params=dict(request.match_info))
        status = CLIENT_GONE
        lingering = None
        try:
            response = await serve_operation(request, body, serve, context, errors, operation_id)
            status = response.status
            return response
        except ClientGone as gone:
            lingering = gone.lingering  # awaited once the request is counted: it holds no admission slot
            return gone.response
        finally:
            finished = time.monotonic()
            # A request no model served (refused before one was chosen) counts under the runner's MODEL_ID:
            # a label value per unknown name a client sends would grow without bound.
            model = context.model or request.app[STATE].pipeline.model_id
            request.app[METRICS].observe(operation_id, status, context, started, finished, model)
            log.info(
                "request.done",
                operation=operation_id,
                model=model,
                status=status,
                prompt_tokens=context.prompt_tokens,
                completion_tokens=context.completion_tokens,
                ttft_s=None if context.first_token_at is None else round(context.first_token_at - started, 4),
                duration_s=round(finished - started, 4),
                finish_reason=context.finish_reason or None,
            )
            if lingering is not None:
                await lingering

    return handle
