"""What the llm pipeline's settings mean on this machine: pure functions, no vLLM.

How the engine's ranks fit the model and the devices, where its caches and
threads go, and the one place the engine's environment is built
(``engine_environment``). Every rule here is checked without an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipelines.llm.settings import LLMSettings

GiB = 1024**3
CPU_KV_CACHE_SHARE = 0.25  # of the machine's RAM
CPU_KV_CACHE_MAX_BYTES = 4 * GiB
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
ENGINE_CACHE_FOLDER = "vllm-cache"  # inside the model store, beside the Hub's models--* folders
SMALL_MACHINE_CORES = 4  # and fewer: vLLM's worker gets every core (cpu_engine_variables)


def parallelism_errors(settings: LLMSettings, model_config: dict, devices: int, device: str = "GPU") -> list[str]:
    """What stops the engine from splitting this model the way the settings ask.

    ``devices`` are what one rank each can run on here: GPUs, or on a machine
    without one the cores this process may use (``device="core"``). vLLM puts
    the same number of ranks on every node, so several nodes have NNODES times
    this node's devices.
    """
    text_config = model_config.get("text_config", model_config)
    heads = text_config.get("num_attention_heads")
    layers = text_config.get("num_hidden_layers")
    tensor, pipeline = settings.tensor_parallel_size, settings.pipeline_parallel_size
    errors = []
    if heads and heads % tensor:
        errors.append(f"TENSOR_PARALLEL_SIZE={tensor} must divide the model's {heads} attention heads")
    if layers and pipeline > layers:
        errors.append(f"PIPELINE_PARALLEL_SIZE={pipeline} is more than the model's {layers} layers")
    world, nodes = tensor * pipeline, settings.nnodes
    if settings.node_rank >= nodes:
        errors.append(f"NODE_RANK={settings.node_rank} must be below NNODES={nodes} (ranks count from 0)")
    if world % nodes:
        errors.append(
            f"NNODES={nodes} must divide TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = {world}: "
            "every node runs the same number of ranks"
        )
    elif nodes > 1:
        if world // nodes > devices:
            errors.append(
                f"TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = {world} ranks over NNODES={nodes} is "
                f"{world // nodes} {device}s a node, but this node has {devices} "
                f"(all nodes: {nodes * devices}): lower the sizes or raise NNODES"
            )
    elif world > 1 and world > devices:
        if device == "GPU":
            errors.append(
                f"TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = {world} GPUs, but this machine has {devices}"
            )
        else:
            errors.append(
                f"TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = {world} ranks of at least one {device} each, "
                f"but this machine has {devices} {device}{'' if devices == 1 else 's'}: lower the sizes or spread the ranks over "
                "several machines (NNODES)"
            )
    return errors


def distributed_errors(settings: LLMSettings, on_cpu: bool) -> list[str]:
    """What stops the chosen executor backend here, found before anything starts."""
    errors = []
    if settings.distributed_executor_backend == "ray":
        if on_cpu:
            errors.append(
                "DISTRIBUTED_EXECUTOR_BACKEND=ray: vLLM's CPU backend does not support Ray "
                "(\"current platform cpu does not support ray\"); on CPUs use mp (the default), "
                "with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT for several machines"
            )
        elif not settings.ray_address:
            errors.append(
                "DISTRIBUTED_EXECUTOR_BACKEND=ray needs RAY_ADDRESS, the head of a running Ray cluster "
                "(host:port); the runner joins a cluster, it does not start one"
            )
        if settings.nnodes > 1:
            errors.append("NNODES is for the mp backend; with DISTRIBUTED_EXECUTOR_BACKEND=ray, Ray places the ranks")
    if on_cpu and settings.pipeline_parallel_size > 1 and settings.enforce_eager:
        errors.append(
            "PIPELINE_PARALLEL_SIZE>1 on a CPU needs compiled mode: unset ENFORCE_EAGER or set it false "
            "(in eager mode vLLM 0.32's CPU backend stops at the first request)"
        )
    return errors


def engine_cache_variables(settings: LLMSettings, model_dir: Path) -> dict[str, str]:
    """VLLM_CACHE_ROOT in the model store, unless the user chose one: none, or one.

    vLLM keeps its torch.compile artefacts there; a container's only lasting
    folder is the store it mounts at /models, so a restarted container finds
    its compiled graphs instead of compiling again.
    """
    if settings.vllm_cache_root is not None:
        return {}
    return {"VLLM_CACHE_ROOT": str(model_dir.resolve() / ENGINE_CACHE_FOLDER)}


def cpu_enforce_eager(settings: LLMSettings) -> bool:
    """Eager mode on CPUs unless ENFORCE_EAGER says otherwise; compiled for pipeline parallelism.

    In eager mode vLLM 0.32's CPU backend fails the first request with
    PIPELINE_PARALLEL_SIZE>1 (rank 1 asserts ``intermediate_tensors is not
    None``); compiled, it serves.
    """
    if settings.enforce_eager is not None:
        return settings.enforce_eager
    return settings.pipeline_parallel_size == 1


def cpu_thread_binding(cpus: Iterable[int], ranks: int, reserve: int = 0) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``ranks`` workers: the cores split into contiguous lists, "0,1|2,3".

    vLLM's automatic binding gives each rank a NUMA node of its own and refuses
    more ranks than nodes; the runner splits the cores it may use instead.
    ``reserve`` cores (the last ones) are left to vLLM's scheduler process.
    """
    cores = sorted(cpus)
    if reserve and len(cores) - reserve >= ranks:
        cores = cores[:-reserve]
    share, extra = divmod(len(cores), ranks)
    lists, start = [], 0
    for rank in range(ranks):
        end = start + share + (rank < extra)
        lists.append(",".join(str(core) for core in cores[start:end]))
        start = end
    return "|".join(lists)


