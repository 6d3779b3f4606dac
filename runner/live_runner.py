"""go-livepeer's Live Runner, dynamic side: this runner registers itself with an orchestrator.

Followed from livepeer/go-livepeer at commit 004450d (``ai/runner/live_runner.go``:
``LiveRunnerRegistry.Heartbeat``, ``Unregister``, ``normalizeHeartbeat``;
``server/ai_http.go``: ``POST /runners/heartbeat``, ``POST /runners/{runner_id}/unregister``):

- First contact is ``POST <orchestrator>/runners/heartbeat`` with no ``runner_id``
  and the orchestrator's registration secret, raw, as ``Authorization``. The
  answer names the ``runner_id``, the ``heartbeat_interval`` and ``heartbeat_ttl``
  (Go durations, "5s" and "20s") and, on first contact only, the
  ``heartbeat_secret``; every later heartbeat and the unregister carry that id
  and that secret.
- 404 is a runner the orchestrator does not know (expired past the TTL,
  unregistered, or an orchestrator that restarted): register again. 401 is a
  wrong secret, 400 a body it refuses; both answer ``text/plain`` with the
  reason, which is logged. Only ``status`` "ready" (or empty) is routable.

The registration runs beside the server, as a task of the app's own: serving
never waits on it, and an orchestrator that is down or refuses it changes
nothing but the log, ``/metrics`` and the retries. It registers only once the
runner can serve; it then sends the runner's status at once when it changes and
every ``heartbeat_interval`` otherwise, and on SIGTERM it unregisters first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runner import __version__
from runner.state import RunnerState

log = structlog.get_logger(__name__)

MODE = "single-shot"  # a session is one request: capacity counts requests
DEFAULT_INTERVAL = 5.0  # go-livepeer's defaultLiveRunnerHeartbeatInterval, used if an answer names none
MIN_INTERVAL = 0.05  # an orchestrator's interval is obeyed, but never spins the loop
UNREGISTER_TIMEOUT = 1.0  # SIGTERM: the orchestrator gets this long to forget the runner, then the drain starts


class LiveRunnerSettings(BaseSettings):
    """Registration with a go-livepeer orchestrator as a Live Runner: on when LIVE_RUNNER_ORCHESTRATOR is set."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", env_ignore_empty=True)

    orchestrator: str | None = Field(
        None,
        alias="LIVE_RUNNER_ORCHESTRATOR",
        description="The orchestrator's runner-facing URL (its -liveRunnerAddr), e.g. http://orchestrator:8935.",
    )
    secret: SecretStr | None = Field(
        None, alias="LIVE_RUNNER_SECRET", description="The orchestrator's registration secret (required with it)."
    )
    url: str | None = Field(
        None,
        alias="LIVE_RUNNER_URL",
        description="The URL the orchestrator reaches this runner at, e.g. http://runner:8000 (required with it).",
    )
    app: str | None = Field(
        None, alias="LIVE_RUNNER_APP", description="The app name clients discover; default PIPELINE/MODEL_ID."
    )
    price_usd_per_hour: float | None = Field(
        None,
        alias="LIVE_RUNNER_PRICE_USD_PER_HOUR",
        gt=0,
        allow_inf_nan=False,
        description="Price per hour of compute in USD; required by an on-chain orchestrator, ignored off-chain.",
    )

    @field_validator("app")
    @classmethod
    def app_is_trimmed(cls, app: str | None) -> str | None:
        if app is not None and (not app.strip() or app != app.strip()):
            raise ValueError("LIVE_RUNNER_APP must be a name without leading or trailing spaces "
                             "(go-livepeer refuses it)")
        return app

    @model_validator(mode="after")
    def complete_when_on(self) -> LiveRunnerSettings:
        if self.orchestrator is None:
            return self
        problems = [
            f"{name} is required when LIVE_RUNNER_ORCHESTRATOR is set ({why})"
            for name, value, why in (
                ("LIVE_RUNNER_SECRET", self.secret and self.secret.get_secret_value(),
                 "the orchestrator's registration secret"),
                ("LIVE_RUNNER_URL", self.url, "where the orchestrator reaches this runner, e.g. http://runner:8000"),
            )
            if not value
        ]
        for name, value in (("LIVE_RUNNER_ORCHESTRATOR", self.orchestrator), ("LIVE_RUNNER_URL", self.url)):
            if value and not is_http_url(value):
                problems.append(f"{name} must be an http:// or https:// URL with a host, not {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def enabled(self) -> bool:
        return self.orchestrator is not None


def is_http_url(value: str) -> bool:
    """go-livepeer's test for runner_url: url.ParseRequestURI, an http(s) scheme and a host."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class RegistrationState(enum.Enum):
    OFF = "off"  # LIVE_RUNNER_ORCHESTRATOR unset
    WAITING = "waiting"  # for the runner to be ready before first contact
    REGISTERING = "registering"  # first contact sent or being retried
    REGISTERED = "registered"  # the orchestrator knows the runner: heartbeats
    UNREGISTERED = "unregistered"  # left on SIGTERM


class Outcome(enum.Enum):
    """What became of the last request to the orchestrator."""

    NONE = "none"  # none sent yet
    OK = "ok"
    NOT_FOUND = "not_found"  # 404: unknown or expired runner, or registration disabled there
    UNAUTHORIZED = "unauthorized"  # 401: a wrong secret
    REJECTED = "rejected"  # 400 and other 4xx: a body it refuses
    FAILED = "failed"  # 5xx, or an answer that is not go-livepeer's
    UNREACHABLE = "unreachable"  # no answer: refused, reset, timed out


@dataclass
class RegistrationRecord:
    """What /metrics shows of the registration."""

    state: RegistrationState = RegistrationState.OFF
    last_outcome: Outcome = Outcome.NONE
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    last_ok_at: float | None = None  # unix time of the last accepted heartbeat


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


@dataclass(frozen=True)
class Identity:
    runner_id: str
    secret: str  # the heartbeat secret


GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go ``time.Duration.String()`` ("5s", "1m0s", "100ms"); ValueError otherwise."""
    if text == "0":
        return 0.0
    position, seconds = 0, 0.0
    while position < len(text):
        match = GO_DURATION.match(text, position)
        if match is None:
            raise ValueError(f"not a Go duration: {text!r}")
        seconds += float(match.group(1)) * GO_UNITS[match.group(2)]
        position = match.end()
    if not text:
        raise ValueError("an empty duration")
    return seconds


@dataclass(frozen=True)
class Backoff:
    """Waits between failed attempts: doubling from ``first`` up to ``most``, each drawn in [half, whole]."""

    first: float = 1.0
    most: float = 10.0

    def delay(self, failures: int) -> float:
        whole = min(self.most, self.first * 2 ** max(0, failures - 1))
        return random.uniform(whole / 2, whole)


def gpu_entry(gpu_info: dict[str, Any]) -> dict[str, Any] | None:
    """go-livepeer's LiveRunnerGPU {id, name, vram_mb} for the first of /hardware/info's GPUs; None without one."""
    if not gpu_info:
        return None
    first = gpu_info[min(gpu_info, key=int)]
    return {"id": first.id, "name": first.name, "vram_mb": first.memory_total // (1024 * 1024)}


def network_status(state: RunnerState) -> str:
    """The runner's state as a Live Runner status: "ready" is routable, any other word is not."""
    if state.draining:
        return "draining"
    return {"IDLE": "ready", "OK": "ready", "LOADING": "loading", "ERROR": "unavailable"}[state.health()]


class Registration:
    """This runner as a dynamic Live Runner of one orchestrator (see the module's docstring).

    ``start(http, gpu)`` runs it as a task of its own; ``leave()`` stops it and
    unregisters, bounded. With the settings off it is only a record saying so.
    """

    def __init__(
        self,
        settings: LiveRunnerSettings,
        state: RunnerState,
        app_name: str,
        backoff: Backoff = Backoff(),
        request_timeout: float = 5.0,
        status_poll: float = 1.0,
    ) -> None:
        self.settings = settings
        self.state = state
        self.app_name = settings.app or app_name
        self.backoff = backoff
        self.request_timeout = request_timeout
        # The pipeline's own failure (its engine dying) is no state event: it is read this often.
        self.status_poll = status_poll
        self.record = RegistrationRecord(
            state=RegistrationState.WAITING if settings.enabled else RegistrationState.OFF
        )
        self.identity: Identity | None = None
        self.interval = DEFAULT_INTERVAL
        self.sent_status: str | None = None
        self.gpu: dict[str, Any] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None
        self.woken = asyncio.Event()
        state.on_change(self.woken.set)

    @property
    def base_url(self) -> str:
        assert self.settings.orchestrator is not None
        return self.settings.orchestrator.rstrip("/")

    def start(self, http: aiohttp.ClientSession, gpu: dict[str, Any] | None) -> None:
        self.http, self.gpu = http, gpu
        self.task = asyncio.create_task(self.run(), name="live-runner-registration")
        log.info("live_runner.on", orchestrator=self.base_url, runner_url=self.settings.url, app=self.app_name,
                 waiting_for="the runner to be ready" if not self.state.accepting() else None)

    async def leave(self, timeout: float = UNREGISTER_TIMEOUT) -> None:
        """Stop heartbeating and unregister, within ``timeout``: on SIGTERM, before the drain."""
        if self.task is None:
            return
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None
        identity, self.identity = self.identity, None
        if self.record.state is not RegistrationState.OFF:
            self.record.state = RegistrationState.UNREGISTERED
        if identity is None:
            return
        url = f"{self.base_url}/runners/{identity.runner_id}/unregister"
        try:
            answer = await self.post(url, None, identity.secret, timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("live_runner.unregister_failed", runner_id=identity.runner_id,
                        reason=str(exc) or type(exc).__name__, timeout_s=timeout)
            return
        if answer.status == 204:
            log.info("live_runner.unregistered", runner_id=identity.runner_id)
        else:
            log.warning("live_runner.unregister_failed", runner_id=identity.runner_id, status=answer.status,
                        message=answer.body)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        not_before = 0.0  # after a failure: no request before this
        next_beat = 0.0
        while True:
            status = network_status(self.state)
            now = loop.time()
            if self.identity is None:
                due = status == "ready"  # no first contact before the runner can serve
            else:
                due = now >= next_beat or status != self.sent_status
            if not due or now < not_before:
                wake_in = [self.status_poll]
                if now < not_before:
                    wake_in.append(not_before - now)
                if self.identity is not None and now < next_beat:
                    wake_in.append(next_beat - now)
                await self.sleep(min(wake_in))
                continue
            sent_at = now
            outcome = await self.heartbeat(status)
            self.record.last_outcome = outcome
            self.record.outcomes[outcome] += 1
            if outcome is Outcome.OK:
                failures, not_before = 0, 0.0
                next_beat = sent_at + self.interval
                self.record.last_ok_at = time.time()
            elif outcome is Outcome.NOT_FOUND and self.identity is not None:
                # It forgot this runner: register again at once (a 404 to that is a failure like any other).
                log.warning("live_runner.forgotten", runner_id=self.identity.runner_id, orchestrator=self.base_url)
                self.forget()
            else:
                failures += 1
                delay = self.backoff.delay(failures)
                not_before = loop.time() + delay
                log.debug("live_runner.retry", in_s=round(delay, 2), failures=failures)

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.woken.wait()
        self.woken.clear()

    def forget(self) -> None:
        self.identity = None
        self.sent_status = None
        self.record.state = RegistrationState.REGISTERING

    def body(self, status: str) -> dict[str, Any]:
        """go-livepeer's LiveRunnerHeartbeatRequest."""
        capacity = self.state.pipeline.max_in_flight() if self.state.pipeline is not None else None
        body: dict[str, Any] = {
            "runner_url": self.settings.url,
            "app": self.app_name,
            "capacity": capacity or 1,  # no admission bound: one at a time (0 would mean the same there)
            "mode": MODE,
            "status": status,
            "version": __version__,
        }
        if self.identity is not None:
            body["runner_id"] = self.identity.runner_id
        if self.gpu is not None:
            body["gpu"] = self.gpu
        if self.settings.price_usd_per_hour is not None:
            body["price_info"] = {"price": self.settings.price_usd_per_hour, "currency": "usd", "unit": "hour"}
        return body

    async def heartbeat(self, status: str) -> Outcome:
        registering = self.identity is None
        if registering:
            self.record.state = RegistrationState.REGISTERING
            assert self.settings.secret is not None
            secret = self.settings.secret.get_secret_value()
        else:
            secret = self.identity.secret
        try:
            answer = await self.post(f"{self.base_url}/runners/heartbeat", self.body(status), secret,
                                     self.request_timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("live_runner.unreachable", orchestrator=self.base_url, reason=str(exc) or type(exc).__name__)
            return Outcome.UNREACHABLE
        if answer.status == 200:
            return self.accepted(answer, status, registering)
        if answer.status == 404:
            if registering:
                log.error("live_runner.refused", status=404, message=answer.body,
                          hint="is -useLiveRunners set with a registration secret there?")
            return Outcome.NOT_FOUND
        if answer.status == 401:
            log.error("live_runner.refused", status=401, message=answer.body,
                      hint="LIVE_RUNNER_SECRET differs from the orchestrator's" if registering else None)
            if not registering:
                self.forget()  # its heartbeat secret is not ours: register anew
            return Outcome.UNAUTHORIZED
        if 400 <= answer.status < 500:
            log.error("live_runner.refused", status=answer.status, message=answer.body)
            return Outcome.REJECTED
        log.warning("live_runner.orchestrator_failed", status=answer.status, message=answer.body)
        return Outcome.FAILED

    def accepted(self, answer: Answer, status: str, registering: bool) -> Outcome:
        try:
            reply = json.loads(answer.body)
            runner_id = reply["runner_id"]
            secret = reply.get("heartbeat_secret") or (None if registering else self.identity.secret)
            if not isinstance(runner_id, str) or not runner_id or not isinstance(secret, str) or not secret:
                raise ValueError("no runner_id or heartbeat_secret")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("live_runner.orchestrator_failed", status=200, reason=f"not go-livepeer's answer: {exc}",
                        message=answer.body[:200])
            return Outcome.FAILED
        self.interval = self.interval_of(reply.get("heartbeat_interval"))
        self.identity = Identity(runner_id, secret)
        self.record.state = RegistrationState.REGISTERED
        if registering:
            log.info("live_runner.registered", runner_id=runner_id, orchestrator=self.base_url, app=self.app_name,
                     status=status, heartbeat_interval_s=self.interval, heartbeat_ttl=reply.get("heartbeat_ttl"))
        elif status != self.sent_status:
            log.info("live_runner.status", runner_id=runner_id, status=status, was=self.sent_status)
        self.sent_status = status
        return Outcome.OK

    def interval_of(self, text: object) -> float:
        try:
            seconds = go_duration(text) if isinstance(text, str) else None
        except ValueError:
            seconds = None
        if seconds is None or seconds <= 0:
            log.warning("live_runner.interval_unreadable", heartbeat_interval=text, using_s=DEFAULT_INTERVAL)
            return DEFAULT_INTERVAL
        return max(MIN_INTERVAL, seconds)

    async def post(self, url: str, body: dict[str, Any] | None, secret: str, timeout: float) -> Answer:
        assert self.http is not None
        headers = {"Authorization": secret}  # raw, as go-livepeer compares it: no "Bearer"
        async with self.http.post(url, json=body, headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            text = await response.text(errors="replace")
        return Answer(response.status, text.strip()[:500])

