"""The contract between the generic runner and a pipeline that plugs into it.

A pipeline is found by name among the ``livepeer_runner.pipelines`` entry points,
so a new one plugs in by declaring an entry point, without touching ``runner/``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel

ENTRY_POINT_GROUP = "livepeer_runner.pipelines"


class OperationError(Exception):
    """A request the pipeline cannot serve; the runner answers ``status`` with ``msg``."""

    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status


@dataclass(frozen=True)
class EventStream:
    """A streamed answer: the runner sends each event as it comes.

    An event is a protocol model, or that model's JSON already serialised
    (``bytes``), for a pipeline that builds one event per token and would
    otherwise spend more on models than on the token. ``error_event`` builds the
    in-band event that reports a failure after the response header has gone out.
    """

    events: AsyncIterator[BaseModel | bytes]
    error_event: Callable[[str], BaseModel]


@dataclass
class RequestContext:
    """One request as the runner sees it; the pipeline fills in what it learns.

    The runner logs and measures every request from these facts, so pipelines
    report them rather than logging or timing requests themselves.
    """

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic() of the first generated token
    finish_reason: str = ""

    def count_tokens(self, completion_tokens: int) -> None:
        if completion_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += completion_tokens


Operation = Callable[[BaseModel, RequestContext], Awaitable[BaseModel | EventStream]]


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now (running or waiting), and all it was ever handed."""

    unfinished: int
    submitted: int
    batch_size: int  # requests the engine runs at once; the rest wait


class Pipeline(abc.ABC):
    """One model behind the runner's HTTP operations.

    The constructor must be cheap: the runner builds the pipeline before it
    listens and calls ``load`` in the background while ``/health`` says LOADING.
    """

    name: ClassVar[str]

    def __init__(self, model_id: str, model_dir: Path) -> None:
        self.model_id = model_id
        self.model_dir = model_dir

    @abc.abstractmethod
    def operations(self) -> Mapping[str, Operation]:
        """The spec's operationIds this pipeline serves, each with its coroutine."""

    @abc.abstractmethod
    async def load(self) -> None:
        """Validate settings, fetch the model, start and warm the engine."""

    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why the loaded pipeline can no longer serve, or None while it can."""

    @abc.abstractmethod
    def engine_load(self) -> EngineLoad:
        """What the engine is working on, for metrics and drain checks."""

    def max_in_flight(self) -> int | None:
        """Requests the pipeline takes at once, queued ones included; None for no bound.

        Beyond it the runner answers 503 at once instead of queueing without end.
        """
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine and free what it holds."""


class UnknownPipeline(LookupError):
    pass


def pipeline_class(name: str) -> type[Pipeline]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise UnknownPipeline(f"PIPELINE={name!r} is not a known pipeline (known: {known})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise UnknownPipeline(f"entry point {name!r} does not name a Pipeline subclass")
    return cls
