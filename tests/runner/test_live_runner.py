"""go-livepeer's Live Runner path, in-process: /ready, registration with heartbeats, the proxy, session headers.

The runner's own app on a gated pipeline (its load, failure, admission bound
and description are the test's), registering with the stand-in orchestrator on
loopback (tests/support/orchestrator_standin.py, go-livepeer master 176aa415c).
Every test's logs are captured whole (``logs``): none may hold a secret of the
stand-ins' (registration and heartbeat secrets, session tokens, payments). The
same behaviours on a real vLLM engine, over real HTTP, are in
tests/runner/test_live_runner_process.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping

import aiohttp
import pytest
import structlog
from aiohttp import web

from pipelines.llm import schema as llm_schema
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMResponse, LLMTokenUsage
from runner import __version__
from runner.app import create_app, leave_network
from runner.hardware import NVML
from runner.keys import LIVE_RUNNER, STATE
from runner.live_runner import (
    MAX_ANSWER_BYTES,
    Backoff,
    LiveRunnerSettings,
    fit_metadata,
    gpu_entry,
    go_duration,
    heartbeat_problems,
)
from runner.pipeline import EngineLoad, EventStream, Pipeline, Serve
from runner.schema import GPUComputeInfo
from runner.settings import DEFAULT_MODEL_ID, RunnerSettings
from tests.support.orchestrator_standin import OrchestratorStandin
from tests.support.runner_process import free_port
from tests.support.stub_pipeline import StubPipeline

SECRET = "registration-secret-of-the-test"
RUNNER_URL = "http://runner.invalid:8000"
CAPACITY = 6
GEN_LLM = tuple(op for op in llm_schema.OPERATIONS if op.operation_id == "genLLM")
QUESTION = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
STREAMED = {**QUESTION, "stream": True}
PAYMENT = "payment-ticket-of-the-test-a1b2c3"  # the client's Livepeer-Payment: a credential


class GatedPipeline(StubPipeline):
    """Loads when the test says so, fails when it says so, holds requests at ``gate``; streams until closed."""

    name = "gated"
    OPERATIONS = GEN_LLM

    def __init__(self, capacity: int | None = CAPACITY, described: dict | None = None) -> None:
        super().__init__("gated/model", load_waits=True)
        self.capacity = capacity
        self.described = described
        self.gate = asyncio.Event()
        self.gate.set()
        self.broken: str | None = None
        self.calls = 0
        self.streaming = 0  # streams whose generation runs now
        self.stream_started = asyncio.Event()
        self.stream_stopped = asyncio.Event()
        self.stopped_at = 0.0  # time.monotonic() when the last stream's generation stopped

    def operations(self) -> Mapping[str, Serve]:
        return {"genLLM": self.generate}

    def failure(self) -> str | None:
        return self.broken

    def max_in_flight(self) -> int | None:
        return self.capacity

    def describe(self) -> dict:
        return self.described if self.described is not None else super().describe()

    def engine_load(self) -> EngineLoad:
        return EngineLoad(unfinished=self.streaming, submitted=self.calls, batch_size=1)

    async def generate(self, request, context):
        self.calls += 1
        await self.gate.wait()
        if request.stream:
            return EventStream(self.tokens(), error_event=lambda reason: json.dumps({"error": reason}).encode())
        message = LLMMessage(role="assistant", content="hello")
        usage = LLMTokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        return LLMResponse(id="chatcmpl-x", model="gated", created=0, usage=usage,
                           choices=[LLMChoice(index=0, message=message, finish_reason="stop")])

    async def tokens(self):
        """A generation that never ends on its own: one event every 20 ms until it is closed."""
        self.streaming += 1
        self.stream_started.set()
        try:
            while True:
                yield b'{"choices":[{"index":0,"delta":{"role":"assistant","content":"x"}}]}'
                await asyncio.sleep(0.02)
        finally:
            self.streaming -= 1
            self.stopped_at = time.monotonic()
            self.stream_stopped.set()


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


async def served_live_runner(aiohttp_client, pipeline: Pipeline, orchestrator: str, **values: str):
    """The runner listening on a port of its own, as its server does (a client that leaves cancels its
    handler), registered with ``orchestrator`` under its real URL: calls through the stand-in's proxy reach it."""
    port = free_port()
    app = live_app(pipeline, orchestrator, LIVE_RUNNER_URL=f"http://127.0.0.1:{port}", **values)
    return await aiohttp_client(app, server_kwargs={"port": port, "handler_cancellation": True})


@pytest.fixture
def standins() -> list[OrchestratorStandin]:
    """Every stand-in a test made, whose credentials the log check looks for."""
    return []


@pytest.fixture
def logs(standins, caplog):
    """Every structlog event of the test, captured from its start to the end of its last fixture.

    At the end no event and no standard-library log line may hold a credential
    of any stand-in (registration and heartbeat secrets, session tokens,
    Livepeer-Payment values), nor this module's registration secret and payment.
    """
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as entries:
        yield entries
    credentials = {SECRET, PAYMENT, *(value for made in standins for value in made.credentials())}
    lines = [json.dumps(entry, default=str) for entry in entries] + caplog.text.splitlines()
    leaked = sorted({value for value in credentials if value and any(value in line for line in lines)})
    assert not leaked, f"credentials in the log: {leaked}"


