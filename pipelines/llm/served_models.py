"""The model ids this runner answers to, and which model each one means: the base, and its LoRA adapters.

Every API looks a request's ``model`` up here (``find``), and adapters come and
go here: those of LORA_ADAPTERS at start, others at run time (``load`` and
``unload``, with LORA_RUNTIME_UPDATES). An adapter's requests are counted while
the engine holds them, so that unloading it waits for them. Run-time loads are
bounded: one at a time (a load fetches files, perhaps a download), at most
LORA_MAX_ADAPTERS adapters served, and those of LORA_ADAPTERS stay for good.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from pipelines.llm.adapters import AdapterError, AdapterFiles
from pipelines.llm.engine import Adapter, AdapterRefused, Engine, GenerationStep

log = structlog.get_logger(__name__)


class UnknownAdapter(LookupError):
    """No adapter of that name is served."""


class AdapterBusy(RuntimeError):
    """The adapter cannot change now (requests in flight, or another change of it under way); the message says why."""


class AdapterPinned(AdapterError):
    """The adapter was loaded at start (LORA_ADAPTERS): the operator's, not to be unloaded at run time."""


class InFlight:
    """How many of one model's requests the engine holds now; ``idle`` is set while none."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()

    def hold(self, steps: AsyncIterator[GenerationStep]) -> AsyncIterator[GenerationStep]:
        return HeldSteps(steps, self)


class HeldSteps:
    """One request's steps, counted in flight from submission until they end, are closed, or are dropped unread."""

    __slots__ = ("steps", "counter", "held")

    def __init__(self, steps: AsyncIterator[GenerationStep], counter: InFlight) -> None:
        self.steps = steps
        self.counter = counter
        self.held = True
        counter.enter()

    def __aiter__(self) -> HeldSteps:
        return self

    async def __anext__(self) -> GenerationStep:
        try:
            return await anext(self.steps)
        except BaseException:  # the last step was read, or the request failed or was stopped
            self.release()
            raise

    async def aclose(self) -> None:
        try:
            await self.steps.aclose()
        finally:
            self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.counter.leave()

    def __del__(self) -> None:  # a request never read (its client left first) holds nothing
        self.release()


@dataclass(frozen=True)
class ServedModel:
    id: str
    parent: str | None = None  # the base model's id, for a model served on top of it
    adapter: Adapter | None = None  # the LoRA adapter the engine applies for it; None: the base model itself
    pinned: bool = False  # loaded at start (LORA_ADAPTERS): run-time unloads refuse it
    in_flight: InFlight = field(default_factory=InFlight, compare=False, repr=False)


PrepareAdapter = Callable[[str, str], Awaitable[AdapterFiles]]


