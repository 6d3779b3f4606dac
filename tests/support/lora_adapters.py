"""Small LoRA adapters in PEFT's file format, made in the test: random weights, deterministic.

``make_adapter(folder, model_dir)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` for the model in ``model_dir`` (its config.json
gives the layer shapes), as PEFT saves them: tensors named
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (rank x in)
and ``...lora_B.weight`` (out x rank). Both matrices are random and large enough
(``scale``) that the adapter's greedy answer differs from the base model's; a
``seed`` gives another adapter for the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_shapes(config: dict) -> dict[str, tuple[str, int, int]]:
    """Each Llama-style projection: (its block, in features, out features)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    inter = config["intermediate_size"]
    return {
        "q_proj": ("self_attn", hidden, heads * head_dim), "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv), "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter), "down_proj": ("mlp", inter, hidden),
    }


def make_adapter(folder: Path, model_dir: Path, *, seed: int = 1, rank: int = 8, alpha: int = 16,
                 targets: tuple[str, ...] = ATTENTION + MLP, scale: float = 0.5, base_model: str | None = None,
                 config_overrides: dict | None = None, layers: int | None = None) -> Path:
    """Write a PEFT LoRA adapter for the model in ``model_dir`` into ``folder``; returns ``folder``.

    ``base_model`` is the adapter config's ``base_model_name_or_path`` (default:
    ``model_dir`` itself); ``config_overrides`` are laid over adapter_config.json;
    ``layers`` adapts only the first layers.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    shapes = module_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers if layers is not None else config["num_hidden_layers"]):
        for module in targets:
            block, fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * scale).astype(np.float32)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or str(model_dir),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
        "fan_in_fan_out": False, "inference_mode": True, **(config_overrides or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder


def make_checkpoint(model_dir: Path, config: dict) -> Path:
    """A model folder's config.json and a safetensors checkpoint of its projections (zeros): what adapters are checked against."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (block, fan_in, fan_out) in module_shapes(config).items():
            tensors[f"model.layers.{layer}.{block}.{module}.weight"] = np.zeros((fan_out, fan_in), np.float32)
    save_file(tensors, str(model_dir / "model.safetensors"))
    return model_dir
