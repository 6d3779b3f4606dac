"""Find a model's files: a local folder, the model store, or the Hugging Face Hub.

The store (``MODEL_DIR``) has the Hugging Face cache layout, so a container's
``/models`` mount, ``make models`` and huggingface_hub downloads all share it.

A store miss downloads only what vLLM reads (configs, tokenizer files and one
set of weights) and resumes where an earlier start left off. huggingface_hub
2.4 cannot do that on its own: it retries a dropped transfer with a Range
request within one call, but keeps only whole 10 MiB chunks, writes to a
temporary file named for its own process and deletes it when the call fails, so
a new start fetches the file from zero. Here each file is fetched into
``blobs/<etag>.incomplete``, which outlives the process, resumed with a Range
request, checked against the Hub's size and sha256, then renamed to its blob;
``snapshot_download`` then links the blobs into the snapshot folder and records
the ref and the file list, as after a download of its own. The files are plain
HTTP transfers (the Hub's resolve URLs, redirected to its CDN), never hf_xet.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, TextIO
from urllib.parse import urlsplit

import httpx2
import structlog
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    get_hf_file_metadata,
    get_session,
    get_token,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, hf_raise_for_status
from huggingface_hub.utils import tqdm as HubProgressBar

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What vLLM reads: configs, tokenizer files, chat templates and weights.
CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
WEIGHT_FILE_PATTERNS = SAFETENSORS_PATTERNS + PICKLE_PATTERNS
# Meta's own checkpoint format (consolidated.*.pth, params.json), which vLLM does not read.
SKIPPED_FOLDER = "original/"

TRANSFER_ATTEMPTS = 6  # in a row without a new byte; the same patience as huggingface_hub's
RETRY_WAIT_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 10.0


class SilentProgressBar(HubProgressBar):
    """snapshot_download's bars would print on stderr whatever the log format: progress is logged per file."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


class DownloadProgress(Protocol):
    """Told about each file of a download; the prefetch command shows it as a bar or JSON lines."""

    def file_start(self, name: str, size: int | None, resume_from: int) -> None: ...

    def file_progress(self, name: str, done: int, size: int | None) -> None: ...

    def file_done(self, name: str, size: int, resumed_from: int, already_stored: bool) -> None: ...


class ModelDownloadError(RuntimeError):
    """The model is not in the store and cannot be fetched; the message says why and what to do."""


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


def resolve_model(
    model_id: str,
    model_dir: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: DownloadProgress | None = None,
) -> Path:
    """The folder vLLM loads `model_id` from, downloading it into the store on a miss.

    `token` defaults to huggingface_hub's (HF_TOKEN, else a saved login) and
    `endpoint` to HF_ENDPOINT, else the Hub.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        log.info("model.local", path=str(local))
        return local
    model_dir = Path(model_dir)
    try:
        cached = cached_snapshot(model_id, model_dir)
    except HFValidationError as exc:
        raise ModelDownloadError(
            f"MODEL_ID {model_id!r} is neither a local folder nor a Hugging Face model id: {exc}"
        ) from exc
    if cached is not None:
        log.info("model.store_hit", path=str(cached))
        return cached
    return download(
        model_id, model_dir, token=token if token is not None else get_token(), endpoint=endpoint, progress=progress
    )


def cached_snapshot(model_id: str, model_dir: Path) -> Path | None:
    """The store's snapshot of the model if it holds everything vLLM needs, else None.

    snapshot_download(local_files_only=True) returns whatever snapshot folder the
    ref points at, including one that an interrupted download left half-filled.
    """
    try:
        # Only config.json is asked for here: the folder's completeness is judged
        # below, by what vLLM needs rather than by every file of the repo.
        snapshot = Path(
            snapshot_download(model_id, cache_dir=model_dir, local_files_only=True, allow_patterns=[CONFIG_FILE])
        )
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
    needed = {CONFIG_FILE, *(wanted_files(repo_files) if repo_files is not None else [])}
    index = snapshot / SAFETENSORS_INDEX
    if index.is_file():
        needed.update(json.loads(index.read_text())["weight_map"].values())
    missing = sorted(name for name in needed if not (snapshot / name).is_file())
    if not any(path.is_file() for pattern in WEIGHT_FILE_PATTERNS for path in snapshot.glob(pattern)):
        missing.append("weights (*.safetensors or *.bin)")
    return missing


def download(
    model_id: str, model_dir: Path, *, token: str | None, endpoint: str | None, progress: DownloadProgress | None = None
) -> Path:
    started = time.monotonic()
    with hub_errors(model_id, model_dir, token, endpoint):
        info = HfApi(endpoint=endpoint, token=token).model_info(model_id, files_metadata=True)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
        wanted = wanted_files(siblings)
        if CONFIG_FILE not in wanted or not any(matches(name, WEIGHT_FILE_PATTERNS) for name in wanted):
            raise ModelDownloadError(
                f"{model_id} has no {CONFIG_FILE} or no weights vLLM can load (*.safetensors or *.bin) "
                f"outside {SKIPPED_FOLDER}; its files: {', '.join(sorted(siblings))}"
            )
        log.info(
            "model.download.start",
            model_id=model_id,
            model_dir=str(model_dir),
            commit=info.sha,
            gated=info.gated,
            files=len(wanted),
            bytes=sum(siblings[name].size or 0 for name in wanted),
            skipped=sorted(set(siblings) - set(wanted)),
        )
        storage = model_dir / repo_folder_name(repo_id=model_id, repo_type="model")
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
            f"{model_id} is not in the model store {model_dir} and HF_HUB_OFFLINE is set, so it cannot be downloaded"
        ) from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise ModelDownloadError(f"downloading {model_id} from {hub} failed: {type(exc).__name__}: {exc}") from exc


def same_origin(url: str, other: str) -> bool:
    first, second = urlsplit(url), urlsplit(other)
    return (first.scheme, first.hostname, first.port) == (second.scheme, second.hostname, second.port)


def fetch_file(
    url: str,
    name: str,
    storage: Path,
    *,
    token: str | None,
    endpoint: str | None,
    sha256: str | None,
    progress: DownloadProgress | None = None,
) -> None:
    """Put one repo file in the store's blobs, resuming a partial copy an earlier start left."""
    metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    blob = storage / "blobs" / metadata.etag
    if blob.is_file():
        log.info("model.download.file", file=name, bytes=blob.stat().st_size, already_stored=True)
        if progress is not None:
            progress.file_done(name, blob.stat().st_size, 0, already_stored=True)
        return
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a compressed body
    if not same_origin(url, metadata.location):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    lock = storage.parent / ".locks" / storage.name / f"{metadata.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    # The lock is huggingface_hub's own for this blob: two runners sharing a store
    # never append to the same partial file.
    with WeakFileLock(lock):
        if blob.is_file():
            return
        BlobTransfer(metadata.location, blob, name, headers, metadata.size, sha256, progress).run()


