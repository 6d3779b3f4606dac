"""The engine's host: finds the model and its adapters, checks the layout, starts the engine (or this node's ranks), stops it.

The host knows the machine (GPUs, cores), the model store and the nodes; the
engine itself comes from a backend, by default vLLM's
(``pipelines.llm.vllm_backend``, imported once loading starts: importing vLLM
and torch takes seconds). Tests hand in a backend of their own.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from pipelines.llm.adapters import (
    ADAPTER_CONFIG,
    AdapterError,
    AdapterFiles,
    ServedBase,
    checkpoint_shapes,
    fit_errors,
    rank_for,
    read_adapter,
)
from pipelines.llm.engine import Engine
from pipelines.llm.layout import GPU, engine_environment, layout_errors
from pipelines.llm.nodes import WorkerNodeLines
from pipelines.llm.settings import LLMSettings
from pipelines.llm.worker_node import WorkerNode
from pipelines.model_store import DownloadLimits, DownloadStopped, ModelDownloadError, resolve_model
from runner.hardware import NVML
from runner.pipeline import run_blocking

log = structlog.get_logger(__name__)

ABANDONED_START_GRACE = 1.0  # seconds a half-started engine's processes get before they are killed: nothing to save
START_PROGRESS_INTERVAL = 30.0  # seconds between a multi-node start's progress lines once every node has joined
RUNTIME_LORA_RANK = 16  # vLLM's default max_lora_rank: the rank left for adapters loaded at run time, unless set
STOPPED_DOWNLOAD_WAIT = 30.0  # seconds a stopped run-time download gets to end (a read times out in 10 s by default)


class Backend(Protocol):
    """What the host needs of an engine implementation (``pipelines.llm.vllm_backend`` is one)."""

    def platform(self) -> str:
        """The device type the engine runs on here: "cpu", "cuda", ..."""
        ...

    def engine_args(self, settings: LLMSettings, model_path: Path, served_name: str, model_config: dict,
                    gpu: GPU | None = None) -> Any: ...

    def start_engine(self, args: Any, environment: Mapping[str, str], clients: int = 1) -> Engine:
        """Build the engine, for ``clients`` API processes (API_PROCESSES) of which this is the first; blocks for as
        long as its processes take to start."""
        ...

    def join_engine(self, share: Any) -> Engine:
        """In another API process: a client of the engine whose ``Engine.share(index)`` this is; blocks until joined."""
        ...

    def stop_engine_processes(self, grace: float) -> int:
        """End the engine's processes (SIGTERM, SIGKILL after ``grace`` s): a start cut short, or a lost worker node."""
        ...


def vllm_backend() -> Backend:
    return importlib.import_module("pipelines.llm.vllm_backend")


