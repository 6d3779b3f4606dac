"""``python -m bench.threads``: one engine worker's threads on every core or on one, side by side in one run.

Two runners of the same model are up together, idle while the other is
measured: ``every-core``, the runner's own CPU layout (on a machine of at most
four cores its worker's threads take all of them, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``),
and ``one-core``, the worker's threads on the first core
(``VLLM_CPU_OMP_THREADS_BIND``). Each round sends both the same completions
(``max_tokens`` BENCH_MAX_TOKENS, ``ignore_eos``, temperature 0): BENCH_REQUESTS
one after another, then BENCH_REQUESTS eight at a time; the runners' order
alternates from round to round. It prints each layout's medians (wall time and
the CPU time of the runner's whole process tree) and one-core's ratio to
every-core.

MODEL (environment): ``tiny`` (the test suite's tiny model, built here, the
default) or ``default`` (the default model from MODEL_DIR). Knobs: BENCH_ROUNDS
(3), BENCH_REQUESTS (16), BENCH_MAX_TOKENS (64).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.support.runner_process import DEFAULT_MODEL_ID, ROOT, RunnerProcess
from tests.support.runners import tiny_engine_env
from tests.support.tiny_model import build_tiny_llama

CONCURRENCY = 8


def tree_cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def complete(url: str, model: str, max_tokens: int) -> int:
    body = {"model": model, "prompt": "Hello there, how", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["usage"]["completion_tokens"]


def measure(runner: RunnerProcess, model: str, requests: int, max_tokens: int) -> dict[str, float]:
    """Wall and CPU seconds of ``requests`` completions one after another, then eight at a time."""
    figures = {}
    for label, workers in (("serial", 1), (f"{CONCURRENCY} at a time", CONCURRENCY)):
        cpu, started = tree_cpu_seconds(runner.process.pid), time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            tokens = sum(pool.map(lambda _: complete(runner.url, model, max_tokens), range(requests)))
        assert tokens == requests * max_tokens, f"{runner.name}: {tokens} tokens"
        figures[f"{label} wall"] = time.monotonic() - started
        figures[f"{label} cpu"] = tree_cpu_seconds(runner.process.pid) - cpu
    return figures


def alternating_rounds(runners: dict[str, RunnerProcess], model: str, rounds: int, requests: int,
                       max_tokens: int) -> dict[str, list[dict[str, float]]]:
    """``measure`` on each runner in turn, round after round, the order reversed each round (the machine drifts)."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    order = list(runners)
    for round_number in range(rounds):
        for name in order:
            time.sleep(1.2)  # an idle worker's threads spin about a second after its last step
            results[name].append(measure(runners[name], model, requests, max_tokens))
            print(f"round {round_number + 1} {name}: "
                  + ", ".join(f"{key} {value:.2f} s" for key, value in results[name][-1].items()), flush=True)
        order.reverse()
    return results


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    requests = int(os.environ.get("BENCH_REQUESTS", "16"))
    max_tokens = int(os.environ.get("BENCH_MAX_TOKENS", "64"))
    folder = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    if os.environ.get("MODEL", "tiny") == "tiny":
        model_env = tiny_engine_env(build_tiny_llama(folder / "tiny"), core=None)
    else:
        model_env = {"MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": os.environ.get("MODEL_DIR", str(ROOT / "models")),
                     "KV_CACHE_GIB": "1"}
    first_core = min(os.sched_getaffinity(0))
    layouts = {"every-core": {}, "one-core": {"VLLM_CPU_OMP_THREADS_BIND": str(first_core)}}
    runners = {name: RunnerProcess(name, {**model_env, **env}, folder / f"{name}.log") for name, env in layouts.items()}
    try:
        for runner in runners.values():
            runner.start()
        for runner in runners.values():
            assert runner.wait_until({"IDLE", "ERROR"}) == "IDLE", runner.log_tail()
        model = model_env["MODEL_ID"]
        for runner in runners.values():
            complete(runner.url, model, 8)  # warm-up
        results = alternating_rounds(runners, model, rounds, requests, max_tokens)
    finally:
        for runner in runners.values():
            runner.stop()
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}
    print(f"\n{model_env['MODEL_ID']}: {requests} completions of {max_tokens} tokens, {rounds} rounds, "
          f"{len(os.sched_getaffinity(0))} cores; medians, and one-core / every-core")
    for key in medians["every-core"]:
        every, one = medians["every-core"][key], medians["one-core"][key]
        print(f"  {key:22s} every-core {every:7.2f} s   one-core {one:7.2f} s   ratio {one / every:.2f}")


if __name__ == "__main__":
    main()
