"""A stand-in for a go-livepeer orchestrator's Live Runner side, on loopback.

It follows livepeer/go-livepeer master at commit 176aa415c (2026-08-18, with
#3938 merged as 5c8d3df27, then #3999, #4000 and #4008): ``ai/runner/live_runner.go``
(``LiveRunnerRegistry.Heartbeat``, ``normalizeHeartbeat``,
``normalizeLiveRunnerPriceInfo``, ``Unregister``, ``ReserveSession``,
``PaymentInfo``, the expiry loop) and ``server/ai_http.go`` (the handlers and
``ProxyLiveRunnerSingleShot``/``proxyLiveRunner``):

- ``POST /runners/heartbeat``: the body is a LiveRunnerHeartbeatRequest. It is
  checked first (400, ``text/plain`` with Go's message): a runner_url that is not
  http(s) with a host, an app that is empty or not trimmed, a status that is not
  lowercase and trimmed, a mode other than persistent/single-shot, a negative
  capacity, ``metadata`` that is not valid UTF-8 or over 1,024 bytes, a
  ``proxy`` that is not a bool, and on an on-chain orchestrator a missing or
  non-positive ``price_info.price``, a currency other than usd, a unit other
  than hour/720p/fixed. A runner it does not know (no ``runner_id``, one it
  never saw, or one it removed: 5 s after its TTL ran out, or in a restart)
  registers with the registration secret as the raw ``Authorization`` (401
  "invalid registration authorization" otherwise, which is what a removed
  runner's heartbeat secret gets; 404 when it has none: registration disabled)
  and gets its ``heartbeat_secret`` once. A known one must send that secret
  (401 "invalid heartbeat authorization"); one silent past the TTL but not yet
  removed gets 404 "runner not found".
- ``POST /runners/{runner_id}/unregister``: 404 unknown or expired, 401 a wrong
  secret ("invalid authorization"), else 204 and the runner is gone.
- ``/apps/{runner_id}/app/{path}`` (any method): the single-shot proxy. A runner
  whose status is not "ready" or empty is 404, one that is not single-shot 400.
  On an on-chain orchestrator a priced runner's call is billed (#4000): a price
  it cannot convert to wei, or under 1 wei, is 503 "live runner price
  unavailable"; a call without ``Livepeer-Payment`` gets the 402 challenge
  ``{payment_params, orchestrator, manifest_id, payment_url}``; a paid call's
  session is named by its payment, so the same payment twice at once is 409
  "session already exists", checked before capacity (503 "no capacity available
  for runner"). The call then goes to ``runner_url`` + path with the client's
  headers (``Livepeer-Payment`` included) and the four Livepeer-* session
  headers. A time-priced (hour) call whose payment runs out
  (``payment_runs_out_after``) is cancelled: the connection to the runner is
  closed mid-answer, and so is the client's.

Left out: the o2r trickle channel of the first answer, trickle channels,
persistent sessions, payment tickets themselves (any ``Livepeer-Payment``
value pays), discovery, static runners (``runners.json``).
Every heartbeat, unregister and proxied call is recorded, with the time it
arrived (``time.monotonic()``); ``credentials()`` lists every secret value it
handed out or passed on, for tests that grep logs for them. ``expire(runner_id)``
puts a runner in the window between its TTL and its removal; ``forget(runner_id)``
removes it as the expiry loop does; ``reboot()`` restarts the orchestrator on the
same port with an empty registry. ``silent`` makes it take heartbeats and
unregisters (recorded as answered 0) and never answer them. Faults that no
go-livepeer sends, for the runner's client to survive: ``redirect_to`` answers
each heartbeat 307 to that URL, ``answer_extra`` adds fields to each accepted
answer (a long answer), ``odd_answer`` replaces an accepted answer's body. It serves in the
caller's event loop (``serve``/``close``) or on a thread of its own
(``start``/``stop``), for tests that block while they poll a runner process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "host", "content-length"}
STRING_FIELDS = ("runner_id", "label", "runner_url", "version", "status", "mode", "app", "metadata")
METADATA_LIMIT = 1024
REMOVAL_DELAY = 5.0  # go-livepeer's expiry loop removes a runner about this long after its TTL ran out
WEI_PER_USD = 10**18 // 3000  # the stand-in's price feed: ETH at 3,000 USD
SECONDS_PER_UNIT = {"hour": 3600, "720p": 1, "fixed": 1}  # a fixed price is per request


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()`` for the durations this stand-in answers with."""
    if seconds < 1:
        return f"{round(seconds * 1000):d}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m{rest:g}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes)}m{rest:g}s"


