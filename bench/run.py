"""``make bench``: the runner against the bare vLLM engine and ``vllm serve``, same model, same engine settings.

One fixed streaming workload (``bench/prompts.py``, temperature 0) runs at each
concurrency against each system. All three systems start once, one after the
other (each start timed to its first answer), and stay up; then every pass runs
every concurrency on every system, the systems' order rotating from pass to pass
so that drift on the machine spreads evenly. The report gives medians over the
passes with their ranges, in ``bench/results.md`` and ``bench/results.png``.

Knobs (environment): MODEL_ID, MODEL_DIR, KV_CACHE_GIB (1), BENCH_PASSES (3),
BENCH_CONCURRENCY (1,8,32,64), BENCH_MAX_TOKENS (64), BENCH_MIN_REQUESTS (4)
and BENCH_ROUNDS (1): a level sends max(MIN_REQUESTS, ROUNDS x concurrency)
requests; BENCH_SYSTEMS (engine,runner,runner-v1,runner-responses,runner-messages,vllm-serve; also
vllm-serve-messages, vllm serve's /v1/messages), BENCH_OUTPUT
(bench/results.md), BENCH_TIME_LIMIT (3600 s: a measurement that would end past
it is skipped, and the report says so), BENCH_SETTLE (1.2 s between two
measurements), BENCH_REQUEST_TIMEOUT (300 s), BENCH_START_TIMEOUT (600 s),
BENCH_STARTS (3: timed starts of each system alone, round robin, before the
passes; 0 for none), BENCH_ALONE (engine,runner: the systems given those timed
starts; vllm serve's start is timed once, as the systems start for the passes), BENCH_COMPILED (1: the runner compiled, ENFORCE_EAGER=false,
started on an empty compile cache and restarted on the one it left; 0 to skip), BENCH_FLOOR (1: CPU
per streamed event of a bare socket, aiohttp and the runner over a stand-in engine,
``bench/floor.py``, after the passes; 0 to skip), BENCH_GROWTH (1: TTFT against prompt length on the engine
and the runner, and a multi-turn chat on the runner with the prefix cache on
and off, after the passes; 0 to skip).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import floor, growth
from bench.frontend import kept_section
from bench.load import LevelResult, RequestRecord, run_level
from bench.prompts import chat_prompts
from bench.report import COLD_COMPILED, WARM_COMPILED, Report, machine_facts
from bench.systems import (
    ROOT,
    EngineSystem,
    RunnerMessagesSystem,
    RunnerOpenAISystem,
    RunnerResponsesSystem,
    RunnerSystem,
    Startup,
    System,
    VllmServeMessagesSystem,
    VllmServeResponsesSystem,
    VllmServeSystem,
)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYSTEM_NAMES = ("engine", "runner", "runner-v1", "runner-responses", "runner-messages", "vllm-serve",
                "vllm-serve-messages")
DEFAULT_SYSTEMS = ("engine", "runner", "runner-v1", "runner-responses", "runner-messages", "vllm-serve")
# APIs of another system's process: they start and stop with it.
SECOND_APIS = {"runner-v1", "runner-responses", "runner-messages", "vllm-serve-messages", "vllm-serve-responses"}
# Each parity line: the runner's API against vllm serve's same API, at temperature 0.
PARITY = (("runner-v1", "vllm-serve", "runner /v1"),
          ("runner-responses", "vllm-serve-responses", "runner /v1/responses"),
          ("runner-messages", "vllm-serve-messages", "runner /v1/messages"))
WARM_UP_CONCURRENCY = 36  # every prompt at once
STOP_ALLOWANCE = 30  # seconds kept back from BENCH_TIME_LIMIT to stop the systems and write the report
WARM_UP_MAX_TOKENS = 4
NO_PREFIX_CACHE = "runner-no-prefix-cache"  # the runner with ENABLE_PREFIX_CACHING=false, for the multi-turn chat


def env_ints(name: str, default: str) -> list[int]:
    return [int(part) for part in os.environ.get(name, default).split(",") if part.strip()]


@dataclass(frozen=True)
class BenchConfig:
    model_id: str
    model_dir: Path
    kv_cache_gib: str
    passes: int
    concurrency: list[int]
    max_tokens: int
    min_requests: int  # requests per level at least ...
    rounds: int  # ... and this many times the concurrency
    systems: list[str]
    output: Path
    request_timeout: float
    start_timeout: float
    time_limit: float
    settle: float
    starts: int  # timed starts of each system alone, before the passes ...
    alone: list[str]  # ... of these systems
    growth: bool  # TTFT against prompt length, and a multi-turn chat with the prefix cache on and off
    compiled: bool  # the runner compiled, started on an empty compile cache and restarted on its own
    floor: bool  # the per-event CPU of the HTTP path's layers, over a stand-in engine

    @classmethod
    def from_env(cls) -> BenchConfig:
        systems = [name.strip() for name in os.environ.get("BENCH_SYSTEMS", ",".join(DEFAULT_SYSTEMS)).split(",")]
        alone = [name.strip() for name in os.environ.get("BENCH_ALONE", "engine,runner").split(",") if name.strip()]
        for variable, names in (("BENCH_SYSTEMS", systems), ("BENCH_ALONE", alone)):
            unknown = set(names) - set(SYSTEM_NAMES)
            if unknown:
                raise SystemExit(f"{variable}: unknown {sorted(unknown)}; known: {', '.join(SYSTEM_NAMES)}")
        return cls(
            model_id=os.environ.get("MODEL_ID", DEFAULT_MODEL_ID),
            model_dir=Path(os.environ.get("MODEL_DIR", "models")).resolve(),
            kv_cache_gib=os.environ.get("KV_CACHE_GIB", "1"),
            passes=int(os.environ.get("BENCH_PASSES", "3")),
            concurrency=env_ints("BENCH_CONCURRENCY", "1,8,32,64"),
            max_tokens=int(os.environ.get("BENCH_MAX_TOKENS", "64")),
            min_requests=int(os.environ.get("BENCH_MIN_REQUESTS", "4")),
            rounds=int(os.environ.get("BENCH_ROUNDS", "1")),
            systems=systems,
            output=Path(os.environ.get("BENCH_OUTPUT", ROOT / "bench" / "results.md")),
            request_timeout=float(os.environ.get("BENCH_REQUEST_TIMEOUT", "300")),
            start_timeout=float(os.environ.get("BENCH_START_TIMEOUT", "600")),
            time_limit=float(os.environ.get("BENCH_TIME_LIMIT", "3600")),
            settle=float(os.environ.get("BENCH_SETTLE", "1.2")),
            starts=int(os.environ.get("BENCH_STARTS", "3")),
            alone=alone,
            growth=os.environ.get("BENCH_GROWTH", "1") != "0",
            compiled=os.environ.get("BENCH_COMPILED", "1") != "0",
            floor=os.environ.get("BENCH_FLOOR", "1") != "0",
        )

    def workload(self, concurrency: int) -> list[list[dict]]:
        prompts = chat_prompts()
        count = max(self.min_requests, self.rounds * concurrency)
        return [prompts[index % len(prompts)] for index in range(count)]


def server_env(config: BenchConfig) -> dict[str, str]:
    """The environment every system's engine sees: the same tuning variables, no Hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "KV_CACHE_GIB": config.kv_cache_gib}


