"""go-livepeer's Live Runner, dynamic side: this runner registers itself with an orchestrator.

Followed from livepeer/go-livepeer master at commit 176aa415c (2026-08-18;
``ai/runner/live_runner.go``: ``LiveRunnerRegistry.Heartbeat``,
``normalizeHeartbeat``, ``normalizeLiveRunnerPriceInfo``, ``Unregister``;
``server/ai_http.go``: ``POST /runners/heartbeat``,
``POST /runners/{runner_id}/unregister``; ``doc/live-runner.md``):

- First contact is ``POST <orchestrator>/runners/heartbeat`` with no ``runner_id``
  and the orchestrator's registration secret, raw, as ``Authorization``. The
  answer names the ``runner_id``, the ``heartbeat_interval`` and ``heartbeat_ttl``
  (Go durations, "5s" and "20s") and, on first contact only, the
  ``heartbeat_secret``; every later heartbeat and the unregister carry that id
  and that secret. An interval longer than half the TTL is shortened to half
  the TTL (an orchestrator's "1000h" would otherwise let the runner expire).
- A runner the orchestrator no longer knows (removed about 5 s after its TTL
  ran out, or lost in a restart of the orchestrator) is a new registration to
  it, and a heartbeat secret is not its registration secret: 401
  ``invalid registration authorization``. Only in the short window before the
  removal is it 404 ``runner not found``. Either way the runner forgets its
  identity and registers again with the registration secret: at once after a
  404, after its first backoff after a 401. 400 is a body the orchestrator
  refuses; its ``text/plain`` reason is logged.
- Each heartbeat carries ``metadata`` (a string of at most 1,024 bytes of
  UTF-8, published through ``/discovery``: never a secret): by default a
  compact JSON document of what the runner serves (``Pipeline.describe``, the
  GPU's name, the runner's version, cut to fit by ``fit_metadata``), or
  LIVE_RUNNER_METADATA verbatim; ``proxy`` when LIVE_RUNNER_PROXY asks for the
  orchestrator's ``-liveRunnerProxyUrl``; and ``price_info`` {price, currency
  "usd", unit "hour" | "fixed"} when a price is set. Every field go-livepeer
  checks is checked here with its rules before anything is sent
  (``heartbeat_problems``). Only ``status`` "ready" (or empty) is routable.
- The client follows no redirect (it would carry the secret elsewhere), reads
  at most ``MAX_ANSWER_BYTES`` of an answer, and never logs a secret: an
  answer is logged only as its status and, for an error, its reason with any
  secret the runner holds masked.

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
import ipaddress
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
DEFAULT_TTL = 20.0  # go-livepeer's defaultLiveRunnerHeartbeatTTL, used if an answer names none
MIN_INTERVAL = 0.05  # an orchestrator's interval is obeyed, but never spins the loop
UNREGISTER_TIMEOUT = 1.0  # SIGTERM: the orchestrator gets this long to forget the runner, then the drain starts
METADATA_LIMIT = 1024  # go-livepeer's bound on metadata, in UTF-8 bytes
# go-livepeer's answers are a few hundred bytes (a first one with its o2r channel and session ids, a few KiB);
# anything larger is not its answer, and is not read into memory.
MAX_ANSWER_BYTES = 64 * 1024
MESSAGE_LOG_CHARS = 200  # of an orchestrator's error reason, in the log
PRICE_UNITS = ("hour", "fixed")  # of go-livepeer's hour | 720p | fixed: 720p prices video by its pixels


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
    price_usd: float | None = Field(
        None,
        alias="LIVE_RUNNER_PRICE_USD",
        gt=0,
        allow_inf_nan=False,
        description="Price in USD per LIVE_RUNNER_PRICE_UNIT; required by an on-chain orchestrator, ignored off-chain.",
    )
    price_unit: str | None = Field(
        None,
        alias="LIVE_RUNNER_PRICE_UNIT",
        description="What LIVE_RUNNER_PRICE_USD buys: hour (of compute, the default) or fixed (one request).",
    )
    price_usd_per_hour: float | None = Field(
        None,
        alias="LIVE_RUNNER_PRICE_USD_PER_HOUR",
        gt=0,
        allow_inf_nan=False,
        description="The hourly price under its first name: LIVE_RUNNER_PRICE_USD with LIVE_RUNNER_PRICE_UNIT=hour.",
    )
    metadata: str | None = Field(
        None,
        alias="LIVE_RUNNER_METADATA",
        description="Sent verbatim as the heartbeat's metadata instead of the runner's own description "
                    "(public through the orchestrator's /discovery; at most 1,024 bytes of UTF-8).",
    )
    proxy: bool = Field(
        False,
        alias="LIVE_RUNNER_PROXY",
        description="Ask the orchestrator to advertise this runner under its -liveRunnerProxyUrl.",
    )

    @field_validator("app")
    @classmethod
    def app_is_trimmed(cls, app: str | None) -> str | None:
        if app is not None and (not app.strip() or app != app.strip()):
            raise ValueError("LIVE_RUNNER_APP must be a name without leading or trailing spaces "
                             "(go-livepeer refuses it)")
        return app

    @field_validator("price_unit")
    @classmethod
    def unit_is_known(cls, unit: str | None) -> str | None:
        if unit is None:
            return None
        normalized = unit.strip().lower()  # as go-livepeer reads it
        if normalized not in PRICE_UNITS:
            raise ValueError(
                f"LIVE_RUNNER_PRICE_UNIT must be hour (USD per hour of compute) or fixed (USD per request), not "
                f"{unit!r}" + (" (go-livepeer's 720p prices video by its pixels, which an LLM does not make)"
                               if normalized == "720p" else ""))
        return normalized

    @field_validator("metadata")
    @classmethod
    def metadata_fits(cls, metadata: str | None) -> str | None:
        if metadata is not None:
            problem = metadata_problem(metadata)
            if problem:
                raise ValueError(f"LIVE_RUNNER_METADATA {problem}")
        return metadata

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
        problems.extend(self.price_problems())
        secret = self.secret.get_secret_value() if self.secret else ""
        if secret and self.metadata and secret in self.metadata:
            problems.append("LIVE_RUNNER_METADATA holds LIVE_RUNNER_SECRET: the orchestrator publishes metadata "
                            "to anyone through /discovery")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def price_problems(self) -> list[str]:
        """The price settings that do not make one price: each with what to set instead."""
        if self.price_usd is not None and self.price_usd_per_hour is not None:
            return ["set LIVE_RUNNER_PRICE_USD (with LIVE_RUNNER_PRICE_UNIT) or LIVE_RUNNER_PRICE_USD_PER_HOUR "
                    "(the same as LIVE_RUNNER_PRICE_UNIT=hour), not both"]
        if self.price_usd_per_hour is not None and self.price_unit not in (None, "hour"):
            return [f"LIVE_RUNNER_PRICE_USD_PER_HOUR is a price per hour, but LIVE_RUNNER_PRICE_UNIT is "
                    f"{self.price_unit}: set LIVE_RUNNER_PRICE_USD to the price of one request instead"]
        if self.price_unit is not None and self.price_usd is None and self.price_usd_per_hour is None:
            return [f"LIVE_RUNNER_PRICE_UNIT={self.price_unit} needs LIVE_RUNNER_PRICE_USD, the price in USD per "
                    f"{'hour of compute' if self.price_unit == 'hour' else 'request'}"]
        return []

    @property
    def enabled(self) -> bool:
        return self.orchestrator is not None

    @property
    def price_info(self) -> dict[str, Any] | None:
        """go-livepeer's LiveRunnerPriceInfo for the price set, None without one."""
        if self.price_usd is not None:
            return {"price": self.price_usd, "currency": "usd", "unit": self.price_unit or "hour"}
        if self.price_usd_per_hour is not None:
            return {"price": self.price_usd_per_hour, "currency": "usd", "unit": "hour"}
        return None


