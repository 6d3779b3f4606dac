"""Prometheus metrics for /metrics, kept in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runner import __version__
from runner.live_runner import Outcome, RegistrationRecord, RegistrationState
from runner.offload import Offload
from runner.pipeline import RequestContext
from runner.state import RunnerState

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


def outcome_of(status: int, finish_reason: str) -> str:
    if status == 499:
        return "cancelled"
    if status == 503:
        return "unavailable"
    if 400 <= status < 500:
        return "rejected"
    if status >= 500 or finish_reason == "error":
        return "failed"
    return "ok"


class RunnerMetrics:
    def __init__(self, state: RunnerState, registration: RegistrationRecord) -> None:
        self.registry = CollectorRegistry()
        # /metrics' text is made on a worker thread of its own: with the engine's series it is milliseconds of CPU
        # per scrape (38 % of the event loop's busy samples in a hostile run scraped every 0.25 s), which on the
        # loop would delay /ready and every stream. prometheus_client's metrics take a lock of their own to be read.
        self.offload = Offload(name="metrics")
        self.registry.register(StateCollector(state))
        self.registry.register(RegistrationCollector(registration))
        self.requests = Counter(
            "livepeer_runner_requests",
            "Requests by operation, outcome (ok, rejected, unavailable, failed, cancelled), status code and model id",
            ["operation", "outcome", "code", "model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "livepeer_runner_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "livepeer_runner_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "livepeer_runner_request_duration_seconds",
            "From the request's arrival to its last byte",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "livepeer_runner_prompt_tokens", "Prompt tokens of served requests, by model id", ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "livepeer_runner_completion_tokens", "Generated tokens, by model id", ["model"], registry=self.registry
        )

    async def exposition(self, engine_registry: CollectorRegistry | None = None) -> bytes:
        """/metrics' body: the runner's series, then the engine's (``engine_registry``), in Prometheus' text format."""
        return await self.offload.run(exposition, self.registry, engine_registry)

    def observe(
        self, operation: str, status: int, context: RequestContext, started: float, finished: float, model: str
    ) -> None:
        """One finished request; ``model`` is the id that served it (the runner's own for one no model served)."""
        self.requests.labels(operation, outcome_of(status, context.finish_reason), str(status), model).inc()
        self.request_duration.observe(finished - started)
        if context.completion_tokens:
            self.prompt_tokens.labels(model).inc(context.prompt_tokens)
            self.completion_tokens.labels(model).inc(context.completion_tokens)
        if context.first_token_at is not None:
            self.time_to_first_token.observe(context.first_token_at - started)
            if context.completion_tokens > 1:
                self.time_per_output_token.observe(
                    (finished - context.first_token_at) / (context.completion_tokens - 1)
                )


def exposition(registry: CollectorRegistry, engine_registry: CollectorRegistry | None) -> bytes:
    body = generate_latest(registry)
    if engine_registry is not None:
        body += generate_latest(engine_registry)
    return body


class StateCollector:
    """Gauges read from the runner's state at scrape time."""

    def __init__(self, state: RunnerState) -> None:
        self.state = state

    def collect(self):
        pipeline = self.state.pipeline
        info = GaugeMetricFamily("livepeer_runner_info", "Runner version", labels=["version", "pipeline", "model_id"])
        info.add_metric([__version__, pipeline.name if pipeline else "", pipeline.model_id if pipeline else ""], 1)
        yield info
        yield GaugeMetricFamily(
            "livepeer_runner_requests_in_flight", "Requests the runner is serving", value=self.state.in_flight
        )
        yield GaugeMetricFamily(
            "livepeer_runner_admitted_sequences",
            "What the requests in flight take of the admission bound: the engine sequences they become "
            "(prompts x n), the unit of livepeer_runner_admission_capacity",
            value=self.state.units_in_flight,
        )
        capacity = self.state.capacity()
        if capacity is not None:
            yield GaugeMetricFamily(
                "livepeer_runner_admission_capacity",
                "The admission bound in engine sequences (MAX_NUM_SEQS + MAX_WAITING_REQUESTS): past it a request is "
                "answered 503 at once; the capacity reported to a Live Runner orchestrator",
                value=capacity,
            )
        load = pipeline.engine_load() if self.state.ready else None
        yield GaugeMetricFamily(
            "livepeer_runner_engine_requests_unfinished",
            "Requests the engine holds, running or waiting",
            value=load.unfinished if load else 0,
        )
        yield GaugeMetricFamily(
            "livepeer_runner_engine_requests_waiting",
            "Requests the engine holds beyond its batch (MAX_NUM_SEQS), waiting for a slot",
            value=max(0, load.unfinished - load.batch_size) if load else 0,
        )
        yield CounterMetricFamily(
            "livepeer_runner_engine_requests", "Requests handed to the engine", value=load.submitted if load else 0
        )


class RegistrationCollector:
    """The Live Runner registration (runner/live_runner.py), read at scrape time.

    Each state and outcome is a series of its own, 1 for the current one and 0
    for the rest (a state set), so that every series exists from the start,
    with the registration off too.
    """

    def __init__(self, record: RegistrationRecord) -> None:
        self.record = record

    def collect(self):
        state = GaugeMetricFamily(
            "livepeer_runner_live_registration",
            "Registration with a go-livepeer orchestrator as a Live Runner: off, waiting (for the runner to be "
            "ready), registering, registered, unregistered (1 for the current state)",
            labels=["state"],
        )
        for member in RegistrationState:
            state.add_metric([member.value], float(member is self.record.state))
        yield state
        last = GaugeMetricFamily(
            "livepeer_runner_live_heartbeat_last_outcome",
            "What became of the last heartbeat sent to the orchestrator (1 for it; none before the first)",
            labels=["outcome"],
        )
        for member in Outcome:
            last.add_metric([member.value], float(member is self.record.last_outcome))
        yield last
        counted = CounterMetricFamily(
            "livepeer_runner_live_heartbeats", "Heartbeats sent to the orchestrator, by outcome", labels=["outcome"]
        )
        for member in Outcome:
            if member is not Outcome.NONE:
                counted.add_metric([member.value], self.record.outcomes[member])
        yield counted
        if self.record.last_ok_at is not None:
            yield GaugeMetricFamily(
                "livepeer_runner_live_heartbeat_last_ok_timestamp_seconds",
                "Unix time of the last heartbeat the orchestrator accepted",
                value=self.record.last_ok_at,
            )