def serve_flags(engine_args) -> list[str]:
    """``vllm serve`` flags for every engine argument the runner sets away from vLLM's defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    defaults = AsyncEngineArgs(model=engine_args.model)
    flags = [engine_args.model]
    for arg in dataclasses.fields(engine_args):
        value = getattr(engine_args, arg.name)
        if arg.name == "model" or value == getattr(defaults, arg.name) or value is None:
            continue
        flag = "--" + arg.name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + arg.name.replace("_", "-"))
        elif isinstance(value, (str, int, float)):
            flags += [flag, str(value)]
        else:
            raise ValueError(f"no vllm serve flag for engine argument {arg.name}={value!r}")
    return flags


def runner_engine_args(config: BenchConfig):
    """The runner's engine arguments for this model, and ``pipelines.llm.vllm_backend`` with the seconds its import took.

    The runner's engine environment (pipelines.llm.layout.engine_environment: its
    compile cache in the model store, its CPU thread layout) goes into this
    process's environment, for all systems alike: the in-process engine starts
    its processes with it, and the servers inherit it.
    """
    os.environ["KV_CACHE_GIB"] = config.kv_cache_gib  # as the servers see it
    import_started = time.perf_counter()
    import pipelines.llm.vllm_backend as vllm_backend  # imports vLLM and torch
    import_s = time.perf_counter() - import_started
    from pipelines.llm.layout import engine_environment
    from pipelines.llm.settings import LLMSettings
    from pipelines.model_store import resolve_model

    settings = LLMSettings()
    os.environ.update(engine_environment(settings, config.model_dir, vllm_backend.platform() == "cpu",
                                         os.sched_getaffinity(0)))
    # A model missing from MODEL_DIR is fetched here, once; the systems then find it there, offline.
    model_path = resolve_model(config.model_id, config.model_dir)
    model_config = json.loads((model_path / "config.json").read_text())
    return vllm_backend, vllm_backend.engine_args(settings, model_path, config.model_id, model_config), import_s


def candidate_systems(config: BenchConfig, log_dir: Path, vllm_backend, engine_args, import_s: float
                      ) -> dict[str, System]:
    """Every system the bench knows, not started; the second APIs share their server's process."""
    env = server_env(config)
    runner = RunnerSystem(config.model_id, config.model_dir, env, log_dir)
    vllm_serve = VllmServeSystem(config.model_id, serve_flags(engine_args), env, log_dir)
    return {
        # A copy: vLLM fills in the arguments it is started with, and serve_flags reads the ones the runner chose.
        "engine": EngineSystem(vllm_backend, copy.deepcopy(engine_args), import_s),
        "runner": runner,
        "runner-v1": RunnerOpenAISystem(runner),
        "runner-responses": RunnerResponsesSystem(runner),
        "runner-messages": RunnerMessagesSystem(runner),
        "vllm-serve": vllm_serve,
        "vllm-serve-messages": VllmServeMessagesSystem(vllm_serve),
    }


