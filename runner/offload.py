"""Work a request brings that would hold the event loop: done on a few worker threads, bounded.

Rendering a chat template, tokenising a long text, validating a large JSON body or
compiling a grammar takes tens to hundreds of milliseconds of CPU; on the event
loop it delays every other request, ``/ready`` and ``/health`` included (four
900 KB ``/tokenize`` calls at once held a ``/ready`` poll for 1.46 s on 2 cores).
``Offload`` runs such calls on ``workers`` daemon threads: however many requests
send work, no more threads than that, the rest waits in its queue, in turn; the
loop only hands work over and takes the result. Tokenizers (Rust) release the
GIL while they work, and Python code on a worker yields the GIL to the loop every
few milliseconds, so the loop keeps answering. Daemon threads: a call still
running at exit never holds the process (as ``run_blocking``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Threads per pool. One, as vLLM's own server tokenises on one thread: a Hugging Face fast tokenizer used from two
# threads at once may fail ("Already borrowed"), and on a few cores more threads would only contend for the GIL.
OFFLOAD_WORKERS = 1
LARGE_BODY_BYTES = 64 * 1024  # request bodies from this size on are validated on a worker thread


class Offload:
    """A bounded pool of daemon worker threads, awaited from the event loop."""

    def __init__(self, workers: int = OFFLOAD_WORKERS, name: str = "offload") -> None:
        self.workers = workers
        self.name = name
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    async def run(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``function(*args, **kwargs)`` on a worker thread; its result or its exception, awaited.

        Cancelling the await (its request went away) drops the call if no worker has taken it yet.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.start_workers()
        self.jobs.put((loop, future, functools.partial(function, *args, **kwargs)))
        return await future

    def start_workers(self) -> None:
        if len(self.threads) >= self.workers:
            return
        with self.lock:
            while len(self.threads) < self.workers:
                thread = threading.Thread(target=self.work, name=f"{self.name}-{len(self.threads)}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def work(self) -> None:
        while True:
            loop, future, call = self.jobs.get()
            if future.cancelled():  # read without the loop's lock: at worst a call whose result nobody takes
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                hand_over(loop, future, error=exc)
            else:
                hand_over(loop, future, result=result)
            loop = future = call = result = None  # nothing of a finished call stays referenced while it waits


def hand_over(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: object = None,
              error: BaseException | None = None) -> None:
    def settle() -> None:
        if future.done():  # its caller went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)
