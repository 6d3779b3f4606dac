"""API_PROCESSES (runner/processes.py): its settings, one admission and one /health over the processes' shared
counters, /metrics summed, and N real runner processes over the front-end stand-in engine (no vLLM: each
process runs a stand-in of its own), over real HTTP. The same on a real engine: test_processes_process.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from pipelines.llm.host import EngineHost
from pipelines.llm.pipeline import LLMPipeline
from pipelines.llm.settings import LLMSettings
from runner.pipeline import EngineLoad, Pipeline
from runner.processes import DRAINING, IN_FLIGHT, Shared, SharedState, merge_metrics
from runner.settings import RunnerSettings
from runner.state import AtCapacity, Load, NotReady
from tests.support.fake_engine import FakeBackend, FakeEngine
from tests.support.api_processes import (DEAF_FILE, KILL_FILE, answered_by, assert_every_call_ended_visibly,
                                         calls_on_every_process, log_events, metric, plug_in_dying, samples,
                                         serving)
from tests.support.frontend_pipeline import plug_in
from tests.support.runner_process import RunnerProcess, get_json

CORES = len(os.sched_getaffinity(0))


class Bounded(Pipeline):
    """A loaded pipeline that admits ``bound`` units at once."""

    name = "bounded"
    OPERATIONS = ()

    def __init__(self, bound: int) -> None:
        super().__init__("m", Path("."))
        self.bound = bound

    def operations(self):
        return {}

    async def load(self) -> None:
        pass

    def failure(self) -> str | None:
        return None

    def engine_load(self) -> EngineLoad:
        return EngineLoad(0, 0, 1)

    def max_in_flight(self) -> int | None:
        return self.bound

    async def close(self) -> None:
        pass


def ready_states(bound: int, count: int = 2) -> list[SharedState]:
    shared = Shared(count, multiprocessing.get_context("spawn"))
    states = [SharedState(Bounded(bound), 1.0, shared, index) for index in range(count)]
    for state in states:
        state.load = Load.READY
    return states


# Settings


def test_more_processes_than_cores_is_refused_saying_why(monkeypatch):
    monkeypatch.setenv("API_PROCESSES", str(CORES + 1))
    with pytest.raises(ValidationError) as caught:
        RunnerSettings()
    message = str(caught.value)
    assert f"API_PROCESSES={CORES + 1} is more HTTP processes than the {CORES} cores" in message
    assert f"at most {CORES}" in message
    monkeypatch.setenv("API_PROCESSES", "0")
    with pytest.raises(ValidationError):
        RunnerSettings()
    monkeypatch.setenv("API_PROCESSES", str(CORES))
    assert RunnerSettings().api_processes == CORES
    monkeypatch.delenv("API_PROCESSES")
    assert RunnerSettings().api_processes == 1, "the default is one process"


def llm_pipeline(tmp_path, **settings) -> LLMPipeline:
    llm = LLMSettings().model_copy(update=settings)
    host = EngineHost(llm, "m", tmp_path, backend=lambda: FakeBackend(FakeEngine()), gpus=0)
    return LLMPipeline("m", tmp_path, llm, host=host)


@pytest.mark.parametrize(("settings", "named"), [
    ({"nnodes": 2}, "NNODES=2"),
    ({"lora_adapters": [("a", "/x")]}, "LoRA adapters"),
    ({"lora_runtime_updates": True}, "LORA_RUNTIME_UPDATES"),
    ({"lora_adapters": [("a", "/x")], "lora_runtime_updates": True}, "LORA_RUNTIME_UPDATES"),
])
def test_the_llm_pipeline_refuses_api_processes_over_several_nodes_or_with_lora(tmp_path, settings, named):
    pipeline = llm_pipeline(tmp_path, **settings)
    with pytest.raises(ValueError, match=named) as caught:
        pipeline.share_engine(2)
    assert "API_PROCESSES=1" in str(caught.value) and "docs/api-processes.md" in str(caught.value)


def test_the_llm_pipeline_starts_its_engine_for_every_process_and_shares_it(tmp_path):
    pipeline = llm_pipeline(tmp_path)
    pipeline.share_engine(2)
    assert pipeline.host.clients == 2
    backend = FakeBackend(FakeEngine())
    pipeline.host.engine = backend.engine
    assert pipeline.engine_share(1) == {"index": 1}


def test_the_llm_pipeline_of_an_extra_process_ends_its_requests_when_told_its_engine_is_lost(tmp_path):
    pipeline = llm_pipeline(tmp_path)
    engine = FakeEngine()
    pipeline.host.engine = engine
    assert pipeline.failure() is None
    pipeline.lose_engine("the engine has stopped (seen by the primary)")
    assert engine.dead, "its requests in flight fail as on the engine's death"
    assert pipeline.failure() == "the engine has stopped (seen by the primary)"


# One admission, one /health, over the shared counters


def test_admission_is_one_bound_over_every_process():
    primary, extra = ready_states(bound=3)
    with primary.admit(2):
        with extra.admit(1):
            with pytest.raises(AtCapacity, match="2 of 3|3 of 3"):
                with extra.admit(1):
                    pass
            with pytest.raises(AtCapacity):
                with primary.admit(1):
                    pass
        with extra.admit(1):  # room again once one has finished
            assert extra.units_in_flight == 1 and primary.units_in_flight == 2, "each process counts its own"
    assert primary.shared.total(IN_FLIGHT) == 0


def test_health_counts_every_process_in_flight():
    primary, extra = ready_states(bound=3)
    assert primary.health() == "IDLE"
    with extra.admit(1):
        assert primary.health() == "OK", "a request served by another process: not IDLE"
        assert primary.in_flight == 0, "its own count is its own (its drain waits on it alone)"
    assert primary.health() == "IDLE"


def test_a_draining_primary_stops_admission_in_every_process():
    primary, extra = ready_states(bound=3)
    primary.shared.values[DRAINING] = 1
    with pytest.raises(NotReady, match="shutting down"):
        with extra.admit(1):
            pass


def test_an_extra_says_its_primary_failed():
    primary, extra = ready_states(bound=3)
    primary.shared.values[1] = 1  # FAILED
    assert "primary process says ERROR" in extra.failure()
    assert primary.failure() is None, "the primary's own failure is its pipeline's"


# /metrics summed


def exposition(requests: int, in_flight: int, capacity: int, seconds: list[float]) -> bytes:
    registry = CollectorRegistry()
    Counter("livepeer_runner_requests", "r", ["code"], registry=registry).labels("200").inc(requests)
    Gauge("livepeer_runner_requests_in_flight", "f", registry=registry).set(in_flight)
    Gauge("livepeer_runner_admission_capacity", "c", registry=registry).set(capacity)
    histogram = Histogram("livepeer_runner_request_duration_seconds", "d", buckets=(1, 10), registry=registry)
    for value in seconds:
        histogram.observe(value)
    return generate_latest(registry)


def test_metrics_sum_counters_histograms_and_in_flight_and_keep_the_primarys_other_gauges():
    merged = samples(merge_metrics(exposition(3, 1, 5, [0.5]), [exposition(4, 2, 5, [0.5, 5])]))
    assert merged[("livepeer_runner_requests_total", (("code", "200"),))] == 7
    assert merged[("livepeer_runner_requests_in_flight", ())] == 3
    assert merged[("livepeer_runner_admission_capacity", ())] == 5, "one capacity, not one per process"
    assert merged[("livepeer_runner_request_duration_seconds_count", ())] == 3
    assert merged[("livepeer_runner_request_duration_seconds_bucket", (("le", "1.0"),))] == 2
    assert merged[("livepeer_runner_request_duration_seconds_bucket", (("le", "10.0"),))] == 3
    assert merged[("livepeer_runner_request_duration_seconds_sum", ())] == 6.0


# N runner processes over the front-end stand-in, over real HTTP


def stand_in_runner(tmp_path, processes: int, **env: str) -> RunnerProcess:
    return RunnerProcess(f"stand-in-{processes}", {**plug_in(tmp_path), "API_PROCESSES": str(processes),
                                                    "MAX_NUM_SEQS": "2", "MAX_WAITING_REQUESTS": "3", **env},
                         tmp_path / "runner.log")


def dying_stand_in(tmp_path, name: str) -> RunnerProcess:
    """Two API processes over a stand-in engine that dies (or turns deaf) when the test drops its file."""
    return RunnerProcess(name, {**plug_in_dying(tmp_path), "API_PROCESSES": "2", "MAX_NUM_SEQS": "32",
                                "MAX_WAITING_REQUESTS": "0"}, tmp_path / "runner.log")


def held_stream(runner: RunnerProcess) -> socket.socket:
    """A streamed call whose client never reads: it stays in flight (until WRITE_STALL_TIMEOUT, or the drain)."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", runner.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"POST /llm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_two_processes_share_one_socket_and_stay_one_server(tmp_path):
    with serving(stand_in_runner(tmp_path, 2, DRAIN_TIMEOUT="1")) as runner:
        tree = runner.record_descendants()
        # Both processes answer calls on the one port; /health is answered the same whichever process takes it.
        served = answered_by(runner)
        assert set(served) == {"0", "1"}, served
        assert {"0", "1"} >= set(answered_by(runner, "/health", 20))
        # /metrics: the calls of both, summed, and each process's labelled.
        total = metric(runner, "livepeer_runner_requests_total", code="200", model=runner.env["MODEL_ID"],
                       operation="genLLM", outcome="ok")
        assert total == 40, "every call counted once, whichever process served it"
        by_process = [metric(runner, "livepeer_runner_api_process_requests_total", process=str(index))
                      for index in (0, 1)]
        assert sum(by_process) == 40 and all(by_process), by_process
        assert metric(runner, "livepeer_runner_admission_capacity") == 5, "one capacity: MAX_NUM_SEQS + waiting"
        # A request in flight in either process: every /health says OK, whichever process answers it.
        held = held_stream(runner)
        deadline = time.monotonic() + 10
        while metric(runner, "livepeer_runner_requests_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(runner, "livepeer_runner_requests_in_flight") == 1
        statuses = {get_json(f"{runner.url}/health")["status"] for _ in range(20)}
        assert statuses == {"OK"}, statuses
        # SIGTERM: one drain (the held stream is cut after DRAIN_TIMEOUT), and no process is left.
        stopped_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        assert runner.process.wait(timeout=15) == 0
        assert time.monotonic() - stopped_at < 1 + 2.5 + 1, "DRAIN_TIMEOUT, then the stop's budget"
        held.close()
        assert len(tree) >= 2, "the primary started an extra process"
        assert runner.left_behind(timeout=3) == [], "no process outlives the runner"
        log = runner.log_path.read_text()
        assert log.count('"event": "runner.draining"') == 1, "one drain, the primary's"


def test_an_extra_process_dies_with_a_killed_primary(tmp_path):
    with serving(stand_in_runner(tmp_path, 2)) as runner:
        runner.record_descendants()
        runner.process.send_signal(signal.SIGKILL)
        runner.process.wait(timeout=10)
        assert runner.left_behind(timeout=3) == [], "the extra is killed with its primary (PR_SET_PDEATHSIG)"


def test_an_extra_process_that_dies_makes_the_runner_error_with_the_reason(tmp_path):
    with serving(stand_in_runner(tmp_path, 2)) as runner:
        [extra] = [child for child in runner.record_descendants()[1:] if "resource_tracker" not in " ".join(child.cmdline())]
        extra.kill()
        assert runner.wait_until({"ERROR"}, timeout=10) == "ERROR"
        assert "API process 1 of 2" in runner.log_path.read_text()


@pytest.mark.parametrize(("processes", "env", "reason"), [
    (CORES + 1, {}, f"API_PROCESSES={CORES + 1} is more HTTP processes than the {CORES} cores"),
    (2, {"NNODES": "2", "TENSOR_PARALLEL_SIZE": "2", "NODE_SECRET": "0123456789abcdef0123"}, "API_PROCESSES=2: NNODES=2: an engine served from several nodes"),
    (2, {"LORA_RUNTIME_UPDATES": "true", "AUTH_TOKEN": "0123456789abcdef0123"},
     "API_PROCESSES=2: LORA_RUNTIME_UPDATES is served from one API process"),
])
def test_a_bad_api_processes_is_health_error_with_the_reason(tmp_path, processes, env, reason):
    runner = stand_in_runner(tmp_path, processes, **env)
    runner.start()
    try:
        assert runner.wait_until({"ERROR"}, timeout=60) == "ERROR"
        assert reason in runner.log_path.read_text()
        assert len(runner.record_descendants()) == 1, "nothing started"
    finally:
        runner.stop()


def test_requests_in_flight_on_every_process_end_visibly_when_the_engine_dies(tmp_path):
    """The engine's death, which only the primary sees: every call in flight ends as the primary's do, whichever
    process serves it (a stream: its in-band error event, then [DONE], its chunked body ended; a whole answer: a 500
    in the API's shape), each with a log line; then the runner is ERROR and refuses new calls."""
    with serving(dying_stand_in(tmp_path, "dying-stand-in")) as runner:
        tree = runner.record_descendants()
        calls = calls_on_every_process(runner, max_tokens=3000)  # a minute each: in flight until the death
        killed_at = time.monotonic()
        (tmp_path / KILL_FILE).touch()
        endings = assert_every_call_ended_visibly(runner, calls)
        took = max(ending.at for ending in endings) - killed_at
        assert took < 5, f"the calls ended {took:.1f} s after the death"
        runner.process.send_signal(signal.SIGTERM)
        assert runner.process.wait(timeout=15) == 0
        assert len(tree) >= 2 and runner.left_behind(timeout=3) == [], "no process outlives the runner"
        print(f"{len(endings)} calls ended visibly, {took:.2f} s after the engine died")


def test_an_extra_that_does_not_end_its_calls_after_the_engine_died_is_killed_saying_so(tmp_path):
    """The backstop: an extra still holding calls LOST_ENGINE_GRACE after the engine's death is killed, logged; the
    primary's calls ended visibly all the same, and the runner is ERROR."""
    with serving(dying_stand_in(tmp_path, "deaf-stand-in")) as runner:
        calls = calls_on_every_process(runner, max_tokens=3000)
        (tmp_path / DEAF_FILE).touch()
        killed_at = time.monotonic()
        (tmp_path / KILL_FILE).touch()
        endings = [call.ending() for call in calls]
        assert all(ending.failed_visibly() for ending in endings if ending.process == "0")
        cut = [ending for ending in endings if ending.process == "1"]
        assert cut and all(ending.broken for ending in cut), "the extra's connections closed as it was killed"
        took = max(ending.at for ending in cut) - killed_at
        assert 5 <= took < 5 + 3, f"killed {took:.1f} s after the death: LOST_ENGINE_GRACE (5 s) and its checks"
        assert runner.wait_until({"ERROR"}, timeout=5) == "ERROR"
        [killed] = [event for event in log_events(runner) if event["event"] == "api_process.killed"]
        assert killed["process"] == 1 and "did not end within 5 s of the engine's loss" in killed["why"]
