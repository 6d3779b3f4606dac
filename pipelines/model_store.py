"""Find a model's files: a local folder, the model store, or the Hugging Face Hub.

The store (``MODEL_DIR``) has the Hugging Face cache layout, so a container's
``/models`` mount, ``make models`` and huggingface_hub downloads all share it.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from huggingface_hub import list_repo_files, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

log = structlog.get_logger(__name__)

# What vLLM reads: configs, tokenizer files, chat templates and weights.
CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def weight_patterns(repo_files: list[str]) -> list[str]:
    """Safetensors when the repo has them, else its pickled weights; never `original/`."""
    if any(name.endswith(".safetensors") for name in repo_files):
        return SAFETENSORS_PATTERNS
    return PICKLE_PATTERNS


def resolve_model(model_id: str, model_dir: Path) -> Path:
    local = Path(model_id).expanduser()
    if local.is_dir():
        log.info("model.local", path=str(local))
        return local
    try:
        path = Path(snapshot_download(model_id, cache_dir=model_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    else:
        log.info("model.store_hit", path=str(path))
        return path
    log.info("model.download.start", model_id=model_id, model_dir=str(model_dir))
    patterns = CONFIG_PATTERNS + weight_patterns(list_repo_files(model_id))
    path = Path(
        snapshot_download(model_id, cache_dir=model_dir, allow_patterns=patterns, ignore_patterns=["original/*"])
    )
    log.info("model.download.done", path=str(path))
    return path
