"""PIPELINE_PARALLEL_SIZE=2 on the default model, with nothing else set: compiled on CPUs by itself, two stages.

Its own module: beside the shared default runner it is two engines, and the
tensor-parallel module's tiny runner would make four.
"""

from __future__ import annotations

import pytest

from tests.pipelines.test_parallel import (
    engine_start,
    start,
    text,
    two_ranks_missing,
    wait_idle,
    workers,
)
from tests.support.runner_process import DEFAULT_MODEL_ID

pytestmark = [pytest.mark.own_engines(2), pytest.mark.skipif(bool(two_ranks_missing()), reason=two_ranks_missing())]


def test_pipeline_parallel_serves_the_default_model_like_one_stage(tmp_path, model_store, default_runner):
    runner = start(tmp_path, "pp2", {"MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": str(model_store),
                                     "PIPELINE_PARALLEL_SIZE": "2"})
    try:
        wait_idle(runner)
        print(f"PP=2 default model: IDLE {runner.since_launch():.1f} s after launch")
        assert len(workers(runner)) == 2, [process.name() for process in runner.engine_processes()]
        started = engine_start(runner)
        assert started["pipeline_parallel_size"] == 2 and started["enforce_eager"] is False, started
        assert text(runner) == text(default_runner), "PP=2 gives the text of PP=1 at temperature 0"
    finally:
        runner.stop()
