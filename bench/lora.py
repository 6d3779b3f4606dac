"""``python -m bench.lora``: what serving LoRA adapters costs, measured side by side in one run.

Two runners of the same model (MODEL_ID, the default model by default) are up
together: ``plain`` without LoRA, and ``lora`` with two adapters made here
(PEFT's format, random weights, rank BENCH_LORA_RANK). The bench's fixed
streaming workload (``bench/prompts.py``, temperature 0, POST /llm) runs at each
concurrency on four systems, their order rotating from pass to pass:

- ``plain``: the base model on the runner without LoRA;
- ``lora-base``: the base model on the LoRA runner (``model: ""``);
- ``lora-one``: every request through adapter ``a``;
- ``lora-mix``: requests alternating between adapters ``a`` and ``b``, both in each batch.

It prints the medians over the passes and each system's ratio to ``plain`` at
the same concurrency, then the memory: the LoRA runner's process tree against
the plain one's at rest (the room for MAX_LORAS adapters of MAX_LORA_RANK), and
what one more adapter adds once loaded (BENCH_LORA_EXTRA adapters loaded at run
time, the growth divided among them), beside the adapter's file size; on a GPU
machine also the GPU memory in use before and after.

Knobs (environment): MODEL_ID, MODEL_DIR, KV_CACHE_GIB (1), BENCH_PASSES (4),
BENCH_CONCURRENCY (8,32), BENCH_MAX_TOKENS (64), BENCH_LORA_RANK (8),
BENCH_LORA_EXTRA (8), BENCH_SETTLE (1.2 s), BENCH_REQUEST_TIMEOUT (300 s),
BENCH_START_TIMEOUT (600 s).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from bench.load import LevelResult, RequestRecord, run_level
from bench.prompts import chat_prompts
from bench.run import DEFAULT_MODEL_ID, progress_line
from bench.systems import ROOT, RunnerSystem, System
from pipelines.llm.adapters import safetensors_shapes
from pipelines.model_store import resolve_model
from runner.hardware import NVML
from tests.support.lora_adapters import make_adapter

TOKEN = "bench-lora-token"
MiB = 1024**2


class ModelChoice(System):
    """One runner's /llm, each request naming the next model of ``models`` in turn ("" is the base)."""

    def __init__(self, name: str, runner: RunnerSystem, models: list[str]) -> None:
        self.name = name
        self.runner = runner
        self.models = models
        self.turn = itertools.count()

    async def stream(self, session, messages, max_tokens, record: RequestRecord) -> None:
        model = self.models[next(self.turn) % len(self.models)]
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
        async for event in self.runner.events(session, "/llm", body, record):
            choice = event["choices"][0]
            if choice["delta"]["content"]:
                record.chunk(choice["delta"]["content"])
            if choice["finish_reason"]:
                usage = event["usage"]
                record.finish(choice["finish_reason"], usage["completion_tokens"], usage["prompt_tokens"])

    def api_process(self) -> psutil.Process:
        return self.runner.api_process()


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a runner and its engine processes."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


def gpu_used() -> int | None:
    nvml = NVML()
    try:
        stats = nvml.utilization_info()
        if not stats:
            return None
        return sum(gpu.memory_total - gpu.memory_free for gpu in stats.values())
    finally:
        nvml.close()


async def settled_rss(process: psutil.Process, settle: float) -> int:
    await asyncio.sleep(settle)
    return statistics.median([tree_rss(process) for _ in range(5)])


async def load_adapter(session: aiohttp.ClientSession, runner: RunnerSystem, name: str, path: Path) -> None:
    async with session.post(f"{runner.server.url}/v1/load_lora_adapter",
                            json={"lora_name": name, "lora_path": str(path)}) as response:
        if response.status != 200:
            raise RuntimeError(f"loading {name} failed: {response.status} {await response.text()}")


def median(results: list[LevelResult], key: str) -> float:
    return statistics.median(result.summary()[key] for result in results)


