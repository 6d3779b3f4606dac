"""``python -m runner``: the container's entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

import psutil
import structlog
from aiohttp import web
from pydantic import ValidationError

from runner.app import build_pipeline, create_app, leave_network
from runner.keys import STATE
from runner.listening import listening_sockets
from runner.log import configure_logging
from runner.processes import APIProcesses
from runner.settings import ListenSettings, RunnerSettings

log = structlog.get_logger("runner")

# The stop's budget after the drain: cutting what is left (state.CUT_GRACE), closing the server and the pipeline
# (ending the engine's processes), exiting. With DRAIN_TIMEOUT's default 5 s the process is gone within 7.5 s of
# SIGTERM, inside go-livepeer's 8; a stop that overruns it is ended by force (stop_overrun).
STOP_AFTER_DRAIN = 2.5


async def serve(settings: RunnerSettings, start_error: str | None = None) -> None:
    """Listen at once, load in the background, and on SIGTERM drain, then stop.

    aiohttp's own run_app closes the listening socket first on a signal; here new
    /llm calls keep getting a clear 503 while the requests in flight finish. A
    SIGTERM while the model loads stops the load at once.
    """
    # API_PROCESSES > 1: this is the primary of N processes on one listening socket (runner/processes.py).
    pipeline = None
    if start_error is None:
        pipeline, start_error = build_pipeline(settings)
    processes = APIProcesses(settings) if settings.api_processes > 1 and start_error is None else None
    app = create_app(settings, pipeline=pipeline, start_error=start_error, processes=processes)
    # handler_cancellation: a client that goes away cancels its handler, which stops its generation.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sockets = processes.sockets if processes is not None else listening_sockets(
        settings.host, settings.port, settings.send_buffer_bytes)
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    if processes is not None:
        await web.UnixSite(runner, processes.primary_path).start()  # the extras' way to the primary
    log.info("runner.listening", host=settings.host, port=settings.port, pipeline=settings.pipeline,
             model_id=settings.model_id, event_loop=type(asyncio.get_running_loop()).__module__,
             api_processes=settings.api_processes)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    state = app[STATE]
    signalled_at = loop.time()
    overrun = threading.Timer(settings.drain_timeout + STOP_AFTER_DRAIN, stop_overrun,
                              args=(settings.drain_timeout + STOP_AFTER_DRAIN,))
    overrun.daemon = True
    overrun.start()
    await leave_network(app)  # a Live Runner leaves the orchestrator's pool before it refuses work (<= 1 s)
    # DRAIN_TIMEOUT counts from SIGTERM: the unregister's time comes out of it, inside go-livepeer's 8 s.
    drain_timeout = max(0.0, settings.drain_timeout - (loop.time() - signalled_at))
    log.info("runner.draining", in_flight=state.in_flight, timeout_s=round(drain_timeout, 3))
    draining = state.drain(drain_timeout, cut_reason=drain_cut_reason(settings))
    if processes is None:
        left = await draining
    else:  # every process drains at once, to one deadline; the extras are gone before the engine closes
        left, _ = await asyncio.gather(draining, processes.drain(time.monotonic() + drain_timeout))
    if left:
        log.warning("runner.drain.timeout", cut_requests=left)
    await runner.cleanup()  # stops listening, cancels what is left, closes the pipeline (and ends its engine)
    log.info("runner.stopped", seconds=round(loop.time() - signalled_at, 2))


def drain_cut_reason(settings: RunnerSettings) -> str:
    """What a request still running at the drain's end is told (every API process's drain)."""
    return (f"the runner is stopping (SIGTERM) and the request was still running after DRAIN_TIMEOUT "
            f"({settings.drain_timeout:g} s): it was cut")


def stop_overrun(budget: float) -> None:
    """The stop took longer than its budget: end every process this one started, and this one, now."""
    log.error("runner.stop_overrun", budget_s=budget, effect="every process of the runner is killed")
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    exit_now(1)


def exit_now(code: int) -> None:
    """Flush the logs and end the process at once, without the interpreter's teardown.

    Once the runner has stopped nothing is left to save, and the teardown is
    unbounded: it joins every non-daemon thread (a thread still blocked in an
    engine's start, for one), runs vLLM's and multiprocessing's exit handlers and
    waits on multiprocessing's resource tracker, seconds on a loaded machine
    (issue #23 measured 4 s between runner.stopped and the exit). os._exit skips
    all of it; the resource tracker, a process of its own, still unlinks the
    shared memory left behind once it sees this process gone.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def main() -> int:
    """Serve; with invalid settings, serve /health ERROR with the reason, as go-livepeer expects.

    Only settings that leave nowhere to listen (HOST, PORT) end the process, with exit code 2.
    """
    try:
        listen = ListenSettings()
    except ValidationError as exc:
        print(f"invalid runner settings, nowhere to listen:\n{exc}", file=sys.stderr)
        return 2
    try:
        settings, start_error = RunnerSettings(), None
    except ValidationError as exc:
        settings, start_error = RunnerSettings.fallback(listen), f"invalid runner settings: {exc}"
    configure_logging(settings.verbose_logging)
    run_event_loop(serve(settings, start_error))
    return 0


def run_event_loop(main: Coroutine) -> Any:
    """On uvloop where it is installed, as vLLM's own server: every streamed token crosses the loop twice."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    else:
        return uvloop.run(main)


if __name__ == "__main__":
    exit_now(main())
