"""The bench report's statistics, on figures whose answer is known."""

from __future__ import annotations

import math

from bench.report import paired_ratio_interval


def test_a_paired_ratio_interval_holds_one_for_noise_and_excludes_it_for_a_real_gap():
    centre, low, high = paired_ratio_interval([(100, 100), (98, 100), (102, 100)])
    assert low < 1 < high and math.isclose(centre, 1, abs_tol=0.001)
    centre, low, high = paired_ratio_interval([(90, 100), (91, 100), (89, 100), (90.5, 100)])
    assert 0.88 < low < centre < high < 0.92


def test_the_pair_cancels_drift_that_both_systems_share():
    # The machine slows by half from one pass to the next; the runner is 5 % behind in each.
    pairs = [(95, 100), (47.5, 50), (71.25, 75)]
    centre, low, high = paired_ratio_interval(pairs)
    assert math.isclose(centre, 0.95) and math.isclose(low, 0.95) and math.isclose(high, 0.95)


def test_one_pair_has_no_interval():
    centre, low, high = paired_ratio_interval([(1, 2)])
    assert centre == 0.5 and math.isnan(low) and math.isnan(high)


def test_starts_alone_report_the_gap_to_the_engine_and_what_a_warm_compile_cache_saves(tmp_path):
    from types import SimpleNamespace

    from bench.report import COLD_COMPILED, WARM_COMPILED, Report
    from bench.systems import Startup

    config = SimpleNamespace(passes=3, concurrency=[1], output=tmp_path / "results.md")
    alone = {"engine": [Startup(first_answer_s=s) for s in (30, 31, 35)],
             "runner": [Startup(first_answer_s=s) for s in (31, 33, 40)],
             COLD_COMPILED: [Startup(first_answer_s=120)], WARM_COMPILED: [Startup(first_answer_s=90)]}
    lines = Report(config, {}, {}, [], alone).alone_lines()
    assert "| runner | 3 | 33.0 s | 31.0–40.0 s | +2.0 s |" in lines
    assert any("after 90.0 s instead of 120.0 s: 30.0 s saved (0.75x)" in line for line in lines)


def test_ttft_by_prompt_length_is_reported_per_length_with_its_sample_count(tmp_path):
    from types import SimpleNamespace

    from bench.growth import LENGTH_SAMPLES, Timed
    from bench.report import Report

    config = SimpleNamespace(passes=3, concurrency=[1], output=tmp_path / "results.md")
    found = {}
    for length, samples in LENGTH_SAMPLES.items():
        for name, scale in (("engine", 1.0), ("runner", 1.1)):
            found[name, length] = [Timed(ttft_ms=scale * length * (1 + sample), prompt_tokens=length + 20)
                                   for sample in range(samples)]
    lines = Report(config, {}, {}, [], None, {"prompt_length": found}).growth_lines()
    counts = ", ".join(str(samples) for samples in LENGTH_SAMPLES.values())
    assert any(f"{counts} unique prompts at each length" in line for line in lines)
    # 256 words, 3 samples: medians 512 (engine) and 563 (runner); 7680 words, 1 sample: 7680 and 8448.
    assert "| 276 | 512 | 563 | +51 ms |" in lines
    assert "| 7700 | 7680 | 8448 | +768 ms |" in lines


def test_the_per_event_floor_is_reported_layer_by_layer_against_the_passes_gap(tmp_path):
    from types import SimpleNamespace

    from bench.floor import FloorResult
    from bench.load import LevelResult
    from bench.report import Report
    from bench.systems import Startup

    config = SimpleNamespace(passes=1, concurrency=[64], output=tmp_path / "results.md")
    floor = {kind: FloorResult(kind, [us]) for kind, us in
             (("stand-in", 15.0), ("socket", 35.0), ("aiohttp", 45.0), ("runner", 60.0))}

    def level(system: str, cpu_s: float) -> LevelResult:
        return LevelResult(system=system, concurrency=64, pass_index=0, requests=64, errors=0, output_tokens=4000,
                           prompt_tokens=2000, wall_s=10.0, ttft_ms=[1.0], itl_ms=[1.0], api_cpu_s=cpu_s)

    startups = {"engine": Startup(first_answer_s=1), "runner": Startup(first_answer_s=1)}
    report = Report(config, {}, startups, [level("engine", 0.36), level("runner", 0.56)], None, {"floor": floor})
    lines = report.floor_lines()
    assert "| + one socket write per event (a bare protocol, HTTP chunked) | 35.0 | +20.0 |" in lines
    assert "| the runner's `/llm` (app, middlewares, reply builder, paced writer) | 60.0 | +15.0 |" in lines
    assert any("at c=64 the runner's API process spent 50 µs per output token more" in line
               and "costs 45 µs per event, of which 20 µs is the socket write" in line for line in lines)


