"""go-livepeer's Live Runner path, in-process: /ready, registration with heartbeats, session headers.

The runner's own app on a gated pipeline (its load, failure and admission
bound are the test's), registering with the stand-in orchestrator on loopback
(tests/support/orchestrator_standin.py, go-livepeer commit 004450d). The same
behaviours on a real vLLM engine, over real HTTP, are in
tests/runner/test_live_runner_process.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import structlog
from aiohttp import web

from pipelines.llm import schema as llm_schema
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMResponse, LLMTokenUsage
from runner import __version__
from runner.app import create_app, leave_network
from runner.hardware import NVML
from runner.keys import LIVE_RUNNER, STATE
from runner.live_runner import Backoff, LiveRunnerSettings, gpu_entry, go_duration
from runner.pipeline import EngineLoad, Pipeline, Serve
from runner.schema import GPUComputeInfo
from runner.settings import DEFAULT_MODEL_ID, RunnerSettings
from tests.support.orchestrator_standin import OrchestratorStandin
from tests.support.runner_process import free_port

SECRET = "registration-secret-of-the-test"
RUNNER_URL = "http://runner.invalid:8000"
CAPACITY = 6
GEN_LLM = tuple(op for op in llm_schema.OPERATIONS if op.operation_id == "genLLM")
QUESTION = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class GatedPipeline(Pipeline):
    """Loads when the test says so, fails when it says so, holds requests at ``gate``."""

    name = "gated"
    OPERATIONS = GEN_LLM

    def __init__(self, capacity: int | None = CAPACITY) -> None:
        super().__init__("gated/model", Path("."))
        self.capacity = capacity
        self.loaded = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.broken: str | None = None

    def operations(self) -> Mapping[str, Serve]:
        return {"genLLM": self.generate}

    async def load(self) -> None:
        await self.loaded.wait()

    def failure(self) -> str | None:
        return self.broken

    def max_in_flight(self) -> int | None:
        return self.capacity

    def engine_load(self) -> EngineLoad:
        return EngineLoad(unfinished=0, submitted=0, batch_size=1)

    async def close(self) -> None:
        pass

    async def generate(self, request, context):
        await self.gate.wait()
        message = LLMMessage(role="assistant", content="hello")
        usage = LLMTokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        return LLMResponse(id="chatcmpl-x", model="gated", created=0, usage=usage,
                           choices=[LLMChoice(index=0, message=message, finish_reason="stop")])


def live_settings(orchestrator: str, **values: str) -> LiveRunnerSettings:
    return LiveRunnerSettings.model_validate(
        {"LIVE_RUNNER_ORCHESTRATOR": orchestrator, "LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL,
         **values})


def live_app(pipeline: Pipeline, orchestrator: str, status_poll: float = 0.02, **values: str) -> web.Application:
    app = create_app(RunnerSettings(), pipeline=pipeline, live_runner=live_settings(orchestrator, **values))
    registration = app[LIVE_RUNNER]
    registration.backoff = Backoff(first=0.05, most=0.4)
    registration.request_timeout = 0.5
    registration.status_poll = status_poll
    return app


@pytest.fixture
async def standin():
    """An off-chain orchestrator (the price is not its business) that asks for a heartbeat every 100 ms.

    Tests ask for it before ``aiohttp_client``, so that their runner leaves before it closes.
    """
    orchestrator = OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=0.1)
    await orchestrator.serve()
    yield orchestrator
    await orchestrator.close()


@pytest.fixture
async def onchain():
    """An on-chain orchestrator: it requires a price."""
    orchestrator = OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=0.1, onchain=True)
    await orchestrator.serve()
    yield orchestrator
    await orchestrator.close()


async def ready_status(client, path: str = "/ready") -> tuple[int, str]:
    response = await client.get(path)
    return response.status, (await response.json())["status"]


async def wait_for(condition, timeout: float = 2.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
    return result


async def metrics_text(client) -> str:
    return await (await client.get("/metrics")).text()


# /ready


async def test_ready_is_200_only_while_a_request_would_be_served(aiohttp_client):
    pipeline = GatedPipeline()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline, live_runner=LiveRunnerSettings()))
    for path in ("/ready", "/readyz"):
        assert await ready_status(client, path) == (503, "LOADING")
    assert (await client.get("/health")).status == 200, "/health keeps answering 200 in every state"
    pipeline.loaded.set()
    await wait_for(lambda: client.app[STATE].ready)
    for path in ("/ready", "/readyz"):
        assert await ready_status(client, path) == (200, "IDLE")
    pipeline.gate.clear()
    held = asyncio.create_task(client.post("/llm", json=QUESTION))
    await wait_for(lambda: client.app[STATE].in_flight == 1)
    assert await ready_status(client) == (200, "OK")
    pipeline.broken = "the engine died"
    assert await ready_status(client) == (503, "ERROR")
    assert (await client.get("/health")).status == 200
    pipeline.broken = None
    drained = asyncio.create_task(client.app[STATE].drain(timeout=5))
    await asyncio.sleep(0)
    # Draining: /health still says OK while the request finishes, but nothing new would be served.
    assert await ready_status(client) == (503, "OK")
    assert await ready_status(client, "/readyz") == (503, "OK")
    pipeline.gate.set()
    assert (await held).status == 200
    assert await drained == 0
    assert await ready_status(client) == (503, "ERROR")


async def test_a_runner_that_failed_to_load_is_not_ready(aiohttp_client):
    client = await aiohttp_client(create_app(RunnerSettings(), start_error="no such model",
                                             live_runner=LiveRunnerSettings()))
    assert await ready_status(client) == (503, "ERROR")


# Settings


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({"LIVE_RUNNER_URL": RUNNER_URL}, "LIVE_RUNNER_SECRET is required"),
        ({"LIVE_RUNNER_SECRET": SECRET}, "LIVE_RUNNER_URL is required"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": "runner:8000"}, "LIVE_RUNNER_URL must be an http"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": "ftp://runner"}, "LIVE_RUNNER_URL must be an http"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_ORCHESTRATOR": "orch:8935"},
         "LIVE_RUNNER_ORCHESTRATOR must be an http"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "0"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "-1"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "cheap"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "nan"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "inf"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL, "LIVE_RUNNER_APP": " llm"},
         "LIVE_RUNNER_APP must be a name"),
    ],
)
async def test_a_bad_setting_is_health_error_with_the_reason(aiohttp_client, monkeypatch, environment, said):
    monkeypatch.setenv("LIVE_RUNNER_ORCHESTRATOR", "http://orchestrator:8935")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    with structlog.testing.capture_logs() as logs:
        app = create_app(RunnerSettings(), pipeline=pipeline)
    [refusal] = [entry for entry in logs if entry["event"] == "runner.cannot_serve"]
    assert refusal["reason"].startswith("invalid live runner settings") and said in refusal["reason"]
    client = await aiohttp_client(app)
    assert (await (await client.get("/health")).json()) == {"status": "ERROR"}
    assert await ready_status(client) == (503, "ERROR")
    assert (await client.post("/llm", json=QUESTION)).status == 503
    assert 'livepeer_runner_live_registration{state="off"} 1.0' in await metrics_text(client)


async def test_without_an_orchestrator_nothing_registers_and_metrics_say_off(aiohttp_client, monkeypatch):
    monkeypatch.setenv("LIVE_RUNNER_ORCHESTRATOR", "")  # empty is unset, as docker compose often passes it
    monkeypatch.setenv("LIVE_RUNNER_SECRET", "a secret for nobody")
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    assert await ready_status(client) in ((200, "IDLE"), (503, "LOADING"))
    text = await metrics_text(client)
    assert 'livepeer_runner_live_registration{state="off"} 1.0' in text
    assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="none"} 1.0' in text
    assert client.app[LIVE_RUNNER].task is None


def test_valid_settings_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIVE_RUNNER_ORCHESTRATOR", "https://orchestrator.example:8935")
    monkeypatch.setenv("LIVE_RUNNER_SECRET", SECRET)
    monkeypatch.setenv("LIVE_RUNNER_URL", RUNNER_URL)
    monkeypatch.setenv("LIVE_RUNNER_PRICE_USD_PER_HOUR", "0.75")
    monkeypatch.setenv("LIVE_RUNNER_APP", "llm/smollm2")
    settings = LiveRunnerSettings()
    assert settings.enabled and settings.price_usd_per_hour == 0.75 and settings.app == "llm/smollm2"
    assert SECRET not in repr(settings), "the secret never shows in a repr or a log line"


# Registration


async def test_no_registration_before_ready_then_at_once(standin, aiohttp_client):
    standin.heartbeat_interval = 10
    pipeline = GatedPipeline()
    # A status poll this slow leaves only the state's own notice to explain a registration at once.
    client = await aiohttp_client(live_app(pipeline, standin.url, status_poll=30))
    await asyncio.sleep(0.3)
    assert standin.heartbeats == [], "nothing is sent while the model loads"
    assert 'livepeer_runner_live_registration{state="waiting"} 1.0' in await metrics_text(client)
    released = time.monotonic()
    pipeline.loaded.set()
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    assert first.at - released < 0.5
    assert first.authorization == SECRET, "the registration secret, raw"
    body = first.body
    assert "runner_id" not in body
    assert body["status"] == "ready" and body["mode"] == "single-shot"
    assert body["runner_url"] == RUNNER_URL
    assert body["app"] == f"llm/{DEFAULT_MODEL_ID}", "PIPELINE/MODEL_ID by default"
    assert body["capacity"] == CAPACITY, "the admission bound"
    assert body["version"] == __version__
    assert "price_info" not in body, "no price unless one is set"
    nvml = NVML()
    try:
        assert body.get("gpu") == gpu_entry(nvml.compute_info()), "the GPU NVML reports, none without one"
    finally:
        nvml.close()
    text = await metrics_text(client)
    assert 'livepeer_runner_live_registration{state="registered"} 1.0' in text
    assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="ok"} 1.0' in text
    assert 'livepeer_runner_live_heartbeats_total{outcome="ok"} 1.0' in text
    assert "livepeer_runner_live_heartbeat_last_ok_timestamp_seconds" in text


async def test_the_app_and_price_settings_reach_the_orchestrator(onchain, aiohttp_client):
    pipeline = GatedPipeline(capacity=None)
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, onchain.url, LIVE_RUNNER_APP="llm/smollm2",
                                  LIVE_RUNNER_PRICE_USD_PER_HOUR="0.25"))
    [first] = await onchain.until(onchain.registrations, 1.0, "a registration")
    assert first.answered == 200, "an on-chain orchestrator takes the price"
    assert first.body["app"] == "llm/smollm2"
    assert first.body["price_info"] == {"price": 0.25, "currency": "usd", "unit": "hour"}
    assert first.body["capacity"] == 1, "a pipeline without an admission bound takes one request at a time"


async def test_heartbeats_on_the_interval_with_the_heartbeat_secret(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, standin.url))
    [registration] = await standin.until(standin.registrations, 1.0, "a registration")
    runner = standin.runners[registration.runner_id]
    beats = await standin.until(lambda: len(standin.accepted()) >= 7 and standin.accepted(), 3.0, "6 heartbeats")
    for beat in beats[1:]:
        assert beat.body["runner_id"] == runner.runner_id
        assert beat.authorization == runner.heartbeat_secret, "every heartbeat after the first carries its secret"
        assert beat.body["status"] == "ready"
    gaps = [later.at - earlier.at for earlier, later in zip(beats, beats[1:])]
    assert all(0.08 <= gap <= 0.5 for gap in gaps), f"heartbeat_interval is 100ms: {gaps}"


async def test_status_changes_are_sent_at_once(standin, aiohttp_client):
    standin.heartbeat_interval = 30
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url, status_poll=0.05))
    registration = client.app[LIVE_RUNNER]
    await standin.until(standin.registrations, 1.0, "a registration")

    def statuses() -> list[str]:
        return [beat.body["status"] for beat in standin.accepted()]

    broken_at = time.monotonic()
    pipeline.broken = "the engine died"  # the pipeline's own failure, read each status poll
    await standin.until(lambda: statuses()[-1] == "unavailable", 1.0, "status unavailable")
    assert standin.accepted()[-1].at - broken_at < 0.5
    pipeline.broken = None
    await standin.until(lambda: statuses()[-1] == "ready", 1.0, "status ready again")
    registration.status_poll = 30  # from here only the state's own notice of the drain can wake it
    await asyncio.sleep(0.1)
    drain_at = time.monotonic()
    drained = asyncio.create_task(client.app[STATE].drain(timeout=1))
    await standin.until(lambda: statuses()[-1] == "draining", 1.0, "status draining")
    assert standin.accepted()[-1].at - drain_at < 0.5
    assert statuses() == ["ready", "unavailable", "ready", "draining"], "a change is sent once, then on the interval"
    await drained


async def test_an_orchestrator_that_forgot_the_runner_gets_a_new_registration(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    with structlog.testing.capture_logs() as logs:
        await aiohttp_client(live_app(pipeline, standin.url))
        [first] = await standin.until(standin.registrations, 1.0, "a registration")
        standin.forget(first.runner_id)
        registrations = await standin.until(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                            2.0, "a second registration")
    forgotten = [beat for beat in standin.heartbeats if beat.answered == 404]
    assert forgotten and forgotten[0].body["runner_id"] == first.runner_id
    second = registrations[1]
    assert second.authorization == SECRET and "runner_id" not in second.body, "registered anew, with the secret"
    assert second.runner_id != first.runner_id
    assert any(entry["event"] == "live_runner.forgotten" for entry in logs)
    runner = standin.runners[second.runner_id]
    await standin.until(lambda: len(standin.accepted(second.runner_id)) >= 3, 2.0, "heartbeats of the new one")
    assert all(beat.authorization == runner.heartbeat_secret for beat in standin.accepted(second.runner_id)[1:])


async def test_a_wrong_secret_is_logged_and_retried_with_backoff(standin, aiohttp_client):
    standin.registration_secret = "the orchestrator's secret, which is not the runner's"
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    with structlog.testing.capture_logs() as logs:
        client = await aiohttp_client(live_app(pipeline, standin.url))
        refused = await standin.until(lambda: len(standin.heartbeats) >= 5 and standin.heartbeats, 5.0, "5 attempts")
        assert {beat.answered for beat in refused} == {401}
        text = await metrics_text(client)
        assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="unauthorized"} 1.0' in text
        assert 'livepeer_runner_live_registration{state="registering"} 1.0' in text
        assert await ready_status(client) == (200, "IDLE"), "serving is not the orchestrator's business"
        standin.registration_secret = SECRET
        await standin.until(standin.registrations, 2.0, "a registration once the secrets agree")
    gaps = [later.at - earlier.at for earlier, later in zip(refused, refused[1:])]
    # Backoff(first=0.05, most=0.4): each wait is drawn from [half, whole] of 0.05, 0.1, 0.2, 0.4.
    assert gaps[3] > gaps[0], f"the waits grow: {gaps}"
    said = [entry for entry in logs if entry["event"] == "live_runner.refused"]
    assert said and said[0]["status"] == 401 and said[0]["message"] == "invalid registration authorization"
    assert not any(SECRET in str(entry) for entry in logs), "no secret is logged"


async def test_a_body_the_orchestrator_refuses_is_logged_and_retried(onchain, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    with structlog.testing.capture_logs() as logs:
        client = await aiohttp_client(live_app(pipeline, onchain.url))  # no price: on-chain says 400
        await onchain.until(lambda: len(onchain.heartbeats) >= 3, 5.0, "3 attempts")
    assert {beat.answered for beat in onchain.heartbeats} == {400}
    said = [entry for entry in logs if entry["event"] == "live_runner.refused"]
    assert said[0]["status"] == 400 and said[0]["message"] == "price_info.price is required"
    assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="rejected"} 1.0' in await metrics_text(client)


async def test_an_orchestrator_that_is_down_changes_nothing_about_serving(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = await aiohttp_client(live_app(pipeline, nobody))
    await wait_for(lambda: client.app[LIVE_RUNNER].record.outcomes, 2.0)
    for _ in range(3):
        assert (await client.post("/llm", json=QUESTION)).status == 200
        assert await ready_status(client) == (200, "IDLE")
        assert (await (await client.get("/health")).json()) == {"status": "IDLE"}
    text = await metrics_text(client)
    assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="unreachable"} 1.0' in text
    assert 'livepeer_runner_live_registration{state="registering"} 1.0' in text

    # One that takes the call and never answers: each attempt ends at the request timeout (0.5 s here).
    standin.silent = True
    silent = await aiohttp_client(live_app(GatedPipeline(), standin.url))
    silent.app[STATE].pipeline.loaded.set()
    await standin.until(lambda: standin.heartbeats, 1.0, "an attempt")
    started = time.monotonic()
    assert (await silent.post("/llm", json=QUESTION)).status == 200
    assert time.monotonic() - started < 0.4, "a request never waits on the orchestrator"
    await wait_for(lambda: silent.app[LIVE_RUNNER].record.outcomes, 2.0)
    assert 'outcome="unreachable"} 1.0' in await metrics_text(silent)


async def test_leaving_unregisters_with_the_heartbeat_secret_and_stops_heartbeats(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    secret = standin.runners[first.runner_id].heartbeat_secret
    await standin.until(lambda: len(standin.accepted()) >= 3, 1.0, "heartbeats")
    with structlog.testing.capture_logs() as logs:
        await leave_network(client.app)
    [left] = standin.unregisters
    assert (left.runner_id, left.authorization, left.answered) == (first.runner_id, secret, 204)
    assert first.runner_id not in standin.runners
    assert any(entry["event"] == "live_runner.unregistered" for entry in logs)
    assert 'livepeer_runner_live_registration{state="unregistered"} 1.0' in await metrics_text(client)
    count = len(standin.heartbeats)
    await asyncio.sleep(0.3)
    assert len(standin.heartbeats) == count, "no heartbeat after the unregister (it would register it again)"
    await client.close()
    assert len(standin.unregisters) == 1, "the app's end does not unregister twice"


async def test_the_app_s_end_unregisters_if_sigterm_did_not(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    await client.close()
    assert [(left.runner_id, left.answered) for left in standin.unregisters] == [(first.runner_id, 204)]


async def test_an_unregister_that_is_not_answered_is_given_up_within_its_bound(standin, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    await standin.until(standin.registrations, 1.0, "a registration")
    standin.silent = True
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await client.app[LIVE_RUNNER].leave(timeout=0.3)
    assert time.monotonic() - started < 0.6
    assert [left.answered for left in standin.unregisters] == [0], "it was sent, and never answered"
    assert any(entry["event"] == "live_runner.unregister_failed" for entry in logs)


# Session headers


async def test_session_headers_name_the_session_in_the_request_log(aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline, live_runner=LiveRunnerSettings()))
    headers = {
        "Livepeer-Session-Id": "session_abc123",
        "Livepeer-Runner-Route": "runner_xyz",
        "Livepeer-Session-Token": "a-session-token-is-a-credential",
        "Livepeer-Session-Control": "http://orchestrator/runner/runner_xyz/session/session_abc123",
    }
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        assert (await client.post("/llm", json=QUESTION, headers=headers)).status == 200
        assert (await client.post("/llm", json=QUESTION)).status == 200
    done = [entry for entry in logs if entry["event"] == "request.done"]
    assert done[0]["session_id"] == "session_abc123" and done[0]["runner_route"] == "runner_xyz"
    assert "session_id" not in done[1] and "runner_route" not in done[1], "a request without them names none"
    assert not any("a-session-token-is-a-credential" in str(entry) for entry in logs)


# Parts


def test_go_durations_are_read_as_go_writes_them():
    assert go_duration("5s") == 5 and go_duration("20s") == 20 and go_duration("1m0s") == 60
    assert go_duration("100ms") == pytest.approx(0.1) and go_duration("1.5s") == 1.5
    assert go_duration("1h2m3.5s") == 3723.5 and go_duration("0") == 0 and go_duration("250us") == pytest.approx(2.5e-4)
    for text in ("5", "", "s", "5 s", "-5s", "5sec"):
        with pytest.raises(ValueError):
            go_duration(text)


def test_the_gpu_is_the_first_nvml_reports():
    gib = 1024**3
    info = {
        "1": GPUComputeInfo(id="GPU-b", name="NVIDIA L4", memory_total=24 * gib, memory_free=0, major=8, minor=9),
        "0": GPUComputeInfo(id="GPU-a", name="NVIDIA H100", memory_total=80 * gib, memory_free=0, major=9, minor=0),
    }
    assert gpu_entry(info) == {"id": "GPU-a", "name": "NVIDIA H100", "vram_mb": 80 * 1024}
    assert gpu_entry({}) is None