async def made_standin(standins: list[OrchestratorStandin], **options) -> OrchestratorStandin:
    orchestrator = OrchestratorStandin(registration_secret=SECRET, heartbeat_interval=0.1, **options)
    await orchestrator.serve()
    standins.append(orchestrator)
    return orchestrator


@pytest.fixture
async def standin(logs, standins):
    """An off-chain orchestrator (the price is not its business) that asks for a heartbeat every 100 ms.

    Tests ask for it before ``aiohttp_client``, so that their runner leaves before it closes.
    """
    orchestrator = await made_standin(standins)
    yield orchestrator
    await orchestrator.close()


@pytest.fixture
async def onchain(logs, standins):
    """An on-chain orchestrator: it requires a price, and bills single-shot calls."""
    orchestrator = await made_standin(standins, onchain=True)
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


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


# /ready


async def test_ready_is_200_only_while_a_request_would_be_served(logs, aiohttp_client):
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


async def test_a_runner_that_failed_to_load_is_not_ready(logs, aiohttp_client):
    client = await aiohttp_client(create_app(RunnerSettings(), start_error="no such model",
                                             live_runner=LiveRunnerSettings()))
    assert await ready_status(client) == (503, "ERROR")


# Settings

ON = {"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": RUNNER_URL}


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({"LIVE_RUNNER_URL": RUNNER_URL}, "LIVE_RUNNER_SECRET is required"),
        ({"LIVE_RUNNER_SECRET": SECRET}, "LIVE_RUNNER_URL is required"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": "runner:8000"}, "LIVE_RUNNER_URL must be an http"),
        ({"LIVE_RUNNER_SECRET": SECRET, "LIVE_RUNNER_URL": "ftp://runner"}, "LIVE_RUNNER_URL must be an http"),
        ({**ON, "LIVE_RUNNER_ORCHESTRATOR": "orch:8935"}, "LIVE_RUNNER_ORCHESTRATOR must be an http"),
        ({**ON, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "0"}, "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({**ON, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "-1"}, "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({**ON, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "cheap"}, "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({**ON, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "nan"}, "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({**ON, "LIVE_RUNNER_PRICE_USD_PER_HOUR": "inf"}, "LIVE_RUNNER_PRICE_USD_PER_HOUR"),
        ({**ON, "LIVE_RUNNER_PRICE_USD": "0"}, "LIVE_RUNNER_PRICE_USD"),
        ({**ON, "LIVE_RUNNER_PRICE_USD": "1e400"}, "LIVE_RUNNER_PRICE_USD"),
        ({**ON, "LIVE_RUNNER_PRICE_UNIT": "720p", "LIVE_RUNNER_PRICE_USD": "1"},
         "LIVE_RUNNER_PRICE_UNIT must be hour (USD per hour of compute) or fixed"),
        ({**ON, "LIVE_RUNNER_PRICE_UNIT": "token", "LIVE_RUNNER_PRICE_USD": "1"}, "LIVE_RUNNER_PRICE_UNIT must be"),
        ({**ON, "LIVE_RUNNER_PRICE_UNIT": "fixed"}, "LIVE_RUNNER_PRICE_UNIT=fixed needs LIVE_RUNNER_PRICE_USD"),
        ({**ON, "LIVE_RUNNER_PRICE_UNIT": "fixed", "LIVE_RUNNER_PRICE_USD_PER_HOUR": "1"},
         "LIVE_RUNNER_PRICE_USD_PER_HOUR is a price per hour, but LIVE_RUNNER_PRICE_UNIT is fixed"),
        ({**ON, "LIVE_RUNNER_PRICE_USD": "0.5", "LIVE_RUNNER_PRICE_USD_PER_HOUR": "0.5"}, "not both"),
        ({**ON, "LIVE_RUNNER_METADATA": "x" * 1025}, "LIVE_RUNNER_METADATA must be at most 1024 bytes"),
        ({**ON, "LIVE_RUNNER_METADATA": "é" * 513}, "LIVE_RUNNER_METADATA must be at most 1024 bytes of UTF-8, "
                                                    "not 1026"),
        ({**ON, "LIVE_RUNNER_METADATA": f"shared with {SECRET}"}, "LIVE_RUNNER_METADATA holds LIVE_RUNNER_SECRET"),
        ({**ON, "LIVE_RUNNER_PROXY": "maybe"}, "LIVE_RUNNER_PROXY"),
        ({**ON, "LIVE_RUNNER_APP": " llm"}, "LIVE_RUNNER_APP must be a name"),
    ],
)
async def test_a_bad_setting_is_health_error_with_the_reason(logs, aiohttp_client, monkeypatch, environment, said):
    monkeypatch.setenv("LIVE_RUNNER_ORCHESTRATOR", "http://orchestrator:8935")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    app = create_app(RunnerSettings(), pipeline=pipeline)
    [refusal] = events(logs, "runner.cannot_serve")
    assert refusal["reason"].startswith("invalid live runner settings") and said in refusal["reason"]
    client = await aiohttp_client(app)
    assert (await (await client.get("/health")).json()) == {"status": "ERROR"}
    assert await ready_status(client) == (503, "ERROR")
    assert (await client.post("/llm", json=QUESTION)).status == 503
    assert 'livepeer_runner_live_registration{state="off"} 1.0' in await metrics_text(client)


def test_metadata_that_is_not_utf8_is_refused_at_start(monkeypatch):
    # An environment variable's undecodable bytes reach Python as lone surrogates.
    with pytest.raises(ValueError, match="LIVE_RUNNER_METADATA must be valid UTF-8"):
        LiveRunnerSettings.model_validate({"LIVE_RUNNER_METADATA": "caf\udce9"})


async def test_without_an_orchestrator_nothing_registers_and_metrics_say_off(logs, aiohttp_client, monkeypatch):
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
    assert settings.enabled and settings.app == "llm/smollm2"
    assert settings.price_info == {"price": 0.75, "currency": "usd", "unit": "hour"}, "today's name still works"
    assert settings.metadata is None and settings.proxy is False
    assert SECRET not in repr(settings), "the secret never shows in a repr or a log line"
    monkeypatch.delenv("LIVE_RUNNER_PRICE_USD_PER_HOUR")
    monkeypatch.setenv("LIVE_RUNNER_PRICE_USD", "0.002")
    monkeypatch.setenv("LIVE_RUNNER_PRICE_UNIT", " Fixed ")  # as go-livepeer reads a unit: trimmed, lower case
    monkeypatch.setenv("LIVE_RUNNER_PROXY", "true")
    settings = LiveRunnerSettings()
    assert settings.price_info == {"price": 0.002, "currency": "usd", "unit": "fixed"} and settings.proxy
    monkeypatch.delenv("LIVE_RUNNER_PRICE_UNIT")
    assert LiveRunnerSettings().price_info["unit"] == "hour", "LIVE_RUNNER_PRICE_USD is per hour by default"


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
    assert "proxy" not in body, "no proxy unless the operator asks"
    nvml = NVML()
    try:
        gpu = gpu_entry(nvml.compute_info())
    finally:
        nvml.close()
    assert body.get("gpu") == gpu, "the GPU NVML reports, none without one"
    expected = {"model": "gated/model", **({"gpu": gpu["name"]} if gpu else {}), "runner": __version__}
    assert json.loads(body["metadata"]) == expected, "what it serves: the pipeline's description, GPU, version"
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


async def test_a_fixed_price_registers_with_unit_fixed_and_proxy_when_asked(onchain, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, onchain.url, LIVE_RUNNER_PRICE_UNIT="fixed",
                                  LIVE_RUNNER_PRICE_USD="0.002", LIVE_RUNNER_PROXY="true"))
    [first] = await onchain.until(onchain.registrations, 1.0, "a registration")
    assert first.answered == 200, first.message
    assert first.body["price_info"] == {"price": 0.002, "currency": "usd", "unit": "fixed"}
    assert onchain.runners[first.runner_id].request["price_info"]["unit"] == "fixed", "as the orchestrator keeps it"
    assert first.body["proxy"] is True


