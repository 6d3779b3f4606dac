"""``python -m bench.processes``: API_PROCESSES=2 against 1 on the front-end stand-in, in alternating rounds.

Two runner processes are up at once on the stand-in engine of ``bench/frontend.py``
(``tests/support/frontend_pipeline.py``: tokens as fast as they are asked for; with
API_PROCESSES=2 each API process runs a stand-in of its own, since it is fake and
there is no engine to share): one with API_PROCESSES=1, one with 2. Each round
measures both, one after the other, the order swapped every round, with
``bench.frontend``'s load client (one uvloop process, ``c`` streams kept open on
``/v1/chat/completions``): streamed tokens per second, the CPU of the runner's
whole process tree, and the client's own CPU. The figure is the ratio of the two
in each round, and its median; absolute figures move with whatever else runs on
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from bench.frontend import Load, wait_idle
from tests.support.frontend_pipeline import plug_in
from tests.support.runner_process import RunnerProcess


def tree_cpu(pid: int) -> float:
    """CPU seconds of a runner and every process it started (its extra API processes), the resource tracker aside."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            if "resource_tracker" in " ".join(process.cmdline()):
                continue
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def measure(runner: RunnerProcess, concurrency: int, tokens: int, warm: float, window: float) -> dict:
    load = Load(runner.port, "chat", runner.env["MODEL_ID"], concurrency, tokens)
    me = psutil.Process()
    await load.start()
    try:
        await asyncio.sleep(warm)
        load.check()
        load.tally.measuring = True
        runner_before, client_before, started = tree_cpu(runner.process.pid), me.cpu_times(), time.perf_counter()
        await asyncio.sleep(window)
        runner_after, client_after, ended = tree_cpu(runner.process.pid), me.cpu_times(), time.perf_counter()
        load.tally.measuring = False
        load.check()
    finally:
        await load.stop()
    await wait_idle(runner)
    seconds = ended - started
    client = (client_after.user + client_after.system) - (client_before.user + client_before.system)
    return {"tok_s": load.tally.tokens / seconds, "runner_cores": (runner_after - runner_before) / seconds,
            "client_cores": client / seconds}


async def run(rounds: int, concurrency: int, tokens: int, warm: float, window: float, folder: Path) -> None:
    runners = {}
    for processes in (1, 2):
        site = folder / f"site-{processes}"
        site.mkdir()
        env = plug_in(site) | {"API_PROCESSES": str(processes), "MAX_NUM_SEQS": str(concurrency)}
        runners[processes] = RunnerProcess(f"processes-{processes}", env, folder / f"runner-{processes}.log")
        runners[processes].start()
    try:
        for processes, runner in runners.items():
            if runner.wait_until({"IDLE", "ERROR"}, timeout=120) != "IDLE":
                raise RuntimeError(f"the runner did not load:\n{runner.log_tail()}")
            deadline = time.monotonic() + 120
            while runner.log_path.read_text().count('"event": "api_process.serving"') < processes - 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the extra API process did not serve:\n{runner.log_tail()}")
                await asyncio.sleep(0.2)
            await measure(runner, 8, tokens, 0.2, 0.3)  # warm
        print(f"c={concurrency}, {tokens} tokens a stream, /v1/chat/completions, STREAM_INTERVAL=1, "
              f"{len(psutil.Process().cpu_affinity())} cores (client, runner and its processes share them)")
        print("| round | API_PROCESSES | tok/s | runner cores busy | client cores busy |")
        print("| --- | --- | --- | --- | --- |")
        ratios = []
        for round_ in range(1, rounds + 1):
            seen = {}
            for processes in ((1, 2) if round_ % 2 else (2, 1)):
                seen[processes] = await measure(runners[processes], concurrency, tokens, warm, window)
                figures = seen[processes]
                print(f"| {round_} | {processes} | {figures['tok_s']:,.0f} | {figures['runner_cores']:.2f} | "
                      f"{figures['client_cores']:.2f} |", flush=True)
            ratios.append(seen[2]["tok_s"] / seen[1]["tok_s"])
        print(f"API_PROCESSES=2 / 1, tok/s, per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
    finally:
        for runner in runners.values():
            runner.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warm", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as folder:
        asyncio.run(run(args.rounds, args.concurrency, args.tokens, args.warm, args.window, Path(folder)))


if __name__ == "__main__":
    main()
