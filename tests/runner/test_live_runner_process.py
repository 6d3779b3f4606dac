"""go-livepeer's Live Runner path on real runner processes with a real vLLM engine, over real HTTP.

Each runner is ``python -m runner`` with the tiny model and LIVE_RUNNER_* set to
the stand-in orchestrator (tests/support/orchestrator_standin.py, go-livepeer
commit 004450d), which serves on a thread of its own. One runner goes through a
whole life: /ready through its start, registration once it can serve,
heartbeats, calls through the orchestrator's single-shot proxy, a fresh
registration after the orchestrator forgets it, and SIGTERM with a request in
flight. Another loses its engine. The in-process tests of the same path are in
tests/runner/test_live_runner.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from tests.support.orchestrator_standin import OrchestratorStandin
from tests.support.runner_process import START_TIMEOUT, RunnerProcess, free_port, get_json, post_json
from tests.support.runners import tiny_engine_env

# Each test has a runner of its own; the second one starts with the module, behind the first test.
pytestmark = pytest.mark.own_engines(2)

SECRET = "standin-registration-secret"
INTERVAL = 1.0  # the stand-in's heartbeat_interval
MAX_NUM_SEQS, MAX_WAITING_REQUESTS = 2, 3
QUESTION = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass(frozen=True)
class Sample:
    sent_at: float
    code: int | None  # None: no answer (not listening yet)
    status: str | None


class ReadySampler:
    """GET /ready every 0.1 s on a thread, from the runner's launch on."""

    def __init__(self, runner: RunnerProcess) -> None:
        self.runner = runner
        self.samples: list[Sample] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stopped.is_set():
            sent_at = time.monotonic()
            try:
                with urllib.request.urlopen(f"{self.runner.url}/ready", timeout=5) as response:
                    code, status = response.status, json.load(response)["status"]
            except urllib.error.HTTPError as error:
                code, status = error.code, json.load(error)["status"]
            except OSError:
                code, status = None, None
            self.samples.append(Sample(sent_at, code, status))
            time.sleep(0.1)

    def stop(self) -> list[Sample]:
        self.stopped.set()
        self.thread.join(timeout=10)
        return [sample for sample in self.samples if sample.code is not None]


def ready(runner: RunnerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{runner.url}/ready", timeout=5) as response:
            return response.status, json.load(response)["status"]
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)["status"]


def call(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {}


def live_runner(tmp_path, tiny_model_dir, standin: OrchestratorStandin, name: str) -> RunnerProcess:
    port = free_port()
    env = {
        **tiny_engine_env(tiny_model_dir, core=None),
        "MAX_NUM_SEQS": str(MAX_NUM_SEQS), "MAX_WAITING_REQUESTS": str(MAX_WAITING_REQUESTS),
        "LIVE_RUNNER_ORCHESTRATOR": standin.url, "LIVE_RUNNER_SECRET": SECRET,
        "LIVE_RUNNER_URL": f"http://127.0.0.1:{port}", "LIVE_RUNNER_PRICE_USD_PER_HOUR": "0.5",
    }
    return RunnerProcess(name, env, tmp_path / f"{name}.log", port=port)


def log_events(runner: RunnerProcess, event: str) -> list[dict]:
    return [json.loads(line) for line in runner.log_path.read_text().splitlines() if f'"event": "{event}"' in line]


def started_standin() -> OrchestratorStandin:
    return OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=INTERVAL).start()


@pytest.fixture
def standin():
    orchestrator = started_standin()
    yield orchestrator
    orchestrator.stop()


@pytest.fixture(scope="module", autouse=True)
def doomed_live(tmp_path_factory, tiny_model_dir):
    """The runner whose engine dies, and its stand-in: started with the module, its start overlaps the first test."""
    orchestrator = started_standin()
    runner = live_runner(tmp_path_factory.mktemp("live-doomed"), tiny_model_dir, orchestrator, "live-doomed")
    runner.start()
    yield orchestrator, runner
    runner.stop()
    orchestrator.stop()


