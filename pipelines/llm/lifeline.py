"""No process outlives the process that started it: the kernel's parent-death signal on every child.

A runner killed outright (SIGKILL, a crash, the OOM killer) runs no code of its
own on the way out, so its children must end themselves: each asks the kernel,
as it starts, for SIGKILL when its parent ends (``prctl(PR_SET_PDEATHSIG)``),
and ends at once if its parent has already gone. SIGKILL, because a rank blocked
in a collective ignores SIGTERM, and nothing is left to save once the runner is
gone (multiprocessing's resource tracker, a process of its own, still removes
the shared memory the ranks leave; it ends by itself once they have).

- ``bind_children()``: from then on, every process this process starts with
  multiprocessing (vLLM's engine core and its workers, with the ``spawn`` or
  the ``fork`` method) asks for the signal as it starts, and binds its own
  children the same way, so a whole tree goes with its root.
- ``python -m pipelines.llm.lifeline PARENT_PID COMMAND...``: runs COMMAND
  bound to PARENT_PID (the signal survives ``exec``), for programs started with
  ``subprocess`` (a worker node's ranks).

The kernel ties the signal to the *thread* that started the child, not to the
process: a child started from a short-lived thread (the runner builds its engine
in a thread of its own) would be killed when that thread ends. So every
multiprocessing start of this process runs on one thread that lasts as long as
the process (``STARTER``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing.process
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; at once if its parent (``parent_pid``) has already ended."""
    if sys.platform != "linux":  # no parent-death signal elsewhere (macOS, for a developer's run): nothing to ask for
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:  # the parent ended before the signal was asked for: nobody would send it
        os.kill(os.getpid(), signal.SIGKILL)


class Guard:
    """Unpickled in a spawned child before the target it precedes: binds the child to its parent that early.

    A spawned child unpickles its target (importing vLLM, seconds) before it
    runs: a parent that dies meanwhile would leave it running until then.
    """

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def __reduce__(self) -> tuple[Callable[[int], Guard], tuple[int]]:
        return guarded, (self.parent_pid,)


def adopt_orphans() -> bool:
    """Make this process the one that adopts its descendants' orphans (``PR_SET_CHILD_SUBREAPER``), so that a
    grandchild whose parent ends during a stop (a worker its engine core was starting) is still this process's
    to find and end; False where the kernel refuses it."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def guarded(parent_pid: int) -> Guard:
    die_with_parent(parent_pid)
    return Guard(parent_pid)


class Bound:
    """A multiprocessing target that first binds its process to its parent, and its own children to itself."""

    def __init__(self, target: Callable[..., Any], parent_pid: int) -> None:
        self.guard = Guard(parent_pid)  # pickled (so unpickled) before the target
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        die_with_parent(self.guard.parent_pid)  # with fork nothing was unpickled
        bind_children()
        return self.target(*args, **kwargs)


class Starter:
    """The one thread on which this process starts its multiprocessing children; it lasts as long as the process."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self.refusing = False  # set by refuse_children: this process is stopping
        self.thread = threading.Thread(target=self.serve, daemon=True, name="child-starter")
        self.thread.start()

    def serve(self) -> None:
        while True:
            call, future = self.calls.get()
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)

    def run(self, call: Callable[[], Any]) -> Any:
        if threading.current_thread() is self.thread:
            return call()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.put((call, future))
        return future.result()


STARTER: Starter | None = None
_original_start = multiprocessing.process.BaseProcess.start
_binding = threading.Lock()


def _bound_start(self: multiprocessing.process.BaseProcess) -> None:
    target = getattr(self, "_target", None)
    if target is not None and not isinstance(target, Bound):
        self._target = Bound(target, os.getpid())

    def start() -> None:
        if STARTER is not None and STARTER.refusing:
            raise ChildrenRefused("this process is stopping: it starts no more processes")
        _original_start(self)

    starter().run(start)


class ChildrenRefused(RuntimeError):
    """A process start asked for once this process stopped taking them (``refuse_children``)."""


def starter() -> Starter:
    """This process's starter thread, started on first use (and anew in a forked child: threads do not come along)."""
    global STARTER
    with _binding:
        if STARTER is None or not STARTER.thread.is_alive():
            STARTER = Starter()
        return STARTER


def _forked() -> None:
    global STARTER, _binding
    STARTER, _binding = None, threading.Lock()  # the parent's thread is not here, and its lock may have been held


os.register_at_fork(after_in_child=_forked)


def bind_children() -> None:
    """Every process this process starts with multiprocessing from now on dies with it, however it dies. Idempotent."""
    starter()
    multiprocessing.process.BaseProcess.start = _bound_start


def refuse_children() -> None:
    """From now on, no multiprocessing start of this process starts anything; returns once a start under way is done.

    For a stop that ends this process's children: once this returns, every child
    there will be exists already, and can be found and ended.
    """
    bind_children()
    thread = starter()

    def refuse() -> None:
        thread.refusing = True

    thread.run(refuse)


def run_on_starter(call: Callable[[], Any]) -> Any:
    """``call()`` on the thread that lasts as long as this process: what it starts is bound to it, not to the caller."""
    bind_children()
    return starter().run(call)


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie: a killed grandchild stays a zombie until whoever adopted it reaps it."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def left_after(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after at most ``timeout`` seconds (polled: a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    alive = [process for process in processes if running(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.005)
        alive = [process for process in alive if running(process)]
    return alive


def bound_command(command: list[str]) -> list[str]:
    """``command``, run so that it dies with this process (see ``main``)."""
    return [sys.executable, "-m", __name__, str(os.getpid()), *command]


def main(argv: list[str]) -> None:
    """``python -m pipelines.llm.lifeline PARENT_PID COMMAND...``: COMMAND, SIGKILLed when PARENT_PID ends."""
    parent_pid, *command = argv
    die_with_parent(int(parent_pid))
    os.execvp(command[0], command)  # the parent-death signal is kept across exec


if __name__ == "__main__":
    main(sys.argv[1:])
