"""The bounded worker pool that keeps a request's CPU work off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runner.offload import Offload


async def test_a_flood_of_calls_runs_on_the_pools_threads_only_and_each_gets_its_own_answer():
    pool = Offload(workers=2, name="flood")
    threads: set[str] = set()

    def work(number: int) -> int:
        threads.add(threading.current_thread().name)
        time.sleep(0.005)
        return number * 2

    assert await asyncio.gather(*(pool.run(work, number) for number in range(50))) == [n * 2 for n in range(50)]
    # The pool's own threads, not the process's count: another test's daemon thread may end meanwhile (seen once
    # under make test-fast: the process count rose by 1 with the pool's two threads started).
    started = [thread for thread in threading.enumerate() if thread.name.startswith("flood-")]
    assert len(threads) == 2 and threads == {thread.name for thread in started}, "two threads, however many calls"


async def test_an_exception_reaches_the_caller_and_the_loop_is_free_meanwhile():
    pool = Offload()

    def fail() -> None:
        time.sleep(0.3)
        raise ValueError("refused")

    loop = asyncio.get_running_loop()
    failing = asyncio.ensure_future(pool.run(fail))
    started = loop.time()
    await asyncio.sleep(0.01)
    assert loop.time() - started < 0.1, "the loop runs while the worker works"
    with pytest.raises(ValueError, match="refused"):
        await failing


async def test_a_call_whose_caller_went_away_before_a_worker_took_it_is_not_run():
    pool = Offload(workers=1)
    gate = threading.Event()
    ran: list[str] = []
    first = asyncio.ensure_future(pool.run(gate.wait, 5))
    await asyncio.sleep(0.05)
    dropped = asyncio.ensure_future(pool.run(ran.append, "dropped"))
    await asyncio.sleep(0.01)
    dropped.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    assert await first is True
    assert await pool.run(ran.append, "kept") is None
    assert ran == ["kept"]
