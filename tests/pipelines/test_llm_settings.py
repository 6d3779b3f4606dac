"""The llm pipeline's settings and the engine sizes that follow from them, checked without an engine."""

from __future__ import annotations


import pytest
import structlog
from pydantic import ValidationError

from pipelines.llm_settings import LLMSettings, parallelism_errors

LLAMA_8B = {"num_attention_heads": 32, "num_hidden_layers": 32}


def settings(**env: str) -> LLMSettings:
    return LLMSettings(**env)


def test_defaults_are_the_contracts():
    defaults = settings()
    assert (defaults.use_8bit, defaults.pipeline_parallel_size, defaults.tensor_parallel_size) == (False, 1, 1)
    assert (defaults.max_model_len, defaults.max_num_batched_tokens, defaults.max_num_seqs) == (8192, 8192, 128)
    assert defaults.gpu_memory_utilization == 0.85
    assert defaults.max_in_flight == 256, "the queue behind the batch is as deep as the batch"


def test_environment_names_are_the_documented_ones(monkeypatch):
    monkeypatch.setenv("MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("MAX_NUM_SEQS", "8")
    monkeypatch.setenv("MAX_WAITING_REQUESTS", "2")
    loaded = LLMSettings()
    assert loaded.max_model_len == 4096 and loaded.max_in_flight == 10


def test_batched_tokens_are_raised_to_the_longest_sequence_with_a_warning():
    with structlog.testing.capture_logs() as logs:
        raised = settings(MAX_MODEL_LEN="16384", MAX_NUM_BATCHED_TOKENS="4096")
    assert raised.max_num_batched_tokens == 16384
    assert [entry["event"] for entry in logs] == ["settings.max_num_batched_tokens.raised"]


@pytest.mark.parametrize("value", ["0", "1.01", "-0.5", "lots"])
def test_memory_share_must_be_in_zero_one(value):
    with pytest.raises(ValidationError, match="GPU_MEMORY_UTILIZATION"):
        settings(GPU_MEMORY_UTILIZATION=value)


def test_memory_share_of_one_is_allowed():
    assert settings(GPU_MEMORY_UTILIZATION="1").gpu_memory_utilization == 1


@pytest.mark.parametrize("name", ["TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "MAX_NUM_SEQS"])
def test_sizes_are_positive(name):
    with pytest.raises(ValidationError, match=name):
        settings(**{name: "0"})


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


def test_multimodal_configs_are_read_from_their_text_config():
    config = {"text_config": {"num_attention_heads": 8, "num_hidden_layers": 4}}
    assert parallelism_errors(settings(TENSOR_PARALLEL_SIZE="3"), config, devices=8)[0].endswith("8 attention heads")


SMOLLM2_135M = {  # the config.json fields that size a KV cache
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
}
SMOLLM2_FLOAT32_TOKEN = 2 * 30 * 3 * 64 * 4  # keys and values, 30 layers, 3 KV heads of 64, 4 bytes


def test_kv_bytes_per_token_follow_the_model_config():
    from pipelines.llm_settings import kv_bytes_per_token

    assert kv_bytes_per_token(SMOLLM2_135M, "float32") == SMOLLM2_FLOAT32_TOKEN
    assert kv_bytes_per_token(SMOLLM2_135M, "bfloat16") == SMOLLM2_FLOAT32_TOKEN // 2
    # head_dim, when given, wins over hidden_size / heads; no KV heads means one per attention head
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                               "head_dim": 32}, "float16") == 2 * 2 * 4 * 32 * 2
    assert kv_bytes_per_token({"text_config": SMOLLM2_135M}, "float32") == SMOLLM2_FLOAT32_TOKEN
    assert kv_bytes_per_token({"num_hidden_layers": 30}, "float32") is None


def test_the_cpu_kv_cache_is_sized_from_the_model_not_from_free_ram():
    from pipelines.llm_settings import GiB, cpu_kv_cache_bytes

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
    from pipelines.llm_settings import cpu_engine_variables

    every_core = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_engine_variables({}, 2) == every_core
    assert cpu_engine_variables({}, 4) == every_core
    assert cpu_engine_variables({}, 8) == {}, "a reserved core is a small share of a larger machine: vLLM's layout"
    assert cpu_engine_variables({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, 2) == {}
    assert cpu_engine_variables({"VLLM_CPU_OMP_THREADS_BIND": "0"}, 2) == {}
    assert cpu_engine_variables({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, 2) == every_core


def test_on_a_cpu_each_rank_needs_a_core_and_the_message_says_what_to_change():
    [error] = parallelism_errors(settings(TENSOR_PARALLEL_SIZE="2", PIPELINE_PARALLEL_SIZE="2"), LLAMA_8B,
                                 devices=2, device="core")
    assert error.startswith("TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 4 ranks of at least one core each, "
                            "but this machine has 2 cores")
    assert "NNODES" in error
    assert parallelism_errors(settings(TENSOR_PARALLEL_SIZE="2"), LLAMA_8B, devices=2, device="core") == []


def test_several_nodes_count_every_nodes_devices():
    two_nodes = {"NNODES": "2", "TENSOR_PARALLEL_SIZE": "4", "PIPELINE_PARALLEL_SIZE": "2"}
    assert parallelism_errors(settings(**two_nodes), LLAMA_8B, devices=4) == [], "2 nodes of 4 GPUs hold 8 ranks"
    [error] = parallelism_errors(settings(**two_nodes), LLAMA_8B, devices=2)
    assert error == ("TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 8 ranks over NNODES=2 is 4 GPUs a node, "
                     "but this node has 2 (all nodes: 4): lower the sizes or raise NNODES")
    [error] = parallelism_errors(settings(NNODES="3", TENSOR_PARALLEL_SIZE="2"), LLAMA_8B, devices=8)
    assert error.startswith("NNODES=3 must divide TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE = 2")
    [error] = parallelism_errors(settings(NNODES="2", NODE_RANK="2", TENSOR_PARALLEL_SIZE="2"), LLAMA_8B, devices=1)
    assert error == "NODE_RANK=2 must be below NNODES=2 (ranks count from 0)"
    assert settings(NNODES="2", TENSOR_PARALLEL_SIZE="4").local_world_size == 2


def test_ray_is_refused_on_cpus_with_vllms_reason_and_needs_a_cluster_elsewhere():
    from pipelines.llm_settings import distributed_errors

    ray = settings(DISTRIBUTED_EXECUTOR_BACKEND="ray")
    [error] = distributed_errors(ray, on_cpu=True, environ={"RAY_ADDRESS": "10.0.0.1:6379"})
    assert "current platform cpu does not support ray" in error and "use mp" in error
    [error] = distributed_errors(ray, on_cpu=False, environ={})
    assert "needs RAY_ADDRESS" in error and "does not start one" in error
    assert distributed_errors(ray, on_cpu=False, environ={"RAY_ADDRESS": "10.0.0.1:6379"}) == []
    assert distributed_errors(settings(DISTRIBUTED_EXECUTOR_BACKEND="mp"), on_cpu=True, environ={}) == []
    with pytest.raises(ValidationError, match="DISTRIBUTED_EXECUTOR_BACKEND"):
        settings(DISTRIBUTED_EXECUTOR_BACKEND="threads")


def test_pipeline_parallel_on_cpus_runs_compiled():
    from pipelines.llm_settings import cpu_enforce_eager, distributed_errors

    assert cpu_enforce_eager(settings()) is True
    assert cpu_enforce_eager(settings(PIPELINE_PARALLEL_SIZE="2")) is False
    assert cpu_enforce_eager(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="false")) is False
    [error] = distributed_errors(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="true"), on_cpu=True, environ={})
    assert "unset ENFORCE_EAGER" in error
    assert distributed_errors(settings(PIPELINE_PARALLEL_SIZE="2", ENFORCE_EAGER="true"), on_cpu=False, environ={}) == []


def test_several_ranks_on_a_cpu_get_a_share_of_the_cores_each_unless_the_user_placed_them():
    from pipelines.llm_settings import cpu_engine_variables, cpu_thread_binding

    assert cpu_thread_binding([1, 0], 2) == "0|1"
    assert cpu_thread_binding(range(5), 2) == "0,1,2|3,4"
    assert cpu_thread_binding(range(8), 2, reserve=1) == "0,1,2,3|4,5,6"
    assert cpu_thread_binding([0, 1], 2, reserve=1) == "0|1", "never fewer cores than ranks"
    assert cpu_engine_variables({}, 2, [0, 1], local_ranks=2) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert cpu_engine_variables({}, 8, range(8), local_ranks=2) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3|4,5,6"}
    assert cpu_engine_variables({"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, 2, [0, 1], local_ranks=2) == {}
    assert cpu_engine_variables({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, 2, [0, 1], local_ranks=2) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_prefix_caching_is_on_and_one_token_per_event_unless_asked():
    defaults = settings()
    assert defaults.enable_prefix_caching is True and defaults.stream_interval == 1
    chosen = settings(ENABLE_PREFIX_CACHING="false", STREAM_INTERVAL="4")
    assert chosen.enable_prefix_caching is False and chosen.stream_interval == 4
    with pytest.raises(ValidationError):
        settings(STREAM_INTERVAL="0")


def test_the_engine_compile_cache_lives_in_the_model_store_unless_the_user_placed_it(tmp_path):
    from pipelines.llm_settings import engine_cache_variables

    assert engine_cache_variables({}, tmp_path) == {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    assert engine_cache_variables({"VLLM_CACHE_ROOT": "/elsewhere"}, tmp_path) == {}