def random_id(size: int = 5) -> str:
    """go-livepeer's randomStr: unpadded base32 of random bytes, lowercase."""
    return base64.b32encode(secrets.token_bytes(size)).decode().rstrip("=").lower()


def derive_secret(seed: bytes, label: str) -> str:
    """go-livepeer's deriveSecret: HMAC-SHA256 of the label under the runner's seed, base32, lowercase."""
    return base64.b32encode(hmac.new(seed, label.encode(), hashlib.sha256).digest()).decode().rstrip("=").lower()


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Heartbeat:
    at: float
    authorization: str | None
    body: dict[str, Any] | None
    answered: int
    runner_id: str | None  # the runner it registered or beat for, when it was accepted
    registered: bool  # a first contact that registered a runner
    message: str = ""  # the reason of a refusal


@dataclass(frozen=True)
class Unregister:
    at: float
    runner_id: str
    authorization: str | None
    answered: int


@dataclass(frozen=True)
class ProxiedCall:
    at: float
    runner_id: str
    session_id: str
    session_token: str
    path: str
    answered: int  # the runner's status; 0 when the call was cancelled before its answer ended
    payment: str | None = None
    cancelled: bool = False  # its payment ran out: the stand-in closed the runner's connection
    ended: float = 0.0  # when the stand-in was done with it (for a cancelled call: when it cut the connection)


@dataclass(frozen=True)
class Refusal:
    """A proxied call the stand-in answered itself: the runner never saw it."""

    at: float
    runner_id: str
    status: int
    message: str


@dataclass
class LiveRunner:
    runner_id: str
    seed: bytes
    heartbeat_secret: str
    request: dict[str, Any]
    last_heartbeat: float
    sessions: set[str] = field(default_factory=set)

    def session_token(self, session_id: str) -> str:
        return derive_secret(self.seed, "session:" + session_id)


