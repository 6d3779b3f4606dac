"""Find a model's files: a local folder, the model store, or the Hugging Face Hub.

A model is a repository with a ``config.json``; a LoRA adapter one with an
``adapter_config.json`` (PEFT's format) and no ``config.json``. Both are found,
stored and resumed the same way.

The store (``MODEL_DIR``) has the Hugging Face cache layout, so a container's
``/models`` mount, ``make models`` and huggingface_hub downloads all share it.
A store miss downloads only what vLLM reads (configs, tokenizer files and one
set of weights), each file resumable (``pipelines.model_store.transfer``);
``snapshot_download`` then links the blobs into the snapshot folder and records
the ref and the file list, as after a download of its own.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx2
import structlog
from huggingface_hub import HfApi, constants, get_cached_repo_tree, get_token, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from pipelines.model_store.errors import DownloadLimits, ModelDownloadError
from pipelines.model_store.progress import DownloadProgress, SilentProgressBar
from pipelines.model_store.transfer import fetch_file

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA adapter's, in PEFT's format
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What vLLM reads: configs, tokenizer files, chat templates and weights.
CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
WEIGHT_FILE_PATTERNS = SAFETENSORS_PATTERNS + PICKLE_PATTERNS
# Meta's own checkpoint format (consolidated.*.pth, params.json), which vLLM does not read.
SKIPPED_FOLDER = "original/"


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def weight_patterns(repo_files: Iterable[str]) -> list[str]:
    """Safetensors when the repo has them, else its pickled weights."""
    if any(name.endswith(".safetensors") for name in repo_files):
        return SAFETENSORS_PATTERNS
    return PICKLE_PATTERNS


def wanted_files(repo_files: Iterable[str]) -> list[str]:
    """The files of a repo that vLLM reads; never those under `original/`."""
    candidates = [name for name in repo_files if not name.startswith(SKIPPED_FOLDER)]
    patterns = CONFIG_PATTERNS + weight_patterns(candidates)
    return sorted(name for name in candidates if matches(name, patterns))


def main_config(repo_files: Iterable[str]) -> str:
    """The file that makes a repository loadable: a model's config.json, else an adapter's adapter_config.json."""
    files = set(repo_files)
    return ADAPTER_CONFIG_FILE if ADAPTER_CONFIG_FILE in files and CONFIG_FILE not in files else CONFIG_FILE


def resolve_model(
    model_id: str,
    model_dir: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: DownloadProgress | None = None,
    local_folders: bool = True,
    limits: DownloadLimits | None = None,
) -> Path:
    """The folder vLLM loads `model_id` (a model or a LoRA adapter) from, downloading it into the store on a miss.

    `token` defaults to huggingface_hub's (HF_TOKEN, else a saved login) and
    `endpoint` to HF_ENDPOINT, else the Hub. `local_folders` False: `model_id` is
    a Hub id only, never a folder of this machine. `limits`: a download's byte cap
    and stop signal (a run-time adapter's); without them nothing is capped and a
    failed download keeps its partial files for the next start to resume.
    """
    if local_folders:
        local = Path(model_id).expanduser()
        if local.is_dir():
            log.info("model.local", path=str(local))
            return local
    model_dir = Path(model_dir)
    try:
        cached = cached_snapshot(model_id, model_dir)
    except HFValidationError as exc:
        raise ModelDownloadError(
            f"{model_id!r} is neither a local folder nor a Hugging Face model id: {exc}"
        ) from exc
    if cached is not None:
        log.info("model.store_hit", path=str(cached))
        return cached
    return download(
        model_id, model_dir, token=token if token is not None else get_token(), endpoint=endpoint, progress=progress,
        limits=limits,
    )


def cached_snapshot(model_id: str, model_dir: Path) -> Path | None:
    """The store's snapshot of the model if it holds everything vLLM needs, else None.

    snapshot_download(local_files_only=True) returns whatever snapshot folder the
    ref points at, including one that an interrupted download left half-filled.
    """
    try:
        # Only the config is asked for here: the folder's completeness is judged
        # below, by what vLLM needs rather than by every file of the repo.
        snapshot = Path(snapshot_download(model_id, cache_dir=model_dir, local_files_only=True,
                                          allow_patterns=[CONFIG_FILE, ADAPTER_CONFIG_FILE]))
    except LocalEntryNotFoundError:
        return None
    missing = missing_files(snapshot, listed_files(model_id, model_dir))
    if missing:
        log.info("model.store.incomplete", path=str(snapshot), missing=missing)
        return None
    return snapshot


def listed_files(model_id: str, model_dir: Path) -> list[str] | None:
    """The repo's files as the last download listed them; None for a store filled by other means."""
    try:
        return [entry.path for entry in get_cached_repo_tree(model_id, cache_dir=model_dir)]
    except CachedRepoTreeNotFoundError:
        return None


def missing_files(snapshot: Path, repo_files: list[str] | None) -> list[str]:
    present = repo_files if repo_files is not None else [path.name for path in snapshot.iterdir()]
    needed = {main_config(present), *(wanted_files(repo_files) if repo_files is not None else [])}
    index = snapshot / SAFETENSORS_INDEX
    if index.is_file():
        needed.update(json.loads(index.read_text())["weight_map"].values())
    missing = sorted(name for name in needed if not (snapshot / name).is_file())
    if not any(path.is_file() for pattern in WEIGHT_FILE_PATTERNS for path in snapshot.glob(pattern)):
        missing.append("weights (*.safetensors or *.bin)")
    return missing


def download(
    model_id: str, model_dir: Path, *, token: str | None, endpoint: str | None, progress: DownloadProgress | None = None,
    limits: DownloadLimits | None = None,
) -> Path:
    storage = model_dir / repo_folder_name(repo_id=model_id, repo_type="model")
    new_storage = not storage.exists()
    try:
        return download_into(model_id, model_dir, storage, token=token, endpoint=endpoint, progress=progress,
                             limits=limits)
    except BaseException:
        if limits is not None and not limits.keep_partial and new_storage:
            # A capped download leaves nothing behind: the store had no folder for this repository before it.
            shutil.rmtree(storage, ignore_errors=True)
            shutil.rmtree(model_dir / ".locks" / storage.name, ignore_errors=True)
        raise


def download_into(
    model_id: str, model_dir: Path, storage: Path, *, token: str | None, endpoint: str | None,
    progress: DownloadProgress | None, limits: DownloadLimits | None,
) -> Path:
    started = time.monotonic()
    with hub_errors(model_id, model_dir, token, endpoint):
        info = HfApi(endpoint=endpoint, token=token).model_info(model_id, files_metadata=True)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
        wanted = wanted_files(siblings)
        config = main_config(wanted)
        if config not in wanted or not any(matches(name, WEIGHT_FILE_PATTERNS) for name in wanted):
            lacks = (f"{model_id} has no {CONFIG_FILE} (a model) or {ADAPTER_CONFIG_FILE} (a LoRA adapter), or no "
                     f"weights vLLM can load (*.safetensors or *.bin) outside {SKIPPED_FOLDER}")
            raise ModelDownloadError(f"{lacks}; its files: {', '.join(sorted(siblings))}", public=lacks)
        announced = sum(siblings[name].size or 0 for name in wanted)
        if limits is not None:
            limits.check()
            if announced > limits.max_bytes:
                raise ModelDownloadError(f"{model_id} is {announced} bytes, more than {limits.setting} "
                                         f"({limits.max_bytes} bytes): it was not downloaded")
        log.info(
            "model.download.start",
            model_id=model_id,
            model_dir=str(model_dir),
            kind="lora adapter" if config == ADAPTER_CONFIG_FILE else "model",
            commit=info.sha,
            gated=info.gated,
            files=len(wanted),
            bytes=announced,
            skipped=sorted(set(siblings) - set(wanted)),
        )
        for name in wanted:
            lfs = siblings[name].lfs
            fetch_file(
                hf_hub_url(model_id, name, revision=info.sha, endpoint=endpoint),
                name,
                storage,
                token=token,
                endpoint=endpoint,
                sha256=lfs.sha256 if lfs else None,
                progress=progress,
                limits=limits,
            )
        # Every blob is in place: this only links them into the snapshot folder and
        # records the ref and the file list (it would fetch anything still missing).
        path = Path(
            snapshot_download(
                model_id,
                cache_dir=model_dir,
                allow_patterns=wanted,
                token=token,
                endpoint=endpoint,
                tqdm_class=SilentProgressBar,
            )
        )
    log.info("model.download.done", path=str(path), seconds=round(time.monotonic() - started, 2))
    return path


@contextlib.contextmanager
def hub_errors(model_id: str, model_dir: Path, token: str | None, endpoint: str | None) -> Iterator[None]:
    """Turns huggingface_hub's failures into ModelDownloadErrors that say what to do."""
    hub = endpoint or constants.ENDPOINT
    try:
        yield
    except ModelDownloadError:
        raise
    except GatedRepoError as exc:
        why = "no HF_TOKEN is set" if token is None else "the HF_TOKEN given has not been granted access to it"
        raise ModelDownloadError(
            f"{model_id} is a gated model and {why}: accept its conditions on {hub}/{model_id} with an account "
            f"and set HF_TOKEN to a token of that account (the Hub said: {exc.server_message})"
        ) from exc
    except RepositoryNotFoundError as exc:
        why = "no HF_TOKEN is set" if token is None else "the HF_TOKEN given has no access to it"
        raise ModelDownloadError(
            f"{model_id} is not a model on {hub}, or it is private and {why} (the Hub said: {exc.server_message})"
        ) from exc
    except OfflineModeIsEnabled as exc:
        raise ModelDownloadError(
            f"{model_id} is not in the model store {model_dir} and HF_HUB_OFFLINE is set, so it cannot be downloaded",
            public=f"{model_id} is not in the model store and HF_HUB_OFFLINE is set, so it cannot be downloaded",
        ) from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise ModelDownloadError(f"downloading {model_id} from {hub} failed: {type(exc).__name__}: {exc}",
                                 public=f"downloading {model_id} from {hub} failed ({type(exc).__name__})") from exc

