"""go-livepeer's Live Runner path on real runner processes with a real vLLM engine, over real HTTP.

Each runner is ``python -m runner`` with LIVE_RUNNER_* set to an on-chain
stand-in orchestrator (tests/support/orchestrator_standin.py, go-livepeer master
176aa415c), which serves on a thread of its own. One runner (the tiny model,
priced per hour) goes through a whole life: /ready through its start,
registration once it can serve, heartbeats, billed calls through the
orchestrator's single-shot proxy (a 402 without payment), a fresh registration
after the orchestrator expires it and after it restarts, a stream the
orchestrator cancels when its payment runs out, and SIGTERM with a request in
flight; its whole log holds none of the credentials the stand-in handed out or
passed on. Another (the default model with two LoRA adapters, priced per
request) shows its metadata and its fixed price, then loses its engine. The
in-process tests of the same path are in tests/runner/test_live_runner.py.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from tests.support.lora_adapters import make_adapter
from tests.support.orchestrator_standin import OrchestratorStandin
from tests.support.runner_process import DEFAULT_MODEL_ID, START_TIMEOUT, RunnerProcess, free_port, get_json, post_json
from tests.support.runners import TINY_MAX_MODEL_LEN, tiny_engine_env

# Each test has a runner of its own; the second one starts with the module, behind the first test.
pytestmark = pytest.mark.own_engines(2)

SECRET = "standin-registration-secret"
INTERVAL = 1.0  # the stand-in's heartbeat_interval
FIRST_BACKOFF = 1.0  # the runner's own Backoff().first: its first wait is drawn from [0.5, 1.0] s
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


def call(url: str, body: dict | None = None, timeout: float = 60, payment: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Livepeer-Payment": payment} if payment else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {}


def live_runner(tmp_path, standin: OrchestratorStandin, name: str, env: dict[str, str]) -> RunnerProcess:
    port = free_port()
    env = {
        "MAX_NUM_SEQS": str(MAX_NUM_SEQS), "MAX_WAITING_REQUESTS": str(MAX_WAITING_REQUESTS),
        "LIVE_RUNNER_ORCHESTRATOR": standin.url, "LIVE_RUNNER_SECRET": SECRET,
        "LIVE_RUNNER_URL": f"http://127.0.0.1:{port}", **env,
    }
    return RunnerProcess(name, env, tmp_path / f"{name}.log", port=port)


def leaked(runner: RunnerProcess, standin: OrchestratorStandin) -> list[str]:
    """The credentials the stand-in handed out or passed on that appear anywhere in the runner's whole log."""
    text = runner.log_path.read_text()
    return sorted({value for value in standin.credentials() if value and value in text})


def log_events(runner: RunnerProcess, event: str) -> list[dict]:
    return [json.loads(line) for line in runner.log_path.read_text().splitlines() if f'"event": "{event}"' in line]


def started_standin() -> OrchestratorStandin:
    return OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=INTERVAL, onchain=True).start()


@pytest.fixture
def standin():
    orchestrator = started_standin()
    yield orchestrator
    orchestrator.stop()


@pytest.fixture(scope="module", autouse=True)
def doomed_live(tmp_path_factory, model_store):
    """The runner whose engine dies, and its stand-in: started with the module, its start overlaps the first test.

    The default model with two LoRA adapters, priced per request.
    """
    orchestrator = started_standin()
    folder = tmp_path_factory.mktemp("live-doomed")
    snapshot = next((model_store / f"models--{DEFAULT_MODEL_ID.replace('/', '--')}" / "snapshots").iterdir())
    adapters = {name: make_adapter(folder / name, snapshot, seed=seed, scale=0.1, base_model=DEFAULT_MODEL_ID)
                for name, seed in (("sql-lora", 1), ("chat-lora", 2))}
    runner = live_runner(folder, orchestrator, "live-doomed", {
        "MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": str(model_store), "MAX_MODEL_LEN": "2048", "KV_CACHE_GIB": "1",
        "DTYPE": "float32", "LORA_ADAPTERS": ",".join(f"{name}={path}" for name, path in adapters.items()),
        "LIVE_RUNNER_PRICE_UNIT": "fixed", "LIVE_RUNNER_PRICE_USD": "0.0005",
    })
    runner.start()
    yield orchestrator, runner
    runner.stop()
    orchestrator.stop()