class OrchestratorStandin:
    def __init__(self, registration_secret: str = "standin-registration-secret", heartbeat_interval: float = 5.0,
                 heartbeat_ttl: float = 20.0, onchain: bool = False, removal_delay: float = REMOVAL_DELAY) -> None:
        self.registration_secret = registration_secret
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self.onchain = onchain
        self.removal_delay = removal_delay
        self.wei_per_usd: int | None = WEI_PER_USD  # None: the price feed is down, no price can be converted
        self.payment_runs_out_after: float | None = None  # seconds a time-priced call runs before its payment fails
        self.silent = False
        self.redirect_to: str | None = None
        self.answer_extra: dict[str, Any] = {}
        self.odd_answer: str | None = None
        self.runners: dict[str, LiveRunner] = {}
        self.heartbeats: list[Heartbeat] = []
        self.unregisters: list[Unregister] = []
        self.proxied: list[ProxiedCall] = []
        self.refused: list[Refusal] = []
        self.handed_out: list[str] = []  # every heartbeat secret and session token, and every payment passed on
        self.restarts: list[float] = []  # when each reboot ended
        self.url = ""
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.client: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    # -- serving -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/runners/heartbeat", self.heartbeat)
        app.router.add_post("/runners/{runner_id}/unregister", self.unregister)
        app.router.add_route("*", "/apps/{runner_id}/app/{app_path:.*}", self.proxy_single_shot)
        return app

    async def listen(self) -> None:
        # A silent orchestrator's handlers end when the runner gives up on them.
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        host, self.port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{self.port}"

    async def serve(self) -> str:
        """Listen on a loopback port in the running loop; the base URL."""
        self.client = aiohttp.ClientSession(auto_decompress=False)
        await self.listen()
        return self.url

    async def reboot(self) -> None:
        """Restart the orchestrator on the same port: every connection closed, every runner forgotten."""
        assert self.runner is not None
        await self.runner.cleanup()
        self.runners.clear()
        await self.listen()
        self.restarts.append(time.monotonic())

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.client is not None:
            await self.client.close()

    def start(self) -> OrchestratorStandin:
        """Serve on a thread of its own."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="orchestrator-standin", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.serve(), self.loop).result(timeout=30)
        return self

    def restart(self) -> None:
        """``reboot`` for a stand-in serving on its own thread."""
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self.reboot(), self.loop).result(timeout=30)

    def stop(self) -> None:
        assert self.loop is not None and self.thread is not None
        asyncio.run_coroutine_threadsafe(self.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    # -- what tests ask ------------------------------------------------------------------------

    def expire(self, runner_id: str) -> None:
        """Put a runner past its TTL, not yet removed: go-livepeer's 404 window."""
        self.runners[runner_id].last_heartbeat = time.monotonic() - self.heartbeat_ttl - 0.001

    def forget(self, runner_id: str) -> None:
        """Remove a runner as go-livepeer's expiry loop does, 5 s after its TTL ran out."""
        del self.runners[runner_id]

    def registrations(self) -> list[Heartbeat]:
        return [beat for beat in self.heartbeats if beat.registered]

    def accepted(self, runner_id: str | None = None) -> list[Heartbeat]:
        return [beat for beat in self.heartbeats if beat.answered == 200
                and (runner_id is None or beat.runner_id == runner_id)]

    def credentials(self) -> list[str]:
        """Every secret value this orchestrator knows: none may appear in a runner's log."""
        return [self.registration_secret, *self.handed_out]

    async def until(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the stand-in orchestrator did not see {what} within {timeout} s")
            await asyncio.sleep(0.01)
        return result

    def wait(self, condition, timeout: float, what: str):
        """``until`` for a test that blocks (the stand-in then serves on its own thread)."""
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the stand-in orchestrator did not see {what} within {timeout} s")
            time.sleep(0.02)
        return result

    # -- go-livepeer's rules -------------------------------------------------------------------

    @staticmethod
    def error(message: str, status: int) -> web.Response:
        """go-livepeer's respondWithError: net/http's http.Error, plain text."""
        return web.Response(text=message + "\n", status=status, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def expired(self, runner: LiveRunner) -> bool:
        return time.monotonic() - runner.last_heartbeat > self.heartbeat_ttl

    def sweep(self) -> None:
        """go-livepeer's expiry loop: a runner silent for its TTL and REMOVAL_DELAY more is removed."""
        now = time.monotonic()
        for runner_id, runner in list(self.runners.items()):
            if now - runner.last_heartbeat > self.heartbeat_ttl + self.removal_delay:
                del self.runners[runner_id]

    def answer(self, runner: LiveRunner, heartbeat_secret: str | None) -> web.Response:
        reply = {
            "runner_id": runner.runner_id,
            "orchestrator": self.url,
            "heartbeat_interval": go_duration(self.heartbeat_interval),
            "heartbeat_ttl": go_duration(self.heartbeat_ttl),
            "session_ids": sorted(runner.sessions),
        }
        if heartbeat_secret:
            reply["heartbeat_secret"] = heartbeat_secret
        if self.odd_answer is not None:
            return web.Response(text=self.odd_answer, content_type="application/json")
        return web.json_response(reply | self.answer_extra)

    async def heartbeat(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        authorization = request.headers.get("Authorization")
        if self.silent:
            self.heartbeats.append(Heartbeat(arrived, authorization, None, 0, None, False))
            await asyncio.sleep(3600)
        if self.redirect_to is not None:
            self.heartbeats.append(Heartbeat(arrived, authorization, None, 307, None, False))
            return web.Response(status=307, headers={"Location": self.redirect_to})
        self.sweep()
        try:
            body = decode_heartbeat(await request.read())
        except BadRequest as exc:
            self.heartbeats.append(Heartbeat(arrived, authorization, None, 400, None, False, str(exc)))
            return self.error(str(exc), 400)
        response, runner_id, registered, message = self.beat(body, authorization or "")
        self.heartbeats.append(Heartbeat(arrived, authorization, body, response.status, runner_id, registered,
                                         message))
        return response

    def beat(self, body: dict[str, Any], authorization: str) -> tuple[web.Response, str | None, bool, str]:
        runner_id = (body.get("runner_id") or "").strip() or "runner_" + random_id()
        try:
            normalized = self.normalize(runner_id, body)
        except BadRequest as exc:
            return self.error(str(exc), 400), None, False, str(exc)
        runner = self.runners.get(runner_id)
        if runner is None:
            if not self.registration_secret:
                message = "dynamic live runner registration is disabled"
                return self.error(message, 404), None, False, message
            if not hmac.compare_digest(authorization.encode(), self.registration_secret.encode()):
                message = "invalid registration authorization"
                return self.error(message, 401), None, False, message
            seed = secrets.token_bytes(32)
            runner = LiveRunner(runner_id, seed, derive_secret(seed, "heartbeat"), normalized, time.monotonic())
            self.runners[runner_id] = runner
            self.handed_out.append(runner.heartbeat_secret)
            return self.answer(runner, runner.heartbeat_secret), runner_id, True, ""
        if self.expired(runner):
            return self.error("runner not found", 404), None, False, "runner not found"
        if not hmac.compare_digest(authorization.encode(), runner.heartbeat_secret.encode()):
            message = "invalid heartbeat authorization"
            return self.error(message, 401), None, False, message
        runner.request, runner.last_heartbeat = normalized, time.monotonic()
        return self.answer(runner, None), runner_id, False, ""

    def normalize(self, runner_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """go-livepeer's normalizeHeartbeat."""
        runner_url = body.get("runner_url") or ""
        parts = urlsplit(runner_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("invalid runner_url")
        app = body.get("app") or ""
        if not app or app != app.strip():
            raise BadRequest("app must be trimmed")
        status = body.get("status") or ""
        if status != status.strip().lower():
            raise BadRequest("status must be lowercase and trimmed")
        metadata = body.get("metadata") or ""
        try:
            size = len(metadata.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest("metadata must be valid UTF-8") from None
        if size > METADATA_LIMIT:
            raise BadRequest(f"metadata must be at most {METADATA_LIMIT} bytes")
        mode = body.get("mode") or "persistent"
        if mode == "single_shot":
            mode = "single-shot"
        if mode not in ("persistent", "single-shot"):
            raise BadRequest('mode must be "persistent" or "single-shot"')
        capacity = body.get("capacity") or 0
        if capacity < 0:
            raise BadRequest("capacity must be >= 0")
        normalized = {**body, "runner_id": runner_id, "mode": mode, "capacity": capacity or 1}
        if self.onchain:
            normalized["price_info"] = normalize_price(body.get("price_info") or {})
        return normalized

    async def unregister(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        runner_id = request.match_info["runner_id"]
        authorization = request.headers.get("Authorization")
        if self.silent:
            self.unregisters.append(Unregister(arrived, runner_id, authorization, 0))
            await asyncio.sleep(3600)
        self.sweep()
        runner = self.runners.get(runner_id)
        if runner is None or self.expired(runner):
            response = self.error("runner not found", 404)
        elif not hmac.compare_digest((authorization or "").encode(), runner.heartbeat_secret.encode()):
            response = self.error("invalid authorization", 401)
        else:
            del self.runners[runner_id]
            response = web.Response(status=204)
        self.unregisters.append(Unregister(arrived, runner_id, authorization, response.status))
        return response

    def price_in_wei(self, price_info: dict[str, Any]) -> Fraction | None:
        """go-livepeer's PaymentInfo: the USD price converted to wei per second (or per request); None if it can't."""
        if self.wei_per_usd is None:
            return None
        return Fraction(str(price_info["price"])) * self.wei_per_usd / SECONDS_PER_UNIT[price_info["unit"]]

    def refuse(self, arrived: float, runner_id: str, status: int, message: str) -> web.Response:
        self.refused.append(Refusal(arrived, runner_id, status, message))
        return self.error(message, status)

    async def proxy_single_shot(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        self.sweep()
        runner_id = request.match_info["runner_id"]
        runner = self.runners.get(runner_id)
        if runner is None or self.expired(runner) or runner.request.get("status") not in ("", None, "ready"):
            return self.refuse(arrived, runner_id, 404, "runner not found")
        if runner.request["mode"] != "single-shot":
            return self.refuse(arrived, runner_id, 400, "runner is not single-shot")
        price_info = runner.request.get("price_info") if self.onchain else None
        payment = request.headers.get("Livepeer-Payment")
        session_id = ""
        if price_info is not None:
            wei = self.price_in_wei(price_info)
            if wei is None or wei < 1:
                return self.refuse(arrived, runner_id, 503, "live runner price unavailable")
            if not payment:
                manifest_id = random_id(16)
                self.refused.append(Refusal(arrived, runner_id, 402, "payment required"))
                return web.json_response({
                    "payment_params": {"price_per_unit": str(wei.numerator), "pixels_per_unit": str(wei.denominator),
                                       "unit": price_info["unit"], "recipient": "0x" + "00" * 20},
                    "orchestrator": self.url,
                    "manifest_id": manifest_id,
                    "payment_url": f"{self.url}/apps/{runner_id}/app/{request.match_info['app_path']}",
                }, status=402)
            self.handed_out.append(payment)
            session_id = "session_" + hashlib.sha256(payment.encode()).hexdigest()[:10]  # named by its payment
            if session_id in runner.sessions:
                return self.refuse(arrived, runner_id, 409, "session already exists")
        if len(runner.sessions) >= runner.request["capacity"]:
            return self.refuse(arrived, runner_id, 503, "no capacity available for runner")
        session_id = session_id or "session_" + random_id()
        runner.sessions.add(session_id)
        token = runner.session_token(session_id)
        self.handed_out.append(token)
        target = runner.request["runner_url"].rstrip("/") + "/" + request.match_info["app_path"]
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        headers |= {
            "Livepeer-Runner-Route": runner_id,
            "Livepeer-Session-Id": session_id,
            "Livepeer-Session-Token": token,
            "Livepeer-Session-Control": f"{self.url}/runner/{runner_id}/session/{session_id}",
        }
        runs_out = self.payment_runs_out_after if price_info is not None and price_info["unit"] != "fixed" else None
        status, cancelled = 502, False
        try:
            assert self.client is not None
            async with self.client.request(request.method, target, params=request.query, headers=headers,
                                           data=await request.read()) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    name: value for name, value in upstream.headers.items() if name.lower() not in HOP_BY_HOP})
                await response.prepare(request)
                try:
                    async with asyncio.timeout(runs_out):
                        async for chunk in upstream.content.iter_any():
                            await response.write(chunk)
                except TimeoutError:
                    # The payment failed: go-livepeer cancels the request's context, which closes the runner's
                    # connection (the runner sees its client leave) and ends the client's answer unfinished.
                    cancelled = True
                    upstream.close()
                    if request.transport is not None:
                        request.transport.close()
                    return response
                status = upstream.status
                await response.write_eof()
                return response
        except aiohttp.ClientError as exc:
            return self.error(str(exc), 502)
        finally:
            runner.sessions.discard(session_id)
            self.proxied.append(ProxiedCall(arrived, runner_id, session_id, token, request.match_info["app_path"],
                                            0 if cancelled else status, payment, cancelled, time.monotonic()))


def decode_heartbeat(raw: bytes) -> dict[str, Any]:
    """encoding/json into LiveRunnerHeartbeatRequest: the types Go would refuse are 400 with its kind of message."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"invalid character in JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("json: cannot unmarshal into Go value of type runner.LiveRunnerHeartbeatRequest")
    for name in STRING_FIELDS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise BadRequest(f"json: cannot unmarshal into Go struct field LiveRunnerHeartbeatRequest.{name} "
                             "of type string")
    if body.get("proxy") is not None and not isinstance(body["proxy"], bool):
        raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerHeartbeatRequest.proxy of type bool")
    capacity = body.get("capacity")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)):
        raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerHeartbeatRequest.capacity of type int")
    gpu = body.get("gpu")
    if gpu is not None and not isinstance(gpu, (int, dict)):
        raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerHeartbeatRequest.gpu")
    if isinstance(gpu, dict):
        if any(gpu.get(name) is not None and not isinstance(gpu[name], str) for name in ("id", "name")) or (
                gpu.get("vram_mb") is not None and not isinstance(gpu["vram_mb"], int)):
            raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerGPU")
    price_info = body.get("price_info")
    if price_info is not None:
        if not isinstance(price_info, dict):
            raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerHeartbeatRequest.price_info")
        price = price_info.get("price")
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float, str))):
            raise BadRequest("json: cannot unmarshal into Go struct field LiveRunnerPriceInfo.price "
                             "of type json.Number")
    return body


def normalize_price(price_info: dict[str, Any]) -> dict[str, Any]:
    """go-livepeer's normalizeLiveRunnerPriceInfo (on-chain only)."""
    price = str(price_info.get("price", "")).strip()
    if not price:
        raise BadRequest("price_info.price is required")
    try:
        positive = Fraction(price) > 0
    except (ValueError, ZeroDivisionError):
        positive = False
    if not positive:
        raise BadRequest("price_info.price must be a positive decimal")
    currency = (price_info.get("currency") or "").strip().lower() or "usd"
    if currency != "usd":
        raise BadRequest("price_info.currency must be usd")
    unit = (price_info.get("unit") or "").strip().lower() or "hour"
    if unit not in ("hour", "720p", "fixed"):
        raise BadRequest("price_info.unit must be hour, 720p, or fixed")
    return {**price_info, "currency": currency, "unit": unit}
