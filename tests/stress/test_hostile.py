"""The hostile campaign's classifier, over real HTTP on loopback, against a stand-in server (no engine).

A campaign that cannot see a failure proves nothing: a 500, an error in
text/plain, a body with a traceback or a Python exception's name, a 503
without Retry-After, a dropped connection and a hang must each count as
failed; a refusal in the API's own shape as refused; a 2xx as served.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from aiohttp import web

from stress.hostile import (
    AUTH_TOKEN,
    EITHER,
    FAILED,
    REFUSE,
    REFUSED,
    SERVE,
    SERVED,
    Campaign,
    Probe,
    Target,
    error_shape,
    passed,
    report,
    run_campaign,
)

OPENAI_400 = {"error": {"message": "stop: at most 4 items", "type": "invalid_request_error", "param": "stop",
                        "code": None}}


def openai_error(message: str, status: int = 400, **kwargs) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.json_response(body, status=status, **kwargs)


async def hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.json_response({})


async def reset(request: web.Request) -> web.Response:
    request.transport.abort()
    await asyncio.sleep(1)
    return web.json_response({})


STANDIN = {
    "/v1/served": lambda request: web.json_response({"object": "list", "data": []}),
    "/v1/refused": lambda request: web.json_response(OPENAI_400, status=400),
    "/v1/busy": lambda request: openai_error("the runner is at capacity", 503, headers={"Retry-After": "1"}),
    "/llm": lambda request: web.json_response({"detail": [{"loc": ["body"], "msg": "bad", "type": "x"}]}, status=422),
    "/v1/messages": lambda request: web.json_response(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}},
        status=400),
    "/v1/crash": lambda request: openai_error("generation failed", 500),
    "/v1/plain": lambda request: web.Response(text="400: Bad Request", status=400),
    "/v1/traceback": lambda request: openai_error('Traceback (most recent call last):\n  File "x.py", line 3'),
    "/v1/exception-name": lambda request: openai_error("generation failed: RecursionError"),
    "/v1/int-literal": lambda request: openai_error("invalid literal for int() with base 10: '--1'"),
    "/v1/busy-forever": lambda request: openai_error("at capacity", 503),
    "/v1/wrong-shape": lambda request: web.json_response({"error": "Unauthorized"}, status=401),
    "/v1/livepeer-shape": lambda request: web.json_response({"detail": {"msg": "no"}}, status=400),
    "/v1/hang": hang,
    "/v1/reset": reset,
}


@pytest.fixture
async def standin(aiohttp_server) -> Target:
    app = web.Application()
    for path, handler in STANDIN.items():
        async def handle(request, handler=handler):
            answer = handler(request)
            return await answer if asyncio.iscoroutine(answer) else answer
        app.router.add_post(path, handle)
    server = await aiohttp_server(app)
    return Target("standin", server.port, os.getpid())


async def outcome(target: Target, path: str, expect: str = EITHER, timeout: float = 5) -> tuple[str, str, Campaign]:
    campaign = Campaign(target)
    [call] = await campaign.send(Probe("unit", path, "POST", path, json.dumps({}).encode(), expect, timeout=timeout))
    return call.outcome, call.reason, campaign


@pytest.mark.parametrize("path", ["/v1/served"])
async def test_a_2xx_is_served(standin, path):
    assert (await outcome(standin, path))[0] == SERVED


@pytest.mark.parametrize("path", ["/v1/refused", "/v1/busy", "/llm", "/v1/messages"])
async def test_a_refusal_in_the_apis_own_shape_is_refused(standin, path):
    assert (await outcome(standin, path))[0] == REFUSED


@pytest.mark.parametrize("path, reason", [
    ("/v1/crash", "500"),
    ("/v1/plain", "not in openai's error shape"),
    ("/v1/traceback", "Python exception text"),
    ("/v1/exception-name", "Python exception text ('RecursionError')"),
    ("/v1/int-literal", "Python exception text"),
    ("/v1/busy-forever", "503 without Retry-After"),
    ("/v1/wrong-shape", "not in openai's error shape"),
    ("/v1/livepeer-shape", "not in openai's error shape"),
    ("/v1/reset", "connection broke"),
])
async def test_failures_are_failed(standin, path, reason):
    result, why, campaign = await outcome(standin, path)
    assert result == FAILED and reason in why
    assert not passed(campaign)


async def test_a_hang_is_failed_within_its_timeout(standin):
    started = asyncio.get_running_loop().time()
    result, why, campaign = await outcome(standin, "/v1/hang", timeout=1)
    assert result == FAILED and why == "no answer within 1 s"
    assert asyncio.get_running_loop().time() - started < 3
    assert not passed(campaign)


async def test_a_call_served_where_it_should_be_refused_fails_the_campaign(standin):
    *_, campaign = await outcome(standin, "/v1/served", expect=REFUSE)
    assert campaign.calls[0].unexpected and not passed(campaign)
    *_, campaign = await outcome(standin, "/v1/refused", expect=SERVE)
    assert campaign.calls[0].unexpected and not passed(campaign)
    *_, campaign = await outcome(standin, "/v1/refused", expect=REFUSE)
    assert passed(campaign)


def refusing_server(status: int) -> web.Application:
    """A stand-in server that answers every call of the campaign with ``status`` in the API's error shape."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        token = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if request.path == "/v1/models" and request.method == "GET" and token == f"Bearer {AUTH_TOKEN}".encode():
            return web.json_response({"object": "list", "data": [{"id": "standin-model"}]})
        if request.path == "/metrics":
            return web.Response(text="livepeer_runner_requests_in_flight 0\n")
        if request.path == "/ready":
            return web.json_response({"status": "IDLE"})
        shape = error_shape(request.path)
        if shape == "anthropic":
            body = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
        elif shape == "openai":
            body = {"error": {"message": "no", "type": "invalid_request_error", "param": None, "code": None}}
        else:
            body = {"detail": {"msg": "no"}}
        return web.json_response(body, status=status)

    app = web.Application(client_max_size=2**21)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_the_whole_campaign_runs_against_a_standin_and_sees_its_500s(aiohttp_server, tmp_path):
    """Every phase runs and reports; a server that refuses everything fails the calls that must be served,
    one that answers 500 fails them all."""
    for status, failed in ((400, False), (500, True)):
        server = await aiohttp_server(refusing_server(status))
        target = Target("standin", server.port, os.getpid(), store=tmp_path,
                        adapters={"inside": tmp_path, "outside": tmp_path})
        campaign = await run_campaign(target, ["secret"], log=lambda line: None)
        text = report(campaign)
        assert not passed(campaign) and "RSS growth" in text and "readiness within" in text
        unexpected = {call.probe.kind for call in campaign.calls if call.unexpected}
        assert unexpected == ({"X-Request-ID not ASCII", "X-Request-ID 4,000 characters",
                               "metadata at OpenAI's bounds (16 x 64 x 512)", "2 prompts x n 2 to an idle server",
                               "response_format schema: 1 property"}
                              if not failed else set())
        others = [call for call in campaign.calls if (call.probe.method, call.probe.path) != ("GET", "/v1/models")]
        assert all(call.outcome == FAILED for call in others) == failed
        await server.close()
