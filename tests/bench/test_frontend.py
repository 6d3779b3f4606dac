"""The front end's ceiling bench: a real runner process over the fast stand-in engine, its smallest case."""

from __future__ import annotations

import pytest

from bench.frontend import (
    API_SHARES,
    HEADER,
    LAYER_HEADER,
    LAYERS,
    Settings,
    layer_row,
    api_shares,
    layer_shares,
    py_spy,
    report,
    row,
    run,
    idle_wait,
    kept_section,
    write_against_section,
    write_section,
)

ROOT = "/work/checkout"


async def test_the_smallest_case_measures_a_real_runner_and_profiles_it(tmp_path):
    if py_spy() is None:
        pytest.skip("py-spy is not installed")
    settings = Settings(concurrency=(8,), apis=("llm",), intervals=(1,), tokens=16, warm=0.3, window=0.7,
                        profile_seconds=1, profile_at=8)
    cases = await run(settings, tmp_path)
    assert [(case.interval, case.api, case.concurrency) for case in cases] == [(1, "llm", 8)]
    case = cases[0]
    assert case.tokens > 0 and case.streams > 0 and case.api_cpu_s > 0 and case.client_cpu_s > 0
    assert case.tokens_per_s > 0 and case.tokens_per_core_s > 0 and case.us_per_token > 0 and case.us_per_event > 0
    # /llm, one token an event: one event per token, and the final event (finish reason) of each stream
    assert 1 <= case.events / case.tokens <= 1.5
    assert case.gaps and 0 < case.gap_ms(0.5) <= case.gap_ms(0.99)
    assert row(case).count("|") == HEADER.splitlines()[0].count("|")
    assert set(case.layers) == set(LAYERS) and sum(case.layers.values()) == pytest.approx(1)
    # Sampled shares move with the machine's load (this ran beside engines in the suite): that each layer the
    # profile is folded into is seen at all is what can be asserted; test_each_sample_goes_to_the_innermost_layer_on_its_stack
    # pins the folding itself on a fixed profile.
    for layer in ("socket write", "runner/", "engine"):
        assert case.layers[layer] > 0, layer
    assert layer_row(case).count("|") == LAYER_HEADER.splitlines()[0].count("|")
    text = report(cases, settings)
    assert HEADER in text and LAYER_HEADER in text and "nproc" in text


def stack(*frames: tuple[str, str]) -> str:
    return ";".join(f"{function} ({file}:1)" for function, file in frames)


def test_each_sample_goes_to_the_innermost_layer_on_its_stack(monkeypatch):
    monkeypatch.setattr("bench.frontend.ROOT", ROOT)
    entry = [("<module>", f"{ROOT}/runner/__main__.py"), ("Runner.run", "/usr/lib/python3.11/asyncio/runners.py")]
    handler = [*entry, ("handle", f"{ROOT}/runner/handlers.py")]
    wait_line = idle_wait()[2]
    raw = "\n".join([
        stack(*entry) + " 1",  # the loop itself
        stack(*handler, ("StreamWriter._writelines", "/venv/aiohttp/http_writer.py")) + " 3",
        stack(*handler, ("PacedStreamWriter.to_socket", f"{ROOT}/runner/handlers.py")) + " 1",
        stack(*handler, ("StreamResponse.write", "/venv/aiohttp/web_response.py")) + " 2",
        stack(*handler, ("ChatReply.events", f"{ROOT}/pipelines/llm/api/chat_completion.py"),
              ("dumps", "/usr/lib/python3.11/json/__init__.py")) + " 3",  # the reply builder's json.dumps
        stack(*handler, ("Generation.stream", f"{ROOT}/pipelines/llm/generation.py"),
              ("FastEngine.steps", f"{ROOT}/tests/support/frontend_pipeline.py")) + " 2",
        stack(*handler, ("Timeout.reschedule", "/usr/lib/python3.11/asyncio/timeouts.py")) + " 5",
        stack(*handler, ("info", "/venv/structlog/_native.py")) + " 3",
        # the offload worker waiting for its next job: idle, left out; the same thread at work is counted
        f"Thread.run (/usr/lib/python3.11/threading.py:982);Offload.work ({ROOT}/runner/offload.py:{wait_line}) 40",
        stack(("Thread.run", "/usr/lib/python3.11/threading.py"), ("Offload.work", f"{ROOT}/runner/offload.py"),
              ("render", f"{ROOT}/pipelines/llm/generation.py")) + " 1",
    ])
    shares = layer_shares(raw)
    assert {layer: round(share * 21) for layer, share in shares.items()} == {
        "socket write": 4, "aiohttp": 2, "runner/": 5, "reply builders": 3, "generation path": 1, "logging": 3,
        "engine": 2, "loop & other": 1}