def test_a_live_runner_joins_when_it_can_serve_is_reached_through_the_proxy_and_leaves_on_sigterm(
        tmp_path, tiny_model_dir, standin):
    runner = live_runner(tmp_path, standin, "live", {**tiny_engine_env(tiny_model_dir, core=None),
                                                     "LIVE_RUNNER_PRICE_USD_PER_HOUR": "0.5"})
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
        assert registration.answered == 200, "an on-chain orchestrator takes the hourly price"
        described = json.loads(body["metadata"])
        assert described["model"] == runner.env["MODEL_ID"] and described["adapters"] == []
        assert described["max_model_len"] == TINY_MAX_MODEL_LEN and described["runner"] == body["version"]
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

        # 3. Reached through the orchestrator's single-shot proxy: billed, so a call without payment gets the
        # 402 challenge and never reaches the runner; paid calls reach the Livepeer API and the OpenAI one.
        app_url = f"{standin.url}/apps/{runner_id}/app"
        status, _ = call(f"{app_url}/llm", QUESTION)
        assert status == 402 and standin.proxied == []
        status, answer = call(f"{app_url}/llm", QUESTION, payment="ticket-live-1")
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
        status, answer = call(f"{app_url}/v1/chat/completions", {"model": runner.env["MODEL_ID"], **QUESTION},
                              payment="ticket-live-2")
        assert status == 200 and answer["object"] == "chat.completion"
        status, answer = call(f"{app_url}/v1/models", payment="ticket-live-3")
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

        # 4. An orchestrator that no longer knows the runner gets a fresh registration: removed after its TTL
        # (master answers the heartbeat 401), then restarted between two heartbeats (401 too).
        standin.forget(runner_id)
        forgot_at = time.monotonic()
        registrations = standin.wait(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                     3 * INTERVAL, "a second registration")
        again = registrations[1]
        assert again.at - forgot_at < INTERVAL + FIRST_BACKOFF + 0.5, "at the next heartbeat's 401 and a backoff"
        assert again.authorization == SECRET and "runner_id" not in again.body and again.runner_id != runner_id
        assert [beat.message for beat in standin.heartbeats if beat.answered == 401] == [
            "invalid registration authorization"]
        runner_id = again.runner_id
        beat = standin.wait(lambda: standin.accepted(runner_id)[1:], 3 * INTERVAL, "a heartbeat of the new one")[0]
        time.sleep(max(0.0, beat.at + 0.2 - time.monotonic()))
        standin.restart()
        restarted_at = standin.restarts[-1]
        registrations = standin.wait(lambda: len(standin.registrations()) == 3 and standin.registrations(),
                                     3 * (INTERVAL + FIRST_BACKOFF), "a registration after the restart")
        routable_in = registrations[2].at - restarted_at
        assert routable_in <= INTERVAL + FIRST_BACKOFF + 0.3, f"routable again {routable_in:.2f} s after the restart"
        runner_id, secret = registrations[2].runner_id, standin.runners[registrations[2].runner_id].heartbeat_secret
        status, _ = call(f"{standin.url}/apps/{runner_id}/app/llm", QUESTION, payment="ticket-live-4")
        assert status == 200, "routable: reached through the restarted orchestrator's proxy"
        standin.wait(lambda: len(standin.accepted(runner_id)) >= 2, 3 * INTERVAL, "heartbeats of the new one")

        # 4b. A time-priced stream whose payment runs out: the orchestrator closes the connection, the engine
        # lets the request go at once.
        standin.payment_runs_out_after = 0.5
        long_stream = {"messages": [{"role": "user", "content": "count"}], "max_tokens": TINY_MAX_MODEL_LEN - 64,
                       "temperature": 1.0, "stream": True}
        request = urllib.request.Request(
            f"{standin.url}/apps/{runner_id}/app/llm", data=json.dumps(long_stream).encode(),
            headers={"Content-Type": "application/json", "Livepeer-Payment": "ticket-live-5"})
        received = b""
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                while chunk := response.read1(65536):
                    received += chunk
        except (OSError, http.client.IncompleteRead):
            pass
        cut = standin.wait(lambda: [c for c in standin.proxied if c.payment == "ticket-live-5"], 10, "the cut call")[0]
        assert cut.cancelled and b"data: " in received and b"[DONE]" not in received, "cut mid-stream"

        def freed() -> float | None:
            text = urllib.request.urlopen(f"{runner.url}/metrics", timeout=5).read().decode()
            values = {name: float(text.split(f"\n{name} ")[1].split()[0]) for name in (
                "livepeer_runner_requests_in_flight", "livepeer_runner_engine_requests_unfinished")}
            return time.monotonic() if not any(values.values()) else None

        freed_at = standin.wait(freed, 5, "the engine freed")
        freed_in = freed_at - cut.ended
        assert freed_in < 1.0, f"the engine held the cancelled request {freed_in:.2f} s"
        assert standin.wait(lambda: [line for line in log_events(runner, "request.done") if line["status"] == 499],
                            5, "the request counted as a client gone")
        standin.payment_runs_out_after = None

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
        assert not leaked(runner, standin), f"credentials in the runner's log: {leaked(runner, standin)}"
        print(f"registered {registration.at - samples[first_ready - 1].sent_at:.2f} s after the last /ready 503 "
              f"was sent; re-registered {again.at - forgot_at:.2f} s after being removed (401); routable again "
              f"{routable_in:.2f} s after an orchestrator restart (interval {INTERVAL:g} s, first backoff 0.5-1 s); "
              f"a cancelled stream left the engine {freed_in:.2f} s after the cut; SIGTERM: unregistered "
              f"{left.at - signalled_at:.3f} s after, request in flight done {done_at - signalled_at:.2f} s after, "
              f"exit {took:.2f} s after; {len(standin.credentials())} credentials, none in the log")
    finally:
        sampler.stop()
        runner.stop()


def test_a_runner_whose_engine_dies_turns_not_ready_within_a_heartbeat(doomed_live):
    standin, runner = doomed_live
    try:
        [registration] = standin.wait(standin.registrations, START_TIMEOUT, "a registration")
        runner_id = registration.runner_id
        assert ready(runner) == (200, "IDLE")
        assert registration.answered == 200
        assert registration.body["price_info"] == {"price": 0.0005, "currency": "usd", "unit": "fixed"}
        assert standin.runners[runner_id].request["price_info"]["unit"] == "fixed", "as the orchestrator keeps it"
        metadata = registration.body["metadata"]
        described = json.loads(metadata)
        assert described["model"] == DEFAULT_MODEL_ID and described["adapters"] == ["chat-lora", "sql-lora"]
        assert described["max_model_len"] == 2048 and described["dtype"] == "float32"
        assert "livepeer" in described["apis"] and described["runner"] == registration.body["version"]
        assert len(metadata.encode()) <= 1024
        print(f"metadata ({len(metadata.encode())} bytes): {metadata}")
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
        assert not leaked(runner, standin)
        print(f"engine killed: the orchestrator saw 'unavailable' {seen_in:.2f} s later (heartbeat_interval 1s)")
    finally:
        runner.stop()