def test_the_paired_table_adds_the_http_clients_cpu_to_the_runners(tmp_path):
    from types import SimpleNamespace

    from bench.load import LevelResult
    from bench.report import Report
    from bench.systems import Startup

    config = SimpleNamespace(passes=2, concurrency=[64], output=tmp_path / "results.md")

    def level(system: str, pass_index: int, tokens_per_s: float, api_s: float, client_s: float) -> LevelResult:
        return LevelResult(system=system, concurrency=64, pass_index=pass_index, requests=64, errors=0,
                           output_tokens=4000, prompt_tokens=2000, wall_s=4000 / tokens_per_s, ttft_ms=[1.0],
                           itl_ms=[1.0], api_cpu_s=api_s, client_cpu_s=client_s)

    # The engine's adapter is in the bench process: its client CPU is its API CPU.
    results = [level("engine", 0, 100, 0.4, 0.4), level("runner", 0, 90, 0.6, 0.8),
               level("engine", 1, 50, 0.4, 0.4), level("runner", 1, 45, 0.6, 0.8)]
    startups = {"engine": Startup(first_answer_s=1), "runner": Startup(first_answer_s=1)}
    lines = Report(config, {}, startups, results).paired_lines()
    assert "| 64 | 0.900 [0.900–0.900] | +0.050 | +0.250 |" in lines


def test_the_responses_api_cpu_is_reported_against_chat_completions_with_its_target(tmp_path):
    from types import SimpleNamespace

    from bench.load import LevelResult
    from bench.report import Report
    from bench.systems import Startup

    config = SimpleNamespace(passes=1, concurrency=[8, 32], output=tmp_path / "results.md")

    def level(system: str, concurrency: int, api_s: float) -> LevelResult:
        return LevelResult(system=system, concurrency=concurrency, pass_index=0, requests=8, errors=0,
                           output_tokens=1000, prompt_tokens=500, wall_s=10.0, ttft_ms=[1.0], itl_ms=[1.0],
                           api_cpu_s=api_s)

    results = [level("runner", c, 0.2) for c in (8, 32)] + [level("runner-v1", c, 0.3) for c in (8, 32)]
    results += [level("runner-responses", 8, 0.32), level("runner-responses", 32, 0.36)]
    startups = {name: Startup(first_answer_s=1) for name in ("runner", "runner-v1", "runner-responses")}
    report = Report(config, {}, startups, results)
    lines = report.ratio_lines()
    assert lines[3] == "| concurrency | API CPU runner-responses/runner-v1 |"
    assert lines[5:] == ["| 8 | 1.07 |", "| 32 | 1.20 |"]
    targets = report.targets()
    assert (True, "runner /v1/responses API CPU per output token within 1.1x of /v1/chat/completions' at c=8: "
                  "0.320 vs 0.300 ms (1.07x)") in targets
    assert (False, "runner /v1/responses API CPU per output token within 1.1x of /v1/chat/completions' at c=32: "
                   "0.360 vs 0.300 ms (1.20x)") in targets


def test_the_messages_api_cpu_is_held_to_1_1_times_chats(tmp_path):
    from types import SimpleNamespace

    from bench.load import LevelResult
    from bench.report import Report
    from bench.systems import Startup

    config = SimpleNamespace(passes=1, concurrency=[1, 8], output=tmp_path / "results.md")

    def level(system: str, concurrency: int, api_cpu_s: float) -> LevelResult:
        return LevelResult(system=system, concurrency=concurrency, pass_index=0, requests=4, errors=0,
                           output_tokens=1000, prompt_tokens=100, wall_s=10, ttft_ms=[10], itl_ms=[1],
                           api_cpu_s=api_cpu_s, client_cpu_s=0.1)

    results = [level("runner-v1", 1, 0.1), level("runner-messages", 1, 0.105),
               level("runner-v1", 8, 0.1), level("runner-messages", 8, 0.12)]
    startups = {name: Startup(first_answer_s=1) for name in ("runner", "runner-v1", "runner-messages")}
    report = Report(config, {}, startups, results)
    assert report.targets()[-2:] == [
        (True, "runner /v1/messages API CPU per output token within 1.1x of /v1/chat/completions' at c=1: "
               "0.105 vs 0.100 ms (1.05x)"),
        (False, "runner /v1/messages API CPU per output token within 1.1x of /v1/chat/completions' at c=8: "
                "0.120 vs 0.100 ms (1.20x)")]
    assert any("API CPU runner-messages/runner-v1" in line for line in report.ratio_lines())