def paired_ratio(cells: list[LevelResult], others: list[LevelResult]) -> float:
    """The median over the passes of tok/s divided by the other system's in the same pass."""
    pairs = [mine.tokens_per_s / other.tokens_per_s for mine in cells for other in others
             if other.pass_index == mine.pass_index]
    return statistics.median(pairs) if pairs else float("nan")


def report(results: list[LevelResult], concurrency: list[int], memory: dict[str, str], facts: dict[str, str]) -> str:
    lines = ["## LoRA adapters: the same workload on the base, one adapter and a mix of two", ""]
    lines += [f"- {name}: {value}" for name, value in facts.items()]
    lines += ["", "| c | system | output tok/s | vs plain | vs lora-base | TTFT p50 ms | ITL p50 ms | errors |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for level in concurrency:
        at_level = [result for result in results if result.concurrency == level]
        by_name = {name: [result for result in at_level if result.system == name]
                   for name in ("plain", "lora-base", "lora-one", "lora-mix")}
        for name, cells in by_name.items():
            if not cells:
                continue
            lines.append(f"| {level} | {name} | {median(cells, 'tokens_per_s'):.1f} | "
                         f"{paired_ratio(cells, by_name['plain']):.2f} | {paired_ratio(cells, by_name['lora-base']):.2f} | "
                         f"{median(cells, 'ttft_p50_ms'):.0f} | {median(cells, 'itl_p50_ms'):.1f} | "
                         f"{sum(cell.errors for cell in cells)} |")
    lines += ["", "tok/s, TTFT and ITL: medians over the passes. vs X: the median over the passes of tok/s divided "
              "by X's in the same pass (the systems of one pass run minutes apart, not at once).", ""]
    lines += [f"- {name}: {value}" for name, value in memory.items()]
    return "\n".join(lines)


def adapter_bytes(folder: Path, dtype_bytes: int) -> int:
    """The adapter's weights as the engine holds them: every element of its tensors, in the engine's dtype."""
    total = 0
    for shape in safetensors_shapes(folder / "adapter_model.safetensors").values():
        count = 1
        for side in shape:
            count *= side
        total += count
    return total * dtype_bytes


async def bench() -> str:
    model_id = os.environ.get("MODEL_ID", DEFAULT_MODEL_ID)
    model_dir = Path(os.environ.get("MODEL_DIR", "models")).resolve()
    passes = int(os.environ.get("BENCH_PASSES", "4"))
    concurrency = [int(part) for part in os.environ.get("BENCH_CONCURRENCY", "8,32").split(",") if part.strip()]
    max_tokens = int(os.environ.get("BENCH_MAX_TOKENS", "64"))
    rank = int(os.environ.get("BENCH_LORA_RANK", "8"))
    extra = int(os.environ.get("BENCH_LORA_EXTRA", "8"))
    settle = float(os.environ.get("BENCH_SETTLE", "1.2"))
    request_timeout = float(os.environ.get("BENCH_REQUEST_TIMEOUT", "300"))
    start_timeout = float(os.environ.get("BENCH_START_TIMEOUT", "600"))
    model_path = resolve_model(model_id, model_dir)
    scratch = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    adapters = {name: make_adapter(scratch / name, model_path, seed=seed, rank=rank, scale=0.05, base_model=model_id)
                for seed, name in enumerate(["a", "b", *(f"extra{index}" for index in range(extra))], start=1)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KV_CACHE_GIB": os.environ.get("KV_CACHE_GIB", "1")}
    lora_env = {**env, "LORA_ADAPTERS": f"a={adapters['a']},b={adapters['b']}", "MAX_LORAS": "2",
                "MAX_LORA_RANK": str(rank), "MAX_CPU_LORAS": str(2 + extra), "LORA_RUNTIME_UPDATES": "true",
                "AUTH_TOKEN": TOKEN}
    log_dir = ROOT / "bench" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plain = RunnerSystem(model_id, model_dir, env, log_dir, name="plain")
    lora = RunnerSystem(model_id, model_dir, lora_env, log_dir, name="lora")
    systems = [ModelChoice("plain", plain, [""]), ModelChoice("lora-base", lora, [""]),
               ModelChoice("lora-one", lora, ["a"]), ModelChoice("lora-mix", lora, ["a", "b"])]
    facts = {"model": model_id, "adapters": f"rank {rank}, every attention and MLP projection of every layer",
             "workload": f"{len(chat_prompts())} chat prompts (bench/prompts.py) streamed on POST /llm, "
                         f"temperature 0, max_tokens {max_tokens}, max(4, c) requests per level",
             "passes": f"{passes}, the systems' order rotating by one place per pass",
             "CPU": f"{os.cpu_count()} logical cores", "RAM": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"}
    memory: dict[str, str] = {}
    results: list[LevelResult] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}  # the plain runner has no token and ignores it
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers) as session:
        started: list[RunnerSystem] = []
        try:
            for runner in (plain, lora):
                print(f"starting {runner.name} ...", flush=True)
                started.append(runner)
                startup = await runner.start(session, start_timeout)
                print(f"  {runner.name}: first answer after {startup.first_answer_s:.1f} s", flush=True)
            for system in systems:  # every prompt once: the prefix cache and the adapters' weights warm
                await run_level(system, session, chat_prompts(), 36, 4, request_timeout, -1)
            plain_rss = await settled_rss(plain.api_process(), settle)
            lora_rss = await settled_rss(lora.api_process(), settle)
            memory["runner and engine RSS at rest, plain"] = f"{plain_rss / MiB:.0f} MiB"
            memory["runner and engine RSS at rest, LoRA (MAX_LORAS=2, 2 adapters loaded)"] = (
                f"{lora_rss / MiB:.0f} MiB ({(lora_rss - plain_rss) / MiB:+.0f} MiB)")
            # Before the passes: their large batches leave freed memory in the allocator's arenas, which new
            # tensors would fill without growing the resident set.
            gpu_before = gpu_used()
            for index in range(extra):
                await load_adapter(session, lora, f"extra{index}", adapters[f"extra{index}"])
            extra_system = ModelChoice("extras", lora, [f"extra{index}" for index in range(extra)])
            await run_level(extra_system, session, chat_prompts()[:extra], 2, 4, request_timeout, -1)
            after, gpu_after = await settled_rss(lora.api_process(), settle), gpu_used()
            dtype_bytes = 4 if engine_dtype(lora) == "float32" else 2
            memory[f"one more adapter, loaded at run time and used ({extra} of them, growth / {extra})"] = (
                f"{(after - lora_rss) / extra / MiB:+.1f} MiB RSS; its weights in the engine's dtype "
                f"({engine_dtype(lora)}): {adapter_bytes(adapters['a'], dtype_bytes) / MiB:.1f} MiB "
                f"(adapter_model.safetensors, float32: "
                f"{(adapters['a'] / 'adapter_model.safetensors').stat().st_size / MiB:.1f} MiB)")
            if gpu_before is not None and gpu_after is not None:
                memory["GPU memory in use, before and after those loads"] = (
                    f"{gpu_before / MiB:.0f} and {gpu_after / MiB:.0f} MiB")
            for index in range(passes):
                order = systems[index % len(systems):] + systems[: index % len(systems)]
                print(f"pass {index + 1}/{passes}: {', '.join(system.name for system in order)}", flush=True)
                for level in concurrency:
                    workload = [chat_prompts()[i % len(chat_prompts())] for i in range(max(4, level))]
                    for system in order:
                        await asyncio.sleep(settle)
                        result = await run_level(system, session, workload, level, max_tokens, request_timeout, index)
                        results.append(result)
                        print("  " + progress_line(result), flush=True)
        finally:
            for runner in started:
                await runner.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    return report(results, concurrency, memory, facts)


def engine_dtype(runner: RunnerSystem) -> str:
    """The dtype the runner's engine started with, from its engine.start log line."""
    for line in runner.server.log_path.read_text(errors="replace").splitlines():
        if '"engine.start"' in line:
            return json.loads(line).get("dtype", "auto")
    return "auto"


def main() -> int:
    begun = time.perf_counter()
    print(asyncio.run(bench()))
    print(f"\nbench.lora took {time.perf_counter() - begun:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # vLLM's engine processes import this module again
    sys.exit(main())
