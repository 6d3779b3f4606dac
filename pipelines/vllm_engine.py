"""The engine adapter: the one module that imports vLLM.

The llm pipeline imports it once loading starts (importing vLLM and torch takes
seconds) and talks to the engine only through ``VLLMEngine``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import structlog
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from pipelines.llm_settings import GiB, LLMSettings, cpu_enforce_eager, cpu_engine_variables, cpu_kv_cache_bytes
from pipelines.sampling import Sampling

log = structlog.get_logger(__name__)

# go-livepeer kills a container 8 s after SIGTERM and the runner drains for up to
# DRAIN_TIMEOUT (5 s) first: the engine's processes get 2 s to exit, not vLLM's 5.
ENGINE_SHUTDOWN_TIMEOUT = 2.0


def platform() -> str:
    """The device type vLLM runs on here: "cpu", "cuda", ..."""
    return current_platform.device_type


def cpu_has_native_bfloat16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def engine_args(settings: LLMSettings, model_path: Path, served_name: str, model_config: dict) -> AsyncEngineArgs:
    """Raises ValueError when the CPU KV cache cannot fit in the RAM free now."""
    on_cpu = current_platform.is_cpu()
    dtype = settings.dtype
    kv_cache_bytes = int(settings.kv_cache_gib * GiB) if settings.kv_cache_gib else None
    if on_cpu:
        if dtype == "auto":
            # bfloat16 gives wrong text on CPUs that only emulate it (AVX2).
            dtype = "bfloat16" if cpu_has_native_bfloat16() else "float32"
        memory = psutil.virtual_memory()
        if kv_cache_bytes is None:
            kv_cache_bytes = cpu_kv_cache_bytes(settings, model_config, dtype, memory.total)
        if kv_cache_bytes > memory.available:
            raise ValueError(
                f"the KV cache needs {kv_cache_bytes / GiB:.2f} GiB of RAM and {memory.available / GiB:.2f} GiB "
                "is free: set KV_CACHE_GIB lower (with MAX_MODEL_LEN and MAX_NUM_SEQS to match) or free some RAM"
            )
    if on_cpu:
        enforce_eager = cpu_enforce_eager(settings)
        if not enforce_eager and settings.enforce_eager is None:
            log.info("engine.compiled_for_pipeline_parallel", pipeline_parallel_size=settings.pipeline_parallel_size,
                     why="vLLM's CPU backend fails pipeline parallelism in eager mode")
    else:
        enforce_eager = bool(settings.enforce_eager)
    return AsyncEngineArgs(
        model=str(model_path),
        served_model_name=served_name,
        dtype=dtype,
        max_model_len=settings.max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_bytes,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        quantization="bitsandbytes" if settings.use_8bit else None,
        enforce_eager=enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        stream_interval=settings.stream_interval,
        # Stats on: vLLM's PrometheusStatLogger records each step's into prometheus_client's
        # global registry, which /metrics serves (LLMPipeline.metrics_registry). Its
        # LoggingStatLogger only writes when do_log_stats() is called, which the runner never does.
        **distributed_args(settings),
    )


def distributed_args(settings: LLMSettings) -> dict:
    """The executor backend and, for several nodes, where they meet (vLLM's own multi-node launch)."""
    args = {}
    if settings.distributed_executor_backend:
        args["distributed_executor_backend"] = settings.distributed_executor_backend
    if settings.nnodes > 1:
        args.update(nnodes=settings.nnodes, node_rank=settings.node_rank,
                    master_addr=settings.master_addr, master_port=settings.master_port)
    return args


def cpu_engine_environment(local_ranks: int = 1) -> dict[str, str]:
    """What the runner adds to the environment of the engine's processes on this machine."""
    if not current_platform.is_cpu():
        return {}
    cpus = os.sched_getaffinity(0)
    return cpu_engine_variables(os.environ, len(cpus), cpus, local_ranks)


def stop_engine_processes(grace: float = ENGINE_SHUTDOWN_TIMEOUT) -> int:
    """End the engine processes this process started, for an engine whose start was cut short.

    ``AsyncLLM`` offers no way to stop its own construction; its engine core
    exits on SIGTERM (taking its workers with it), and what is left after
    ``grace`` seconds is killed. multiprocessing's resource tracker is spared:
    it removes the shared memory the others leave. Returns how many were signalled.
    """
    children = [
        child for child in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(child.cmdline())
    ]
    for child in children:
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return len(children)


class VLLMEngine:
    """One running ``AsyncLLM`` and what the pipeline reads of it."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len: int = engine.model_config.max_model_len
        self.vocab_size: int = engine.model_config.get_vocab_size()

    @classmethod
    def start(cls, args: AsyncEngineArgs) -> VLLMEngine:
        """Build the engine; blocks for as long as its processes take to start."""
        return cls(AsyncLLM.from_engine_args(args))

    @property
    def errored(self) -> bool:
        return self.engine.errored

    def unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def sampling_params(self, sampling: Sampling) -> SamplingParams:
        """The one builder of SamplingParams, for every operation.

        Raises ValueError, with vLLM's message, for values vLLM refuses (e.g. a temperature above 2).
        """
        # -1, 0 and anything from the vocabulary's size up all mean "off"; a top_k
        # beyond 64 bits would not even reach the engine.
        top_k = 0 if sampling.top_k == -1 or sampling.top_k >= self.vocab_size else sampling.top_k
        structured = None
        if sampling.json_schema is not None:
            structured = StructuredOutputsParams(json=sampling.json_schema)
        elif sampling.json_object:
            structured = StructuredOutputsParams(json_object=True)
        try:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=top_k,
                min_p=sampling.min_p,
                max_tokens=sampling.max_tokens,
                stop=sampling.stop or None,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                logit_bias=sampling.logit_bias,
                logprobs=sampling.logprobs,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,  # only new tokens each step: nothing to diff
            )
        except (VLLMClientError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    def tool_parser(self, name: str) -> ToolCallParser:
        return ToolCallParser(name, self.tokenizer)

    def generate(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id)

    def shutdown(self) -> None:
        self.engine.shutdown(ENGINE_SHUTDOWN_TIMEOUT)


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


class ToolCallParser:
    """One of vLLM's tool-call parsers, reading tool calls out of a model's whole answer."""

    def __init__(self, name: str, tokenizer) -> None:
        from vllm.tool_parsers import ToolParserManager

        self.name = name
        self.parser_class = ToolParserManager.get_tool_parser(name)
        self.tokenizer = tokenizer

    def extract(self, text: str, request: dict) -> tuple[str | None, list[tuple[str, str]]]:
        """The answer's content and its tool calls as (name, arguments JSON); ``request`` is the OpenAI body."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        vllm_request = ChatCompletionRequest.model_validate(request)
        parser = self.parser_class(self.tokenizer, vllm_request.tools)
        found = parser.extract_tool_calls(text, vllm_request)
        if not found.tools_called:
            return text, []
        return found.content, [(call.function.name, call.function.arguments) for call in found.tool_calls]


def run_worker_node(model_path: Path, served_name: str, ready_fd: int) -> None:
    """This node's share of the engine's ranks, as ``vllm serve --headless`` runs them for mp and several nodes.

    Runs in a process of its own (``python -m pipelines.vllm_engine``) that the
    worker-node runner starts in a process group it kills as a whole: vLLM's
    headless process ignores SIGTERM for longer than go-livepeer waits. Writes
    one line to ``ready_fd`` once the local ranks have joined the master, then
    returns when one of them dies.
    """
    import json

    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    settings = LLMSettings()
    model_config = json.loads((model_path / "config.json").read_text())
    args = engine_args(settings, model_path, served_name, model_config)
    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    executor = MultiprocExecutor(vllm_config, monitor_workers=False)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    executor.start_worker_monitor(inline=True)  # returns once a local rank has died
    log.error("worker_node.rank_died")


if __name__ == "__main__":
    import sys

    run_worker_node(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
