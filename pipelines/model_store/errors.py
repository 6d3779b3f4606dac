"""The model store's errors and a download's limits: each message says what went wrong and what to do."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class ModelDownloadError(RuntimeError):
    """The model is not in the store and cannot be fetched; the message says why and what to do.

    ``public``: the same, without what only the operator may see (local paths, a repository's file list, the
    text of an OS error): what a caller of a run-time adapter load is told.
    """

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public if public is not None else message


class DownloadStopped(ModelDownloadError):
    """The download was stopped from outside (its request ended)."""


@dataclass
class DownloadLimits:
    """What one download (a run-time adapter's) may take: ``max_bytes`` in all, until ``stop`` is set.

    ``keep_partial`` False: a download that fails or is stopped removes what it wrote, instead of keeping it for
    the next start to resume. ``setting`` names the setting that sets ``max_bytes``, for the messages.
    """

    max_bytes: int
    setting: str = "the download's byte limit"
    stop: threading.Event = field(default_factory=threading.Event)
    keep_partial: bool = False
    spent: int = 0

    def check(self) -> None:
        if self.stop.is_set():
            raise DownloadStopped("the download was stopped: its request ended")

    def spend(self, size: int) -> None:
        """Count ``size`` more bytes received; ModelDownloadError past ``max_bytes``, DownloadStopped once stopped."""
        self.check()
        self.spent += size
        if self.spent > self.max_bytes:
            raise ModelDownloadError(f"the download passed {self.setting} ({self.max_bytes} bytes) and was stopped")
