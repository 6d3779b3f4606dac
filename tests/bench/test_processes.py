"""bench/processes.py: its report and its section of bench/results.md, which make bench keeps. The measuring
itself runs real runner processes: `make bench-processes`."""

from __future__ import annotations

from bench.frontend import kept_section, write_section as write_frontend_section
from bench.processes import report, write_section


def figures(tok_s: float) -> dict:
    return {"tok_s": tok_s, "runner_cores": 0.9, "client_cores": 0.3}


def test_the_report_gives_each_rounds_ratio_and_their_median():
    text = report([{1: figures(10_000), 2: figures(15_000)}, {2: figures(16_000), 1: figures(8_000)},
                   {1: figures(10_000), 2: figures(11_000)}], concurrency=256, tokens=64, warm=1.0, window=4.0)
    assert "| 2 | 2 | 16,000 | 0.90 | 0.30 |" in text
    assert "per round: 1.50, 2.00, 1.10; **median 1.50x**" in text
    assert "c = 256 streams of 64 tokens" in text and "3 rounds" in text


def test_its_section_is_replaced_by_its_next_run_and_kept_by_make_bench(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark\n")
    write_frontend_section("the ceiling\n", results)
    write_section("two processes, first\n", results)
    write_section("two processes, again\n", results)
    text = results.read_text()
    assert text.count("bench-processes:start") == 1 and "first" not in text and "again" in text
    results.write_text("# Benchmark, run again\n" + kept_section(results))  # make bench rewrites the file
    text = results.read_text()
    assert "the ceiling" in text and "two processes, again" in text and text.count("bench-processes:end") == 1