class EngineHost:
    def __init__(self, settings: LLMSettings, model_id: str, model_dir: Path,
                 backend: Callable[[], Backend] = vllm_backend, gpus: int | None = None,
                 cpus: set[int] | None = None, gpu: GPU | None = None) -> None:
        self.settings = settings
        self.model_id = model_id
        self.model_dir = model_dir
        self.load_backend = backend
        self.gpus = gpus  # None: as many as NVML finds
        self.gpu = gpu  # the least capable of the ``gpus``; with gpus=None, NVML's
        self.cpus = cpus  # None: the cores this process may run on
        self.backend: Backend | None = None
        self.engine: Engine | None = None
        self.worker_node: WorkerNode | None = None  # NODE_RANK > 0: this node's ranks, no engine to serve from
        self.lines: WorkerNodeLines | None = None  # NODE_RANK=0 of several: the worker nodes' lines
        self.node_error: str | None = None  # why a worker node is lost, once one is
        self.node_lost = asyncio.Event()
        self.ending: asyncio.Task | None = None  # the engine being ended after a lost worker node
        self.starting = False  # the engine's processes are being started
        self.base: ServedBase | None = None  # the model adapters are checked against, once found
        self.adapters: list[AdapterFiles] = []  # LORA_ADAPTERS, found and checked
        self.max_lora_rank: int | None = None  # the engine's, once chosen (MAX_LORA_RANK or the adapters')
        # Where a run-time lora_path may point: LORA_ROOT, else the model store; symbolic links resolved.
        self.lora_root = Path(os.path.realpath(settings.lora_root if settings.lora_root is not None else model_dir))
        self.clients = 1  # the API processes the engine serves (API_PROCESSES), this one first
        self.engine_lost: str | None = None  # in an extra API process: why the engine it joined is gone, once it is

    async def join(self, share: Any) -> Engine:
        """The engine another API process started, joined as one of its clients (``share``: its ``Engine.share``)."""
        self.backend = await run_blocking(self.load_backend)
        self.engine = await run_blocking(self.backend.join_engine, share)
        log.info("engine.joined", clients=self.clients)
        return self.engine

    def lose_engine(self, reason: str) -> None:
        """In an extra API process: the engine it joined is gone (its primary saw it die). The client ends every
        request in flight with the engine's death, as the primary's own client does; ``failure`` says ``reason``."""
        self.engine_lost = reason
        if self.engine is not None:
            self.engine.lose()

    def share(self, index: int) -> Any:
        """What API process ``index`` needs to ``join`` the running engine."""
        assert self.engine is not None, "the engine is shared once it runs"
        return self.engine.share(index)

    async def start(self) -> Engine | None:
        """The running engine, or None on a worker node once its ranks have joined; raises ValueError when it cannot start.

        Cancelling it (SIGTERM while loading) stops whatever it started; so does ``close``.
        """
        settings = self.settings
        gpus, gpu = (self.gpus, self.gpu) if self.gpus is not None else (count_gpus(), least_capable_gpu())
        cpus = self.cpus if self.cpus is not None else os.sched_getaffinity(0)
        # Importing vLLM takes seconds: let the downloads of the model and its adapters overlap it, and a model or an
        # adapter that cannot be found or served fail at once, not after the import.
        self.backend, (model_path, settings) = await asyncio.gather(
            run_blocking(self.load_backend), self.find_model_and_adapters()
        )
        backend = self.backend
        model_config = json.loads((model_path / "config.json").read_text())
        on_cpu = backend.platform() == "cpu"
        if not on_cpu and not gpus:  # vLLM's CUDA build (the GPU image) where NVML finds no GPU
            raise ValueError(
                "no NVIDIA GPU: NVML finds none (no driver, or no GPU passed to this container), and this vLLM is "
                "the CUDA build, which needs one: run the GPU image with the GPUs passed through (docker run --gpus "
                "all, with the NVIDIA driver and Container Toolkit on the host), or the CPU image where there is none")
        errors = layout_errors(settings, model_config, on_cpu, gpus, len(cpus), gpu)
        if errors:
            raise ValueError("; ".join(errors))
        args = backend.engine_args(settings, model_path, self.model_id, model_config, gpu)
        environment = engine_environment(settings, self.model_dir, on_cpu, cpus)
        if settings.worker_node:
            log.info("worker_node.environment", environment=environment)
            self.worker_node = WorkerNode(settings, model_path, self.model_id, environment, gpu)
            await self.worker_node.start()
            return None
        log.info(
            "engine.start",
            platform=backend.platform(),
            environment=environment,
            model_path=str(model_path),
            dtype=args.dtype,
            quantization=args.quantization,
            gpu=str(gpu) if gpu else None,
            enforce_eager=args.enforce_eager,
            enable_prefix_caching=args.enable_prefix_caching,
            stream_interval=args.stream_interval,
            kv_cache_bytes=args.kv_cache_memory_bytes,
            max_model_len=args.max_model_len,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            lora_adapters=[adapter.name for adapter in self.adapters],
            max_loras=settings.lora_slots if settings.lora_enabled else None,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.lora_cpu_slots if settings.lora_enabled else None,
            api_processes=self.clients,
        )
        # Building the engine blocks for as long as its processes take to start:
        # off the event loop, so /health keeps answering LOADING.
        # Until the engine is up, close() must stop what the start has begun, also if this start is cancelled.
        self.starting = True
        if settings.nnodes > 1:
            self.engine = await self.start_with_worker_nodes(backend, args, environment)
        else:
            self.engine = await run_blocking(backend.start_engine, args, environment,
                                             *([self.clients] if self.clients > 1 else []))
        self.starting = False
        return self.engine

    async def start_with_worker_nodes(self, backend: Backend, args: Any, environment: Mapping[str, str]) -> Engine:
        """The engine of several nodes: MASTER_WAIT_TIMEOUT for every worker node to join, then no timeout.

        A node that has not joined is a fault of the network or of that node, and
        the message names it; once all have joined the engine loads and compiles
        for as long as the CPU or GPU takes (go-livepeer judges a LOADING
        container), and the start logs its progress. A worker node lost on the
        way fails the start with its name.
        """
        settings = self.settings
        self.lines = WorkerNodeLines(settings, self.lose_worker_node)
        await self.lines.open()
        loop = asyncio.get_running_loop()
        started = loop.time()
        starting = asyncio.ensure_future(run_blocking(backend.start_engine, args, environment))
        starting.add_done_callback(lambda done: done.cancelled() or done.exception())
        joined = asyncio.ensure_future(self.lines.all_joined.wait())
        lost = asyncio.ensure_future(self.node_lost.wait())
        try:
            await asyncio.wait({starting, joined, lost}, timeout=settings.master_wait_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not (starting.done() or joined.done() or lost.done()):
                raise ValueError(
                    f"not every worker node joined within MASTER_WAIT_TIMEOUT ({settings.master_wait_timeout:g} s): "
                    f"{self.lines.missing()}; start the worker nodes (NODE_RANK=1..{settings.nnodes - 1}) with "
                    f"MASTER_ADDR={settings.master_addr} and MASTER_PORT={settings.master_port}, check that they "
                    f"reach this node at ports {settings.master_port} and {settings.node_line_port} (NODE_LINE_PORT), "
                    "or raise MASTER_WAIT_TIMEOUT")
            if joined.done():
                log.info("serving_node.worker_nodes_joined", seconds=round(loop.time() - started, 2),
                         next="the engine loads and compiles; no timeout of its own from here")
            while not (starting.done() or lost.done()):
                await asyncio.wait({starting, lost}, timeout=START_PROGRESS_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not (starting.done() or lost.done()):
                    log.info("engine.starting", seconds=round(loop.time() - started, 1), worker_nodes="all joined")
            if self.node_error is not None:
                raise ValueError(f"the engine could not start: {self.node_error}")
            engine = starting.result()
            self.lines.watch_silence()
            return engine
        except Exception:
            if not starting.done():
                stopped = await run_blocking(backend.stop_engine_processes, ABANDONED_START_GRACE)
                log.info("engine.start_stopped", processes=stopped)
            self.starting = False  # what it had started is ended: close() has nothing more to stop
            raise
        finally:
            joined.cancel()
            lost.cancel()

    async def find_model_and_adapters(self) -> tuple[Path, LLMSettings]:
        """The model's folder (downloaded where needed) and the settings its adapters leave; raises when either cannot serve."""
        model_path = await run_blocking(resolve_model, self.model_id, self.model_dir)
        if not (model_path / "config.json").is_file():
            raise not_a_model(self.model_id, model_path)
        return model_path, await self.find_adapters(model_path) if self.settings.lora_enabled else self.settings

    async def find_adapters(self, model_path: Path) -> LLMSettings:
        """LORA_ADAPTERS found (downloaded where needed, all at once) and checked; the settings with the engine's LoRA rank.

        A worker node reads no adapters: the serving node does, and MAX_LORA_RANK, which every node must set, sizes them.
        """
        settings = self.settings
        if settings.worker_node:
            self.max_lora_rank = settings.max_lora_rank
            return settings
        self.base = await run_blocking(served_base, self.model_id, model_path)
        found = await asyncio.gather(*(run_blocking(self.read, name, source) for name, source in settings.lora_adapters),
                                     return_exceptions=True)
        errors = [f"adapter {name!r} has the base model's id (MODEL_ID): give the adapter a name of its own"
                  for name, _ in settings.lora_adapters if name == self.model_id]
        errors += [str(result) for result in found if isinstance(result, BaseException)]
        for result in found:
            if isinstance(result, BaseException) and not isinstance(result, AdapterError):
                raise result
        self.adapters = [result for result in found if isinstance(result, AdapterFiles)]
        ranks = [adapter.rank for adapter in self.adapters] + ([RUNTIME_LORA_RANK] if settings.lora_runtime_updates else [])
        try:
            self.max_lora_rank = settings.max_lora_rank or rank_for(ranks)
        except AdapterError as exc:
            errors.append(str(exc))
        for adapter in self.adapters:
            errors += fit_errors(adapter, self.base, self.max_lora_rank)
        if errors:
            raise AdapterError("; ".join(errors))
        if settings.max_lora_rank is None:
            log.info("engine.max_lora_rank", rank=self.max_lora_rank, chosen_by="the adapters' ranks"
                     + (f" and {RUNTIME_LORA_RANK} for run-time loads" if settings.lora_runtime_updates else ""))
        return settings.model_copy(update={"max_lora_rank": self.max_lora_rank})

    def read(self, name: str, source: str) -> AdapterFiles:
        """An adapter from a local folder or the Hub (into the model store, as the base model is); blocks while it downloads."""
        local = Path(source).expanduser()
        if not local.is_dir() and source.startswith(("/", ".", "~")):
            raise AdapterError(f"adapter {name!r}: {source} is not a folder: give a local folder in PEFT's format "
                               f"({ADAPTER_CONFIG} and its weights) or a Hub id")
        try:
            path = resolve_model(source, self.model_dir)
        except ModelDownloadError as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from None
        return read_adapter(name, path)

    async def prepare_adapter(self, name: str, source: str) -> AdapterFiles:
        """An adapter asked for at run time, found and checked against the running engine; AdapterError says why not.

        Its download, if any, stops with its request: cancelling this stops the download, and returns once its
        thread has ended and removed what it wrote.
        """
        limits = DownloadLimits(self.settings.lora_max_bytes, "LORA_MAX_BYTES")
        reading = asyncio.ensure_future(run_blocking(self.read_at_run_time, name, source, limits))
        try:
            adapter = await asyncio.shield(reading)
        except asyncio.CancelledError:
            limits.stop.set()
            await asyncio.wait({reading}, timeout=STOPPED_DOWNLOAD_WAIT)
            if reading.done() and not reading.cancelled():
                reading.exception()  # retrieved: the request is gone, its error is of no use
            log.info("adapter.load.stopped", model=name, source=source, bytes=limits.spent)
            raise
        errors = fit_errors(adapter, self.base, self.max_lora_rank)
        if errors:
            raise AdapterError("; ".join(errors))
        return adapter

    def read_at_run_time(self, name: str, source: str, limits: DownloadLimits) -> AdapterFiles:
        """A run-time ``lora_path``: a folder under LORA_ROOT, or a Hub id downloaded into the store within ``limits``.

        What a caller is told never lists a folder, never says what lies outside LORA_ROOT (a path outside it is
        refused before anything is looked at), and never shows the store's paths.
        """
        if hub_id(source):
            try:
                path = resolve_model(source, self.model_dir, local_folders=False, limits=limits)
            except DownloadStopped:
                raise
            except ModelDownloadError as exc:
                log.warning("adapter.download.failed", model=name, source=source, reason=str(exc))
                raise AdapterError(f"adapter {name!r}: {exc.public}") from None
            return read_adapter(name, path, shown=source)
        outside = AdapterError(f"adapter {name!r}: lora_path must be a Hub id (org/name) or the absolute path of a "
                               "folder under the runner's LORA_ROOT")
        if not os.path.isabs(source):
            raise outside
        path = Path(os.path.realpath(source))  # symbolic links and .. resolved before the check, not after
        if not path.is_relative_to(self.lora_root):
            log.warning("adapter.load.outside_root", model=name, source=source, lora_root=str(self.lora_root))
            raise outside
        return read_adapter(name, path, shown=source)

    def lose_worker_node(self, reason: str) -> None:
        """A worker node went away (WorkerNodeLines): this runner is ERROR for good, and its engine is ended.

        The ranks left would wait on the lost ones' collectives for ever: ending the
        engine's processes makes every request in flight end with its error (a 500,
        or a stream's in-band error event) instead of hanging; new ones are 503.
        """
        self.node_error = reason
        self.node_lost.set()
        if self.engine is not None and self.backend is not None and self.ending is None:
            self.ending = asyncio.create_task(run_blocking(self.backend.stop_engine_processes, ABANDONED_START_GRACE))

    def failure(self) -> str | None:
        if self.worker_node is not None:
            return self.worker_node.error
        if self.node_error is not None:
            return self.node_error
        if self.engine_lost is not None:
            return self.engine_lost
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine has stopped (its worker process died or failed)"
        return None

    def metrics_registry(self):
        return self.engine.metrics_registry() if self.engine is not None else None

    async def close(self) -> None:
        if self.lines is not None:  # first: the worker nodes see this node go, and stop their ranks at once
            await self.lines.close()
        if self.ending is not None:
            await self.ending
        if self.worker_node is not None:
            await self.worker_node.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await run_blocking(engine.shutdown)
        elif self.starting:  # stopped, or failed, while the engine was starting: end what it had started
            stopped = await run_blocking(self.backend.stop_engine_processes, ABANDONED_START_GRACE)
            log.info("engine.start_stopped", processes=stopped)


def hub_id(source: str) -> bool:
    """Whether a run-time lora_path is a Hub repository id ("org/name" or "name"), not a path of this machine."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def served_base(model_id: str, model_path: Path) -> ServedBase:
    return ServedBase(model_id, model_path, checkpoint_shapes(model_path))


def not_a_model(model_id: str, model_path: Path) -> ValueError:
    if (model_path / ADAPTER_CONFIG).is_file():
        return ValueError(f"MODEL_ID {model_id!r} is a LoRA adapter, not a model: serve its base model as MODEL_ID "
                          f"and name the adapter in LORA_ADAPTERS (e.g. LORA_ADAPTERS=mine={model_id})")
    return ValueError(f"MODEL_ID {model_id!r}: {model_path} has no config.json, so it is not a model vLLM can load")


def count_gpus() -> int:
    nvml = NVML()
    try:
        return nvml.device_count()
    finally:
        nvml.close()


def least_capable_gpu() -> GPU | None:
    """The machine's GPU of the lowest compute capability (what USE_8BIT's method must run on), or None."""
    nvml = NVML()
    try:
        gpus = [GPU(info.name, (info.major, info.minor)) for info in nvml.compute_info().values()]
    finally:
        nvml.close()
    return min(gpus, key=lambda gpu: gpu.capability, default=None)
