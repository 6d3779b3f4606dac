"""Helpers for tests of API_PROCESSES (runner/processes.py) on runner processes: which process answered, when
every process serves, a /metrics sample, calls in flight on every process and how each ended, and a stand-in engine
that dies when told."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipelines.llm.host import EngineHost
from pipelines.llm.pipeline import LLMPipeline
from pipelines.llm.settings import LLMSettings
from tests.support.fake_engine import FakeBackend, FakeEngine
from tests.support.frontend_pipeline import plug_in
from tests.support.runner_process import RunnerProcess, get_json


def samples(text: bytes) -> dict[tuple, float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


def answered_by(runner: RunnerProcess, path: str = "/llm", count: int = 40) -> dict[str, int]:
    """Which process answered each of ``count`` calls, each on a connection of its own."""
    seen: dict[str, int] = {}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=10)
        if path == "/llm":
            connection.request("POST", path, body, {"Content-Type": "application/json"})
        else:
            connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200, (path, answer.status)
        process = answer.getheader("X-API-Process")
        seen[process] = seen.get(process, 0) + 1
        connection.close()
    return seen


def wait_serving(runner: RunnerProcess, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner.log_path.read_text().count('"event": "api_process.serving"') >= count - 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"not every API process serves:\n{runner.log_tail()}")


@contextlib.contextmanager
def serving(runner: RunnerProcess, processes: int = 2, timeout: float = 120) -> Iterator[RunnerProcess]:
    """``runner`` started, IDLE and with its ``processes`` API processes all serving; stopped after, whatever the
    test did to it."""
    runner.start()
    try:
        assert runner.wait_until({"IDLE"}, timeout=timeout) == "IDLE", runner.log_tail()
        wait_serving(runner, processes, timeout)
        yield runner
    finally:
        runner.stop()


def metric(runner: RunnerProcess, name: str, **labels: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read()
    connection.close()
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


# Calls in flight on each process when the engine dies (the primary's, and an extra's), and how each ended.

CHAT = "/v1/chat/completions"


@dataclass
class Call:
    """One call on a connection of its own: a stream (its header read, so its process known) or a whole answer."""

    connection: http.client.HTTPConnection
    stream: bool
    process: str | None = None  # X-API-Process, once known
    response: http.client.HTTPResponse | None = None

    def ending(self) -> Ending:
        """Read the call to its end: the status, the body (a chunked one read to its last chunk) and how it ended."""
        try:
            if self.response is None:
                self.response = self.connection.getresponse()
                assert self.response.getheader("X-API-Process") == self.process
            body = self.response.read()
        except (http.client.HTTPException, OSError) as exc:  # a connection closed without an ending
            return Ending(self.stream, self.process, None, b"", repr(exc), time.monotonic())
        finally:
            self.connection.close()
        return Ending(self.stream, self.process, self.response.status, body, None, time.monotonic())


@dataclass
class Ending:
    stream: bool
    process: str | None
    status: int | None
    body: bytes
    broken: str | None  # why the connection ended without a whole answer, or None
    at: float  # time.monotonic() once read to its end

    def failed_visibly(self) -> bool:
        """A stream: its 200, then OpenAI's in-band error event and ``data: [DONE]``, its chunked body ended cleanly;
        a whole answer: a 5xx in OpenAI's error shape."""
        if self.broken is not None:
            return False
        if self.stream:
            events = [line.removeprefix(b"data: ") for line in self.body.split(b"\n\n") if line]
            return (self.status == 200 and events[-1] == b"[DONE]" and len(events) >= 2
                    and json.loads(events[-2])["error"]["type"] == "server_error")
        return self.status >= 500 and json.loads(self.body)["error"]["type"] == "server_error"


def open_call(runner: RunnerProcess, model: str, stream: bool, max_tokens: int) -> Call:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "count"}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": stream})
    connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=60)
    connection.request("POST", CHAT, body, {"Content-Type": "application/json"})
    call = Call(connection, stream)
    if stream:  # its header (and first event) comes as soon as it is served
        call.response = connection.getresponse()
        assert call.response.status == 200, call.response.status
        call.process = call.response.getheader("X-API-Process")
        call.response.read1(1)  # the stream has started generating
    return call


def assert_every_call_ended_visibly(runner: RunnerProcess, calls: list[Call]) -> list[Ending]:
    """After the engine's death: every call in flight ended as the primary's do, whichever process served it (a
    stream: its in-band error event, then [DONE], its chunked body ended; a whole answer: a 5xx in the API's shape),
    each with its log line in the process that served it; then /health is ERROR and new calls are 503, whichever
    process takes them, and no extra was killed (each ended its own calls)."""
    endings = [call.ending() for call in calls]
    assert {ending.stream for ending in endings if ending.process != "0"} == {True, False}, "both kinds on an extra"
    assert [ending for ending in endings if not ending.failed_visibly()] == [], "every call ends visibly"
    assert runner.wait_until({"ERROR"}, timeout=10) == "ERROR"
    assert {get_json(f"{runner.url}/health")["status"] for _ in range(10)} == {"ERROR"}, "whichever process answers"
    assert {new_call_status(runner) for _ in range(10)} == {503}, "new calls are refused, whichever process takes them"
    events = log_events(runner)
    failed = [(event.get("api_process", 0), event["event"]) for event in events
              if event["event"] in ("request.stream_failed", "request.failed")]
    for ending in endings:
        assert (int(ending.process), "request.stream_failed" if ending.stream else "request.failed") in failed, ending
    assert any(event["event"] == "api_process.engine_lost" and event.get("api_process") for event in events)
    assert not any(event["event"] == "api_process.killed" for event in events), "no extra was killed"
    return endings


