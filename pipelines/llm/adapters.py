"""LoRA adapters as the runner checks them before the engine sees them: pure, no vLLM.

An adapter is a folder in PEFT's format: ``adapter_config.json`` (its rank,
target modules and the base model it was trained on) and its weights
(``adapter_model.safetensors``, or PEFT's older ``adapter_model.bin``). Each
check here names the adapter and what to change. The engine would find some of
these faults itself, but with messages such as "The size of tensor a (64) must
match the size of tensor b (128)", and only once the weights are in its process.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.llm.settings import LORA_RANKS

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
# PEFT's tensor names: base_model.model.<module>.lora_A.weight (rank x in) and .lora_B.weight (out x rank);
# embeddings carry lora_embedding_A / lora_embedding_B instead.
PEFT_PREFIX = "base_model.model."
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)(?:\.weight)?$")
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; a larger one is not read
HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names it and says what to change."""


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder as read: what its config says and the shapes of its tensors."""

    name: str
    path: Path
    rank: int  # the largest of r and its rank_pattern
    base_model: str | None  # base_model_name_or_path
    target_modules: tuple[str, ...]
    tensors: dict[str, list[int]] | None  # PEFT tensor name -> shape; None for pickled weights (not read)


@dataclass(frozen=True)
class ServedBase:
    """The served base model as adapters are checked against it."""

    id: str  # MODEL_ID
    path: Path  # the folder the engine loads
    weights: dict[str, list[int]] | None  # checkpoint tensor name -> shape; None where not safetensors

    def names(self) -> set[str]:
        """What an adapter's base_model_name_or_path may say for this model: its id and folder, by their last part."""
        names = {model_name(self.id), model_name(str(self.path))}
        names.discard("")
        return names


def model_name(name_or_path: str) -> str:
    """A model id or folder by its last part, case folded: "org/Name" and "/models/name" both give "name".

    A folder of the Hugging Face cache (``models--org--name/snapshots/<commit>``) gives its repository's name.
    """
    text = name_or_path.strip().rstrip("/")
    snapshot = HF_CACHE_SNAPSHOT.search(text)
    if snapshot:
        return snapshot["name"].casefold()
    return text.rsplit("/", 1)[-1].casefold()


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors file's header; ValueError for a file cut short or not safetensors.

    A safetensors file is an 8-byte little-endian header length, a JSON header
    that gives every tensor's dtype, shape and byte range, then the data.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"its header claims {length} bytes and the file has {size}")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its header is not JSON ({exc})") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(f"it holds {size} bytes where its header describes {8 + length + end}: it was cut short")
    return {name: list(entry["shape"]) for name, entry in header.items()}


def checkpoint_shapes(model_path: Path) -> dict[str, list[int]] | None:
    """Every weight of a model folder's safetensors checkpoint by name; None when it has none (e.g. .bin weights)."""
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            shapes.update(safetensors_shapes(file))
        except (OSError, ValueError):
            return None  # the engine reads the checkpoint and says what is wrong with it
    return shapes


def read_adapter(name: str, path: Path, shown: str | None = None) -> AdapterFiles:
    """The adapter folder's config and tensor shapes; AdapterError for a folder that is missing or not a whole adapter.

    The messages name the folder as ``shown`` (default: its path), and never list what it holds or quote its
    files: a caller that names a folder learns whether it is a whole adapter, nothing more.
    """
    operator = shown is None  # LORA_ADAPTERS: the operator's own folders, which the messages may describe
    shown = str(path) if shown is None else shown
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {shown} is not a folder: give a local folder in PEFT's format "
                           f"({ADAPTER_CONFIG} and {SAFETENSORS_WEIGHTS}) or a Hub id")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        what = "a model, not a LoRA adapter" if operator and (path / "config.json").is_file() else "not a LoRA adapter"
        raise AdapterError(f"adapter {name!r}: {shown} has no {ADAPTER_CONFIG}, so it is {what}; give the folder "
                           "PEFT saved the adapter in")
    try:
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter {name!r}: its {ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} bytes: it is not "
                               "a LoRA adapter PEFT saved")
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterError(f"adapter {name!r}: its {ADAPTER_CONFIG} is not JSON: the folder is damaged or partial; "
                           "copy or download it again") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: its {ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} is a {peft_type} adapter: only LoRA adapters can be served")
    rank = adapter_rank(name, config)
    tensors = None
    weights = path / SAFETENSORS_WEIGHTS
    if weights.is_file():
        try:
            tensors = safetensors_shapes(weights)
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise AdapterError(f"adapter {name!r}: its {SAFETENSORS_WEIGHTS} is not whole ({safe_reason(exc)}); "
                               "copy or download it again") from None
        if not any(LORA_TENSOR.match(tensor) for tensor in tensors):
            raise AdapterError(f"adapter {name!r}: its {SAFETENSORS_WEIGHTS} holds no LoRA tensors (lora_A / lora_B)")
    elif not (path / PICKLE_WEIGHTS).is_file():
        raise AdapterError(f"adapter {name!r}: {shown} has {ADAPTER_CONFIG} but no weights ({SAFETENSORS_WEIGHTS}): "
                           "the folder is partial; copy or download it again")
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return AdapterFiles(name, path, rank, config.get("base_model_name_or_path") or None, targets, tensors)