class ServedModels:
    """Every id a request's ``model`` may name; the one place a name is looked up, and adapters added or dropped."""

    def __init__(self, base_id: str, runtime_updates: bool = False, unload_timeout: float = 30.0,
                 max_adapters: int | None = None) -> None:
        self.base = ServedModel(base_id)
        self.created = int(time.time())  # OpenAI's model cards carry when the model was made available
        self.runtime_updates = runtime_updates  # LORA_RUNTIME_UPDATES: load and unload are open
        self.unload_timeout = unload_timeout
        self.max_adapters = max_adapters  # LORA_MAX_ADAPTERS; None: no bound
        self.adapters: dict[str, ServedModel] = {}
        self.changing: set[str] = set()  # names being loaded or unloaded now: one change of a name at a time
        self.loading: str | None = None  # the run-time load under way: one at a time
        self.adapter_ids = itertools.count(1)  # the engine caches adapters by id: never reused
        self._engine: Engine | None = None
        self._prepare: PrepareAdapter | None = None

    def use(self, engine: Engine, prepare: PrepareAdapter) -> None:
        """Adapters go to ``engine`` from now on; ``prepare`` finds and checks one asked for at run time."""
        self._engine, self._prepare = engine, prepare

    def find(self, name: str) -> ServedModel | None:
        return self.base if name == self.base.id else self.adapters.get(name)

    def all(self) -> list[ServedModel]:
        return [self.base, *self.adapters.values()]

    def names(self) -> str:
        """The served ids, for an error message that says what a client may ask for instead."""
        return ", ".join(repr(model.id) for model in self.all())

    def check_new_name(self, name: str) -> None:
        if name == self.base.id:
            raise AdapterError(f"adapter {name!r} has the base model's id: give the adapter a name of its own")
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded: unload it first, or load this one under "
                               "another name")
        if name in self.changing:
            raise AdapterBusy(f"adapter {name!r} is being loaded or unloaded right now: retry when that is done")

    async def add(self, files: AdapterFiles) -> ServedModel:
        """Serve a found and checked adapter under its name (LORA_ADAPTERS at start, for good); AdapterError if it
        cannot be."""
        self.check_new_name(files.name)
        self.changing.add(files.name)
        try:
            return await self.attach(files, pinned=True)
        finally:
            self.changing.discard(files.name)

    async def load(self, name: str, source: str) -> ServedModel:
        """An adapter from a Hub id or a local folder, served under ``name`` (at run time); AdapterError says why not,
        AdapterBusy when another load is under way or LORA_MAX_ADAPTERS are served."""
        self.check_new_name(name)
        if self.loading is not None:
            raise AdapterBusy(f"adapter {self.loading!r} is being loaded: run-time loads go one at a time; retry when "
                              "it is done")
        if self.max_adapters is not None and len(self.adapters) >= self.max_adapters:
            raise AdapterBusy(f"{len(self.adapters)} adapters are served, as many as LORA_MAX_ADAPTERS="
                              f"{self.max_adapters} allows: unload one first")
        self.changing.add(name)  # before the download: a second load of the name waits for nothing, it is refused
        self.loading = name
        started = time.monotonic()
        try:
            served = await self.attach(await self._prepare(name, source))
        finally:
            self.changing.discard(name)
            self.loading = None
        log.info("adapter.load.done", model=name, source=source, seconds=round(time.monotonic() - started, 2))
        return served

    async def attach(self, files: AdapterFiles, pinned: bool = False) -> ServedModel:
        """The engine loads the adapter's weights (AdapterError if it cannot), then requests may name it."""
        name = files.name
        served = ServedModel(name, parent=self.base.id, adapter=Adapter(name, next(self.adapter_ids), files.path),
                             pinned=pinned)
        try:
            await self._engine.add_adapter(served.adapter)
        except AdapterRefused as exc:
            raise AdapterError(f"adapter {name!r}: the engine cannot load it: {exc}") from None
        self.adapters[name] = served
        log.info("adapter.loaded", model=name, parent=self.base.id, path=str(files.path), rank=files.rank,
                 adapter_id=served.adapter.id)
        return served

    async def unload(self, name: str) -> None:
        """Stop serving the adapter ``name``: new requests no longer find it, and its requests in flight finish first.

        If they do not within LORA_UNLOAD_TIMEOUT, the adapter keeps serving and AdapterBusy says so.
        """
        if name == self.base.id:
            raise AdapterError(f"{name!r} is the base model, not an adapter: it cannot be unloaded")
        served = self.adapters.get(name)
        if served is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded; this runner serves {self.names()}")
        if served.pinned:
            raise AdapterPinned(f"adapter {name!r} was loaded at start (LORA_ADAPTERS): it is the operator's and "
                                "cannot be unloaded at run time")
        if name in self.changing:
            raise AdapterBusy(f"adapter {name!r} is being loaded or unloaded right now: retry when that is done")
        self.changing.add(name)
        del self.adapters[name]
        started = time.monotonic()
        unloaded = False
        try:
            try:
                async with asyncio.timeout(self.unload_timeout):
                    await served.in_flight.idle.wait()
            except TimeoutError:
                raise AdapterBusy(
                    f"adapter {name!r} still has {served.in_flight.count} requests in flight after "
                    f"LORA_UNLOAD_TIMEOUT ({self.unload_timeout:g} s): it keeps serving; unload it again once they are "
                    "done, or raise LORA_UNLOAD_TIMEOUT") from None
            await self._engine.remove_adapter(served.adapter)
            unloaded = True
        finally:
            self.changing.discard(name)
            if not unloaded:  # refused, failed or cut short: the adapter is still served as it was
                self.adapters[name] = served
        log.info("adapter.unloaded", model=name, waited_s=round(time.monotonic() - started, 3))