def new_call_status(runner: RunnerProcess) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=10)
    connection.request("POST", "/llm", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                       {"Content-Type": "application/json"})
    status = connection.getresponse().status
    connection.close()
    return status


def log_events(runner: RunnerProcess) -> list[dict]:
    return [json.loads(line) for line in runner.log_path.read_text().splitlines() if line.startswith("{")]


def in_flight_by_process(runner: RunnerProcess, count: int) -> list[int]:
    return [int(metric(runner, "livepeer_runner_api_process_requests_in_flight", process=str(index)))
            for index in range(count)]


def calls_on_every_process(runner: RunnerProcess, max_tokens: int, count: int = 2, most: int = 24) -> list[Call]:
    """Streams and whole answers in flight until each of the ``count`` processes serves at least one of each (the
    kernel hands each connection to whichever process accepts first): a whole answer's process is known from the
    per-process in-flight gauge, which it raises once admitted."""
    model = runner.env["MODEL_ID"]
    calls: list[Call] = []
    streams: set[str] = set()
    while streams != {str(index) for index in range(count)}:
        assert len(calls) < most, f"the streams never reached every process: {[call.process for call in calls]}"
        call = open_call(runner, model, True, max_tokens)
        calls.append(call)
        streams.add(call.process)
    wholes: set[str] = set()
    while wholes != {str(index) for index in range(count)}:
        assert len(calls) < most, "the whole answers never reached every process"
        before = in_flight_by_process(runner, count)
        call = open_call(runner, model, False, max_tokens)
        calls.append(call)
        deadline = time.monotonic() + 10
        while sum(after := in_flight_by_process(runner, count)) < sum(before) + 1:
            assert time.monotonic() < deadline, "a whole answer never came in flight"
            time.sleep(0.02)
        [call.process] = [str(index) for index in range(count) if after[index] > before[index]]
        wholes.add(call.process)
    return calls


# A stand-in engine that dies when told, for the runner processes of test_processes.py.

DYING_PIPELINE = "llm-dying-stand-in"
KILL_FILE = "engine-dies"  # in MODEL_DIR: once it exists, the engine the primary started is dead
DEAF_FILE = "extras-deaf"  # in MODEL_DIR: while it exists, an extra's engine ignores the word that the engine is lost
STEP_SECONDS = 0.02


class DyingEngine(FakeEngine):
    """A token every STEP_SECONDS. The engine a primary starts dies once ``kill_file`` exists, as a killed engine
    core, whose death only the process that started it sees; a joined one (an extra's) only when told (``lose``),
    and not even then once ``deaf_file`` exists (an extra that never ends its calls)."""

    def __init__(self, kill_file: Path | None, deaf_file: Path | None = None) -> None:
        self.kill_file, self.deaf_file = kill_file, deaf_file
        super().__init__(step_seconds=STEP_SECONDS)

    @property
    def dead(self) -> bool:
        return self._dead or (self.kill_file is not None and self.kill_file.exists())

    @dead.setter
    def dead(self, value: bool) -> None:
        self._dead = value

    def lose(self) -> None:
        if self.deaf_file is None or not self.deaf_file.exists():
            super().lose()


class DyingBackend(FakeBackend):
    def __init__(self, folder: Path) -> None:
        super().__init__(DyingEngine(folder / KILL_FILE))
        self.folder = folder

    def join_engine(self, share) -> FakeEngine:
        return DyingEngine(None, self.folder / DEAF_FILE)


class DyingStandInPipeline(LLMPipeline):
    """``LLMPipeline`` over a ``DyingEngine``: only reachable through ``plug_in_dying``'s entry point."""

    def __init__(self, model_id: str, model_dir: Path, settings: LLMSettings) -> None:
        host = EngineHost(settings, model_id, model_dir, backend=lambda: DyingBackend(model_dir), gpus=0)
        super().__init__(model_id, model_dir, settings, host=host)


def plug_in_dying(folder: Path) -> dict[str, str]:
    """As ``plug_in`` (its model folder and path), naming ``DyingStandInPipeline``; touch ``folder / KILL_FILE`` to
    kill its engine, ``folder / DEAF_FILE`` to make its extras' engines ignore that."""
    env = plug_in(folder)
    dist_info = folder / "dying_stand_in_pipeline-0.1.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dying-stand-in-pipeline\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[livepeer_runner.pipelines]\n{DYING_PIPELINE} = {__name__}:DyingStandInPipeline\n")
    return {**env, "PIPELINE": DYING_PIPELINE}
