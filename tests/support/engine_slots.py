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
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SLOTS_DIR_VARIABLE = "ENGINE_SLOTS_DIR"
POLL_INTERVAL = 0.25  # seconds between tries while waiting for slots
# A wait longer than this is a deadlock or a lane that never gives way: fail saying so. The wait is not the test's
# time: pytest-timeout's alarm is paused while it lasts (``alarm_paused``).
WAIT_LIMIT = 1800.0
WAITING, FIRST = "waiting", "waiting-first"  # files a waiter holds a shared lock on: it lets others go first, or not


class EngineSlots:
    """``size`` engine slots in ``directory``, shared by every process that opens the same directory."""

    def __init__(self, directory: Path, size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.paths = [directory / f"slot-{index}" for index in range(size)]
        self.size = size
        for path in [*self.paths, *(self.announcement(kind, count) for kind in (WAITING, FIRST)
                                     for count in range(1, size + 1))]:
            path.touch(exist_ok=True)

    def announcement(self, kind: str, count: int) -> Path:
        """The file a waiter of ``kind`` for ``count`` slots holds a shared lock on while it waits."""
        return self.directory / f"{kind}-{count}"

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

    def take(self, count: int, first: bool = True, limit: float = WAIT_LIMIT, waits: list[float] | None = None
             ) -> list[int]:
        """``count`` slots, waiting until that many are free at once, saying it waits; a waiter that is not
        ``first`` tries only while no ``first`` one waits. ``waits`` gets the seconds waited, if any.

        The lane of the shared runners waits first: it may wait holding its runners' slots, for slots a running
        module of the other lane will give back, and must not then wait behind the other lane's next module.
        """
        if (first or not self.waiters(FIRST)) and (held := self.try_take(count)) is not None:
            return held
        announced = os.open(self.announcement(FIRST if first else WAITING, count), os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(announced, fcntl.LOCK_SH)
        started = time.monotonic()
        try:
            with alarm_paused():
                while (held := self.try_take(count) if first or not self.waiters(FIRST) else None) is None:
                    if time.monotonic() - started > limit:
                        raise AssertionError(f"waited {limit:.0f} s for {count} of the {len(self.paths)} engine slots "
                                             f"in {self.directory}; the other lane never gave them back (tests/lanes.py)")
                    time.sleep(POLL_INTERVAL)
            return held
        finally:
            os.close(announced)
            if waits is not None:
                waits.append(time.monotonic() - started)

    def waiters(self, kind: str) -> bool:
        """A process waits for slots, of ``kind`` (FIRST or WAITING)."""
        return self.wanted(kind) is not None

    def wanted(self, *kinds: str) -> int | None:
        """The fewest slots a process waits for (of ``kinds``, else of either kind), None if none waits."""
        for count in range(1, self.size + 1):
            for kind in kinds or (WAITING, FIRST):
                descriptor = os.open(self.announcement(kind, count), os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return count
                finally:
                    os.close(descriptor)  # closing drops the lock, if taken
        return None

    def others_wait(self) -> bool:
        """Another process waits for slots (call it only while not waiting oneself)."""
        return self.wanted() is not None

    def free(self) -> int:
        """How many slots are free now: a glance, another process may take one the next moment."""
        held = [descriptor for path in self.paths if (descriptor := self.try_take_path(path)) is not None]
        self.release(held)
        return len(held)

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


@contextlib.contextmanager
def alarm_paused() -> Iterator[None]:
    """The process's interval timer (pytest-timeout's per-test alarm) stopped, then set again to what was left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    left, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if left:
            signal.setitimer(signal.ITIMER_REAL, left, interval)