def kv_bytes_per_token(model_config: dict, dtype: str) -> int | None:
    """Keys and values of one token in every layer, or None where the config does not say."""
    text_config = model_config.get("text_config", model_config)
    layers = text_config.get("num_hidden_layers")
    heads = text_config.get("num_attention_heads")
    kv_heads = text_config.get("num_key_value_heads") or heads
    head_dim = text_config.get("head_dim")
    if not head_dim and heads and text_config.get("hidden_size"):
        head_dim = text_config["hidden_size"] // heads
    if not (layers and kv_heads and head_dim and dtype in DTYPE_BYTES):
        return None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def cpu_kv_cache_bytes(settings: LLMSettings, model_config: dict, dtype: str, total_ram: int) -> int:
    """The CPU KV cache's size when KV_CACHE_GIB is unset.

    Sized from the model and the settings, never from the RAM free at the moment,
    so that the same settings give the same capacity on every start, whatever
    else is starting beside it: room for MAX_NUM_SEQS sequences of MAX_MODEL_LEN
    tokens, at most a quarter of the machine's RAM and 4 GiB, and never less than
    one sequence of MAX_MODEL_LEN tokens (vLLM refuses to start with less).
    """
    cap = min(int(total_ram * CPU_KV_CACHE_SHARE), CPU_KV_CACHE_MAX_BYTES)
    per_token = kv_bytes_per_token(model_config, dtype)
    if per_token is None:
        return cap
    one_sequence = per_token * settings.max_model_len
    return max(min(one_sequence * settings.max_num_seqs, cap), one_sequence)


def cpu_engine_variables(settings: LLMSettings, cpus: Iterable[int]) -> dict[str, str]:
    """vLLM CPU-backend variables the runner sets where the user has not: none, or one.

    vLLM keeps one core out of its worker's thread team, for its scheduler
    process. On a small machine that is a large share of the compute: on two
    cores, letting the worker use both raised tokens per second by 45 to 67 %
    and halved time to first token (the runner at concurrency 1, 32 and 64).

    With several ranks on this node (tensor or pipeline parallel) the runner
    binds each rank's threads to a share of ``cpus`` (cpu_thread_binding),
    keeping one core for the scheduler on machines larger than a small one.
    """
    cpus = sorted(cpus)
    cores, local_ranks = len(cpus), settings.local_world_size
    if settings.vllm_cpu_threads_bind != "auto":  # the user placed the threads
        return {}
    if local_ranks > 1:
        reserved = settings.vllm_cpu_reserved_cores
        reserve = 0 if cores <= SMALL_MACHINE_CORES else (1 if reserved is None else reserved)
        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(cpus, local_ranks, reserve)}
    if cores > SMALL_MACHINE_CORES or settings.vllm_cpu_reserved_cores is not None:
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def cpu_eager_variables(settings: LLMSettings) -> dict[str, str]:
    """torch.compile off in the engine's processes when it runs eager on a CPU, unless the user chose: none, or one.

    Eager mode compiles no model, but vLLM still compiles a few helpers with
    torch.compile the first time a request needs them (its logprobs counting,
    for one), and on a CPU that is a C++ build that stops the whole engine:
    the first request with logprobs took 7.5 s instead of 0.02 s (tiny model,
    2 cores), and again for new batch shapes. Off, they run as plain torch.
    """
    if settings.torch_compile_disable is not None or not cpu_enforce_eager(settings):
        return {}
    return {"TORCH_COMPILE_DISABLE": "1"}


def engine_environment(settings: LLMSettings, model_dir: Path, on_cpu: bool, cpus: Iterable[int]) -> dict[str, str]:
    """The variables the runner adds to the environment of the engine's processes: the one place they are chosen.

    vLLM's processes read these from the environment they start with, and its
    multiprocessing start has no other way in than the parent's environment: the
    vLLM backend lays them over this process's environment only while the
    engine's processes are started, then restores it (vLLM does the same for
    OMP_NUM_THREADS), and a worker node passes them to the process that runs its
    ranks (``env=``). Nothing else in the runner writes the environment.
    """
    environment = engine_cache_variables(settings, model_dir)
    if on_cpu:
        environment.update(cpu_engine_variables(settings, cpus))
        environment.update(cpu_eager_variables(settings))
    return environment


def layout_errors(settings: LLMSettings, model_config: dict, on_cpu: bool, gpus: int, cores: int) -> list[str]:
    """Everything that stops the engine from starting the way the settings ask on this machine."""
    errors = []
    if settings.use_8bit and not gpus:
        errors.append("USE_8BIT needs an NVIDIA GPU (bitsandbytes); this machine has none")
    devices, device = (cores, "core") if on_cpu else (gpus, "GPU")
    errors += parallelism_errors(settings, model_config, devices, device)
    errors += distributed_errors(settings, on_cpu)
    return errors
