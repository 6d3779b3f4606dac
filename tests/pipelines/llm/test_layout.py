"""What the llm pipeline's settings mean on a machine (pipelines.llm.layout), checked without an engine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.llm.layout import (
    GPU,
    GiB,
    checkpoint_format,
    checkpoint_weight_bits,
    cpu_eager_variables,
    cpu_engine_variables,
    cpu_enforce_eager,
    cpu_kv_cache_bytes,
    cpu_thread_binding,
    distributed_errors,
    eight_bit_errors,
    eight_bit_method,
    eight_bit_quantization,
    engine_cache_variables,
    engine_dtype,
    engine_environment,
    kv_bytes_per_token,
    layout_errors,
    parallelism_errors,
)
from pipelines.llm.settings import LLMSettings
from tests.support.nodes import NODE_SECRET

LLAMA_8B = {"num_attention_heads": 32, "num_hidden_layers": 32}


def settings(**env: str) -> LLMSettings:
    return LLMSettings(**env)


SMOLLM2_135M = {  # the config.json fields that size a KV cache
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
}
SMOLLM2_FLOAT32_TOKEN = 2 * 30 * 3 * 64 * 4  # keys and values, 30 layers, 3 KV heads of 64, 4 bytes


def test_parallelism_that_fits_the_model_and_the_machine_passes():
    assert parallelism_errors(settings(TENSOR_PARALLEL_SIZE="4", PIPELINE_PARALLEL_SIZE="2"), LLAMA_8B, devices=8) == []
    assert parallelism_errors(settings(), LLAMA_8B, devices=0) == [], "one shard runs on a CPU"


def test_tensor_shards_must_divide_the_heads():
    [error] = parallelism_errors(settings(TENSOR_PARALLEL_SIZE="3"), LLAMA_8B, devices=8)
    assert error == "TENSOR_PARALLEL_SIZE=3 must divide the model's 32 attention heads"


def test_pipeline_stages_at_most_the_layers():
    [error] = parallelism_errors(settings(PIPELINE_PARALLEL_SIZE="33"), LLAMA_8B, devices=64)
    assert error == "PIPELINE_PARALLEL_SIZE=33 is more than the model's 32 layers"


def test_shards_times_stages_at_most_the_gpus():
    [error] = parallelism_errors(settings(TENSOR_PARALLEL_SIZE="4", PIPELINE_PARALLEL_SIZE="2"), LLAMA_8B, devices=4)
    assert error == "TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 8 GPUs, but this machine has 4"


def test_dtype_auto_is_float32_on_a_cpu_and_vllms_auto_on_a_gpu():
    """bfloat16's rounding changes the default model's greedy answers on AVX2 and AMX CPUs alike: float32 on all."""
    assert engine_dtype(settings(), on_cpu=True) == "float32"
    assert engine_dtype(settings(DTYPE="auto"), on_cpu=True) == "float32"
    assert engine_dtype(settings(), on_cpu=False) == "auto"
    for dtype in ("bfloat16", "float16", "float32"):  # the operator's choice wins on either
        assert engine_dtype(settings(DTYPE=dtype), on_cpu=True) == engine_dtype(settings(DTYPE=dtype), False) == dtype


def test_multimodal_configs_are_read_from_their_text_config():
    config = {"text_config": {"num_attention_heads": 8, "num_hidden_layers": 4}}
    assert parallelism_errors(settings(TENSOR_PARALLEL_SIZE="3"), config, devices=8)[0].endswith("8 attention heads")


def test_kv_bytes_per_token_follow_the_model_config():
    assert kv_bytes_per_token(SMOLLM2_135M, "float32") == SMOLLM2_FLOAT32_TOKEN
    assert kv_bytes_per_token(SMOLLM2_135M, "bfloat16") == SMOLLM2_FLOAT32_TOKEN // 2
    # head_dim, when given, wins over hidden_size / heads; no KV heads means one per attention head
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                               "head_dim": 32}, "float16") == 2 * 2 * 4 * 32 * 2
    assert kv_bytes_per_token({"text_config": SMOLLM2_135M}, "float32") == SMOLLM2_FLOAT32_TOKEN
    assert kv_bytes_per_token({"num_hidden_layers": 30}, "float32") is None


def test_the_cpu_kv_cache_is_sized_from_the_model_not_from_free_ram():
    sequence = SMOLLM2_FLOAT32_TOKEN * 4096
    small = settings(MAX_MODEL_LEN="4096", MAX_NUM_SEQS="4")
    assert cpu_kv_cache_bytes(small, SMOLLM2_135M, "float32", 24 * GiB) == 4 * sequence
    # the contract's defaults ask for 128 sequences of 8192 tokens: capped at 4 GiB, or a quarter of the RAM
    assert cpu_kv_cache_bytes(settings(), SMOLLM2_135M, "float32", 24 * GiB) == 4 * GiB
    assert cpu_kv_cache_bytes(settings(), SMOLLM2_135M, "float32", 8 * GiB) == 2 * GiB
    # never less than one sequence of MAX_MODEL_LEN tokens, which vLLM needs to start at all
    long = settings(MAX_MODEL_LEN="131072")
    assert cpu_kv_cache_bytes(long, SMOLLM2_135M, "float32", 8 * GiB) == SMOLLM2_FLOAT32_TOKEN * 131072
    # a config that does not say: the cap
    assert cpu_kv_cache_bytes(small, {}, "float32", 24 * GiB) == 4 * GiB


def test_on_a_small_machine_the_cpu_worker_gets_every_core_unless_the_user_placed_its_threads():
    every_core = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_engine_variables(settings(), range(2)) == every_core
    assert cpu_engine_variables(settings(), range(4)) == every_core
    assert cpu_engine_variables(settings(), range(8)) == {}, "a reserved core is a small share of a larger machine: vLLM's layout"
    assert cpu_engine_variables(settings(VLLM_CPU_NUM_OF_RESERVED_CPU="1"), range(2)) == {}
    assert cpu_engine_variables(settings(VLLM_CPU_OMP_THREADS_BIND="0"), range(2)) == {}
    assert cpu_engine_variables(settings(VLLM_CPU_OMP_THREADS_BIND="auto"), range(2)) == every_core


def test_on_a_cpu_each_rank_needs_a_core_and_the_message_says_what_to_change():
    [error] = parallelism_errors(settings(TENSOR_PARALLEL_SIZE="2", PIPELINE_PARALLEL_SIZE="2"), LLAMA_8B,
                                 devices=2, device="core")
    assert error.startswith("TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 4 ranks of at least one core each, "
                            "but this machine has 2 cores")
    assert "NNODES" in error
    assert parallelism_errors(settings(TENSOR_PARALLEL_SIZE="2"), LLAMA_8B, devices=2, device="core") == []


def test_several_nodes_count_every_nodes_devices():
    two_nodes = {"NNODES": "2", "NODE_SECRET": NODE_SECRET, "TENSOR_PARALLEL_SIZE": "4", "PIPELINE_PARALLEL_SIZE": "2"}
    assert parallelism_errors(settings(**two_nodes), LLAMA_8B, devices=4) == [], "2 nodes of 4 GPUs hold 8 ranks"
    [error] = parallelism_errors(settings(**two_nodes), LLAMA_8B, devices=2)
    assert error == ("TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 8 ranks over NNODES=2 is 4 GPUs a node, "
                     "but this node has 2 (all nodes: 4): lower the sizes or raise NNODES")
    [error] = parallelism_errors(settings(NNODES="3", TENSOR_PARALLEL_SIZE="2",
                                                        NODE_SECRET=NODE_SECRET), LLAMA_8B, devices=8)
    assert error.startswith("NNODES=3 must divide TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 2")
    [error] = parallelism_errors(settings(NNODES="2", NODE_RANK="2", TENSOR_PARALLEL_SIZE="2",
                                               NODE_SECRET=NODE_SECRET), LLAMA_8B, devices=1)
    assert error == "NODE_RANK=2 must be below NNODES=2 (ranks count from 0)"
    assert settings(NNODES="2", TENSOR_PARALLEL_SIZE="4", NODE_SECRET=NODE_SECRET).local_world_size == 2


def test_ray_is_refused_on_cpus_with_vllms_reason_and_needs_a_cluster_elsewhere():
    ray = settings(DISTRIBUTED_EXECUTOR_BACKEND="ray")
    [error] = distributed_errors(settings(DISTRIBUTED_EXECUTOR_BACKEND="ray", RAY_ADDRESS="10.0.0.1:6379"), on_cpu=True)
    assert "current platform cpu does not support ray" in error and "use mp" in error
    [error] = distributed_errors(ray, on_cpu=False)
    assert "needs RAY_ADDRESS" in error and "does not start one" in error
    assert distributed_errors(settings(DISTRIBUTED_EXECUTOR_BACKEND="ray", RAY_ADDRESS="10.0.0.1:6379"),
                              on_cpu=False) == []
    assert distributed_errors(settings(DISTRIBUTED_EXECUTOR_BACKEND="mp"), on_cpu=True) == []
    with pytest.raises(ValidationError, match="DISTRIBUTED_EXECUTOR_BACKEND"):
        settings(DISTRIBUTED_EXECUTOR_BACKEND="threads")


def test_pipeline_parallel_on_cpus_runs_compiled():
    assert cpu_enforce_eager(settings()) is True
    assert cpu_enforce_eager(settings(PIPELINE_PARALLEL_SIZE="2")) is False
    assert cpu_enforce_eager(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="false")) is False
    [error] = distributed_errors(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="true"), on_cpu=True)
    assert "unset ENFORCE_EAGER" in error
    assert distributed_errors(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="true"), on_cpu=False) == []


def test_several_ranks_on_a_cpu_get_a_share_of_the_cores_each_unless_the_user_placed_them():
    assert cpu_thread_binding([1, 0], 2) == "0|1"
    assert cpu_thread_binding(range(5), 2) == "0,1,2|3,4"
    assert cpu_thread_binding(range(8), 2, reserve=1) == "0,1,2,3|4,5,6"
    assert cpu_thread_binding([0, 1], 2, reserve=1) == "0|1", "never fewer cores than ranks"
    two_ranks = {"TENSOR_PARALLEL_SIZE": "2"}
    assert cpu_engine_variables(settings(**two_ranks), [1, 0]) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert cpu_engine_variables(settings(**two_ranks), range(8)) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3|4,5,6"}
    assert cpu_engine_variables(settings(**two_ranks, VLLM_CPU_OMP_THREADS_BIND="0|1"), [0, 1]) == {}
    assert cpu_engine_variables(settings(**two_ranks, VLLM_CPU_OMP_THREADS_BIND="auto"), [0, 1]) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_the_engine_compile_cache_lives_in_the_model_store_unless_the_user_placed_it(tmp_path):
    assert engine_cache_variables(settings(), tmp_path) == {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    assert engine_cache_variables(settings(VLLM_CACHE_ROOT="/elsewhere"), tmp_path) == {}


def test_the_engine_environment_is_chosen_in_one_place_and_cpu_variables_only_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    cache = {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    assert engine_environment(settings(), tmp_path, on_cpu=True, cpus={0, 1}) == {
        **cache, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TORCH_COMPILE_DISABLE": "1"}
    assert engine_environment(settings(), tmp_path, on_cpu=False, cpus={0, 1}) == cache


def test_an_eager_cpu_engine_compiles_nothing_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    assert cpu_eager_variables(settings()) == {"TORCH_COMPILE_DISABLE": "1"}
    assert cpu_eager_variables(settings(ENFORCE_EAGER="false")) == {}, "compiled mode compiles"
    assert cpu_eager_variables(settings(PIPELINE_PARALLEL_SIZE="2")) == {}, "compiled by itself for PP"
    assert cpu_eager_variables(settings(TORCH_COMPILE_DISABLE="0")) == {}


H100, L40S, A100, T4, V100 = (GPU("NVIDIA H100", (9, 0)), GPU("NVIDIA L40S", (8, 9)), GPU("NVIDIA A100", (8, 0)),
                               GPU("Tesla T4", (7, 5)), GPU("Tesla V100-SXM2-32GB", (7, 0)))
GPTQ_4BIT = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}


def test_use_8bit_is_fp8_computed_where_the_gpu_has_fp8_and_fp8_weights_where_it_does_not():
    assert [eight_bit_method(gpu) for gpu in (H100, L40S, A100, T4, V100)] == [
        "fp8_per_channel", "fp8_per_channel", "fp8_per_tensor", "fp8_per_tensor", None]
    # several nodes each see their own GPUs only: one method for every rank, whatever each node has
    assert eight_bit_method(H100, nnodes=2) == eight_bit_method(A100, nnodes=2) == "fp8_per_tensor"
    on = settings(USE_8BIT="true")
    assert eight_bit_quantization(on, SMOLLM2_135M, H100) == "fp8_per_channel"
    assert eight_bit_quantization(settings(), SMOLLM2_135M, H100) is None, "off by default"
    assert eight_bit_quantization(on, {**SMOLLM2_135M, **GPTQ_4BIT}, H100) is None, "a checkpoint keeps its format"


def test_use_8bit_errors_name_the_machine_the_gpu_or_the_checkpoint_and_what_to_do():
    on = settings(USE_8BIT="true")
    assert eight_bit_errors(settings(), SMOLLM2_135M, on_cpu=True, gpu=None) == []
    assert eight_bit_errors(on, SMOLLM2_135M, on_cpu=False, gpu=A100) == []
    [error] = eight_bit_errors(on, SMOLLM2_135M, on_cpu=True, gpu=None)
    assert error.startswith("USE_8BIT needs an NVIDIA GPU") and "set USE_8BIT=false" in error
    [error] = eight_bit_errors(on, SMOLLM2_135M, on_cpu=False, gpu=V100)
    assert "Tesla V100-SXM2-32GB (compute capability 7.0)" in error and "7.5 or newer" in error
    assert "set USE_8BIT=false" in error
    [error] = eight_bit_errors(on, {**SMOLLM2_135M, **GPTQ_4BIT}, on_cpu=False, gpu=H100)
    assert "already quantised (gptq, 4-bit weights)" in error and "set USE_8BIT=false" in error
    [error] = eight_bit_errors(settings(USE_8BIT="true", DTYPE="float32"), SMOLLM2_135M, on_cpu=False, gpu=H100)
    assert "DTYPE=float32" in error and "set DTYPE=auto, bfloat16 or float16" in error
    # layout_errors takes the GPU only where there are GPUs
    assert layout_errors(on, SMOLLM2_135M, on_cpu=False, gpus=0, cores=8, gpu=H100)[0].startswith(
        "USE_8BIT needs an NVIDIA GPU")


def test_an_8bit_checkpoint_is_served_as_it_is_with_use_8bit():
    on = settings(USE_8BIT="true")
    fp8 = {**SMOLLM2_135M, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    assert eight_bit_errors(on, fp8, on_cpu=False, gpu=A100) == []
    assert eight_bit_quantization(on, fp8, A100) is None, "vLLM reads the format from config.json"


CHECKPOINTS = {  # config.json's quantization_config -> (format named in messages, bits per weight)
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8", 8),
    "gptq-8": ({"quant_method": "gptq", "bits": 8}, "gptq", 8),
    "awq": ({"quant_method": "awq", "w_bit": 4, "q_group_size": 128}, "awq", 4),
    "w8a8": ({"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8}}}},
        "compressed-tensors", 8),
    "w4a16": ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 4}}}},
              "compressed-tensors", 4),
    "modelopt-fp8": ({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}, "modelopt", 8),
    "mxfp4": ({"quant_method": "mxfp4"}, "mxfp4", None),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_quantised_checkpoint_says_its_format_and_width(name):
    quantization, format_, bits = CHECKPOINTS[name]
    assert (checkpoint_format(quantization), checkpoint_weight_bits(quantization)) == (format_, bits)
    model = {**SMOLLM2_135M, "quantization_config": quantization}
    errors = eight_bit_errors(settings(USE_8BIT="true"), model, on_cpu=False, gpu=H100)
    if bits == 8:
        assert errors == [], "served as it is"
    else:
        [error] = errors
        assert f"already quantised ({format_}" in error