def safe_reason(exc: BaseException) -> str:
    """Why a weights file cannot be read, in words that quote nothing of it (its header may be anything)."""
    return str(exc) if isinstance(exc, ValueError) and str(exc).startswith(("it ", "its ")) else "it is not safetensors"


def adapter_rank(name: str, config: dict) -> int:
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(rank, int) and rank > 0 for rank in ranks):
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} gives no rank r (a positive integer): it is not a "
                           "LoRA adapter PEFT saved")
    return max(ranks)


def fit_errors(adapter: AdapterFiles, base: ServedBase, max_rank: int | None) -> list[str]:
    """What stops ``adapter`` from applying to ``base``: another base model, modules or shapes it lacks, a rank too high."""
    name = adapter.name
    errors = []
    if adapter.base_model and model_name(adapter.base_model) not in base.names():
        errors.append(f"adapter {name!r} was trained on {adapter.base_model!r} (base_model_name_or_path in its "
                      f"{ADAPTER_CONFIG}), and this runner serves {base.id!r}: use an adapter trained on {base.id}")
    if max_rank is not None and adapter.rank > max_rank:
        errors.append(f"adapter {name!r} has rank {adapter.rank}, above MAX_LORA_RANK={max_rank}: "
                      f"restart with MAX_LORA_RANK={rank_for([adapter.rank])} or more")
    if adapter.tensors is not None and base.weights is not None:
        errors += shape_errors(adapter, base.weights)
    return errors


def shape_errors(adapter: AdapterFiles, weights: dict[str, list[int]]) -> list[str]:
    """The adapter's modules the base lacks, and its matrices whose sides do not meet the base's layers."""
    modules: dict[str, dict[str, list[int]]] = {}
    for tensor, shape in adapter.tensors.items():
        found = LORA_TENSOR.match(tensor.removeprefix(PEFT_PREFIX))
        if found:
            modules.setdefault(found["module"], {})[found["kind"]] = shape
    missing, misfit = [], []
    for module, parts in sorted(modules.items()):
        if not any(weight == module + ".weight" or weight.startswith(module + ".") for weight in weights):
            missing.append(module)
            continue
        base_shape = weights.get(module + ".weight")
        if base_shape is None or len(base_shape) != 2 or "A" not in parts or "B" not in parts:
            continue  # quantized or embedding weights: the engine checks those
        out_features, in_features = base_shape
        (rank_a, adapter_in), (adapter_out, rank_b) = parts["A"], parts["B"]
        if (adapter_in, adapter_out) != (in_features, out_features) or rank_a != rank_b:
            misfit.append(f"{module} is {adapter_in}->{adapter_out} in the adapter and "
                          f"{in_features}->{out_features} in the model")
    errors = []
    if missing:
        targets = ", ".join(adapter.target_modules) or "?"
        errors.append(f"adapter {adapter.name!r} adapts modules this model does not have (target_modules {targets}; "
                      f"e.g. {', '.join(missing[:3])}): it was made for another model")
    if misfit:
        errors.append(f"adapter {adapter.name!r} does not fit this model's layers ({'; '.join(misfit[:3])}"
                      f"{'; ...' if len(misfit) > 3 else ''}): it was made for another model")
    return errors


def rank_for(ranks: Iterable[int]) -> int:
    """The smallest rank vLLM takes that holds every one of ``ranks`` (vLLM's default, 16, for none)."""
    highest = max(ranks, default=16)
    for rank in LORA_RANKS:
        if rank >= highest:
            return rank
    raise AdapterError(f"an adapter has rank {highest}, above the largest vLLM serves ({LORA_RANKS[-1]})")
