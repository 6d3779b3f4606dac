"""LoRA settings and adapter checks, without an engine: LORA_ADAPTERS' syntax, the engine's LoRA room, and
what an adapter folder must hold to be served."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.llm.adapters import AdapterError, ServedBase, model_name, rank_for, read_adapter, safetensors_shapes
from pipelines.llm.settings import LLMSettings
from tests.support.fake_engine import MODEL_CONFIG
from tests.support.lora_adapters import make_adapter, make_checkpoint


def settings(**values: str) -> LLMSettings:
    return LLMSettings.model_validate(values)


def test_adapter_list_is_name_equals_source_comma_separated(monkeypatch):
    monkeypatch.setenv("LORA_ADAPTERS", " sql = org/sql-lora , chat=/adapters/chat=v2,")
    loaded = LLMSettings()
    assert loaded.lora_adapters == (("sql", "org/sql-lora"), ("chat", "/adapters/chat=v2"))
    assert loaded.lora_enabled and (loaded.lora_slots, loaded.lora_cpu_slots) == (2, 2)
    again = LLMSettings.model_validate_json(loaded.model_dump_json(by_alias=True))
    assert again.lora_adapters == loaded.lora_adapters, "a worker node reads the same list"


@pytest.mark.parametrize("values, message", [
    ({"LORA_ADAPTERS": "sql"}, "LORA_ADAPTERS item 'sql' is not name=source"),
    ({"LORA_ADAPTERS": "=org/x"}, "is not name=source"),
    ({"LORA_ADAPTERS": "a=x,a=y"}, "LORA_ADAPTERS names 'a' twice"),
    ({"MAX_LORA_RANK": "12"}, "MAX_LORA_RANK=12 is not a rank vLLM takes (1, 8, 16, 32, 64, 128, 256, 320, 512): use 16"),
    ({"MAX_LORAS": "4", "MAX_CPU_LORAS": "2"}, "MAX_CPU_LORAS=2 is less than MAX_LORAS=4"),
    ({"LORA_RUNTIME_UPDATES": "true"}, "LORA_RUNTIME_UPDATES=true lets callers load adapters into the engine: set AUTH_TOKEN"),
    ({"LORA_ADAPTERS": "a=x", "NNODES": "2"}, "LoRA over several nodes needs MAX_LORA_RANK"),
    ({"MAX_LORAS": "0"}, "MAX_LORAS"),
])
def test_bad_lora_settings_say_what_to_change(values, message):
    with pytest.raises(ValidationError) as failure:
        settings(**values)
    assert message in str(failure.value)


def test_lora_room_defaults():
    assert not settings().lora_enabled
    many = ",".join(f"a{index}=x{index}" for index in range(12))
    assert (settings(LORA_ADAPTERS=many).lora_slots, settings(LORA_ADAPTERS=many).lora_cpu_slots) == (8, 12), \
        "a batch holds at most 8 by default; every adapter listed stays in host memory"
    runtime = settings(LORA_RUNTIME_UPDATES="true", AUTH_TOKEN="t")
    assert runtime.lora_enabled and runtime.lora_slots == 4
    assert settings(LORA_ADAPTERS="a=x", MAX_LORAS="3").lora_cpu_slots == 3


def test_ranks_round_up_to_one_vllm_takes():
    assert [rank_for(ranks) for ranks in ([1], [4], [8], [9, 2], [300], [])] == [1, 8, 8, 16, 320, 16]
    with pytest.raises(AdapterError, match="above the largest vLLM serves"):
        rank_for([1024])


@pytest.mark.parametrize("name, expected", [
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama-3.1-8b-instruct"),
    ("/models/Meta-Llama-3.1-8B-Instruct/", "meta-llama-3.1-8b-instruct"),
    ("/models/models--meta-llama--Meta-Llama-3.1-8B-Instruct/snapshots/0e9e39f", "meta-llama-3.1-8b-instruct"),
])
def test_a_model_is_known_by_its_last_name(name, expected):
    assert model_name(name) == expected


def test_an_adapter_trained_on_a_copy_of_the_base_fits_by_name(tmp_path):
    base = ServedBase("meta-llama/Meta-Llama-3.1-8B-Instruct", tmp_path, None)
    assert model_name("unsloth/Meta-Llama-3.1-8B-Instruct") in base.names()
    assert model_name("meta-llama/Llama-2-7b-hf") not in base.names()


def test_read_adapter_gives_rank_base_and_shapes(tmp_path):
    model = make_checkpoint(tmp_path / "base", MODEL_CONFIG)
    adapter = read_adapter("sql", make_adapter(tmp_path / "sql", model, rank=8, targets=("q_proj",),
                                               config_overrides={"rank_pattern": {"q_proj": 16}}))
    assert (adapter.rank, adapter.base_model, adapter.target_modules) == (16, str(model), ("q_proj",))
    assert adapter.tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == [128, 8]
    assert safetensors_shapes(model / "model.safetensors")["model.layers.0.mlp.down_proj.weight"] == [128, 256]


def test_an_adapter_of_another_kind_is_refused(tmp_path):
    model = make_checkpoint(tmp_path / "base", MODEL_CONFIG)
    prefix = make_adapter(tmp_path / "prefix", model, config_overrides={"peft_type": "PREFIX_TUNING"})
    with pytest.raises(AdapterError, match="adapter 'p' is a PREFIX_TUNING adapter: only LoRA"):
        read_adapter("p", prefix)
    rankless = make_adapter(tmp_path / "rankless", model, config_overrides={"r": None})
    with pytest.raises(AdapterError, match="gives no rank r"):
        read_adapter("r", rankless)
