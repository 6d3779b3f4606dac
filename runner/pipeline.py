"""The contract between the generic runner and a pipeline that plugs into it.

Pipelines import this module; the runner never imports a pipeline. It finds one
by name among the ``livepeer_runner.pipelines`` entry points, so a new pipeline
plugs in by declaring an entry point and the operations it serves, without
touching ``runner/``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from runner.operations import Operation

# What pipelines need of the runner's own HTTP surface comes from here, not from runner.routes or runner.schema:
# the documents of the error shapes a stream's failed ending is written in, and the runner's models that a
# pipeline's protocol module uses (runner.codegen imports them from this module).
from runner.error_documents import anthropic_error_document, openai_error_document  # noqa: F401 (re-exported)
from runner.schema import APIErrorMessage, OpenAIErrorDetail  # noqa: F401 (re-exported)

ENTRY_POINT_GROUP = "livepeer_runner.pipelines"
T = TypeVar("T")


class OperationError(Exception):
    """A request the pipeline cannot serve; the runner answers ``status`` with ``msg``.

    ``param`` (the request field at fault) and ``code`` reach the error shapes
    that have room for them (OpenAI's).
    """

    def __init__(self, msg: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status
        self.param = param
        self.code = code


@dataclass(frozen=True)
class EventStream:
    """A streamed answer: the runner frames each event as one SSE ``data:`` line, then ``data: [DONE]``.

    Each event is one JSON document, already serialised by the pipeline: a
    pipeline that streams one event per token would otherwise spend more on
    models than on the token. ``error_event(reason)`` builds the in-band event
    that reports a failure after the response header has gone out.

    ``named``: the events are ``(name, document)`` pairs, each framed with an
    ``event: <name>`` line before its ``data:`` line, and the stream ends with
    its own last event instead of ``data: [DONE]``: Anthropic's streams (whose
    SDK reads only named events) are written so. ``error_event`` then gives a
    pair too.
    """

    events: AsyncIterator[bytes] | AsyncIterator[tuple[bytes, bytes]]
    error_event: Callable[[str], bytes] | Callable[[str], tuple[bytes, bytes]]
    named: bool = False


@dataclass
class RequestContext:
    """One request as the runner sees it; the pipeline fills in what it learns.

    The runner logs and measures every request from these facts, so pipelines
    report them rather than logging or timing requests themselves.
    """

    request_id: str
    params: dict[str, str] = field(default_factory=dict)  # the path's parameters, e.g. {"model": ...}
    model: str = ""  # the model id the request was served by, once the pipeline knows it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic() of the first generated token
    finish_reason: str = ""

    def count_tokens(self, completion_tokens: int) -> None:
        if completion_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += completion_tokens


Serve = Callable[[BaseModel | None, RequestContext], Awaitable[BaseModel | EventStream]]


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now (running or waiting), and all it was ever handed."""

    unfinished: int
    submitted: int
    batch_size: int  # requests the engine runs at once; the rest wait


