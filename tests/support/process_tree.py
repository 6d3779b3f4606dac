"""``python -m tests.support.process_tree MODE DIR``: a process tree bound by ``pipelines.llm.lifeline``, to test it.

Prints one JSON line, ``{"pids": [...]}`` (every process it started, children
and grandchildren), once they all run, then sleeps until killed. Every process
in the tree ignores SIGTERM, as a rank blocked in a collective does.

- ``spawn``: children started with multiprocessing's spawn method, as vLLM
  starts its engine core and workers on CPUs, from a thread that ends once they
  run (the runner builds its engine in a thread of its own); each child starts
  a grandchild with spawn. ``fork``: the same with the fork method (vLLM's
  default where nothing forces spawn).
- ``command``: a program started with ``subprocess`` through ``bound_command``,
  as a worker node starts its ranks.
- ``refused``: after ``refuse_children``, a start fails; prints ``{"refused": "..."}``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipelines.llm import lifeline


def sleep_forever(folder: str, grandchild: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if grandchild:
        multiprocessing.get_context("spawn").Process(target=sleep_forever, args=(folder, False)).start()
    (Path(folder) / str(os.getpid())).touch()
    while True:
        time.sleep(60)


def wait_for_pids(folder: Path, count: int) -> list[int]:
    while len(pids := [int(path.name) for path in folder.iterdir()]) < count:
        time.sleep(0.02)
    return pids


def main(mode: str, folder: Path) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lifeline.bind_children()
    if mode in ("spawn", "fork"):
        def start() -> None:
            for _ in range(2):
                multiprocessing.get_context(mode).Process(target=sleep_forever, args=(str(folder), True)).start()
            pids.extend(wait_for_pids(folder, 4))  # each has asked for its parent-death signal by now

        pids: list[int] = []
        starter = threading.Thread(target=start)
        starter.start()
        starter.join()  # the thread that asked for the children has ended: they must live on
    elif mode == "command":
        deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        process = lifeline.run_on_starter(
            lambda: subprocess.Popen(lifeline.bound_command([sys.executable, "-c", deaf])))
        pids = [process.pid]
    else:
        lifeline.refuse_children()
        try:
            multiprocessing.get_context("spawn").Process(target=sleep_forever, args=(str(folder), False)).start()
        except lifeline.ChildrenRefused as exc:
            print(json.dumps({"refused": str(exc)}), flush=True)
            return
        print(json.dumps({"refused": None}), flush=True)
        return
    print(json.dumps({"pids": pids}), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
