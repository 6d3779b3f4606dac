"""The client side: one concurrency level of the workload against one system, timed the same way for all.

Each request's clock starts just before the system's ``stream`` is called and
each text-bearing chunk is stamped as it arrives (``RequestRecord.chunk``), so
the HTTP clients and the in-process engine adapter are measured alike.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import psutil

if TYPE_CHECKING:
    from bench.systems import System

FINISH_REASONS = ("stop", "length")


@dataclass
class RequestRecord:
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    finish_reason: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    done: bool = False  # the stream ended as the protocol says (data: [DONE])
    failure: str | None = None
    text: list[str] = field(default_factory=list)

    def chunk(self, text: str = "") -> None:
        self.chunk_times.append(time.perf_counter())
        self.text.append(text)

    def finish(self, finish_reason: str, output_tokens: int, prompt_tokens: int) -> None:
        self.finish_reason = finish_reason
        self.output_tokens = output_tokens
        self.prompt_tokens = prompt_tokens

    @property
    def error(self) -> str | None:
        if self.failure:
            return self.failure
        if self.finish_reason not in FINISH_REASONS:
            return f"finish_reason {self.finish_reason!r}"
        if not self.done:
            return "the stream ended without its end marker"
        if not self.chunk_times:
            return "no text"
        return None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    pass_index: int
    requests: int
    errors: int
    output_tokens: int
    prompt_tokens: int
    wall_s: float
    ttft_ms: list[float]
    itl_ms: list[float]
    api_cpu_s: float
    first_error: str | None = None
    client_cpu_s: float = float("nan")  # the bench process's: the load client (for the engine, also its front end)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def api_cpu_ms_per_token(self) -> float:
        """API process CPU milliseconds per output token (= CPU seconds per 1,000 tokens)."""
        return 1000 * self.api_cpu_s / self.output_tokens if self.output_tokens else float("nan")

    @property
    def client_cpu_ms_per_token(self) -> float:
        return 1000 * self.client_cpu_s / self.output_tokens if self.output_tokens else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p95_ms": percentile(self.ttft_ms, 95),
            "itl_p50_ms": percentile(self.itl_ms, 50),
            "itl_p95_ms": percentile(self.itl_ms, 95),
            "api_cpu_ms_per_token": self.api_cpu_ms_per_token,
            "client_cpu_ms_per_token": self.client_cpu_ms_per_token,
            "errors": self.errors,
        }


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()  # this process and its threads; not its child processes
    return times.user + times.system


async def run_level(
    system: System,
    session: aiohttp.ClientSession,
    workload: list[list[dict]],
    concurrency: int,
    max_tokens: int,
    request_timeout: float,
    pass_index: int,
) -> LevelResult:
    """Send every request of the workload, ``concurrency`` at a time, and time them."""
    api_process, client_process = system.api_process(), psutil.Process()
    pending = iter(workload)
    records: list[RequestRecord] = []

    async def client() -> None:
        for messages in pending:  # shared by all clients: each takes the next request
            record = RequestRecord(sent=time.perf_counter())
            try:
                await asyncio.wait_for(system.stream(session, messages, max_tokens, record), request_timeout)
            except asyncio.TimeoutError:
                record.failure = f"no complete answer within {request_timeout:g} s"
            except (aiohttp.ClientError, OSError, RuntimeError, ValueError, KeyError) as exc:
                record.failure = f"{type(exc).__name__}: {exc}"
            records.append(record)

    cpu_before, client_before = cpu_seconds(api_process), cpu_seconds(client_process)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    api_cpu_s = cpu_seconds(api_process) - cpu_before
    client_cpu_s = cpu_seconds(client_process) - client_before

    answered = [record for record in records if record.error is None]
    failed = [record for record in records if record.error is not None]
    return LevelResult(
        system=system.name,
        concurrency=concurrency,
        pass_index=pass_index,
        requests=len(records),
        errors=len(failed),
        output_tokens=sum(record.output_tokens for record in answered),
        prompt_tokens=sum(record.prompt_tokens for record in answered),
        wall_s=wall_s,
        ttft_ms=[1000 * (record.chunk_times[0] - record.sent) for record in answered],
        itl_ms=[
            1000 * (later - earlier)
            for record in answered
            for earlier, later in zip(record.chunk_times, record.chunk_times[1:])
        ],
        api_cpu_s=api_cpu_s,
        first_error=failed[0].error if failed else None,
        client_cpu_s=client_cpu_s,
    )