def test_a_live_runner_joins_when_it_can_serve_is_reached_through_the_proxy_and_leaves_on_sigterm(
        tmp_path, tiny_model_dir, standin):
    runner = live_runner(tmp_path, tiny_model_dir, standin, "live")
    runner.start()
    sampler = ReadySampler(runner)
    try:
        # 1. /ready through the start, and the registration once (and only once) it can serve.
        [registration] = standin.wait(standin.registrations, START_TIMEOUT, "a registration")
        standin.wait(lambda: any(sample.code == 200 for sample in sampler.samples), 10, "/ready 200")
        samples = sampler.stop()
        assert samples[0] == Sample(samples[0].sent_at, 503, "LOADING"), "not ready while the model loads"
        codes = [sample.code for sample in samples]
        first_ready = codes.index(200)
        assert set(codes[:first_ready]) == {503} and set(codes[first_ready:]) == {200}, codes
        assert {sample.status for sample in samples[:first_ready]} == {"LOADING"}
        assert {sample.status for sample in samples[first_ready:]} <= {"IDLE", "OK"}
        assert registration.at > samples[first_ready - 1].sent_at, "no registration while /ready said 503"
        body = registration.body
        assert registration.authorization == SECRET and "runner_id" not in body
        assert body["status"] == "ready" and body["mode"] == "single-shot"
        assert body["runner_url"] == runner.url and body["app"] == f"llm/{runner.env['MODEL_ID']}"
        assert body["capacity"] == MAX_NUM_SEQS + MAX_WAITING_REQUESTS, "the admission bound"
        assert body["version"] == get_json(f"{runner.url}/version")["version"]
        assert body["price_info"] == {"price": 0.5, "currency": "usd", "unit": "hour"}
        gpus = get_json(f"{runner.url}/hardware/info")["gpu_info"]
        if gpus:
            assert body["gpu"]["id"] == gpus["0"]["id"] and body["gpu"]["vram_mb"] > 0
        else:
            assert "gpu" not in body, "no GPU on this machine: none is reported"

        # 2. Heartbeats on the interval the orchestrator gave, with the heartbeat secret.
        runner_id = registration.runner_id
        secret = standin.runners[runner_id].heartbeat_secret
        beats = standin.wait(lambda: len(standin.accepted(runner_id)) >= 4 and standin.accepted(runner_id), 10,
                             "3 heartbeats")
        assert all(beat.authorization == secret and beat.body["runner_id"] == runner_id for beat in beats[1:])
        gaps = [later.at - earlier.at for earlier, later in zip(beats, beats[1:])]
        assert all(0.9 * INTERVAL <= gap <= 2 * INTERVAL for gap in gaps), f"heartbeat_interval 1s: {gaps}"

        # 3. Reached through the orchestrator's single-shot proxy: the Livepeer API and the OpenAI one.
        app_url = f"{standin.url}/apps/{runner_id}/app"
        status, answer = call(f"{app_url}/llm", QUESTION)
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
        status, answer = call(f"{app_url}/v1/chat/completions", {"model": runner.env["MODEL_ID"], **QUESTION})
        assert status == 200 and answer["object"] == "chat.completion"
        status, answer = call(f"{app_url}/v1/models")
        assert status == 200 and answer["data"][0]["id"] == runner.env["MODEL_ID"]
        # The stand-in records a proxied call once it has sent the answer on: a client can have it first.
        proxied = standin.wait(lambda: len(standin.proxied) >= 3 and standin.proxied, 5, "3 proxied calls recorded")
        sessions = {call_.session_id: call_ for call_ in proxied}
        def session_lines() -> list[dict]:
            lines = [entry for entry in log_events(runner, "request.done") if "session_id" in entry]
            return lines if len(lines) >= 3 else []

        logged = standin.wait(session_lines, 5, "3 request.done lines with a session")
        named = {(entry["session_id"], entry["runner_route"]) for entry in logged}
        assert named == {(session_id, runner_id) for session_id in sessions}, "request.done names each session"
        assert not any(call_.session_token in runner.log_path.read_text() for call_ in standin.proxied), \
            "the session token is never logged"

        # 4. An orchestrator that forgot the runner (expiry, a restart) gets a fresh registration.
        standin.forget(runner_id)
        forgot_at = time.monotonic()
        registrations = standin.wait(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                     3 * INTERVAL, "a second registration")
        again = registrations[1]
        assert again.at - forgot_at < 2 * INTERVAL + 1, "at the next heartbeat's 404"
        assert again.authorization == SECRET and "runner_id" not in again.body and again.runner_id != runner_id
        runner_id, secret = again.runner_id, standin.runners[again.runner_id].heartbeat_secret
        standin.wait(lambda: len(standin.accepted(runner_id)) >= 2, 3 * INTERVAL, "heartbeats of the new one")

        # 5. SIGTERM with a request in flight: unregister first, /ready 503 while it drains, out within 8 s.
        finished: list[tuple[int, float]] = []
        long_body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 150, "temperature": 0}
        in_flight = threading.Thread(
            target=lambda: finished.append((post_json(f"{runner.url}/llm", long_body), time.monotonic())))
        in_flight.start()
        deadline = time.monotonic() + 20
        while runner.health() != "OK" and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        [left] = standin.wait(lambda: standin.unregisters, 2, "an unregister")
        draining = ready(runner)
        in_flight.join(timeout=30)
        exit_code = runner.process.wait(timeout=30)
        took = time.monotonic() - signalled_at
        assert (left.runner_id, left.authorization, left.answered) == (runner_id, secret, 204)
        assert left.at - signalled_at < 1.5, "unregistered at once"
        assert draining[0] == 503, f"/ready while draining: {draining}"
        [(code, done_at)] = finished
        assert code == 200, "the request in flight at SIGTERM finishes"
        assert left.at < done_at, "the unregister went before the drain ended"
        assert not [beat for beat in standin.heartbeats if beat.at > left.at], "no heartbeat after the unregister"
        assert exit_code == 0 and took < 8, f"exit {exit_code} after {took:.1f} s; go-livepeer kills after 8"
        print(f"registered {registration.at - samples[first_ready - 1].sent_at:.2f} s after the last /ready 503 "
              f"was sent; re-registered {again.at - forgot_at:.2f} s after being forgotten; SIGTERM: unregistered "
              f"{left.at - signalled_at:.3f} s after, request in flight done {done_at - signalled_at:.2f} s after, "
              f"exit {took:.2f} s after")
    finally:
        sampler.stop()
        runner.stop()


def test_a_runner_whose_engine_dies_turns_not_ready_within_a_heartbeat(doomed_live):
    standin, runner = doomed_live
    try:
        [registration] = standin.wait(standin.registrations, START_TIMEOUT, "a registration")
        runner_id = registration.runner_id
        assert ready(runner) == (200, "IDLE")
        [engine] = [p for p in runner.engine_processes() if "EngineCore" in p.name() + " ".join(p.cmdline())]
        killed_at = time.monotonic()
        engine.kill()
        [dead] = standin.wait(lambda: [beat for beat in standin.accepted(runner_id) if beat.at > killed_at
                                       and beat.body["status"] != "ready"][:1], 15, "a status that is not ready")
        seen_in = dead.at - killed_at
        assert dead.body["status"] == "unavailable"
        assert seen_in < INTERVAL + 1.5, f"the orchestrator heard of it {seen_in:.2f} s after the engine died"
        assert ready(runner) == (503, "ERROR")
        signalled_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        assert runner.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled_at < 8
        assert [(left.runner_id, left.answered) for left in standin.unregisters] == [(runner_id, 204)]
        print(f"engine killed: the orchestrator saw 'unavailable' {seen_in:.2f} s later (heartbeat_interval 1s)")
    finally:
        runner.stop()

