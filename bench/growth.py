"""How cost grows with the work: time to first token against prompt length, and a multi-turn chat
whose long system prompt is shared, with the engine's prefix cache on and off.

Both run one request at a time (concurrency 1) for a few output tokens, so that
time to first token is the prefill of that one prompt and nothing else.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench.load import RequestRecord, run_level
from bench.systems import System

# Prompt length in words (about 1:1 with tokens for this text; the report shows the real count) and unique
# prompts at each: fewer where one prefill is long and varies little (7,700 tokens take over two minutes on an
# AVX2-only CPU), more where it is short and the machine's noise is a larger part of it.
LENGTH_SAMPLES = {256: 3, 1024: 2, 4096: 1, 7680: 1}
GROWTH_MAX_TOKENS = 4
TURNS = 4
CONVERSATIONS = 3
SYSTEM_PROMPT_WORDS = 2048
# Plain words that most tokenizers keep whole, so that N words are close to N tokens.
WORDS = ("river stone garden window lantern market harbor meadow candle bridge forest engine silver paper "
         "orange winter summer planet violin pencil mountain basket ladder mirror castle rocket island").split()


def filler(words: int, salt: int) -> str:
    """``words`` words, different for every ``salt`` from the first word on: no prefix is shared."""
    picked = [f"note{salt}:"]
    state = salt * 2654435761 + 1
    for _ in range(words - 1):
        state = (state * 1103515245 + 12345) % 2**31
        picked.append(WORDS[state % len(WORDS)])
    return " ".join(picked)


@dataclass
class Timed:
    ttft_ms: float
    prompt_tokens: int


async def timed_request(system: System, session: aiohttp.ClientSession, messages: list[dict]) -> Timed:
    """TTFT of one request: to its first text, or to its end where the model's first token ends it (no text)."""
    record = RequestRecord(sent=time.perf_counter())
    await system.stream(session, messages, GROWTH_MAX_TOKENS, record)
    ended = time.perf_counter()
    if record.error is not None and record.error != "no text":
        raise RuntimeError(f"{system.name}: {record.error}")
    first = record.chunk_times[0] if record.chunk_times else ended
    return Timed(1000 * (first - record.sent), record.prompt_tokens)


async def ttft_by_prompt_length(systems: list[System], session: aiohttp.ClientSession, timeout: float,
                                settle: float) -> dict[tuple[str, int], list[Timed]]:
    """Unique prompts of each length, the systems taking turns on every prompt."""
    found: dict[tuple[str, int], list[Timed]] = {}
    for length, samples in LENGTH_SAMPLES.items():
        for sample in range(samples):
            for system in systems:
                # Each system its own prompt: one system's prefix cache must not serve another's.
                salt = length * 10 + sample
                messages = [{"role": "user", "content": filler(length, salt) + "\nSum this up in a word."}]
                await asyncio.sleep(settle)
                timed = await asyncio.wait_for(timed_request(system, session, messages), timeout)
                found.setdefault((system.name, length), []).append(timed)
    return found


def conversation(system_prompt: str, turns: int, salt: int) -> list[list[dict]]:
    """The request of each turn of one chat: the shared system prompt, the turns so far, a new question."""
    history = [{"role": "system", "content": system_prompt}]
    requests = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"Question {turn + 1} of chat {salt}: {filler(48, salt * 10 + turn)}"})
        requests.append(list(history))
        history.append({"role": "assistant", "content": filler(64, salt * 100 + turn)})
    return requests


async def multi_turn(systems: list[System], session: aiohttp.ClientSession, timeout: float,
                     settle: float) -> dict[tuple[str, int], list[Timed]]:
    """CONVERSATIONS chats of TURNS turns, all with one long system prompt; TTFT by turn.

    The first chat's first turn meets an empty cache; later turns (and later
    chats' first turns) can reuse the system prompt and the earlier turns.
    """
    found: dict[tuple[str, int], list[Timed]] = {}
    for system in systems:
        # A system prompt of its own per system and per bench run: nothing cached from before.
        system_prompt = "You are a careful assistant. " + filler(SYSTEM_PROMPT_WORDS, 7)
        for chat in range(CONVERSATIONS):
            for turn, messages in enumerate(conversation(system_prompt, TURNS, chat + 1)):
                await asyncio.sleep(settle)
                timed = await asyncio.wait_for(timed_request(system, session, messages), timeout)
                found.setdefault((system.name, turn + 1), []).append(timed)
    return found


def median_ttft(runs: list[Timed]) -> float:
    return statistics.median(run.ttft_ms for run in runs)


OPEN_STREAMS = 256  # the runner's default admission bound: MAX_NUM_SEQS 128 running + 128 waiting
OPEN_STREAM_MAX_TOKENS = 32


@dataclass
class MemoryReading:
    before_mib: float
    peak_mib: float  # the API process's RSS, sampled every 0.1 s while the streams are open
    after_mib: float  # a few seconds after the last stream ended
    streams: int
    errors: int


async def rss_with_open_streams(system: System, session: aiohttp.ClientSession, workload: list[list[dict]],
                                timeout: float) -> MemoryReading:
    process = system.api_process()

    def rss_mib() -> float:
        return process.memory_info().rss / 2**20

    before, peak = rss_mib(), 0.0
    level = asyncio.ensure_future(run_level(system, session, (workload * OPEN_STREAMS)[:OPEN_STREAMS], OPEN_STREAMS,
                                            OPEN_STREAM_MAX_TOKENS, timeout, -1))
    while not level.done():
        peak = max(peak, rss_mib())
        await asyncio.sleep(0.1)
    result = await level
    await asyncio.sleep(3)
    return MemoryReading(before, peak, rss_mib(), result.requests, result.errors)