def test_a_run_replaces_its_own_section_of_the_results_and_keeps_the_rest(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark\n\nthe passes\n")
    write_section("first run\n", results)
    write_section("second run\n", results)
    text = results.read_text()
    assert text.startswith("# Benchmark\n\nthe passes\n\n")
    assert "second run" in text and "first run" not in text and text.count("bench-frontend:start") == 1
    results.write_text("# Benchmark, run again\n" + kept_section(results))  # make bench rewrites the file
    assert "second run" in results.read_text() and "the passes" not in results.read_text()
    write_section("third run\n", results)
    text = results.read_text()
    assert text.startswith("# Benchmark, run again\n") and "third run" in text and "second run" not in text
    assert text.count("bench-frontend:end") == 1


def test_each_api_process_sample_is_http_detokenising_or_engine_client_work(monkeypatch):
    """The side-by-side profile folds the runner's and vllm serve's API processes alike."""
    monkeypatch.setattr("bench.frontend.ROOT", ROOT)
    site = "/venv/lib/python3.11/site-packages"
    loop = [("run", f"{site}/uvloop/__init__.py")]
    raw = "\n".join([
        stack(*loop, ("RequestResponseCycle.send", f"{site}/uvicorn/protocols/http/httptools_impl.py")) + " 3",
        stack(*loop, ("OpenAIServingChat.chat_completion_stream_generator",
                      f"{site}/vllm/entrypoints/openai/serving_chat.py"),
              ("dumps", "/usr/lib/python3.11/json/__init__.py")) + " 2",  # its JSON: framing
        stack(*loop, ("AsyncLLM.output_handler", f"{site}/vllm/v1/engine/async_llm.py"),
              ("OutputProcessor.process_outputs", f"{site}/vllm/v1/engine/output_processor.py"),
              ("IncrementalDetokenizer.update", f"{site}/vllm/v1/engine/detokenizer.py")) + " 4",
        stack(*loop, ("AsyncLLM.output_handler", f"{site}/vllm/v1/engine/async_llm.py"),
              ("MsgpackDecoder.decode", f"{site}/vllm/v1/serial_utils.py")) + " 5",
        stack(*loop, ("handle", f"{ROOT}/runner/handlers.py"),
              ("Generation.stream", f"{ROOT}/pipelines/llm/generation.py")) + " 1",
        stack(*loop, ("handle", f"{ROOT}/runner/handlers.py"), ("info", f"{site}/structlog/_native.py")) + " 1",
        stack(*loop, ("Task.__step", "/usr/lib/python3.11/asyncio/tasks.py")) + " 4",
        # threads blocked in C, left out: a thread pool's queue wait, the loop's own poll
        stack(("Thread._bootstrap", "/usr/lib/python3.11/threading.py"),
              ("_worker", "/usr/lib/python3.11/concurrent/futures/thread.py")) + " 50",
        stack(("Runner.run", "/usr/lib/python3.11/asyncio/runners.py")) + " 50",
    ])
    shares = api_shares(raw)
    assert set(shares) == set(API_SHARES)
    assert {share: round(value * 20) for share, value in shares.items()} == {
        "HTTP & framing": 6, "detokenising": 4, "engine client": 5, "logging": 1, "loop & other": 4}


def test_make_bench_keeps_both_front_end_sections(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark\n")
    write_section("the ceiling\n", results)
    write_against_section("beside vllm serve\n", results)
    write_against_section("beside vllm serve, again\n", results)
    kept = kept_section(results)
    assert "the ceiling" in kept and "beside vllm serve, again" in kept and kept.count("vllm-serve:start") == 1