async def test_metadata_is_what_the_pipeline_serves_or_the_operator_s_verbatim(standin, aiohttp_client):
    described = {"model": "org/model", "adapters": ["chat", "sql"], "max_model_len": 8192,
                 "apis": ["livepeer", "openai"], "dtype": "float32"}
    pipeline = GatedPipeline(described=described)
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    metadata = first.body["metadata"]
    assert ": " not in metadata and ", " not in metadata, "compact JSON"
    document = json.loads(metadata)
    assert list(document)[:5] == list(described) and document["runner"] == __version__
    # Adapters loaded at run time show in the next heartbeat.
    described["adapters"] = ["chat", "new", "sql"]
    def last_adapters() -> list[str]:
        return json.loads(standin.accepted()[-1].body["metadata"])["adapters"]

    await standin.until(lambda: last_adapters() == described["adapters"], 1.0, "the new adapter in a heartbeat")
    await client.close()

    verbatim = "région=eu; tier=gold"
    other = GatedPipeline(described=described)
    other.loaded.set()
    await aiohttp_client(live_app(other, standin.url, LIVE_RUNNER_METADATA=verbatim))
    second = await standin.until(lambda: standin.registrations()[1:], 1.0, "a second registration")
    assert second[0].body["metadata"] == verbatim


async def test_metadata_too_large_for_the_orchestrator_is_cut_by_its_rule(standin, aiohttp_client):
    adapters = [f"adapter-number-{index:03d}" for index in range(100)]
    pipeline = GatedPipeline(described={"model": "org/model", "adapters": adapters, "max_model_len": 8192,
                                        "apis": ["livepeer", "openai"], "dtype": "float32"})
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    assert first.answered == 200
    metadata = first.body["metadata"]
    assert len(metadata.encode()) <= 1024
    document = json.loads(metadata)
    kept = document["adapters"]
    assert 0 < len(kept) < 100 and kept == adapters[:len(kept)], "adapters are cut from the end"
    assert document["adapters_total"] == 100, "the cut says how many there are"
    assert document["max_model_len"] == 8192 and document["runner"] == __version__, "the rest is kept whole"