async def timed_starts(config: BenchConfig, session: aiohttp.ClientSession, log_dir: Path,
                       vllm_backend, engine_args, import_s: float) -> dict[str, list[Startup]]:
    """Each system started and stopped BENCH_STARTS times with nothing else up, round robin.

    Round robin rather than one system's starts in a row, so that a slow spell
    on the machine falls on every system; the report gives the medians.
    """
    # A second API is its server's own process: its start is the server's.
    names = [name for name in config.systems if name in config.alone and name not in SECOND_APIS]
    starts: dict[str, list[Startup]] = {name: [] for name in names}
    for round_index in range(config.starts):
        for name in names:
            system = candidate_systems(config, log_dir, vllm_backend, engine_args, import_s)[name]
            starts[name].append(await start_alone(config, session, system,
                                                  f"start {round_index + 1}/{config.starts} of {name}"))
    return starts


async def start_alone(config: BenchConfig, session: aiohttp.ClientSession, system: System, label: str) -> Startup:
    """One timed start of ``system`` with nothing else up, stopped again at once."""
    await asyncio.sleep(config.settle)
    print(f"{label} alone ...", flush=True)
    try:
        startup = await system.start(session, config.start_timeout)
    finally:
        await system.stop()
    print(f"  {label}: first answer after {startup.first_answer_s:.1f} s", flush=True)
    return startup


