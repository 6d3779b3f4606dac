"""The route layer on its own, with a scripted pipeline behind it.

What the engine does is tested against a real vLLM engine in tests/pipelines;
here are the HTTP rules that hold for any pipeline: binding to the spec, body
validation, error shapes, auth, SSE framing and health states.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping

import pytest
import structlog
import structlog.testing
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from pipelines.llm import schema as llm_schema
from pipelines.llm.schema import LLMChoice, LLMMessage, LLMRequest, LLMResponse, LLMTokenUsage
from runner.app import create_app
from runner.keys import METRICS, STATE
from runner.pipeline import EngineLoad, EventStream, OperationError, Serve
from runner.routes import RouteBindingError, bind_operations
from runner.schema import OPERATIONS as RUNNER_OPERATIONS
from runner.schema import APIErrorMessage
from runner.settings import RunnerSettings
from tests.support.http import raw_request
from tests.support.stub_pipeline import StubPipeline

GEN_LLM = tuple(op for op in llm_schema.OPERATIONS if op.operation_id == "genLLM")  # /llm alone

# The scripted pipeline serves the llm pipeline's part of the spec.
OPERATIONS = RUNNER_OPERATIONS + GEN_LLM


def reply(content: str, finish_reason: str = "", streamed: bool = False) -> LLMResponse:
    message = LLMMessage(role="assistant", content=content)
    choice = (
        LLMChoice(index=0, delta=message, finish_reason=finish_reason)
        if streamed
        else LLMChoice(index=0, message=message, finish_reason=finish_reason)
    )
    usage = LLMTokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    return LLMResponse(id="chatcmpl-x", model="scripted", created=0, usage=usage, choices=[choice])


def as_event(response: LLMResponse) -> bytes:
    return response.model_dump_json(exclude_none=True).encode()


class ScriptedPipeline(StubPipeline):
    """Answers from a script; `gate` holds a request open until the test releases it."""

    name = "scripted"
    OPERATIONS = GEN_LLM

    def __init__(
        self, load_error: Exception | None = None, fail_after: int | None = None, capacity: int | None = None
    ) -> None:
        super().__init__("scripted")
        self.load_error = load_error
        self.fail_after = fail_after
        self.capacity = capacity
        self.cancelled = 0
        self.release_load = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen: list[LLMRequest] = []
        self.closed = False

    def operations(self) -> Mapping[str, Serve]:
        return {"genLLM": self.generate}

    async def load(self) -> None:
        await self.release_load.wait()
        if self.load_error:
            raise self.load_error

    def max_in_flight(self) -> int | None:
        return self.capacity

    def engine_load(self) -> EngineLoad:
        return EngineLoad(unfinished=0, submitted=len(self.seen), batch_size=1)

    async def close(self) -> None:
        self.closed = True

    async def generate(self, request: LLMRequest, context):
        self.seen.append(request)
        if request.messages and request.messages[0].content == "reject":
            raise OperationError("rejected by the script")
        if not request.stream:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            context.prompt_tokens = 1
            context.count_tokens(1)
            context.finish_reason = "stop"
            return reply("whole answer", "stop")
        return EventStream(events=self.events(context), error_event=self.error_event)

    @staticmethod
    def error_event(reason: str) -> bytes:
        return as_event(reply("", "error", streamed=True).model_copy(update={"error": APIErrorMessage(msg=reason)}))

    async def events(self, context):
        try:
            for index, word in enumerate(["one ", "two ", "three"]):
                if self.fail_after is not None and index == self.fail_after:
                    raise RuntimeError("scripted failure")
                await self.gate.wait()
                context.count_tokens(1)
                yield as_event(reply(word, streamed=True))
            context.finish_reason = "stop"
            yield as_event(reply("", "stop", streamed=True))
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise


VALID = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture
def pipeline() -> ScriptedPipeline:
    scripted = ScriptedPipeline()
    scripted.release_load.set()
    return scripted


@pytest.fixture
async def client(aiohttp_client, pipeline):
    return await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))


async def wait_for_health(client, status: str) -> None:
    for _ in range(100):
        if (await (await client.get("/health")).json())["status"] == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"/health never said {status}")


def test_every_spec_operation_needs_a_handler():
    handlers = {op.operation_id: None for op in OPERATIONS}
    del handlers["genLLM"]
    with pytest.raises(RouteBindingError, match="genLLM"):
        bind_operations(web.Application(), handlers, operations=OPERATIONS)


def test_a_handler_without_an_operation_is_refused():
    handlers = {op.operation_id: None for op in OPERATIONS} | {"genImage": None}
    with pytest.raises(RouteBindingError, match="genImage"):
        bind_operations(web.Application(), handlers, operations=OPERATIONS)


def test_two_operations_on_one_route_are_refused():
    twice = OPERATIONS + (GEN_LLM[0].__class__(
        operation_id="genLLM2", method="POST", path="/llm", request_model=None, authenticated=True),)
    handlers = {op.operation_id: None for op in twice}
    with pytest.raises(RouteBindingError, match="/llm"):
        bind_operations(web.Application(), handlers, operations=twice)


def test_a_pipeline_that_serves_other_operations_than_it_declares_is_refused():
    class Undeclared(ScriptedPipeline):
        def operations(self):
            return {"genLLM": self.generate, "genImage": self.generate}

    with pytest.raises(RouteBindingError, match="genImage"):
        create_app(RunnerSettings(), pipeline=Undeclared())


async def test_routes_are_exactly_the_spec(client):
    routes = {(r.method, r.resource.canonical) for r in client.app.router.routes()}
    assert routes == {(op.method, op.path) for op in OPERATIONS}


async def test_plain_request_is_served(client, pipeline):
    response = await client.post("/llm", json=VALID)
    assert response.status == 200
    body = await response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "whole answer"}
    assert "delta" not in body["choices"][0]
    assert pipeline.seen[0].max_tokens == 8


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "messages"]),
        ({"messages": "hi"}, ["body", "messages"]),
        ({"messages": [{"role": "user"}]}, ["body", "messages", 0, "content"]),
        ({"messages": [{"content": "hi"}]}, ["body", "messages", 0, "role"]),
        ({**VALID, "temperature": "hot"}, ["body", "temperature"]),
        ({**VALID, "temperature": -0.1}, ["body", "temperature"]),
        ({**VALID, "top_p": 0}, ["body", "top_p"]),
        ({**VALID, "top_p": 1.01}, ["body", "top_p"]),
        ({**VALID, "max_tokens": 0}, ["body", "max_tokens"]),
        ({**VALID, "max_tokens": 2.5}, ["body", "max_tokens"]),
        ({**VALID, "top_k": -2}, ["body", "top_k"]),
        ({**VALID, "stream": "yes"}, ["body", "stream"]),
    ],
)
async def test_bad_bodies_are_422_at_the_field(client, pipeline, body, loc):
    response = await client.post("/llm", json=body)
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert loc in [error["loc"] for error in detail]
    assert all(error["msg"] and error["type"] for error in detail)
    assert pipeline.seen == []


@pytest.mark.parametrize("top_k", [-1, 0, 5])
async def test_top_k_off_values_and_positive_values_pass(client, top_k):
    assert (await client.post("/llm", json={**VALID, "top_k": top_k})).status == 200


async def test_body_that_is_not_json_is_422(client, pipeline):
    response = await client.post("/llm", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert (await response.json())["detail"][0]["loc"] == ["body"]
    response = await client.post("/llm", data=json.dumps(VALID), headers={"Content-Type": "text/plain"})
    assert response.status == 422
    assert (await response.json())["detail"][0]["type"] == "content_type"
    assert pipeline.seen == []


async def test_oversized_body_is_413_in_the_error_shape(aiohttp_client, pipeline):
    client = await aiohttp_client(create_app(RunnerSettings(MAX_REQUEST_BYTES=2048), pipeline=pipeline))
    big = {"messages": [{"role": "user", "content": "x" * 4096}]}
    response = await client.post("/llm", json=big)
    assert response.status == 413
    assert "msg" in (await response.json())["detail"]
    assert (await client.post("/llm", json=VALID)).status == 200


async def test_unknown_path_and_method_use_the_error_shape(client):
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json()) == {"detail": {"msg": "Not Found"}}
    response = await client.get("/llm")
    assert response.status == 405
    assert "POST" in response.headers["Allow"]


async def test_pipeline_rejection_is_a_400(client):
    response = await client.post("/llm", json={"messages": [{"role": "user", "content": "reject"}]})
    assert response.status == 400
    assert await response.json() == {"detail": {"msg": "rejected by the script"}}


async def test_stream_is_framed_as_the_contract_says(client):
    response = await client.post("/llm", json={**VALID, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = (await response.read()).decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    events = [json.loads(block.removeprefix("data: ")) for block in blocks[:-2]]
    assert all(block.startswith("data: ") for block in blocks[:-1])
    assert [len(event["choices"]) for event in events] == [1] * len(events)
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "one two three"
    assert events[-1]["choices"][0] == {"index": 0, "finish_reason": "stop", "delta": {"role": "assistant", "content": ""}}


async def test_failure_mid_stream_is_reported_in_band(aiohttp_client):
    pipeline = ScriptedPipeline(fail_after=1)
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    response = await client.post("/llm", json={**VALID, "stream": True})
    assert response.status == 200
    blocks = (await response.read()).decode().split("\n\n")
    assert blocks[-2] == "data: [DONE]"
    last = json.loads(blocks[-3].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["choices"][0]["delta"]["content"] == ""
    assert last["error"] == {"msg": "generation failed: scripted failure"}, "the reason reaches the client"
    assert (await client.post("/llm", json=VALID)).status == 200


async def test_health_follows_loading_idle_ok(aiohttp_client):
    pipeline = ScriptedPipeline()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    assert (await (await client.get("/health")).json()) == {"status": "LOADING"}
    pipeline.release_load.set()
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    pending = asyncio.create_task(client.post("/llm", json=VALID))
    await wait_for_health(client, "OK")
    pipeline.gate.set()
    assert (await pending).status == 200
    await wait_for_health(client, "IDLE")


async def test_request_during_load_waits_and_is_served(aiohttp_client):
    pipeline = ScriptedPipeline()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    pending = asyncio.create_task(client.post("/llm", json=VALID))
    await asyncio.sleep(0.05)
    assert not pending.done()
    pipeline.release_load.set()
    assert (await pending).status == 200


async def test_failed_load_is_error_and_503(aiohttp_client):
    pipeline = ScriptedPipeline(load_error=OSError("no such model"))
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    await wait_for_health(client, "ERROR")
    response = await client.post("/llm", json=VALID)
    assert response.status == 503
    assert "no such model" in (await response.json())["detail"]["msg"]


async def test_bearer_token_guards_llm_only(aiohttp_client, pipeline):
    client = await aiohttp_client(create_app(RunnerSettings(AUTH_TOKEN="s3cret"), pipeline=pipeline))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        response = await client.post("/llm", json=VALID, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "msg" in (await response.json())["detail"]
    assert (await client.post("/llm", json=VALID, headers={"Authorization": "Bearer s3cret"})).status == 200
    for path in ("/health", "/version", "/hardware/info", "/hardware/stats", "/metrics"):
        assert (await client.get(path)).status == 200


async def test_request_id_is_echoed(client):
    response = await client.post("/llm", json=VALID, headers={"X-Request-ID": "abc123"})
    assert response.headers["X-Request-ID"] == "abc123"
    assert (await client.get("/health")).headers["X-Request-ID"]


@pytest.mark.parametrize("token", [b"\xff", b"s3cret\xff", b"\xc3\xbf", b"\xed\xa0\x80"])
async def test_an_authorization_that_is_not_ascii_is_a_401_in_the_api_shape(aiohttp_client, pipeline, token):
    client = await aiohttp_client(create_app(RunnerSettings(AUTH_TOKEN="s3cret"), pipeline=pipeline))
    with structlog.testing.capture_logs() as logs:
        status, head, body = await raw_request(
            client.server.host, client.server.port, "POST", "/llm",
            {"Authorization": b"Bearer " + token, "Content-Type": b"application/json"}, json.dumps(VALID).encode())
    assert status == 401, body
    assert b"application/json" in head
    assert "msg" in json.loads(body)["detail"]
    assert not [entry for entry in logs if entry.get("exc_info")], "a client's mistake leaves no traceback"


@pytest.mark.parametrize("given", [b"caf\xc3\xa9", b"\xff\xfe", b"two words", b"a" * 129, b"tab\tid"])
async def test_a_request_id_that_is_not_printable_ascii_or_too_long_is_replaced_and_logged(client, given):
    with structlog.testing.capture_logs() as logs:
        status, head, body = await raw_request(
            client.server.host, client.server.port, "POST", "/llm",
            {"X-Request-ID": given, "Content-Type": b"application/json"}, json.dumps(VALID).encode())
    assert status == 200, body
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    replaced = headers[b"X-Request-ID"].decode()
    assert replaced != given.decode("latin-1") and re.fullmatch(r"[0-9a-f]{32}", replaced)
    assert [entry for entry in logs if entry["event"] == "request.id_replaced" and entry["request_id"] == replaced]


async def test_a_printable_request_id_of_128_characters_is_kept(client):
    given = "r" * 127 + "~"
    response = await client.post("/llm", json=VALID, headers={"X-Request-ID": given})
    assert response.headers["X-Request-ID"] == given


async def test_pipeline_is_closed_with_the_app(aiohttp_client, pipeline):
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    await client.close()
    assert pipeline.closed


async def test_beyond_capacity_is_503_at_once_and_accepted_ones_complete(aiohttp_client):
    pipeline = ScriptedPipeline(capacity=2)
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    accepted = [asyncio.create_task(client.post("/llm", json=VALID)) for _ in range(2)]
    while client.app[STATE].in_flight < 2:
        await asyncio.sleep(0.01)
    response = await client.post("/llm", json=VALID)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert "capacity" in (await response.json())["detail"]["msg"]
    pipeline.gate.set()
    assert [(await task).status for task in accepted] == [200, 200]
    assert (await client.post("/llm", json=VALID)).status == 200


async def test_request_timeout_stops_a_plain_request_with_a_500(aiohttp_client):
    pipeline = ScriptedPipeline()
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(REQUEST_TIMEOUT=0.2), pipeline=pipeline))
    pipeline.gate.clear()
    response = await client.post("/llm", json=VALID)
    assert response.status == 500
    assert "REQUEST_TIMEOUT" in (await response.json())["detail"]["msg"]
    assert pipeline.cancelled == 1, "the operation was cancelled, which aborts its generation"
    await wait_for_health(client, "IDLE")


async def test_request_timeout_ends_a_stream_in_band(aiohttp_client):
    pipeline = ScriptedPipeline()
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(REQUEST_TIMEOUT=0.2), pipeline=pipeline))
    pipeline.gate.clear()
    response = await client.post("/llm", json={**VALID, "stream": True})
    assert response.status == 200
    blocks = (await response.read()).decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    assert json.loads(blocks[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "error"
    assert pipeline.cancelled == 1


async def test_draining_refuses_new_requests_and_never_says_idle(client, pipeline):
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    in_flight = asyncio.create_task(client.post("/llm", json=VALID))
    await wait_for_health(client, "OK")
    state = client.app[STATE]
    drained = asyncio.create_task(state.drain(timeout=5))
    response = await client.post("/llm", json=VALID)
    assert response.status == 503 and response.headers["Retry-After"]
    assert "shutting down" in (await response.json())["detail"]["msg"]
    assert (await (await client.get("/health")).json())["status"] == "OK"
    pipeline.gate.set()
    assert (await in_flight).status == 200
    assert await drained == 0
    assert (await (await client.get("/health")).json())["status"] == "ERROR"


async def test_drain_gives_up_after_its_timeout(client, pipeline):
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    in_flight = asyncio.create_task(client.post("/llm", json=VALID))
    await wait_for_health(client, "OK")
    assert await client.app[STATE].drain(timeout=0.1) == 1
    pipeline.gate.set()
    await in_flight


async def test_every_request_is_counted_and_logged_once(client, pipeline):
    with structlog.testing.capture_logs() as logs:
        await client.post("/llm", json=VALID, headers={"X-Request-ID": "req-1"})
        await client.post("/llm", json={"messages": [{"role": "user", "content": "reject"}]})
        await client.post("/llm", json={**VALID, "stream": True})
    done = [entry for entry in logs if entry["event"] == "request.done"]
    assert [entry["status"] for entry in done] == [200, 400, 200]
    first = done[0]
    assert first["completion_tokens"] == 1 and first["prompt_tokens"] == 1 and first["finish_reason"] == "stop"
    assert first["ttft_s"] is not None and first["duration_s"] >= first["ttft_s"]
    text = await (await client.get("/metrics")).text()
    assert 'livepeer_runner_requests_total{code="200",model="scripted",operation="genLLM",outcome="ok"} 2.0' in text
    assert 'livepeer_runner_requests_total{code="400",model="scripted",operation="genLLM",outcome="rejected"} 1.0' in text
    assert "livepeer_runner_time_to_first_token_seconds_count 2.0" in text
    assert 'livepeer_runner_completion_tokens_total{model="scripted"} 4.0' in text


async def test_metrics_are_made_off_the_event_loop_and_read_the_same(aiohttp_client):
    """/metrics' text (the runner's series, then the engine's) is made on a worker thread: a scrape whose engine
    series take 0.8 s to collect holds no /ready behind it, and its body is prometheus_client's text of both."""

    class SlowSeries:
        def collect(self):
            time.sleep(0.8)  # CPU a large registry's text takes, held as the GIL lets a worker hold it
            yield GaugeMetricFamily("engine_slow_gauge", "Collected slowly", value=7)

    engine = CollectorRegistry()
    engine.register(SlowSeries())
    Counter("engine_steps", "Steps", registry=engine).inc(3)

    class WithEngineSeries(ScriptedPipeline):
        def metrics_registry(self):
            return engine

    pipeline = WithEngineSeries()
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    await wait_for_health(client, "IDLE")
    loop = asyncio.get_running_loop()
    scrape = asyncio.create_task(client.get("/metrics"))
    await asyncio.sleep(0.1)  # the scrape is collecting
    started = loop.time()
    ready = await client.get("/ready")
    waited = loop.time() - started
    assert ready.status == 200 and not scrape.done()
    assert waited < 0.4, f"/ready waited {waited:.2f} s behind a /metrics scrape"
    body = await (await scrape).read()
    assert body == generate_latest(client.app[METRICS].registry) + generate_latest(engine)
    assert b"engine_slow_gauge 7.0" in body and b"engine_steps_total 3.0" in body
    assert b"livepeer_runner_requests_in_flight 0.0" in body