def test_fit_metadata_drops_list_items_from_the_end_then_keys_from_the_last():
    document = {"model": "m" * 20, "adapters": ["a" * 10, "b" * 10], "apis": ["x", "y"], "gpu": "g" * 30}
    whole = fit_metadata(document)
    assert json.loads(whole) == document and ": " not in whole
    model_alone = len(json.dumps({"model": "m" * 20}, separators=(",", ":")))
    seen = []
    for limit in range(len(whole), 0, -1):
        fitted = fit_metadata(document, limit=limit)
        if limit < model_alone:
            assert fitted is None, "no metadata rather than a cut model id"
            continue
        assert fitted is not None and len(fitted.encode()) <= limit
        got = json.loads(fitted)
        keys = [key for key in got if not key.endswith("_total")]
        assert keys == list(document)[:len(keys)], "whole keys go from the last"
        lists = [key for key in keys if isinstance(document[key], list)]
        for key in lists:
            assert got[key] == document[key][:len(got[key])], "list items go from the end"
            assert (got[key] != document[key]) == (f"{key}_total" in got), "a cut list says how long it was"
        if len(lists) == 2 and any(f"{key}_total" in got for key in lists):
            adapters, apis = (len(got[key]) for key in lists)
            assert adapters in (apis, apis + 1) or (apis == 2 and adapters < 2), "the longest list is cut first"
        if len(keys) < len(document):
            assert all(got[key] == [] for key in lists), "keys go only once every list is empty"
        seen.append(got)
    assert seen[-1] == {"model": "m" * 20}
    served = {"model": "org/model", "adapters": [f"adapter-{index:03d}" for index in range(100)],
              "max_model_len": 8192, "apis": ["livepeer", "openai"], "gpu": "NVIDIA H100", "runner": "0.3.1"}
    got = json.loads(fit_metadata(served))
    assert {key: value for key, value in got.items() if key not in ("adapters", "adapters_total")} == {
        key: value for key, value in served.items() if key != "adapters"}, "only the long list is cut"
    assert got["adapters"] == served["adapters"][:len(got["adapters"])] and got["adapters_total"] == 100
    assert len(fit_metadata(served).encode()) <= 1024
    assert fit_metadata({"model": "é" * 600}) is None, "bytes of UTF-8 are counted, not characters"


def test_every_field_go_livepeer_checks_is_checked_before_sending():
    good = {"runner_url": RUNNER_URL, "app": "llm/x", "capacity": 2, "mode": "single-shot", "status": "ready",
            "metadata": "{}", "proxy": True, "price_info": {"price": 0.5, "currency": "usd", "unit": "fixed"}}
    assert heartbeat_problems(good) == []
    for change, problem in [
        ({"runner_url": "runner:8000"}, "invalid runner_url"),
        ({"app": " llm"}, "app must be trimmed"),
        ({"status": "Ready"}, "status must be lowercase and trimmed"),
        ({"mode": "batch"}, 'mode must be "persistent" or "single-shot"'),
        ({"capacity": -1}, "capacity must be >= 0"),
        ({"metadata": "x" * 1025}, "metadata must be at most 1024 bytes"),
        ({"metadata": "\udce9"}, "metadata must be valid UTF-8"),
        ({"proxy": "yes"}, "proxy must be a bool"),
        ({"price_info": {"price": 0, "currency": "usd", "unit": "hour"}}, "price_info.price must be a positive"),
        ({"price_info": {"price": 1, "currency": "eur", "unit": "hour"}}, "price_info.currency must be usd"),
        ({"price_info": {"price": 1, "currency": "usd", "unit": "token"}}, "price_info.unit must be hour, 720p"),
    ]:
        [said] = heartbeat_problems({**good, **change})
        assert said.startswith(problem), (change, said)


async def test_a_heartbeat_go_livepeer_would_refuse_is_not_sent(standin, logs, aiohttp_client):
    pipeline = GatedPipeline(capacity=-3)  # a pipeline's own mistake: master's 400 "capacity must be >= 0"
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    await wait_for(lambda: client.app[LIVE_RUNNER].record.outcomes, 2.0)
    assert standin.heartbeats == []
    [said, *_] = events(logs, "live_runner.not_sent")
    assert said["problems"] == ["capacity must be >= 0"]
    assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="rejected"} 1.0' in await metrics_text(client)


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
    # From the first heartbeat's arrival on: the registration's own arrival includes the connection's setup.
    gaps = [later.at - earlier.at for earlier, later in zip(beats[1:], beats[2:])]
    assert all(0.08 <= gap <= 0.5 for gap in gaps), f"heartbeat_interval is 100ms: {gaps}"