async def compiled_restarts(config: BenchConfig, session: aiohttp.ClientSession, log_dir: Path
                            ) -> dict[str, list[Startup]]:
    """The runner compiled (ENFORCE_EAGER=false) as a container starts it, alone: first on an empty
    compile cache (VLLM_CACHE_ROOT, /models/vllm-cache in a container), then restarted on the cache
    that start left. Each start gets an empty TMPDIR, as a new container's /tmp is empty
    (torch's inductor keeps a cache of its own there)."""
    cache = log_dir / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    found = {}
    for label in (COLD_COMPILED, WARM_COMPILED):
        scratch = tempfile.mkdtemp(prefix="bench-tmp-")
        env = {**server_env(config), "ENFORCE_EAGER": "false", "VLLM_CACHE_ROOT": str(cache), "TMPDIR": scratch}
        system = RunnerSystem(config.model_id, config.model_dir, env, log_dir, name="runner-compiled")
        try:
            found[label] = [await start_alone(config, session, system, f"start of the {label}")]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return found


async def start_systems(config: BenchConfig, session: aiohttp.ClientSession, log_dir: Path,
                        vllm_backend, engine_args, import_s: float, started: list[System]) -> dict[str, Startup]:
    """Start the systems one after the other for the passes, each start timed to its first answer."""
    candidates = candidate_systems(config, log_dir, vllm_backend, engine_args, import_s)
    startups = {}
    for name in config.systems:
        system = candidates[name]
        if started:
            await asyncio.sleep(config.settle)  # the last system's worker spins a while after its first answer
        print(f"starting {name} ...", flush=True)
        started.append(system)
        startups[name] = await system.start(session, config.start_timeout)
        print(f"  {name}: first answer after {startups[name].first_answer_s:.1f} s", flush=True)
    return startups


async def bench(config: BenchConfig, begun: float) -> None:
    log_dir = ROOT / "bench" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(config)
    started: list[System] = []
    results: list[LevelResult] = []
    skipped: list[str] = []
    grown: dict[str, dict] = {}
    connector = aiohttp.TCPConnector(limit=0)  # the concurrency is the bench's to set
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            vllm_backend, engine_args, import_s = runner_engine_args(config)
            facts.update(engine_settings(engine_args))
            alone = await timed_starts(config, session, log_dir, vllm_backend, engine_args, import_s)
            if config.compiled and "runner" in config.systems:
                alone |= await compiled_restarts(config, session, log_dir)
            startups = await start_systems(config, session, log_dir, vllm_backend, engine_args, import_s, started)
            systems = list(started)
            await warm_up(config, systems, session)
            facts.update(await output_parity(config, systems, session))
            last_duration: dict[tuple[str, int], float] = {}
            for pass_index in range(config.passes):
                order = systems[pass_index % len(systems):] + systems[: pass_index % len(systems)]
                print(f"pass {pass_index + 1}/{config.passes}: {', '.join(s.name for s in order)}", flush=True)
                for concurrency in config.concurrency:
                    workload = config.workload(concurrency)
                    for system in order:
                        expected_end = (time.perf_counter() + config.settle
                                        + last_duration.get((system.name, concurrency), 0))
                        if expected_end > begun + config.time_limit - STOP_ALLOWANCE:
                            skipped.append(f"pass {pass_index + 1} c={concurrency} {system.name}")
                            continue
                        # vLLM's workers keep spinning for a second after their last step, pinned
                        # to the core the next system's worker needs: let the last one go quiet.
                        await asyncio.sleep(config.settle)
                        cell_started = time.perf_counter()
                        result = await run_level(system, session, workload, concurrency, config.max_tokens,
                                                 config.request_timeout, pass_index)
                        last_duration[system.name, concurrency] = time.perf_counter() - cell_started
                        results.append(result)
                        print("  " + progress_line(result), flush=True)
            if config.floor:
                print("CPU per streamed event: socket, aiohttp, runner over a stand-in engine ...", flush=True)
                try:
                    grown["floor"] = await floor.measure()
                except Exception as exc:  # the passes' figures are still reported
                    print(f"per-event floor failed: {exc!r}", flush=True)
                    facts["per-event floor failed"] = repr(exc)
            if config.growth:
                try:
                    grown |= await measure_growth(config, session, log_dir, systems, started)
                except Exception as exc:  # the passes' figures are still reported
                    print(f"growth measurements failed: {exc!r}", flush=True)
                    facts["growth measurements failed"] = repr(exc)
        finally:
            await asyncio.gather(*(stop(system) for system in started))
    facts["bench wall time"] = f"{time.perf_counter() - begun:.0f} s (limit {config.time_limit:.0f} s)"
    if skipped:
        facts["skipped at the time limit"] = ", ".join(skipped)
    report = Report(config, facts, startups, results, alone, grown)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(report.markdown() + kept_section(config.output))  # bench/frontend.py's stays
    chart = config.output.with_suffix(".png")
    print(report.markdown())
    if report.chart(chart):
        print(f"wrote {config.output} and {chart}")
    else:
        print(f"wrote {config.output} (no measurements, no chart)")


