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

``make bench-processes`` runs ``--quick`` (2 rounds, short windows) and prints;
``--write`` puts the table in its own section of ``bench/results.md``, which
``make bench`` runs this way after its passes (and keeps when it rewrites the
file). No model and no vLLM: it needs no engine lock.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.frontend import RESULTS, Load, cpu_flags, cpu_model, replace_section, wait_idle
from tests.support.frontend_pipeline import plug_in
from tests.support.runner_process import ROOT, RunnerProcess

SECTION_START, SECTION_END = "<!-- bench-processes:start -->", "<!-- bench-processes:end -->"


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


async def run(rounds: int, concurrency: int, tokens: int, warm: float, window: float, folder: Path) -> list[dict]:
    """Each round's figures for API_PROCESSES 1 and 2 ({1: ..., 2: ...}), printed as they come."""
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
        print(TABLE_HEAD, flush=True)
        results = []
        for round_ in range(1, rounds + 1):
            seen = {}
            for processes in ((1, 2) if round_ % 2 else (2, 1)):
                seen[processes] = await measure(runners[processes], concurrency, tokens, warm, window)
                print(row(round_, processes, seen[processes]), flush=True)
            results.append(seen)
        return results
    finally:
        for runner in runners.values():
            runner.stop()


TABLE_HEAD = ("| round | API_PROCESSES | tok/s | runner cores busy | client cores busy |\n"
              "| --- | --- | --- | --- | --- |")


def row(round_: int, processes: int, figures: dict) -> str:
    return (f"| {round_} | {processes} | {figures['tok_s']:,.0f} | {figures['runner_cores']:.2f} | "
            f"{figures['client_cores']:.2f} |")


def report(results: list[dict], concurrency: int, tokens: int, warm: float, window: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    ratios = [seen[2]["tok_s"] / seen[1]["tok_s"] for seen in results]
    lines = [
        "## API_PROCESSES=2 against 1, engine taken out (`make bench-processes`, `bench/processes.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; code {commit.stdout.strip()}",
        f"- CPU: {cpu_model()}, nproc {os.cpu_count()}; flags: {cpu_flags()}",
        f"- load average at the end: {' '.join(f'{value:.2f}' for value in os.getloadavg())} "
        "(the machine may be shared: read the ratios of this run, not absolute figures)",
        f"- workload: two runner processes up at once over the stand-in engine (`tests/support/frontend_pipeline.py`; "
        f"with API_PROCESSES=2 each API process runs its own), c = {concurrency} streams of {tokens} tokens on "
        f"`/v1/chat/completions`, STREAM_INTERVAL=1, one client process; {len(results)} rounds, the order swapped "
        f"each round, {warm:g} s warm-up then a {window:g} s window each; the client, the runners and their "
        f"processes share the {len(psutil.Process().cpu_affinity())} cores",
        "",
        TABLE_HEAD,
        *(row(round_, processes, seen[processes]) for round_, seen in enumerate(results, 1) for processes in seen),
        "",
        f"API_PROCESSES=2 / 1, tok/s, per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)}; "
        f"**median {statistics.median(ratios):.2f}x**",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    replace_section(text, SECTION_START, SECTION_END, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 0.5 s warm-up and 2 s windows")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warm", type=float)
    parser.add_argument("--window", type=float)
    parser.add_argument("--write", action="store_true", help="write the table into bench/results.md")
    args = parser.parse_args(argv)
    rounds, warm, window = (2, 0.5, 2.0) if args.quick else (4, 1.0, 4.0)
    rounds = args.rounds if args.rounds is not None else rounds
    warm = args.warm if args.warm is not None else warm
    window = args.window if args.window is not None else window
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as folder:
        results = asyncio.run(run(rounds, args.concurrency, args.tokens, warm, window, Path(folder)))
    text = report(results, args.concurrency, args.tokens, warm, window)
    print("\n" + text)
    if args.write:
        write_section(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
