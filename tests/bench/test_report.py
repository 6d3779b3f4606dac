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
