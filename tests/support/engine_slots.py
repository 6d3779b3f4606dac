"""The suite's engine budget, shared by every pytest process of one run: MAX_ENGINES slots, one per vLLM engine.

``make test`` runs the suite in two pytest processes side by side (tests/lanes.py); both start engines, and
together they must never have more than MAX_ENGINES alive. Each slot is a file in one directory
(ENGINE_SLOTS_DIR, set by the driver; a process on its own makes a directory of its own), held by an
exclusive ``flock`` on an open descriptor: a process that dies, however it dies, frees its slots with its
descriptors. A waiter takes all the slots it asks for or none (it never holds some of them while it waits for
the rest), and says it waits with a shared lock on a file, which the others read to give way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

SLOTS_DIR_VARIABLE = "ENGINE_SLOTS_DIR"
POLL_INTERVAL = 0.25  # seconds between tries while waiting for slots
# A wait longer than this is a deadlock or a lane that never gives way: fail saying so, before pytest-timeout's 600 s.
WAIT_LIMIT = 570.0
WAITING, HOLDING = "waiting", "waiting-holding"  # files a waiter holds a shared lock on: it holds no slots, or some


class EngineSlots:
    """``size`` engine slots in ``directory``, shared by every process that opens the same directory."""

    def __init__(self, directory: Path, size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.paths = [directory / f"slot-{index}" for index in range(size)]
        for path in [*self.paths, directory / WAITING, directory / HOLDING]:
            path.touch(exist_ok=True)

    @classmethod
    def for_run(cls, size: int) -> EngineSlots:
        """The run's slots: the driver's directory, or one of this process's own when it runs alone."""
        shared = os.environ.get(SLOTS_DIR_VARIABLE)
        return cls(Path(shared), size) if shared else cls.private(size)

    @classmethod
    def private(cls, size: int) -> EngineSlots:
        """Slots no other process shares."""
        return cls(Path(tempfile.mkdtemp(prefix="engine-slots-")), size)

    def try_take(self, count: int) -> list[int] | None:
        """``count`` free slots (their descriptors), or None and none held."""
        held: list[int] = []
        for path in self.paths:
            if len(held) == count:
                break
            if (descriptor := self.try_take_path(path)) is not None:
                held.append(descriptor)
        if len(held) < count:
            self.release(held)
            return None
        return held

    def take(self, count: int, holding: bool = False, limit: float = WAIT_LIMIT, waits: list[float] | None = None
             ) -> list[int]:
        """``count`` slots, waiting until that many are free at once, saying it waits; ``holding``: the caller
        holds slots already (its runners) and cannot give them back while it waits.

        A waiter that holds none lets one that holds some go first: the one that holds some waits for slots
        that a running module will give back, and would otherwise wait behind a waiter that needs those too.
        """
        if (not self.waiters(HOLDING) or holding) and (held := self.try_take(count)) is not None:
            return held
        announced = os.open(self.directory / (HOLDING if holding else WAITING), os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(announced, fcntl.LOCK_SH)
        started = time.monotonic()
        try:
            while (held := None if not holding and self.waiters(HOLDING) else self.try_take(count)) is None:
                if time.monotonic() - started > limit:
                    raise AssertionError(f"waited {limit:.0f} s for {count} of the {len(self.paths)} engine slots in "
                                         f"{self.directory}; the other lane never gave them back (tests/lanes.py)")
                time.sleep(POLL_INTERVAL)
            return held
        finally:
            os.close(announced)
            if waits is not None:
                waits.append(time.monotonic() - started)

    def waiters(self, kind: str) -> bool:
        """A process waits for slots, of ``kind`` (HOLDING or WAITING)."""
        descriptor = os.open(self.directory / kind, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)  # closing drops the lock, if taken
        return False

    def others_wait(self) -> bool:
        """Another process waits for slots (call it only while not waiting oneself)."""
        return self.waiters(HOLDING) or self.waiters(WAITING)

    @staticmethod
    def try_take_path(path: Path) -> int | None:
        descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        return descriptor

    @staticmethod
    def release(held: list[int]) -> None:
        for descriptor in held:
            with contextlib.suppress(OSError):
                os.close(descriptor)  # closing the only descriptor of the open file drops its flock
        held.clear()