def is_http_url(value: str) -> bool:
    """go-livepeer's test for runner_url: url.ParseRequestURI, an http(s) scheme and a host."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loggable_url(url: str) -> str:
    """A URL without any user:password in it, for the log."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def metadata_problem(metadata: str) -> str | None:
    """go-livepeer's rule for metadata (valid UTF-8, at most 1,024 bytes), or None when it holds."""
    try:
        size = len(metadata.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid UTF-8"
    if size > METADATA_LIMIT:
        return f"must be at most {METADATA_LIMIT} bytes of UTF-8, not {size}"
    return None


def compact_json(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def fit_metadata(document: dict[str, Any], limit: int = METADATA_LIMIT) -> str | None:
    """``document`` as compact JSON in at most ``limit`` bytes of UTF-8; None if not even its first key fits.

    Its keys come in the order of their worth. What does not fit is dropped in
    this order: first list items, one at a time from the end of the longest
    list (the later one on a tie), so a long list of adapters is cut before a
    short one of APIs; a cut list ``adapters`` gains ``adapters_total``, the
    count it had, so a reader knows it is cut. Then whole keys, from the last.
    The first key (the model) is kept whole or there is no metadata.
    """
    document = dict(document)
    totals: dict[str, int] = {}

    def encoded() -> bytes:
        with_totals = dict(document)
        for key, total in totals.items():
            with_totals[f"{key}_total"] = total
        return compact_json(with_totals).encode("utf-8", errors="replace")

    while len(encoded()) > limit:
        lists = [key for key, value in document.items() if isinstance(value, list) and value]
        if lists:
            key = max(reversed(lists), key=lambda name: len(document[name]))  # the longest; the later on a tie
            totals.setdefault(key, len(document[key]))
            document[key] = document[key][:-1]
            continue
        if len(document) <= 1:
            return None
        last = list(document)[-1]
        del document[last]
        totals.pop(last, None)
    return encoded().decode("utf-8")


def heartbeat_problems(body: dict[str, Any]) -> list[str]:
    """go-livepeer's normalizeHeartbeat and normalizeLiveRunnerPriceInfo rules, applied before sending ``body``.

    Each problem would be the orchestrator's 400; sending it would only fail.
    """
    problems = []
    if not is_http_url(body.get("runner_url") or ""):
        problems.append("invalid runner_url")
    app = body.get("app") or ""
    if not app or app != app.strip():
        problems.append("app must be trimmed")
    status = body.get("status") or ""
    if status != status.strip().lower():
        problems.append("status must be lowercase and trimmed")
    if body.get("mode") not in (None, "", "persistent", "single-shot", "single_shot"):
        problems.append('mode must be "persistent" or "single-shot"')
    capacity = body.get("capacity", 0)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        problems.append("capacity must be >= 0")
    metadata = body.get("metadata")
    if metadata is not None:
        problem = metadata_problem(metadata) if isinstance(metadata, str) else "must be a string"
        if problem:
            problems.append(f"metadata {problem}")
    if "proxy" in body and not isinstance(body["proxy"], bool):
        problems.append("proxy must be a bool")
    price_info = body.get("price_info")
    if price_info is not None:
        price = price_info.get("price")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0 or price == float("inf"):
            problems.append("price_info.price must be a positive decimal")
        if (price_info.get("currency") or "usd").strip().lower() != "usd":
            problems.append("price_info.currency must be usd")
        if (price_info.get("unit") or "hour").strip().lower() not in ("hour", "720p", "fixed"):
            problems.append("price_info.unit must be hour, 720p, or fixed")
    return problems


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
    NOT_FOUND = "not_found"  # 404: an expired runner not yet removed, or registration disabled there
    UNAUTHORIZED = "unauthorized"  # 401: a wrong secret, or a runner it no longer knows (expired, restarted)
    REJECTED = "rejected"  # 400 and other 4xx, a redirect, or a body the runner would not send
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
    oversized: bool = False  # longer than MAX_ANSWER_BYTES: not read, ``body`` is empty
    location: str | None = None  # a redirect's target, which is not followed


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


def positive_duration(text: object) -> float | None:
    """A Go duration's seconds when ``text`` is one and positive, else None."""
    try:
        seconds = go_duration(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds > 0 else None


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

    @property
    def orchestrator_for_log(self) -> str:
        return loggable_url(self.base_url)

    def start(self, http: aiohttp.ClientSession, gpu: dict[str, Any] | None) -> None:
        self.http, self.gpu = http, gpu
        self.task = asyncio.create_task(self.run(), name="live-runner-registration")
        log.info("live_runner.on", orchestrator=self.orchestrator_for_log, runner_url=self.settings.url,
                 app=self.app_name, price_info=self.settings.price_info, proxy=self.settings.proxy,
                 waiting_for="the runner to be ready" if not self.state.accepting() else None)
        parts = urlsplit(self.base_url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            log.warning("live_runner.plain_http", orchestrator=self.orchestrator_for_log,
                        risk="the registration secret and the heartbeat secret cross the network unencrypted",
                        fix="an https:// LIVE_RUNNER_ORCHESTRATOR, or an orchestrator on this host or a private "
                            "network only the two share")

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
                        reason=self.mask(str(exc)) or type(exc).__name__, timeout_s=timeout)
            return
        if answer.status == 204:
            log.info("live_runner.unregistered", runner_id=identity.runner_id)
        else:
            log.warning("live_runner.unregister_failed", runner_id=identity.runner_id, status=answer.status,
                        message=self.excerpt(answer, identity.secret))

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
                # Expired, not yet removed: register again at once (a 404 to that is a failure like any other).
                log.warning("live_runner.forgotten", runner_id=self.identity.runner_id,
                            orchestrator=self.orchestrator_for_log, status=404,
                            reason="it expired past its TTL and is about to be removed", next="registering again")
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

    def metadata(self) -> str | None:
        """LIVE_RUNNER_METADATA, or what the runner serves (the pipeline's description, the GPU, the version)."""
        if self.settings.metadata is not None:
            return self.settings.metadata
        document: dict[str, Any] = {}
        if self.state.pipeline is not None:
            document.update(self.state.pipeline.describe())
        if self.gpu is not None and self.gpu.get("name"):
            document["gpu"] = self.gpu["name"]
        document["runner"] = __version__
        fitted = fit_metadata(document)
        if fitted is None:
            log.warning("live_runner.metadata_dropped", reason=f"not even the model's id fits in {METADATA_LIMIT} "
                        "bytes", fix="set LIVE_RUNNER_METADATA")
        return fitted

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
        metadata = self.metadata()
        if metadata is not None:
            body["metadata"] = metadata
        if self.settings.proxy:
            body["proxy"] = True
        price_info = self.settings.price_info
        if price_info is not None:
            body["price_info"] = price_info
        return body

    async def heartbeat(self, status: str) -> Outcome:
        registering = self.identity is None
        if registering:
            self.record.state = RegistrationState.REGISTERING
            assert self.settings.secret is not None
            secret = self.settings.secret.get_secret_value()
        else:
            secret = self.identity.secret
        body = self.body(status)
        problems = heartbeat_problems(body)
        if problems:
            log.error("live_runner.not_sent", problems=problems, reason="go-livepeer would refuse this heartbeat (400)")
            return Outcome.REJECTED
        try:
            answer = await self.post(f"{self.base_url}/runners/heartbeat", body, secret, self.request_timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("live_runner.unreachable", orchestrator=self.orchestrator_for_log,
                        reason=self.mask(str(exc)) or type(exc).__name__)
            return Outcome.UNREACHABLE
        if answer.oversized:
            log.warning("live_runner.orchestrator_failed", status=answer.status,
                        reason=f"an answer over {MAX_ANSWER_BYTES} bytes is not go-livepeer's: not read")
            return Outcome.FAILED
        if 300 <= answer.status < 400:
            log.error("live_runner.refused", status=answer.status, redirect_to=loggable_url(answer.location or ""),
                      reason="a redirect is not followed: it would carry the secret to another address",
                      fix="set LIVE_RUNNER_ORCHESTRATOR to the orchestrator's own -liveRunnerAddr")
            return Outcome.REJECTED
        if answer.status == 200:
            return self.accepted(answer, status, registering)
        message = self.excerpt(answer, secret)
        if answer.status == 404:
            if registering:
                log.error("live_runner.refused", status=404, message=message,
                          hint="is -useLiveRunners set with a registration secret there?")
            return Outcome.NOT_FOUND
        if answer.status == 401:
            if registering:
                log.error("live_runner.refused", status=401, message=message,
                          hint="LIVE_RUNNER_SECRET differs from the orchestrator's")
            else:
                # go-livepeer master: a runner it removed (5 s past its TTL, or in a restart) is a new registration
                # to it, and the heartbeat secret is not the registration secret.
                log.warning("live_runner.forgotten", runner_id=self.identity.runner_id,
                            orchestrator=self.orchestrator_for_log, status=401, message=message,
                            reason="it takes this heartbeat secret no more: it removed the runner (expired past "
                                   "its TTL, or restarted) or holds another secret",
                            next="registering again after the first backoff")
                self.forget()
            return Outcome.UNAUTHORIZED
        if 400 <= answer.status < 500:
            log.error("live_runner.refused", status=answer.status, message=message)
            return Outcome.REJECTED
        log.warning("live_runner.orchestrator_failed", status=answer.status, message=message)
        return Outcome.FAILED

    def accepted(self, answer: Answer, status: str, registering: bool) -> Outcome:
        try:
            reply = json.loads(answer.body)
            if not isinstance(reply, dict):
                raise ValueError("not a JSON object")
            runner_id = reply.get("runner_id")
            secret = reply.get("heartbeat_secret") or (None if registering else self.identity.secret)
            if not isinstance(runner_id, str) or not runner_id or not isinstance(secret, str) or not secret:
                raise ValueError("no runner_id or heartbeat_secret")
        except (ValueError, TypeError) as exc:
            # Never the body: a first answer holds the heartbeat secret.
            reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
            log.warning("live_runner.orchestrator_failed", status=200, reason=f"not go-livepeer's answer: {reason}",
                        answer_bytes=len(answer.body.encode()))
            return Outcome.FAILED
        self.interval = self.interval_of(reply.get("heartbeat_interval"), reply.get("heartbeat_ttl"))
        self.identity = Identity(runner_id, secret)
        self.record.state = RegistrationState.REGISTERED
        if registering:
            log.info("live_runner.registered", runner_id=runner_id, orchestrator=self.orchestrator_for_log,
                     app=self.app_name, status=status, heartbeat_interval_s=self.interval,
                     heartbeat_ttl=reply.get("heartbeat_ttl"))
        elif status != self.sent_status:
            log.info("live_runner.status", runner_id=runner_id, status=status, was=self.sent_status)
        self.sent_status = status
        return Outcome.OK

    def interval_of(self, interval_text: object, ttl_text: object) -> float:
        """The answer's heartbeat_interval, at most half its heartbeat_ttl (a heartbeat on the TTL comes too late)."""
        seconds = positive_duration(interval_text)
        if seconds is None:
            log.warning("live_runner.interval_unreadable", heartbeat_interval=str(interval_text)[:40],
                        using_s=DEFAULT_INTERVAL)
            seconds = DEFAULT_INTERVAL
        ttl = positive_duration(ttl_text) or DEFAULT_TTL
        if seconds > ttl / 2:
            if self.interval != ttl / 2:
                log.warning("live_runner.interval_clamped", heartbeat_interval=str(interval_text)[:40],
                            heartbeat_ttl=str(ttl_text)[:40], using_s=ttl / 2,
                            reason="heartbeats that far apart would let the runner expire")
            seconds = ttl / 2
        return max(MIN_INTERVAL, seconds)

    def secrets(self, *more: str) -> list[str]:
        held = [*more]
        if self.settings.secret is not None:
            held.append(self.settings.secret.get_secret_value())
        if self.identity is not None:
            held.append(self.identity.secret)
        return [secret for secret in held if secret]

    def mask(self, text: str, *more: str) -> str:
        """``text`` with every secret the runner holds (and ``more``) replaced: for the log."""
        for secret in self.secrets(*more):
            text = text.replace(secret, "[secret]")
        return text

    def excerpt(self, answer: Answer, secret: str) -> str:
        """An error answer's reason for the log: go-livepeer's one-line text, secrets masked, bounded."""
        return self.mask(answer.body, secret)[:MESSAGE_LOG_CHARS]

    async def post(self, url: str, body: dict[str, Any] | None, secret: str, timeout: float) -> Answer:
        """POST, following no redirect, reading at most MAX_ANSWER_BYTES of the answer."""
        assert self.http is not None
        headers = {"Authorization": secret}  # raw, as go-livepeer compares it: no "Bearer"
        async with self.http.post(url, json=body, headers=headers, allow_redirects=False,
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if (response.content_length or 0) > MAX_ANSWER_BYTES:
                return Answer(response.status, "", oversized=True)
            raw = bytearray()
            async for chunk in response.content.iter_chunked(16 * 1024):
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    return Answer(response.status, "", oversized=True)
            return Answer(response.status, raw.decode("utf-8", errors="replace").strip(),
                          location=response.headers.get("Location"))
