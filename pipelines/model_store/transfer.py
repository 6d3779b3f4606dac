"""One file from the Hub into the store's blobs, resumable across process starts.

huggingface_hub 2.4 cannot resume on its own: it retries a dropped transfer
with a Range request within one call, but keeps only whole 10 MiB chunks, writes
to a temporary file named for its own process and deletes it when the call
fails, so a new start fetches the file from zero. Here each file is fetched into
``blobs/<etag>.incomplete``, which outlives the process, resumed with a Range
request, checked against the Hub's size and sha256, then renamed to its blob.
The files are plain HTTP transfers (the Hub's resolve URLs, redirected to its
CDN), never hf_xet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import structlog
from huggingface_hub import constants, get_hf_file_metadata, get_session
from huggingface_hub.utils import WeakFileLock, build_hf_headers, hf_raise_for_status

from pipelines.model_store.errors import DownloadLimits, ModelDownloadError
from pipelines.model_store.progress import DownloadProgress

log = structlog.get_logger(__name__)

TRANSFER_ATTEMPTS = 6  # in a row without a new byte; the same patience as huggingface_hub's
RETRY_WAIT_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 10.0


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
    limits: DownloadLimits | None = None,
) -> None:
    """Put one repo file in the store's blobs, resuming a partial copy an earlier start left.

    With ``limits`` the bytes received count against its cap, a stop ends the transfer, and (unless it keeps
    partial files) a transfer that does not finish removes its partial file.
    """
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
        transfer = BlobTransfer(metadata.location, blob, name, headers, metadata.size, sha256, progress, limits)
        try:
            transfer.run()
        except BaseException:
            if limits is not None and not limits.keep_partial:
                transfer.partial.unlink(missing_ok=True)
            raise


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
        limits: DownloadLimits | None = None,
    ) -> None:
        self.limits = limits
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
                    failed = f"downloading {self.name} failed after {self.done} of {self.size} bytes"
                    raise ModelDownloadError(
                        f"{failed} ({error}); they are kept in {self.partial} and the next start resumes from there",
                        public=failed,
                    ) from exc
                log.warning("model.download.retry", file=self.name, bytes_done=self.done, error=error)
                if self.limits is not None:
                    self.limits.check()
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
                f"{self.name} needs {self.size - self.done} more bytes but {self.blob.parent} has {free} free",
                public=f"{self.name} needs {self.size - self.done} more bytes than the model store has free",
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
                    if self.limits is not None:
                        self.limits.spend(len(chunk))
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

