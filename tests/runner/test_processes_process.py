"""API_PROCESSES=2 on a real runner process with a real vLLM engine (the tiny model), over real HTTP.

Two API processes, each a vLLM ``AsyncLLM`` client of the one engine core
(vLLM's multi-API-server addresses), accept on one port; to the outside they are
one server: one Live Runner registration (tests/support/orchestrator_standin.py)
with one capacity, /metrics summed over both, one drain on SIGTERM, and no
process left behind. The same over the front-end stand-in, and the unit tests:
test_processes.py.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.api_processes import (answered_by, assert_every_call_ended_visibly, calls_on_every_process, metric,
                                         wait_serving)
from tests.support.orchestrator_standin import OrchestratorStandin
from tests.support.runner_process import START_TIMEOUT, RunnerProcess, free_port, post_json, started_ahead
from tests.support.runners import tiny_engine_env

# Each test has a runner of its own; the second one starts with the module, behind the first test.
pytestmark = pytest.mark.own_engines(2)

SECRET = "standin-registration-secret"
MAX_NUM_SEQS, MAX_WAITING_REQUESTS = 2, 3


@pytest.fixture(scope="module", autouse=True)
def doomed_two_processes(request, tmp_path_factory, tiny_model_dir) -> Iterator[RunnerProcess]:
    """The runner whose engine dies: started with the module, its start overlaps the first test's."""
    runner = RunnerProcess("two-processes-doomed", {**tiny_engine_env(tiny_model_dir, core=None), "API_PROCESSES": "2"},
                           tmp_path_factory.mktemp("two-processes-doomed") / "runner.log")
    with started_ahead(request, runner,
                       "test_an_engine_that_dies_under_two_api_processes_ends_every_call_visibly_and_is_error"):
        yield runner


def test_two_api_processes_over_one_engine_are_one_server(tmp_path, tiny_model_dir):
    standin = OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=1.0).start()
    port = free_port()
    runner = RunnerProcess("two-processes", {
        **tiny_engine_env(tiny_model_dir, core=None), "API_PROCESSES": "2",
        "MAX_NUM_SEQS": str(MAX_NUM_SEQS), "MAX_WAITING_REQUESTS": str(MAX_WAITING_REQUESTS),
        "LIVE_RUNNER_ORCHESTRATOR": standin.url, "LIVE_RUNNER_SECRET": SECRET,
        "LIVE_RUNNER_URL": f"http://127.0.0.1:{port}"}, tmp_path / "runner.log", port=port)
    runner.start()
    try:
        runner.wait_until({"IDLE"}, timeout=START_TIMEOUT)
        wait_serving(runner, 2, timeout=START_TIMEOUT)
        tree = runner.record_descendants()
        assert any("EngineCore" in process.name() for process in tree), "one engine core"

        # Both processes answer on the one port, each through its own client of the one engine.
        served = answered_by(runner, count=30)
        assert set(served) == {"0", "1"}, served
        connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "model": runner.env["MODEL_ID"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
            {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200 and json.load(answer)["usage"]["completion_tokens"] == 8
        connection.close()

        # One registration, with the one admission bound as its capacity.
        [registration] = standin.wait(standin.registrations, 30, "a registration")
        assert registration.body["capacity"] == MAX_NUM_SEQS + MAX_WAITING_REQUESTS
        time.sleep(2.5)  # heartbeats go on: still one runner, registered once
        assert len(standin.registrations()) == 1 and len(standin.runners) == 1

        # /metrics: the calls of both processes, summed; each process's own, labelled.
        assert metric(runner, "livepeer_runner_requests_total", code="200", model=runner.env["MODEL_ID"],
                      operation="genLLM", outcome="ok") == 30
        by_process = [metric(runner, "livepeer_runner_api_process_requests_total", process=str(index))
                      for index in (0, 1)]
        assert sum(by_process) == 31 and all(by_process), by_process
        assert metric(runner, "livepeer_runner_admission_capacity") == MAX_NUM_SEQS + MAX_WAITING_REQUESTS

        # SIGTERM with a request in flight: one unregister, one drain, the request finishes, nothing left.
        finished: list[int] = []
        body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 100, "temperature": 0}
        in_flight = threading.Thread(target=lambda: finished.append(post_json(f"{runner.url}/llm", body)))
        in_flight.start()
        deadline = time.monotonic() + 20
        while runner.health() != "OK" and time.monotonic() < deadline:
            time.sleep(0.02)
        tree = runner.record_descendants()
        signalled_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        in_flight.join(timeout=30)
        assert runner.process.wait(timeout=30) == 0
        took = time.monotonic() - signalled_at
        assert finished == [200], "the request in flight at SIGTERM finishes, whichever process serves it"
        assert took < 8, f"out {took:.1f} s after SIGTERM; go-livepeer kills after 8"
        assert [left.answered for left in standin.unregisters] == [204], "one unregister"
        log = runner.log_path.read_text()
        assert log.count('"event": "runner.draining"') == 1 and log.count('"event": "runner.stopped"') == 2
        assert len(tree) >= 4, "the primary, its extra, the engine core and its worker"
        assert runner.left_behind(timeout=3) == [], "no process outlives the runner"
        print(f"served by process: {served}; per-process admitted: {by_process}; out {took:.2f} s after SIGTERM")
    finally:
        runner.stop()
        standin.stop()


def test_an_engine_that_dies_under_two_api_processes_ends_every_call_visibly_and_is_error(doomed_two_processes):
    """The engine core killed under two API processes: only the primary's client sees it die; every call in flight,
    on either process, ends as the primary's do (tests/support/api_processes.py: assert_every_call_ended_visibly),
    the runner is ERROR and refuses new calls, and a SIGTERM then leaves nothing behind."""
    runner = doomed_two_processes
    try:
        runner.wait_until({"IDLE"}, timeout=START_TIMEOUT)
        wait_serving(runner, 2, timeout=START_TIMEOUT)
        tree = runner.record_descendants()
        [engine] = [process for process in runner.engine_processes() if "EngineCore" in process.name()]
        [extra] = [process for process in tree[1:] if "VLLM" not in process.name()
                   and "resource_tracker" not in " ".join(process.cmdline())]
        calls = calls_on_every_process(runner, max_tokens=3000)  # ignore_eos: in flight until the kill
        killed_at = time.monotonic()
        engine.kill()
        endings = assert_every_call_ended_visibly(runner, calls)
        took = max(ending.at for ending in endings) - killed_at
        assert took < 10, f"the calls ended {took:.1f} s after the engine core was killed"
        assert extra.is_running() and extra.status() != "zombie", "the extra ended its calls itself: not killed"
        runner.process.send_signal(signal.SIGTERM)
        assert runner.process.wait(timeout=30) == 0
        assert runner.left_behind(timeout=3) == [], "no process outlives the runner"
        on_extra = sum(ending.process == "1" for ending in endings)
        print(f"engine core killed: {len(endings)} calls ({on_extra} on the extra) ended visibly within {took:.2f} s")
    finally:
        runner.stop()