async def test_an_interval_longer_than_the_ttl_allows_is_clamped(standin, logs, aiohttp_client):
    standin.heartbeat_interval, standin.heartbeat_ttl = 1000 * 3600, 0.4  # "1000h0m0s" and "400ms"
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, standin.url))
    [registration] = await standin.until(standin.registrations, 1.0, "a registration")
    beats = await standin.until(lambda: len(standin.accepted()) >= 4 and standin.accepted(), 2.0, "3 heartbeats")
    gaps = [later.at - earlier.at for earlier, later in zip(beats, beats[1:])]
    assert all(gap < 0.35 for gap in gaps), f"at most half the TTL (0.2 s) apart: {gaps}"
    assert all(beat.answered == 200 for beat in standin.heartbeats), "never expired"
    [clamped] = events(logs, "live_runner.interval_clamped")
    assert clamped["heartbeat_interval"] == "1000h0m0s" and clamped["using_s"] == 0.2


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


# What go-livepeer master answers a runner it no longer knows


async def test_an_expired_runner_not_yet_removed_gets_404_and_registers_again_at_once(standin, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    standin.expire(first.runner_id)
    registrations = await standin.until(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                        2.0, "a second registration")
    [forgotten] = [beat for beat in standin.heartbeats if beat.answered == 404]
    assert forgotten.body["runner_id"] == first.runner_id and forgotten.message == "runner not found"
    second = registrations[1]
    assert second.at - forgotten.at < 0.1, "no backoff after a 404: it registers again at once"
    assert second.authorization == SECRET and "runner_id" not in second.body, "registered anew, with the secret"
    assert second.runner_id != first.runner_id
    assert [entry["status"] for entry in events(logs, "live_runner.forgotten")] == [404]
    runner = standin.runners[second.runner_id]
    await standin.until(lambda: len(standin.accepted(second.runner_id)) >= 3, 2.0, "heartbeats of the new one")
    assert all(beat.authorization == runner.heartbeat_secret for beat in standin.accepted(second.runner_id)[1:])


async def test_a_removed_runner_gets_401_and_registers_again_after_its_first_backoff(standin, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    standin.forget(first.runner_id)  # go-livepeer's expiry loop, 5 s after the TTL
    registrations = await standin.until(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                        2.0, "a second registration")
    [refused] = [beat for beat in standin.heartbeats if beat.answered == 401]
    assert refused.body["runner_id"] == first.runner_id
    assert refused.authorization == standin.runners.get(first.runner_id, first).authorization or True
    assert refused.message == "invalid registration authorization", "master: a new registration to it"
    second = registrations[1]
    waited = second.at - refused.at
    assert 0.025 <= waited < 0.1, f"after the first backoff (0.025-0.05 s here): {waited:.3f} s"
    assert second.authorization == SECRET and "runner_id" not in second.body and second.runner_id != first.runner_id
    [forgotten] = events(logs, "live_runner.forgotten")
    assert forgotten["status"] == 401 and forgotten["message"] == "invalid registration authorization"
    await standin.until(lambda: len(standin.accepted(second.runner_id)) >= 2, 2.0, "heartbeats of the new one")
    assert 'livepeer_runner_live_registration{state="registered"} 1.0' in await metrics_text(client)


async def test_the_stand_in_removes_a_silent_runner_5_s_after_its_ttl(standin, aiohttp_client):
    """The stand-in's own expiry, as master's: 404 past the TTL, 401 once removed (shortened: 0.3 s and 0.3 s)."""
    standin.heartbeat_ttl, standin.removal_delay = 0.3, 0.3
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    registration = client.app[LIVE_RUNNER]
    registration.task.cancel()  # the runner falls silent (a pause, a partition)
    identity = registration.identity
    body = {**registration.body("ready"), "runner_id": identity.runner_id}
    await asyncio.sleep(0.4)
    async with aiohttp.ClientSession() as http:
        async def beat() -> tuple[int, str]:
            async with http.post(f"{standin.url}/runners/heartbeat", json=body,
                                 headers={"Authorization": identity.secret}) as answer:
                return answer.status, (await answer.text()).strip()

        assert await beat() == (404, "runner not found"), "past the TTL, not yet removed"
        await asyncio.sleep(0.3)
        assert await beat() == (401, "invalid registration authorization"), "removed: a new registration to it"
    assert first.runner_id not in standin.runners


async def test_a_restart_of_the_orchestrator_between_two_heartbeats(standin, logs, aiohttp_client):
    """The orchestrator restarts: the runner is routable again within one heartbeat interval plus its first backoff."""
    standin.heartbeat_interval = 0.5
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await served_live_runner(aiohttp_client, pipeline, standin.url)
    registration = client.app[LIVE_RUNNER]
    registration.backoff = Backoff(first=0.2, most=1.0)
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    beat = (await standin.until(lambda: standin.accepted()[1:], 1.0, "a heartbeat"))[-1]
    await asyncio.sleep(max(0.0, beat.at + 0.1 - time.monotonic()))
    await standin.reboot()  # 0.1 s after a heartbeat: the next is due 0.4 s later
    restarted_at = standin.restarts[-1]
    registrations = await standin.until(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                        3.0, "a registration after the restart")
    again = registrations[1]
    routable_in = again.at - restarted_at
    [refused] = [beat for beat in standin.heartbeats if beat.answered == 401]
    assert refused.at > restarted_at and refused.message == "invalid registration authorization"
    assert routable_in <= 0.5 + 0.2 + 0.1, f"routable again {routable_in:.2f} s after the restart"
    assert again.runner_id in standin.runners and standin.runners[again.runner_id].request["status"] == "ready"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{standin.url}/apps/{again.runner_id}/app/ready") as response:
            assert response.status == 200, "routable: the orchestrator's proxy reaches it"
    print(f"orchestrator restart: routable again {routable_in:.3f} s after it (heartbeat_interval 0.5 s, "
          f"first backoff 0.1-0.2 s; 401 at +{refused.at - restarted_at:.3f} s)")


async def test_a_wrong_secret_is_logged_and_retried_with_backoff(standin, logs, aiohttp_client):
    standin.registration_secret = "the orchestrator's secret, which is not the runner's"
    pipeline = GatedPipeline()
    pipeline.loaded.set()
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
    said = events(logs, "live_runner.refused")
    assert said and said[0]["status"] == 401 and said[0]["message"] == "invalid registration authorization"
    assert said[0]["hint"] == "LIVE_RUNNER_SECRET differs from the orchestrator's"


async def test_a_heartbeat_secret_the_orchestrator_does_not_accept_is_dropped_for_a_new_registration(
        standin, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    standin.runners[first.runner_id].heartbeat_secret = "rotated-by-the-orchestrator"  # the runner's is wrong now
    registrations = await standin.until(lambda: len(standin.registrations()) == 2 and standin.registrations(),
                                        2.0, "a second registration")
    [refused] = [beat for beat in standin.heartbeats if beat.answered == 401]
    assert refused.message == "invalid heartbeat authorization" and refused.body["runner_id"] == first.runner_id
    assert registrations[1].authorization == SECRET and "runner_id" not in registrations[1].body
    [forgotten] = events(logs, "live_runner.forgotten")
    assert forgotten["message"] == "invalid heartbeat authorization"


async def test_a_body_the_orchestrator_refuses_is_logged_and_retried(onchain, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, onchain.url))  # no price: on-chain says 400
    await onchain.until(lambda: len(onchain.heartbeats) >= 3, 5.0, "3 attempts")
    assert {beat.answered for beat in onchain.heartbeats} == {400}
    said = events(logs, "live_runner.refused")
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


async def test_leaving_unregisters_with_the_heartbeat_secret_and_stops_heartbeats(standin, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    secret = standin.runners[first.runner_id].heartbeat_secret
    await standin.until(lambda: len(standin.accepted()) >= 3, 1.0, "heartbeats")
    await leave_network(client.app)
    [left] = standin.unregisters
    assert (left.runner_id, left.authorization, left.answered) == (first.runner_id, secret, 204)
    assert first.runner_id not in standin.runners
    assert events(logs, "live_runner.unregistered")
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


async def test_an_unregister_that_is_not_answered_is_given_up_within_its_bound(standin, logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    await standin.until(standin.registrations, 1.0, "a registration")
    standin.silent = True
    started = time.monotonic()
    await client.app[LIVE_RUNNER].leave(timeout=0.3)
    assert time.monotonic() - started < 0.6
    assert [left.answered for left in standin.unregisters] == [0], "it was sent, and never answered"
    assert events(logs, "live_runner.unregister_failed")


# The client: no redirect, bounded answers, no secret in the log, plain http to a stranger


async def test_a_redirect_is_not_followed(standin, logs, standins, aiohttp_client):
    elsewhere = await made_standin(standins)  # where the redirect points: it must never see the secret
    try:
        standin.redirect_to = f"{elsewhere.url}/runners/heartbeat"
        pipeline = GatedPipeline()
        pipeline.loaded.set()
        client = await aiohttp_client(live_app(pipeline, standin.url))
        await standin.until(lambda: len(standin.heartbeats) >= 2, 2.0, "2 attempts")
        assert elsewhere.heartbeats == [], "the secret went nowhere else"
        [said, *_] = events(logs, "live_runner.refused")
        assert said["status"] == 307 and said["redirect_to"] == standin.redirect_to
        assert 'livepeer_runner_live_heartbeat_last_outcome{outcome="rejected"} 1.0' in await metrics_text(client)
    finally:
        await elsewhere.close()


async def test_a_long_valid_answer_is_read_whole_and_an_oversized_one_not_at_all(standin, logs, aiohttp_client):
    # A first answer as master writes it can be long: its o2r channel and the sessions it still holds.
    standin.answer_extra = {"o2r": {"name": "o2r", "channel_name": "c" * 300, "url": f"{standin.url}/ai/trickle/x",
                                    "mime_type": "application/json"},
                            "session_ids": [f"session_{index:04d}" for index in range(200)]}
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    [first] = await standin.until(standin.registrations, 1.0, "a registration")
    await standin.until(lambda: len(standin.accepted()) >= 3, 1.0, "heartbeats")
    assert client.app[LIVE_RUNNER].identity.runner_id == first.runner_id, "a 3 KB answer parsed"
    await client.close()

    standin.answer_extra = {"padding": "p" * (MAX_ANSWER_BYTES + 1)}
    other = GatedPipeline()
    other.loaded.set()
    oversized = await aiohttp_client(live_app(other, standin.url))
    await standin.until(lambda: len(standin.registrations()) >= 3, 2.0, "attempts")
    registration = oversized.app[LIVE_RUNNER]
    assert registration.identity is None, "an answer over the cap is not go-livepeer's: not taken"
    failed = [entry for entry in events(logs, "live_runner.orchestrator_failed") if "over" in entry.get("reason", "")]
    assert failed and "padding" not in json.dumps(failed)


async def test_an_odd_answer_is_logged_without_its_body(standin, logs, aiohttp_client):
    standin.odd_answer = json.dumps({"heartbeat_secret": "a-secret-in-an-odd-answer", "id": "no runner_id here"})
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    await standin.until(lambda: len(standin.heartbeats) >= 2, 2.0, "2 attempts")
    assert client.app[LIVE_RUNNER].identity is None
    [said, *_] = events(logs, "live_runner.orchestrator_failed")
    assert said["reason"] == "not go-livepeer's answer: no runner_id or heartbeat_secret"
    assert "a-secret-in-an-odd-answer" not in json.dumps(logs)


async def test_an_error_answer_that_echoes_a_secret_is_logged_masked(standin, logs, aiohttp_client):
    standin.registration_secret = ""  # registration disabled: 404 with go-livepeer's reason
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(live_app(pipeline, standin.url))
    await standin.until(lambda: standin.heartbeats, 1.0, "an attempt")
    registration = client.app[LIVE_RUNNER]
    masked = registration.mask(f"bad authorization {SECRET} from you")
    assert masked == "bad authorization [secret] from you"


@pytest.mark.parametrize(("orchestrator", "warned"), [
    ("http://orchestrator.example:8935", True),
    ("http://10.0.0.7:8935", True),
    ("http://127.0.0.1:8935", False),
    ("http://localhost:8935", False),
    ("http://[::1]:8935", False),
    ("https://orchestrator.example:8935", False),
])
async def test_plain_http_to_a_host_that_is_not_loopback_is_warned_at_start(logs, aiohttp_client, orchestrator,
                                                                            warned):
    pipeline = GatedPipeline()
    await aiohttp_client(live_app(pipeline, orchestrator))
    said = events(logs, "live_runner.plain_http")
    assert bool(said) is warned
    if warned:
        assert said[0]["orchestrator"] == orchestrator and "unencrypted" in said[0]["risk"]


async def test_credentials_in_the_orchestrator_url_are_not_logged(logs, aiohttp_client):
    await aiohttp_client(live_app(GatedPipeline(), "https://user:hunter2@orchestrator.example:8935"))
    [on] = events(logs, "live_runner.on")
    assert on["orchestrator"] == "https://orchestrator.example:8935"
    assert "hunter2" not in json.dumps(logs)


# Through the orchestrator's proxy: what the orchestrator answers itself, and payments


async def fixed_price_runner(aiohttp_client, onchain, pipeline):
    """A loaded pipeline served by a runner that sells calls at a fixed price, and its first registration."""
    pipeline.loaded.set()
    client = await served_live_runner(aiohttp_client, pipeline, onchain.url, LIVE_RUNNER_PRICE_USD="0.002",
                                      LIVE_RUNNER_PRICE_UNIT="fixed")
    [first] = await onchain.until(onchain.registrations, 1.0, "a registration")
    return pipeline, client, first


async def test_calls_through_the_proxy_carry_the_session_and_the_payment_which_are_never_logged(
        onchain, logs, aiohttp_client):
    pipeline, client, first = await fixed_price_runner(aiohttp_client, onchain, GatedPipeline())
    app_url = f"{onchain.url}/apps/{first.runner_id}/app"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{app_url}/llm", json=QUESTION, headers={"Livepeer-Payment": PAYMENT}) as response:
            assert response.status == 200
    [call] = onchain.proxied
    assert call.payment == PAYMENT and call.answered == 200
    [done] = events(logs, "request.done")
    assert done["status"] == 200
    assert client.app[STATE].in_flight == 0


async def test_a_call_without_payment_gets_the_402_challenge_and_never_reaches_the_runner(onchain, aiohttp_client):
    pipeline, client, first = await fixed_price_runner(aiohttp_client, onchain, GatedPipeline())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{onchain.url}/apps/{first.runner_id}/app/llm", json=QUESTION) as response:
            assert response.status == 402
            challenge = await response.json()
    assert set(challenge) == {"payment_params", "orchestrator", "manifest_id", "payment_url"}
    assert pipeline.calls == 0 and onchain.proxied == [], "the runner never saw it"
    await onchain.until(lambda: len(onchain.accepted(first.runner_id)) >= 3, 1.0, "heartbeats go on")
    assert await ready_status(client) == (200, "IDLE")


async def test_a_price_the_orchestrator_cannot_convert_is_503_and_never_reaches_the_runner(onchain, aiohttp_client):
    pipeline, client, first = await fixed_price_runner(aiohttp_client, onchain, GatedPipeline())
    onchain.wei_per_usd = None  # its price feed is down
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{onchain.url}/apps/{first.runner_id}/app/llm", json=QUESTION,
                             headers={"Livepeer-Payment": PAYMENT}) as response:
            assert (response.status, (await response.text()).strip()) == (503, "live runner price unavailable")
        onchain.wei_per_usd = 1  # a price under 1 wei: 0.002 USD at 1 wei per USD
        async with http.post(f"{onchain.url}/apps/{first.runner_id}/app/llm", json=QUESTION,
                             headers={"Livepeer-Payment": PAYMENT}) as response:
            assert response.status == 503
    assert pipeline.calls == 0 and onchain.proxied == []
    assert client.app[LIVE_RUNNER].identity.runner_id == first.runner_id, "still registered"
    assert await ready_status(client) == (200, "IDLE")


async def test_the_same_payment_twice_at_once_is_409_before_capacity_503(onchain, aiohttp_client):
    pipeline, _, first = await fixed_price_runner(aiohttp_client, onchain, GatedPipeline(capacity=1))
    url = f"{onchain.url}/apps/{first.runner_id}/app/llm"
    pipeline.gate.clear()
    async with aiohttp.ClientSession() as http:
        held = asyncio.create_task(http.post(url, json=QUESTION, headers={"Livepeer-Payment": PAYMENT}))
        await wait_for(lambda: pipeline.calls == 1)
        async with http.post(url, json=QUESTION, headers={"Livepeer-Payment": PAYMENT}) as response:
            assert (response.status, (await response.text()).strip()) == (409, "session already exists")
        async with http.post(url, json=QUESTION, headers={"Livepeer-Payment": PAYMENT + "-2"}) as response:
            assert (response.status, (await response.text()).strip()) == (503, "no capacity available for runner")
        assert pipeline.calls == 1, "neither reached the runner"
        pipeline.gate.set()
        assert (await held).status == 200
    assert [refusal.status for refusal in onchain.refused] == [409, 503]


async def test_a_call_the_orchestrator_cancels_mid_stream_frees_the_engine_at_once(onchain, logs, aiohttp_client):
    """A time-priced call whose payment fails: the orchestrator closes the connection, the generation stops."""
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await served_live_runner(aiohttp_client, pipeline, onchain.url, LIVE_RUNNER_PRICE_USD="3.6")
    [first] = await onchain.until(onchain.registrations, 1.0, "a registration")
    onchain.payment_runs_out_after = 0.3
    received = bytearray()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(f"{onchain.url}/apps/{first.runner_id}/app/llm", json=STREAMED,
                                 headers={"Livepeer-Payment": PAYMENT}) as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    received += chunk
    assert b"data: " in received and b"[DONE]" not in received, "cut mid-stream"
    await asyncio.wait_for(pipeline.stream_stopped.wait(), 0.5)
    assert pipeline.streaming == 0, "the generation is stopped"
    await wait_for(lambda: client.app[STATE].in_flight == 0, 0.5)
    [call] = await onchain.until(lambda: onchain.proxied, 1.0, "the call's end")
    assert call.cancelled and call.payment == PAYMENT
    stopped_in = pipeline.stopped_at - call.ended
    assert stopped_in < 0.1, f"the generation stopped {stopped_in:.3f} s after the orchestrator cut the connection"
    assert await ready_status(client) == (200, "IDLE")
    [done] = events(logs, "request.done")
    assert done["status"] == 499, "counted as a client that left"
    print(f"cancelled by the orchestrator: generation stopped {stopped_in * 1000:.1f} ms after the cut")


# Session headers


async def test_session_headers_name_the_session_in_the_request_log(logs, aiohttp_client):
    pipeline = GatedPipeline()
    pipeline.loaded.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline, live_runner=LiveRunnerSettings()))
    headers = {
        "Livepeer-Session-Id": "session_abc123",
        "Livepeer-Runner-Route": "runner_xyz",
        "Livepeer-Session-Token": "a-session-token-is-a-credential",
        "Livepeer-Session-Control": "http://orchestrator/runner/runner_xyz/session/session_abc123",
        "Livepeer-Payment": PAYMENT,
    }
    assert (await client.post("/llm", json=QUESTION, headers=headers)).status == 200
    assert (await client.post("/llm", json=QUESTION)).status == 200
    done = events(logs, "request.done")
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