async def test_client_that_leaves_cancels_the_operation(client, pipeline):
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    pending = asyncio.create_task(client.post("/llm", json=VALID))
    await wait_for_health(client, "OK")
    pending.cancel()
    await wait_for_health(client, "IDLE")
    assert pipeline.cancelled == 1


async def test_named_events_are_framed_with_their_name_and_end_without_done(aiohttp_client):
    """Anthropic's framing: `event: <name>` before each data line, and no `data: [DONE]` after the last event."""

    class Named(ScriptedPipeline):
        async def generate(self, request: LLMRequest, context):
            async def events():
                yield b"first", b'{"n":1}'
                if request.messages[0].content == "fail":
                    raise RuntimeError("scripted failure")
                yield b"last", b'{"n":2}'

            return EventStream(events=events(), error_event=lambda reason: (b"error", json.dumps(reason).encode()),
                               named=True)

    pipeline = Named()
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    response = await client.post("/llm", json={**VALID, "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert await response.read() == b'event: first\ndata: {"n":1}\n\nevent: last\ndata: {"n":2}\n\n'
    failing = {**VALID, "messages": [{"role": "user", "content": "fail"}], "stream": True}
    response = await client.post("/llm", json=failing)
    assert await response.read() == (b'event: first\ndata: {"n":1}\n\n'
                                      b'event: error\ndata: "generation failed: scripted failure"\n\n')


def test_the_error_shape_of_a_path_is_that_of_the_operations_it_shares_most_with():
    from runner.operations import Operation
    from runner.routes import ERROR_SHAPES, error_shape_for

    operations = [Operation(f"op{index}", "POST", path, None, True, shape) for index, (path, shape) in enumerate([
        ("/llm", "livepeer"), ("/v1/messages", "anthropic"), ("/v1/messages/count_tokens", "anthropic"),
        ("/v1/chat/completions", "openai"), ("/v1/completions", "openai"), ("/v1/models/{model}", "openai")])]
    for path, shape in (("/v1/messages", "anthropic"), ("/v1/messages/batches", "anthropic"),
                        ("/v1/messages/count_tokens/x", "anthropic"), ("/v1/models/org/name", "openai"),
                        ("/v1/embeddings", "openai"), ("/v1", "openai"), ("/llm/x", "livepeer"), ("/nope", "livepeer"),
                        ("/", "livepeer")):
        assert error_shape_for(path, operations) is ERROR_SHAPES[shape], path