async def measure_growth(config: BenchConfig, session: aiohttp.ClientSession, log_dir: Path,
                         systems: list[System], started: list[System]) -> dict[str, dict]:
    """TTFT against prompt length (engine and runner), then the multi-turn chat (runner, prefix cache on and off)."""
    by_name = {system.name: system for system in systems}
    measured: dict[str, dict] = {}
    compared = [by_name[name] for name in ("engine", "runner") if name in by_name]
    if compared:
        print("TTFT against prompt length ...", flush=True)
        measured["prompt_length"] = await growth.ttft_by_prompt_length(
            compared, session, config.request_timeout, config.settle)
    if "runner" in by_name:
        print(f"the runner's memory with {growth.OPEN_STREAMS} streams open ...", flush=True)
        measured["memory"] = await growth.rss_with_open_streams(
            by_name["runner"], session, chat_prompts(), config.request_timeout)
        for system in [system for system in started if system.name in ("engine", "vllm-serve")]:
            await stop(system)  # the multi-turn chat needs the two runners only: room for the second
            started.remove(system)
        uncached = RunnerSystem(config.model_id, config.model_dir, {**server_env(config), "ENABLE_PREFIX_CACHING": "false"},
                                log_dir, name=NO_PREFIX_CACHE)
        print(f"starting {NO_PREFIX_CACHE} ...", flush=True)
        started.append(uncached)
        await uncached.start(session, config.start_timeout)
        print("multi-turn chat, prefix cache on and off ...", flush=True)
        measured["multi_turn"] = await growth.multi_turn(
            [by_name["runner"], uncached], session, config.request_timeout, config.settle)
    return measured


async def output_parity(config: BenchConfig, systems: list[System], session: aiohttp.ClientSession) -> dict[str, str]:
    """Every prompt at temperature 0 on each of the runner's APIs and on vllm serve's same API: the same text
    and token counts? (/v1/chat/completions, and Anthropic's /v1/messages, which vllm serve serves too.)

    Chat completions on both, and the Responses API on both when runner-responses
    runs. All prompts at once on each system in turn (one at a time would take
    most of an hour on a slow CPU): both servers see the same batch.
    """
    by_name = {system.name: system for system in systems}
    # vllm serve's other APIs, for their parity lines
    for name, system in (("vllm-serve-messages", VllmServeMessagesSystem), ("vllm-serve-responses", VllmServeResponsesSystem)):
        if "vllm-serve" in by_name and name not in by_name:
            by_name[name] = system(by_name["vllm-serve"])

    async def answer(system: System, messages: list[dict]) -> tuple[str, int, int]:
        record = RequestRecord(sent=time.perf_counter())
        await asyncio.wait_for(system.stream(session, messages, config.max_tokens, record), config.request_timeout)
        if record.error not in (None, "no text"):  # a failed answer is a difference, shown below
            return f"<failed: {record.error}>", record.prompt_tokens, record.output_tokens
        return "".join(record.text), record.prompt_tokens, record.output_tokens

    found = {}
    for ours, theirs, label in PARITY:
        if not {ours, theirs} <= by_name.keys():
            continue
        answers = {}
        for name in (ours, theirs):
            await asyncio.sleep(config.settle)
            answers[name] = await asyncio.gather(*(answer(by_name[name], messages) for messages in chat_prompts()))
        same = sum(mine == other for mine, other in zip(answers[ours], answers[theirs]))
        line = (f"{same}/{len(answers[ours])} prompts with the same text, prompt and output tokens "
                f"(all {len(answers[ours])} at once, max_tokens {config.max_tokens})")
        print(f"output parity, {label} against vllm serve at temperature 0: {line}", flush=True)
        for index, (mine, other) in enumerate(zip(answers[ours], answers[theirs])):
            if mine != other:
                print(f"  prompt {index}: {ours} {mine!r}\n            {theirs} {other!r}", flush=True)
        found[f"output parity ({label} vs vllm serve, temperature 0)"] = line
    return found


