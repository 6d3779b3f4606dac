"""How a download reports its files: the protocol, and the prefetch command's two renderers."""

from __future__ import annotations

import json
import shutil
import time
from typing import Protocol, TextIO

from huggingface_hub.utils import tqdm as HubProgressBar


class SilentProgressBar(HubProgressBar):
    """snapshot_download's bars would print on stderr whatever the log format: progress is logged per file."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


class DownloadProgress(Protocol):
    """Told about each file of a download; the prefetch command shows it as a bar or JSON lines."""

    def file_start(self, name: str, size: int | None, resume_from: int) -> None: ...

    def file_progress(self, name: str, done: int, size: int | None) -> None: ...

    def file_done(self, name: str, size: int, resumed_from: int, already_stored: bool) -> None: ...



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

