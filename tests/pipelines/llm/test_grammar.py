"""The grammar check (pipelines/llm/grammar.py): xgrammar compiles, for real, in a worker process that is killed
past the limit. The tokenizer is the tiny model's (a 768-token vocabulary: compiles take a fraction of what they
take with a real model's, so the slow schema here is one that takes seconds even so)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import psutil
import pytest

from pipelines.llm.engine import Sampling
from pipelines.llm.grammar import GrammarGuard, job_of
from runner.pipeline import OperationError
from tests.support.fast_lane import IMPORTS_VLLM

pytestmark = IMPORTS_VLLM  # the tokenizer, as vLLM's backend hands it to xgrammar

LIMIT = 1.0  # seconds; the slow schema takes about 8 s with the tiny tokenizer on a 2-core CPU, the small one ms
# Optional properties with a pattern each: xgrammar's compile grows fast with them (300 of them: 55 to 82 s with
# SmolLM2's 49k-token vocabulary), while the request stays far inside the size bounds of limits.py.
SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}"}
                                                for i in range(1000)}}
SMALL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class TokenizerOnly:
    """What the guard asks of an engine: its tokenizer as xgrammar reads it."""

    def __init__(self, info: str | None) -> None:
        self.info = info
        self.asked = 0

    def grammar_tokenizer_info(self) -> str | None:
        self.asked += 1
        return self.info


@pytest.fixture(scope="module")
def tiny_tokenizer_info(tiny_model_dir) -> str:
    from transformers import AutoTokenizer

    from pipelines.llm.vllm_backend.grammar import tokenizer_info

    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    info = tokenizer_info(AutoTokenizer.from_pretrained(tiny_model_dir), vocab_size)
    assert info is not None
    return info


def workers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children() if "spawn" in " ".join(child.cmdline())]


async def test_a_grammar_past_the_limit_is_refused_and_its_compile_killed_then_the_next_is_served(
        tiny_tokenizer_info):
    guard = GrammarGuard(timeout=LIMIT)
    engine = TokenizerOnly(tiny_tokenizer_info)
    try:
        await guard.check(Sampling(max_tokens=4, json_schema=SMALL_SCHEMA), engine)  # starts the worker
        worker = guard.worker.process
        started = time.monotonic()
        with pytest.raises(OperationError) as refused:
            await guard.check(Sampling(max_tokens=4, json_schema=SLOW_SCHEMA), engine)
        took = time.monotonic() - started
        assert refused.value.status == 400 and refused.value.param == "response_format"
        assert "GRAMMAR_COMPILE_TIMEOUT" in str(refused.value) and "1 s" in str(refused.value)
        # Refused at the limit, far short of the compile itself (tens of seconds); slack for two busy cores.
        assert LIMIT <= took < LIMIT + 3.0, took
        # The compile was stopped, not left running. Read from the process table: the guard's own reaper joins the
        # process too, and a second joiner's is_alive() reads a reaped child as alive.
        deadline = time.monotonic() + 5
        while psutil.pid_exists(worker.pid) and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE:
                    break
            await asyncio.sleep(0.01)
        assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
        assert guard.killed == 1

        # The same schema again: refused at once, without a worker started and killed for it.
        started = time.monotonic()
        with pytest.raises(OperationError):
            await guard.check(Sampling(max_tokens=4, json_schema=SLOW_SCHEMA), engine)
        assert time.monotonic() - started < 0.5 and guard.killed == 1 and guard.worker is None

        # A fresh worker takes the next grammar; a grammar accepted once is not compiled again.
        small = Sampling(max_tokens=4, json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
        await guard.check(small, engine)
        assert guard.worker is not None and guard.worker.process.is_alive()
        assert len(guard.accepted) == 2
        worker = guard.worker
        guard.worker = None  # were it compiled again, a worker would have to start
        await guard.check(small, engine)
        assert guard.worker is None
        guard.worker = worker
    finally:
        guard.close()
    assert engine.asked == 1
    assert not [process for process in workers() if process.is_running()
                and process.status() != psutil.STATUS_ZOMBIE]


async def test_a_request_that_goes_away_mid_compile_leaves_the_verdict_for_the_next(tiny_tokenizer_info):
    guard = GrammarGuard(timeout=LIMIT)
    engine = TokenizerOnly(tiny_tokenizer_info)
    try:
        waiting = asyncio.ensure_future(guard.check(Sampling(max_tokens=4, json_schema=SLOW_SCHEMA), engine))
        while guard.worker is None:  # the worker starts, then takes the schema
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(OperationError):  # the compile it left goes on to the limit, and is refused
            await guard.check(Sampling(max_tokens=4, json_schema=SLOW_SCHEMA), engine)
        assert guard.killed == 1
    finally:
        guard.close()


async def test_what_xgrammar_refuses_outright_is_left_to_vllms_own_checks(tiny_tokenizer_info):
    guard = GrammarGuard(timeout=LIMIT)
    try:
        await guard.check(Sampling(max_tokens=4, grammar="root ::= ( unclosed"), TokenizerOnly(tiny_tokenizer_info))
        assert not guard.accepted and not guard.refused
    finally:
        guard.close()


async def test_an_engine_that_compiles_no_grammars_starts_no_worker():
    guard = GrammarGuard(timeout=LIMIT)
    await guard.check(Sampling(max_tokens=4, json_schema=SLOW_SCHEMA), TokenizerOnly(None))
    assert guard.worker is None and not workers()


def test_what_is_checked_is_what_the_engine_compiles():
    assert job_of(Sampling(max_tokens=4)) is None
    assert job_of(Sampling(max_tokens=4, json_object=True)) is None
    assert job_of(Sampling(max_tokens=4, choice=["a", "b"])) is None
    assert job_of(Sampling(max_tokens=4, json_schema=SMALL_SCHEMA)) == ("json", json.dumps(SMALL_SCHEMA))
    assert job_of(Sampling(max_tokens=4, regex="[a-z]+")) == ("regex", "[a-z]+")
    assert job_of(Sampling(max_tokens=4, grammar='root ::= "a"')) == ("grammar", 'root ::= "a"')
