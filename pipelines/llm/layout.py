"""What the llm pipeline's settings mean on this machine: pure functions, no vLLM.

How the engine's ranks fit the model and the devices, where its caches and
threads go, and the one place the engine's environment is built
(``engine_environment``). Every rule here is checked without an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.llm.settings import LLMSettings

GiB = 1024**3
CPU_KV_CACHE_SHARE = 0.25  # of the machine's RAM
CPU_KV_CACHE_MAX_BYTES = 4 * GiB
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
CPU_DEFAULT_DTYPE = "float32"  # DTYPE=auto on every CPU (engine_dtype)
ENGINE_CACHE_FOLDER = "vllm-cache"  # inside the model store, beside the Hub's models--* folders
SMALL_MACHINE_CORES = 4  # and fewer: vLLM's worker gets every core (cpu_engine_variables)

# USE_8BIT: the checkpoint's 16-bit weights quantised to FP8 as vLLM loads them (its online
# quantisation), about half the weights' memory. vLLM 0.32 has no bitsandbytes method any more,
# and of its online shorthands only the FP8 ones quantise a dense model's linear layers
# (int8_per_channel_weight_only and nvfp4_per_token quantise MoE experts only). Which FP8 per GPU:
# - compute capability 8.9 and up (Ada, Hopper, Blackwell) computes in FP8 (vLLM's
#   CudaPlatform.supports_fp8; CUTLASS FP8 scaled-mm): fp8_per_channel, one scale per output
#   channel and per token, llm-compressor's FP8_DYNAMIC layout, the closest of them to 16 bits;
# - 7.5 to 8.8 (Turing, Ampere) has no FP8 arithmetic: fp8_per_tensor, whose weights vLLM runs
#   through its FP8 Marlin kernel (is_fp8_marlin_supported: 7.5 and up), FP8 weights computed in
#   16 bits. fp8_per_channel refuses Marlin there (it needs FP8 activations);
# - below 7.5 vLLM has no FP8 weight kernel: ERROR.
# Over several nodes (NNODES > 1) every node takes fp8_per_tensor: a node sees only its own GPUs,
# and the ranks of one tensor-parallel group must quantise alike (as it loads, the per-tensor method
# all-reduces its scales over the group for every sharded layer, the per-channel one for the
# row-parallel ones only: mixed, the ranks would wait on each other for ever).
# Online quantisation takes bfloat16 or float16 activations only
# (OnlineQuantizationConfig.get_supported_act_dtypes), so DTYPE=float32 is ERROR.
# A checkpoint that is already quantised loads in its own format with no flag (vLLM reads it from
# config.json): with USE_8BIT it is served as it is when its weights are 8-bit, ERROR otherwise.
FP8_COMPUTE_CAPABILITY = (8, 9)
FP8_WEIGHT_ONLY_CAPABILITY = (7, 5)
FP8_PER_CHANNEL, FP8_PER_TENSOR = "fp8_per_channel", "fp8_per_tensor"
EIGHT_BIT_METHODS = (FP8_PER_CHANNEL, FP8_PER_TENSOR)  # what USE_8BIT may ask of vLLM
EIGHT_BIT_DTYPES = ("auto", "bfloat16", "float16", "half")


@dataclass(frozen=True)
class GPU:
    """What the start needs to know of a GPU (NVML's name and CUDA compute capability)."""

    name: str
    capability: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


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


def engine_dtype(settings: LLMSettings, on_cpu: bool) -> str:
    """The dtype the engine computes in: DTYPE, and for ``auto`` float32 on every CPU, vLLM's own choice on a GPU.

    On a CPU ``auto`` would be the checkpoint's bfloat16, whose rounding changes
    small models' greedy answers, emulated (AVX2) or native (AVX-512 BF16, AMX):
    the default model's first token is a near-tie that bfloat16 flips on an AMX
    CPU, where it answers "L'Étoile, la Marseillaise, ..." instead of Paris.
    float32 gives the same answers on every CPU, at the speed bench/findings.md
    measures (``python -m bench.dtype``). An operator who wants bfloat16 there
    sets DTYPE=bfloat16.
    """
    if on_cpu and settings.dtype == "auto":
        return CPU_DEFAULT_DTYPE
    return settings.dtype


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


def checkpoint_quantization(model_config: dict) -> dict | None:
    """How a checkpoint is already quantised (config.json's quantization_config, where vLLM looks), or None."""
    for config in (model_config, model_config.get("text_config") or {}):
        found = config.get("quantization_config") or config.get("compression_config")
        if found:
            return found
    return None


def checkpoint_format(quantization: dict) -> str:
    producer = quantization.get("producer")
    if isinstance(producer, dict) and producer.get("name"):  # ModelOpt names itself there
        return str(producer["name"]).lower()
    method = str(quantization.get("quant_method") or "unnamed").lower()
    return method.replace("compressed_tensors", "compressed-tensors")


def checkpoint_weight_bits(quantization: dict) -> int | None:
    """Bits per weight of a quantised checkpoint, where its config says (None where it does not)."""
    if checkpoint_format(quantization) in ("fp8", "fbgemm_fp8"):
        return 8
    bits = quantization.get("bits", quantization.get("w_bit"))  # GPTQ, AWQ
    if isinstance(bits, int):
        return bits
    groups = quantization.get("config_groups")  # compressed-tensors: the same width in every group, or no answer
    if isinstance(groups, dict) and groups:
        widths = {(group.get("weights") or {}).get("num_bits") for group in groups.values() if isinstance(group, dict)}
        return widths.pop() if len(widths) == 1 else None
    algorithm = quantization.get("quant_algo") or (quantization.get("quantization") or {}).get("quant_algo")
    if isinstance(algorithm, str) and algorithm.upper().startswith("FP8"):  # ModelOpt's FP8 recipes
        return 8
    return None


def eight_bit_method(gpu: GPU, nnodes: int = 1) -> str | None:
    """vLLM's online quantisation for USE_8BIT on this GPU, or None where it has none (see FP8_COMPUTE_CAPABILITY)."""
    if gpu.capability < FP8_WEIGHT_ONLY_CAPABILITY:
        return None
    if gpu.capability >= FP8_COMPUTE_CAPABILITY and nnodes == 1:
        return FP8_PER_CHANNEL
    return FP8_PER_TENSOR


def eight_bit_quantization(settings: LLMSettings, model_config: dict, gpu: GPU | None) -> str | None:
    """vLLM's ``quantization`` argument: USE_8BIT's online FP8 method, or None (no USE_8BIT, or a quantised checkpoint).

    Meaningful once ``eight_bit_errors`` found nothing.
    """
    if not settings.use_8bit or gpu is None or checkpoint_quantization(model_config) is not None:
        return None
    return eight_bit_method(gpu, settings.nnodes)


def eight_bit_errors(settings: LLMSettings, model_config: dict, on_cpu: bool, gpu: GPU | None) -> list[str]:
    """What stops USE_8BIT here: no NVIDIA GPU, one without FP8 weight kernels, float32, a checkpoint of other bits."""
    if not settings.use_8bit:
        return []
    if on_cpu or gpu is None:
        return ["USE_8BIT needs an NVIDIA GPU (vLLM's FP8 weights) and this machine has none: set USE_8BIT=false"]
    quantization = checkpoint_quantization(model_config)
    if quantization is not None:
        bits, name = checkpoint_weight_bits(quantization), checkpoint_format(quantization)
        if bits == 8:
            return []
        return [
            f"USE_8BIT: the checkpoint is already quantised ({name}{f', {bits}-bit weights' if bits else ''}) and "
            "vLLM loads it in that format with no flag: set USE_8BIT=false, or serve the model's 16-bit checkpoint "
            "to hold its weights in 8 bits"
        ]
    errors = []
    if eight_bit_method(gpu, settings.nnodes) is None:
        major, minor = FP8_WEIGHT_ONLY_CAPABILITY
        errors.append(
            f"USE_8BIT: the GPU {gpu} has no 8-bit weight kernel in vLLM (FP8 weights need compute capability "
            f"{major}.{minor} or newer): set USE_8BIT=false, or serve a checkpoint quantised for this GPU "
            "(GPTQ runs from 6.0)"
        )
    if settings.dtype not in EIGHT_BIT_DTYPES:
        errors.append(
            f"USE_8BIT computes in bfloat16 or float16 (vLLM's FP8 quantisation takes no other), not "
            f"DTYPE={settings.dtype}: set DTYPE=auto, bfloat16 or float16"
        )
    return errors


def layout_errors(settings: LLMSettings, model_config: dict, on_cpu: bool, gpus: int, cores: int,
                  gpu: GPU | None = None) -> list[str]:
    """Everything that stops the engine from starting the way the settings ask on this machine.

    ``gpu`` is the least capable of this machine's GPUs (None: it has none).
    """
    errors = eight_bit_errors(settings, model_config, on_cpu, gpu if gpus else None)
    devices, device = (cores, "core") if on_cpu else (gpus, "GPU")
    errors += parallelism_errors(settings, model_config, devices, device)
    errors += distributed_errors(settings, on_cpu)
    return errors
