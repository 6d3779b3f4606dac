"""The runner's lifecycle (runner/state.py): the warning a long load gets before go-livepeer's managed-container
clock runs out (past 3 minutes of LOADING every /health poll counts as a failure; two destroy the container)."""

from __future__ import annotations

import asyncio

import structlog

from runner.state import SLOW_LOAD_WARNING, RunnerState
from tests.support.stub_pipeline import StubPipeline


class SlowPipeline(StubPipeline):
    """Loads when the test sets ``loaded``."""

    name = "slow"

    def __init__(self) -> None:
        super().__init__("slow/model", load_waits=True)


def slow_load_warnings(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "pipeline.load.slow"]


def test_the_warning_comes_at_150_s_by_default():
    assert SLOW_LOAD_WARNING == 150.0
    assert RunnerState(SlowPipeline(), load_wait_timeout=1).slow_load_warning == 150.0


async def test_a_load_that_outlasts_the_warning_time_is_warned_about_once():
    pipeline = SlowPipeline()
    state = RunnerState(pipeline, load_wait_timeout=1)
    state.slow_load_warning = 0.1
    with structlog.testing.capture_logs() as logs:
        loading = asyncio.create_task(state.load_pipeline())
        await asyncio.sleep(0.3)
        assert state.health() == "LOADING"
        [warning] = slow_load_warnings(logs)
        assert warning["log_level"] == "warning"
        assert warning["hint"] == "prefetch the model: go-livepeer counts failures from 180 s"
        assert warning["seconds"] >= 0.1
        pipeline.loaded.set()
        await loading
    assert state.health() == "IDLE"
    assert len(slow_load_warnings(logs)) == 1, "once"


async def test_a_load_done_in_time_is_not_warned_about():
    pipeline = SlowPipeline()
    state = RunnerState(pipeline, load_wait_timeout=1)
    state.slow_load_warning = 0.2
    with structlog.testing.capture_logs() as logs:
        pipeline.loaded.set()
        await state.load_pipeline()
        await asyncio.sleep(0.3)
    assert slow_load_warnings(logs) == [], "the timer is cancelled with the load's end"


async def test_a_load_that_fails_early_is_not_warned_about():
    class Failing(SlowPipeline):
        async def load(self) -> None:
            raise ValueError("no such model")

    state = RunnerState(Failing(), load_wait_timeout=1)
    state.slow_load_warning = 0.1
    with structlog.testing.capture_logs() as logs:
        await state.load_pipeline()
        await asyncio.sleep(0.2)
    assert state.health() == "ERROR" and slow_load_warnings(logs) == []