async def stop(system: System) -> None:
    print(f"stopping {system.name}", flush=True)
    await system.stop()


async def warm_up(config: BenchConfig, systems: list[System], session: aiohttp.ClientSession) -> None:
    """Every prompt once (a few tokens) on every system, so that the first pass meets the
    same engine state as the others (prefix cache, warm paths): vLLM caches prefixes by default."""
    prompts = chat_prompts()
    for system in systems:
        result = await run_level(system, session, prompts, WARM_UP_CONCURRENCY, WARM_UP_MAX_TOKENS,
                                 config.request_timeout, -1)
        if result.errors:
            raise RuntimeError(f"{system.name} failed its warm-up: {result.first_error}")


def engine_settings(engine_args) -> dict[str, str]:
    return {
        "engine settings (all three)": (
            f"dtype {engine_args.dtype}, enforce_eager {engine_args.enforce_eager}, "
            f"max_model_len {engine_args.max_model_len}, max_num_batched_tokens {engine_args.max_num_batched_tokens}, "
            f"max_num_seqs {engine_args.max_num_seqs}, KV cache {engine_args.kv_cache_memory_bytes} bytes "
            f"({engine_args.kv_cache_memory_bytes / 1024**3:g} GiB), prefix caching "
            f"{'on' if engine_args.enable_prefix_caching else 'off'} (ENABLE_PREFIX_CACHING; every prompt is sent "
            "once, for a few tokens, to each system before the passes), stream interval "
            f"{engine_args.stream_interval}"
        ),
        "engine environment (all three)": ", ".join(
            f"{name}={os.environ[name]}" for name in sorted(os.environ) if name.startswith("VLLM_CPU_")
        ) or "vLLM's defaults",
        "vllm serve flags": "`" + " ".join(serve_flags(engine_args)) + " --disable-uvicorn-access-log`",
    }


def progress_line(result: LevelResult) -> str:
    summary = result.summary()
    errors = f", {result.errors} errors ({result.first_error})" if result.errors else ""
    return (
        f"c={result.concurrency:<3} {result.system:<10} {summary['tokens_per_s']:7.1f} tok/s  "
        f"TTFT p50 {summary['ttft_p50_ms']:6.0f} ms  ITL p50 {summary['itl_p50_ms']:5.1f} ms  "
        f"API CPU {summary['api_cpu_ms_per_token']:.3f} ms/tok  client CPU {summary['client_cpu_ms_per_token']:.3f}  "
        f"{result.output_tokens} tok in {result.wall_s:.1f} s{errors}"
    )


def main() -> int:
    begun = time.perf_counter()
    config = BenchConfig.from_env()
    loop = asyncio.new_event_loop()
    task = loop.create_task(bench(config, begun))

    def interrupt() -> None:
        # Once only: a second signal must not cut short the stopping of the systems.
        if not task.cancelling():
            print("interrupted: stopping every system the bench started", file=sys.stderr, flush=True)
            task.cancel()

    # SIGTERM and Ctrl-C cancel the bench, whose finally stops every system it started.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("bench interrupted; the systems it started are stopped", file=sys.stderr)
        return 130
    finally:
        loop.close()
    return 0


if __name__ == "__main__":  # vLLM's engine processes import this module again
    sys.exit(main())