class BlobTransfer:
    """One file, fetched into `<blob>.incomplete` from where it stopped, then renamed to `<blob>`."""

    def __init__(
        self,
        url: str,
        blob: Path,
        name: str,
        headers: dict[str, str],
        size: int | None,
        sha256: str | None,
        progress: DownloadProgress | None = None,
    ) -> None:
        self.url = url
        self.blob = blob
        self.partial = blob.with_name(blob.name + ".incomplete")
        self.name = name
        self.headers = headers
        self.size = size
        self.sha256 = sha256
        self.progress = progress
        self.digest = hashlib.sha256()
        self.done = 0
        self.last_progress = time.monotonic()

    def run(self) -> None:
        self.done = self.partial.stat().st_size if self.partial.exists() else 0
        if self.size is not None and self.done > self.size:
            self.restart()
        resumed_from = self.done
        if self.sha256 and self.done:
            with self.partial.open("rb") as kept:
                while chunk := kept.read(1 << 20):
                    self.digest.update(chunk)
        self.check_disk_space()
        log.info("model.download.file.start", file=self.name, bytes=self.size, resume_from=resumed_from)
        if self.progress is not None:
            self.progress.file_start(self.name, self.size, resumed_from)
        started = time.monotonic()
        failures = 0
        # A partial file that is already whole: the last start died before renaming it.
        finished = self.size is not None and self.done == self.size
        while not finished:
            before = self.done
            try:
                self.fetch_rest()
                finished = True
            except httpx2.TransportError as exc:  # dropped, refused or timed out
                failures = 0 if self.done > before else failures + 1
                error = f"{type(exc).__name__}: {exc}"
                if failures >= TRANSFER_ATTEMPTS:
                    raise ModelDownloadError(
                        f"downloading {self.name} failed after {self.done} of {self.size} bytes ({error}); "
                        f"they are kept in {self.partial} and the next start resumes from there"
                    ) from exc
                log.warning("model.download.retry", file=self.name, bytes_done=self.done, error=error)
                time.sleep(RETRY_WAIT_SECONDS)
        self.check_complete()
        os.replace(self.partial, self.blob)
        log.info(
            "model.download.file",
            file=self.name,
            bytes=self.done,
            resumed_from=resumed_from,
            seconds=round(time.monotonic() - started, 2),
        )
        if self.progress is not None:
            self.progress.file_done(self.name, self.done, resumed_from, already_stored=False)

    def restart(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.done = 0

    def check_disk_space(self) -> None:
        if self.size is None:
            return
        free = shutil.disk_usage(self.blob.parent).free
        if free < self.size - self.done:
            raise ModelDownloadError(
                f"{self.name} needs {self.size - self.done} more bytes but {self.blob.parent} has {free} free"
            )

    def fetch_rest(self) -> None:
        headers = dict(self.headers)
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        with get_session().stream("GET", self.url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            content_range = response.headers.get("Content-Range", "")
            if response.status_code == 416 or (
                response.status_code == 206 and not content_range.startswith(f"bytes {self.done}-")
            ):
                asked_from = self.done
                self.restart()  # the kept bytes are not a prefix of this file
                raise httpx2.RemoteProtocolError(
                    f"asked for bytes {asked_from}- and got {response.status_code} {content_range}".rstrip()
                )
            hf_raise_for_status(response)
            if self.done and response.status_code == 200:  # the server ignored the Range: the whole file comes
                log.warning("model.download.range_ignored", file=self.name, bytes_dropped=self.done)
                self.restart()
            with self.partial.open("ab") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    self.digest.update(chunk)
                    self.done += len(chunk)
                    if self.progress is not None:
                        self.progress.file_progress(self.name, self.done, self.size)
                    self.report_progress()

    def report_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress < PROGRESS_EVERY_SECONDS:
            return
        self.last_progress = now
        log.info("model.download.progress", file=self.name, bytes_done=self.done, bytes=self.size)

    def check_complete(self) -> None:
        problem = None
        if self.size is not None and self.done != self.size:
            problem = f"{self.done} bytes arrived where the Hub announced {self.size}"
        elif self.sha256 and self.digest.hexdigest() != self.sha256:
            problem = f"its sha256 is {self.digest.hexdigest()} where the Hub announced {self.sha256}"
        if problem:
            self.restart()
            raise ModelDownloadError(
                f"downloading {self.name} failed: {problem}; the copy was discarded and the next start "
                "downloads it again"
            )


# The prefetch command: `python -m pipelines.model_store <hub id> [--model-dir DIR]`


class JsonLinesProgress:
    """One JSON object a line: each file's start and end, and its bytes at most every `every` seconds between."""

    def __init__(self, out: TextIO, every: float = 1.0) -> None:
        self.out = out
        self.every = every
        self.last_line: dict[str, float] = {}

    def emit(self, event: str, **fields: object) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()

    def file_start(self, name: str, size: int | None, resume_from: int) -> None:
        self.last_line[name] = time.monotonic()
        self.emit("file.start", file=name, bytes=size, resume_from=resume_from)

    def file_progress(self, name: str, done: int, size: int | None) -> None:
        now = time.monotonic()
        if now - self.last_line.get(name, 0.0) >= self.every:
            self.last_line[name] = now
            self.emit("file.progress", file=name, bytes_done=done, bytes=size)

    def file_done(self, name: str, size: int, resumed_from: int, already_stored: bool) -> None:
        self.emit("file.done", file=name, bytes=size, resumed_from=resumed_from, already_stored=already_stored)


class TerminalProgress:
    """A bar per file, on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bars: dict[str, HubProgressBar] = {}

    def file_start(self, name: str, size: int | None, resume_from: int) -> None:
        self.bars[name] = HubProgressBar(
            total=size,
            initial=resume_from,
            desc=name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self.out,
            ncols=shutil.get_terminal_size().columns,  # 80 where the terminal reports no width
        )

    def file_progress(self, name: str, done: int, size: int | None) -> None:
        bar = self.bars[name]
        bar.update(done - bar.n)

    def file_done(self, name: str, size: int, resumed_from: int, already_stored: bool) -> None:
        bar = self.bars.pop(name, None)
        if bar is None:
            self.out.write(f"{name}: already in the store ({size} bytes)\n")
            return
        bar.update(size - bar.n)
        bar.close()


def prefetch(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.model_store",
        description="Download a Hugging Face Hub model into the model store as the runner's start would "
        "(HF_TOKEN for gated models, HF_ENDPOINT for another hub); prints the snapshot folder.",
    )
    parser.add_argument("model_id", help="a Hub model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "models")), help="the store (MODEL_DIR)"
    )
    args = parser.parse_args(argv)
    # The model store's own events would repeat the progress: only its warnings (retries) are shown.
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(30),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    progress: DownloadProgress = TerminalProgress(sys.stderr) if sys.stderr.isatty() else JsonLinesProgress(sys.stderr)
    try:
        path = resolve_model(args.model_id, args.model_dir, progress=progress)
    except ModelDownloadError as exc:
        print(f"prefetch of {args.model_id} failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(prefetch())
