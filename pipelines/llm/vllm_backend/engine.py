"""vLLM's ``AsyncLLM`` behind the pipeline's ``Engine`` protocol (``pipelines.llm.engine``).

The llm pipeline's host imports this package once loading starts (importing vLLM
and torch takes seconds); nothing outside ``pipelines.llm.vllm_backend`` imports vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psutil
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.utils import EngineZmqListeners, bind_engine_zmq_listeners, launch_core_engines
from vllm.v1.executor import Executor
from vllm.v1.metrics.loggers import PrometheusStatLogger

from pipelines.llm import lifeline
from pipelines.llm.engine import Adapter, AdapterRefused, Sampling, SamplingRefused
from pipelines.llm.vllm_backend import grammar
from pipelines.llm.vllm_backend.reasoning_parsers import (
    ReasoningParser,
    reasoning_parser_names,
)
from pipelines.llm.vllm_backend.tool_parsers import ToolCallParser, tool_parser_names

log = structlog.get_logger(__name__)

# go-livepeer kills a container 8 s after SIGTERM and the runner drains for up to DRAIN_TIMEOUT (5 s) first:
# the engine's processes get 0.5 s to exit (not vLLM's 5), then are killed. Nothing is left to save by then
# (the drain is over), and vLLM's workers do not end on SIGTERM anyway: its own shutdown kills them too.
ENGINE_SHUTDOWN_TIMEOUT = 0.5
KILLED_GONE_TIMEOUT = 1.0  # seconds a SIGKILLed process gets to be gone (milliseconds, unless the machine is swamped)


@contextlib.contextmanager
def process_environment(variables: Mapping[str, str]) -> Iterator[None]:
    """``variables`` in this process's environment while the engine's processes start, restored after.

    vLLM starts its processes with multiprocessing, which hands them this
    process's environment and takes no other; vLLM itself sets OMP_NUM_THREADS
    around its own process starts the same way.
    """
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def engine_series_logger(registry: CollectorRegistry) -> type[PrometheusStatLogger]:
    """vLLM's Prometheus stat logger, recording into ``registry`` instead of prometheus_client's global one."""
    metrics = {
        "_gauge_cls": functools.partial(Gauge, registry=registry),
        "_counter_cls": functools.partial(Counter, registry=registry),
        "_histogram_cls": functools.partial(Histogram, registry=registry),
    }

    def own(cls: type) -> type:
        return type(cls.__name__, (cls,), {name: made for name, made in metrics.items() if hasattr(cls, name)})

    helpers = ("_spec_decoding_cls", "_kv_connector_cls", "_ec_connector_cls", "_perf_metrics_cls")
    return type("EngineSeries", (PrometheusStatLogger,), {
        **metrics, **{name: own(getattr(PrometheusStatLogger, name)) for name in helpers},
    })


def engine_processes() -> list[psutil.Process]:
    """The processes this process started for its engine (all of them, the engine core's workers included).

    multiprocessing's resource tracker is spared: it removes the shared memory the others leave.
    """
    processes = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that ended while it was looked at is not there to end
            if "resource_tracker" not in " ".join(child.cmdline()):
                processes.append(child)
    return processes


def end_processes(processes: list[psutil.Process], grace: float) -> None:
    """SIGKILL those of ``processes`` still running ``grace`` seconds on (SIGTERM was sent before); return once gone.

    Polled, not ``psutil.wait_procs``: that waits the whole grace on a zombie
    grandchild, and this runs inside the stop's budget. Returns once every one
    has ended (or KILLED_GONE_TIMEOUT passed): a stop that returns leaves none.
    """
    alive = lifeline.left_after(processes, grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    left = lifeline.left_after(alive, KILLED_GONE_TIMEOUT)
    if left:
        log.error("engine.processes_left", pids=[process.pid for process in left])


def stop_engine_processes(grace: float = ENGINE_SHUTDOWN_TIMEOUT) -> int:
    """End the engine processes this process started: SIGTERM to all at once, SIGKILL after ``grace`` seconds.

    For an engine whose start was cut short (``AsyncLLM`` offers no way to stop
    its own construction), or one that must end now (a lost worker node). No
    process starts after this (a start still under way would start its engine
    core or workers once the children were counted). Returns how many were signalled.
    """
    lifeline.adopt_orphans()
    lifeline.refuse_children()
    children = engine_processes()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)
    end_processes(children, grace)
    # A child may have been starting a process of its own as it was signalled (the engine core its worker): that
    # one is adopted here once its parent is gone, and ended too.
    ended = {child.pid for child in children}
    for _ in range(3):
        late = [child for child in engine_processes() if child.pid not in ended and lifeline.running(child)]
        if not late:
            break
        for child in late:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        end_processes(late, 0.0)
        ended.update(child.pid for child in late)
    return len(children)


def lora_request(adapter: Adapter) -> LoRARequest:
    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=str(adapter.path))


def engine_reason(message: str) -> str:
    """The worker's own words out of vLLM's wrapping ("Call to add_lora method failed: Worker failed with error '...'")."""
    head, quote, rest = message.partition("Worker failed with error '")
    if not quote:
        return message
    return rest.split("', please check the stack trace", 1)[0]


@dataclass
class EngineShare:
    """What API process ``index`` of ``count`` needs to reach a running engine: vLLM's multi-API-server client
    config (``vllm serve --api-server-count``'s, as ``APIServerProcessManager`` builds it: the listening sockets
    the engine core has connected to, handed over), the engine's arguments, and the environment it started in."""

    args: AsyncEngineArgs
    environment: dict[str, str]
    client: dict[str, Any]
    count: int
    index: int


def client_config(listeners: EngineZmqListeners, index: int, count: int) -> dict[str, Any]:
    """API process ``index``'s ``client_addresses``, as vLLM's ``APIServerProcessManager`` builds them."""
    return {
        "input_address": listeners.inputs[index].address,
        "output_address": listeners.outputs[index].address,
        "input_listener": listeners.inputs[index].socket,
        "output_listener": listeners.outputs[index].socket,
        "client_count": count,
        "client_index": index,
    }


class VLLMEngine:
    """One running ``AsyncLLM``, as the ``Engine`` protocol describes it.

    With ``clients`` > 1 (API_PROCESSES) it is one of several ``AsyncLLM``
    clients of one engine core, as under ``vllm serve --api-server-count``:
    the primary's (client 0) launches the engine core with room for all
    (``start``), the others join it from their own processes (``join``).
    """

    def __init__(self, engine: AsyncLLM, registry: CollectorRegistry, args: AsyncEngineArgs | None = None,
                 environment: Mapping[str, str] | None = None, listeners: EngineZmqListeners | None = None,
                 clients: int = 1) -> None:
        self.engine = engine
        self.registry = registry
        self.args = args
        self.environment = dict(environment or {})
        self.listeners = listeners  # the other clients' listening sockets, held until the engine stops
        self.clients = clients
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len: int = engine.model_config.max_model_len
        self.dtype: str = str(engine.model_config.dtype).removeprefix("torch.")  # "auto" resolved, e.g. float32
        self.vocab_size: int = engine.model_config.get_vocab_size()

    @classmethod
    def start(cls, args: AsyncEngineArgs, environment: Mapping[str, str], clients: int = 1) -> VLLMEngine:
        """Build the engine, its processes started with ``environment``; blocks until they are up.

        ``clients`` > 1: the engine core is launched the way ``vllm serve``'s
        ``run_multi_api_server`` does (``bind_engine_zmq_listeners`` for every
        client, ``launch_core_engines``), and this process is client 0.
        """
        registry = CollectorRegistry(auto_describe=True)
        lifeline.bind_children()  # the engine core and its workers die with this process, however it dies
        with process_environment(environment):
            if clients == 1:
                engine = AsyncLLM.from_engine_args(args, stat_loggers=[engine_series_logger(registry)])
                return cls(engine, registry)
            args = replace(args)
            args._api_process_count, args._api_process_rank = clients, -1  # the engine core's view, as vllm serve's
            config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
            executor = Executor.get_class(config)
            listeners = bind_engine_zmq_listeners(config, clients)
            try:
                with launch_core_engines(config, executor, not args.disable_log_stats, listeners.addresses) as launch:
                    pass  # returns once the engine core is up and has connected to every client's listener
                config.parallel_config._api_process_rank = 0
                engine = AsyncLLM(config, executor, log_stats=not args.disable_log_stats,
                                  log_requests=args.enable_log_requests, usage_context=UsageContext.OPENAI_API_SERVER,
                                  stat_loggers=[engine_series_logger(registry)],
                                  client_addresses=client_config(listeners, 0, clients), client_count=clients,
                                  client_index=0)
            except BaseException:
                listeners.cleanup()
                raise
        # As when AsyncLLM launches its engine itself: the client holds the engine core's process manager (which
        # ends the engine core once collected, and with the client's shutdown), and watches the engine core, so that
        # its death fails the requests in flight and marks the engine errored.
        engine.engine_core.resources.engine_manager = launch.engine_manager
        engine.engine_core.start_engine_core_monitor()
        return cls(engine, registry, args, environment, listeners, clients)

    def share(self, index: int) -> EngineShare:
        """What API process ``index`` (1 to clients - 1) needs to ``join`` this engine."""
        if self.listeners is None or not 0 < index < self.clients:
            raise ValueError(f"this engine has no client {index} (it was started for {self.clients})")
        return EngineShare(replace(self.args, _api_process_rank=index), self.environment,
                           client_config(self.listeners, index, self.clients), self.clients, index)

    @classmethod
    def join(cls, share: EngineShare) -> VLLMEngine:
        """Client ``share.index`` of an engine another process started: its own ``AsyncLLM`` on the handed sockets."""
        registry = CollectorRegistry(auto_describe=True)
        with process_environment(share.environment):
            config = share.args.create_engine_config(UsageContext.OPENAI_API_SERVER)
            engine = AsyncLLM(config, Executor.get_class(config), log_stats=not share.args.disable_log_stats,
                              log_requests=share.args.enable_log_requests,
                              usage_context=UsageContext.OPENAI_API_SERVER,
                              stat_loggers=[engine_series_logger(registry)], client_addresses=share.client,
                              client_count=share.count, client_index=share.index)
        return cls(engine, registry)

    def lose(self) -> None:
        """What the primary's engine-core monitor does on the engine core's death (``MPClient.
        start_engine_core_monitor``: ``engine_dead``, then the client's shutdown): its sockets close and its output
        task ends with EngineDeadError, which the output handler hands to every request in flight."""
        core = self.engine.engine_core
        core.resources.engine_dead = True
        core.shutdown()

    @property
    def errored(self) -> bool:
        return self.engine.errored

    def unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def sampling_params(self, sampling: Sampling) -> SamplingParams:
        """The one builder of SamplingParams; SamplingRefused, with vLLM's message, for values vLLM refuses."""
        # -1, 0 and anything from the vocabulary's size up all mean "off"; a top_k
        # beyond 64 bits would not even reach the engine.
        top_k = 0 if sampling.top_k == -1 or sampling.top_k >= self.vocab_size else sampling.top_k
        try:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=top_k,
                min_p=sampling.min_p,
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                ignore_eos=sampling.ignore_eos,
                stop=sampling.stop or None,
                stop_token_ids=sampling.stop_token_ids or None,
                include_stop_str_in_output=sampling.include_stop_str_in_output,
                skip_special_tokens=sampling.skip_special_tokens,
                spaces_between_special_tokens=sampling.spaces_between_special_tokens,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                logit_bias=sampling.logit_bias,
                logprobs=sampling.logprobs,
                prompt_logprobs=sampling.prompt_logprobs,
                bad_words=sampling.bad_words or None,
                allowed_token_ids=sampling.allowed_token_ids,
                structured_outputs=structured_outputs(sampling),
                output_kind=RequestOutputKind.DELTA,  # only new tokens each step: nothing to diff
            )
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise SamplingRefused(str(exc), getattr(exc, "parameter", None)) from None

    def generate(self, prompt: list[int], sampling: Sampling, request_id: str,
                 adapter: Adapter | None = None) -> AsyncIterator[RequestOutput]:
        params = self.sampling_params(sampling)
        # The checks the engine makes when it takes the request (token ids in range, a grammar that compiles), made
        # now: they are the client's mistakes, and the engine takes the request only when the iterator is first read.
        config = self.engine.vllm_config
        try:
            params.verify(self.engine.model_config, config.speculative_config, config.structured_outputs_config,
                          self.tokenizer)
            # bad_words as token ids, which the engine makes only once it takes the request: more than
            # VLLM_MAX_NUM_BAD_WORDS of them, or one that is no token, would fail the request there, not here.
            params.update_from_tokenizer(self.tokenizer)
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise SamplingRefused(str(exc), getattr(exc, "parameter", None)) from None
        return self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id,
                                    lora_request=None if adapter is None else lora_request(adapter))

    async def add_adapter(self, adapter: Adapter) -> None:
        try:
            await self.engine.add_lora(lora_request(adapter))
        except Exception as exc:  # the engine core's refusal comes back as a plain Exception with its worker's message
            raise AdapterRefused(engine_reason(str(exc))) from None

    async def remove_adapter(self, adapter: Adapter) -> None:
        await self.engine.remove_lora(adapter.id)

    def tool_parser_names(self) -> list[str]:
        return tool_parser_names()

    def tool_parser(self, name: str) -> ToolCallParser:
        return ToolCallParser(name, self.tokenizer)

    def reasoning_parser_names(self) -> list[str]:
        return reasoning_parser_names()

    def reasoning_parser(self, name: str) -> ReasoningParser:
        return ReasoningParser(name, self.tokenizer)

    def metrics_registry(self) -> CollectorRegistry:
        return self.registry

    def grammar_tokenizer_info(self) -> str | None:
        return grammar.tokenizer_info(self.tokenizer, self.vocab_size)

    def shutdown(self) -> None:
        """End the engine within ENGINE_SHUTDOWN_TIMEOUT (and SIGKILL's moment), every process it started included.

        vLLM's own shutdown signals the engine core, which then waits for its
        workers before killing them: two waits in a row. Here every process gets
        SIGTERM at once, vLLM's shutdown closes this side (its sockets, the output
        handler), and whatever is still alive at the end of the one grace is killed.
        """
        processes = engine_processes()
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + ENGINE_SHUTDOWN_TIMEOUT
        self.engine.shutdown(ENGINE_SHUTDOWN_TIMEOUT)
        end_processes(processes, max(0.0, deadline - time.monotonic()))
        if self.listeners is not None:
            self.listeners.cleanup()


def structured_outputs(sampling: Sampling) -> StructuredOutputsParams | None:
    """The request's structured-outputs constraint in vLLM's terms, or None for free text."""
    constraint: dict = {}
    if sampling.json_schema is not None:
        constraint["json"] = sampling.json_schema
    if sampling.json_object:
        constraint["json_object"] = True
    for name in ("regex", "choice", "grammar"):
        if getattr(sampling, name) is not None:
            constraint[name] = getattr(sampling, name)
    if sampling.structural_tag is not None:
        constraint["structural_tag"] = json.dumps(sampling.structural_tag)
    if not constraint:
        return None
    return StructuredOutputsParams(
        **constraint,
        disable_any_whitespace=sampling.disable_any_whitespace,
        disable_additional_properties=sampling.disable_additional_properties,
        whitespace_pattern=sampling.whitespace_pattern,
    )
