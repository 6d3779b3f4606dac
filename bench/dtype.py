"""``python -m bench.dtype``: the default model in bfloat16 and in float32 on this CPU, side by side in one run.

Two runners of the default model are up together, idle while the other is
measured, one with ``DTYPE=bfloat16``, one with ``DTYPE=float32`` (the CPU
default, ``pipelines.llm.layout.engine_dtype``). Each first answers the README's
example (``/llm``, temperature 0), so the run shows what each dtype says here.
Then each round sends both the same completions (``max_tokens``
BENCH_MAX_TOKENS, ``ignore_eos``, temperature 0): BENCH_REQUESTS one after
another, then BENCH_REQUESTS eight at a time; the runners' order alternates from
round to round. It prints the CPU's bfloat16 support, each dtype's medians (wall
time and the CPU time of the runner's whole process tree), and float32's time
over bfloat16's paired by round (the two measured one after the other, so a
neighbour's load that comes and goes weighs on both): their median and range.

Knobs (environment): MODEL_DIR (the store ``make models`` fills), BENCH_ROUNDS
(5), BENCH_REQUESTS (8), BENCH_MAX_TOKENS (16).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import urllib.request
from pathlib import Path

from bench.threads import alternating_rounds, complete
from tests.support.runner_process import DEFAULT_MODEL_ID, ROOT, RunnerProcess

DTYPES = ("bfloat16", "float32")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]  # the README's example


def cpu_bfloat16() -> str:
    """How this CPU computes bfloat16: natively (AMX, AVX-512 BF16) or emulated (AVX2 only)."""
    import torch

    amx, avx512_bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    if amx or avx512_bf16:
        return "native bfloat16 (" + ", ".join(name for name, has in (("AMX", amx), ("AVX-512 BF16", avx512_bf16))
                                               if has) + ")"
    return f"no native bfloat16 (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})"


def answer(url: str) -> str:
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 40}
    request = urllib.request.Request(f"{url}/llm", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    requests = int(os.environ.get("BENCH_REQUESTS", "8"))
    max_tokens = int(os.environ.get("BENCH_MAX_TOKENS", "16"))
    folder = Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    model_env = {"MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": os.environ.get("MODEL_DIR", str(ROOT / "models")),
                 "KV_CACHE_GIB": "1"}
    runners = {dtype: RunnerProcess(dtype, {**model_env, "DTYPE": dtype}, folder / f"{dtype}.log") for dtype in DTYPES}
    answers: dict[str, str] = {}
    try:
        for runner in runners.values():
            runner.start()
        for runner in runners.values():
            assert runner.wait_until({"IDLE", "ERROR"}) == "IDLE", runner.log_tail()
        for dtype, runner in runners.items():
            answers[dtype] = answer(runner.url)
            complete(runner.url, DEFAULT_MODEL_ID, 8)  # warm-up
        results = alternating_rounds(runners, DEFAULT_MODEL_ID, rounds, requests, max_tokens)
    finally:
        for runner in runners.values():
            runner.stop()
    medians = {dtype: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for dtype, rs in results.items()}
    print(f"\n{DEFAULT_MODEL_ID} on {len(os.sched_getaffinity(0))} cores, {cpu_bfloat16()}")
    for dtype in DTYPES:
        print(f"  {dtype:8s} answers the README's example: {answers[dtype]!r}")
    print(f"{requests} completions of {max_tokens} tokens, {rounds} rounds; medians, and float32 / bfloat16 paired by "
          "round: median [range]")
    for key in medians["float32"]:
        ratios = sorted(fp32[key] / bf16[key] for fp32, bf16 in zip(results["float32"], results["bfloat16"]))
        print(f"  {key:22s} bfloat16 {medians['bfloat16'][key]:7.2f} s   float32 {medians['float32'][key]:7.2f} s   "
              f"ratio {statistics.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