class Pipeline(abc.ABC):
    """One model behind HTTP operations of its own.

    ``OPERATIONS`` are the operations of the spec this pipeline serves (the
    generated table of its part of openapi.yaml); ``operations()`` gives the
    coroutine for each. ``settings_class`` is the pipeline's own settings: the
    runner reads them from the environment at start, with its own, and hands
    them in (invalid ones are /health ERROR with the reason). The constructor
    must be cheap: the runner builds the pipeline before it listens and calls
    ``load`` in the background while ``/health`` says LOADING.
    """

    name: ClassVar[str]
    OPERATIONS: tuple[Operation, ...]
    settings_class: ClassVar[type[BaseSettings] | None] = None

    def __init__(self, model_id: str, model_dir: Path, settings: BaseSettings | None = None) -> None:
        self.model_id = model_id
        self.model_dir = model_dir

    @abc.abstractmethod
    def operations(self) -> Mapping[str, Serve]:
        """Each of ``OPERATIONS``'s operationIds with the coroutine that serves it."""

    @abc.abstractmethod
    async def load(self) -> None:
        """Validate settings, fetch the model, start and warm the engine.

        Cancelling it (SIGTERM while loading) must stop whatever it started.
        """

    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why the loaded pipeline can no longer serve, or None while it can."""

    @abc.abstractmethod
    def engine_load(self) -> EngineLoad:
        """What the engine is working on, for metrics and drain checks."""

    def metrics_registry(self) -> CollectorRegistry | None:
        """The pipeline's own Prometheus series (its engine's), served on /metrics after the runner's."""
        return None

    def describe(self) -> dict[str, object]:
        """What this pipeline serves, as a small JSON object: the Live Runner's discovery ``metadata``.

        The orchestrator publishes it to anyone who asks (go-livepeer's
        ``/discovery``), so it names what is served and never holds a secret,
        a path or a URL. The keys come in the order of their worth: when the
        runner must shorten it to fit go-livepeer's 1,024 bytes, it cuts the
        longest list from its end first and then whole keys from the last
        (``runner.live_runner.fit_metadata``). Read while the runner is ready,
        so a pipeline may describe what its load found.
        """
        return {"model": self.model_id}

    def max_in_flight(self) -> int | None:
        """What the pipeline takes at once, queued work included, in the unit of ``admission_units``; None for no
        bound.

        Beyond it the runner answers 503 at once instead of queueing without end.
        It is also the capacity the runner reports to a Live Runner orchestrator.
        """
        return None

    def admission_units(self, operation_id: str, body: BaseModel | None) -> int:
        """How much of ``max_in_flight`` one request takes while it is served (at least 1): the llm pipeline counts
        the engine sequences it becomes. Raise OperationError (a 400 naming the field) for a request that could
        never be admitted, however idle the runner. Called before admission, so it must be cheap."""
        return 1

    def share_engine(self, processes: int) -> None:
        """Before ``load``: the engine will serve ``processes`` API processes (API_PROCESSES), this one among them.

        Raise ValueError saying why when this pipeline cannot be served so: the
        runner then says ERROR on /health with the reason and loads nothing.
        """
        if processes > 1:
            raise ValueError(f"pipeline {self.name!r} serves from one API process only: set API_PROCESSES=1")

    def engine_share(self, index: int) -> object:
        """Once loaded (after ``share_engine(n)``): what API process ``index`` (1 to n-1) needs to reach the engine.

        Opaque to the runner, which hands it to that process as it starts it:
        it is pickled by multiprocessing, so it may hold sockets to pass on.
        """
        raise NotImplementedError(f"pipeline {self.name!r} does not share its engine")

    def join_engine(self, share: object) -> None:
        """In an extra API process, before ``load``: ``load`` reaches the engine ``share`` (``engine_share``)
        describes, which another process runs, instead of starting one."""
        raise NotImplementedError(f"pipeline {self.name!r} does not share its engine")

    def lose_engine(self, reason: str) -> None:
        """In an extra API process, once loaded: the engine it joined has stopped (the process that started it saw it
        die; this one's client cannot). End every request in flight here as the engine's death ends them in that
        process (each raises its failure: a stream's in-band error event, a 5xx), and from now on ``failure()`` says
        so. ``reason`` says what was seen."""
        raise NotImplementedError(f"pipeline {self.name!r} does not share its engine")

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine and free what it holds, also when ``load`` was cut short."""


class PipelineUnavailable(Exception):
    """The pipeline cannot even be built (unknown, broken, or invalid settings); the message says why."""


class UnknownPipeline(PipelineUnavailable, LookupError):
    pass


def pipeline_class(name: str) -> type[Pipeline]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise UnknownPipeline(f"PIPELINE={name!r} is not a known pipeline (known: {known})")
    try:
        cls = found[name].load()
    except Exception as exc:  # a broken pipeline package is a start failure, not a traceback
        raise UnknownPipeline(f"pipeline {name!r} ({found[name].value}) cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise UnknownPipeline(f"entry point {name!r} does not name a Pipeline subclass")
    return cls


async def run_blocking(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a daemon thread of its own, awaited without blocking the loop.

    Unlike ``asyncio.to_thread``, a call cut short (SIGTERM while a model
    downloads or an engine starts) never holds the process's exit: the default
    executor's threads are joined at exit, a daemon thread is not.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def hand_over(outcome: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome)

    def work() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            hand_over(lambda error=exc: future.set_exception(error))
        else:
            hand_over(lambda: future.set_result(result))

    threading.Thread(target=work, name=getattr(function, "__name__", "blocking"), daemon=True).start()
    return await future
