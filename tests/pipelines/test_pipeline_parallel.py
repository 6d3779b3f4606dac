"""PIPELINE_PARALLEL_SIZE=2 with nothing else set: compiled on CPUs by itself, two stages, the text of one.

Both runners are the tiny model in float32 (DTYPE=float32): in bfloat16 the
hidden state handed from one stage to the next is rounded where one stage keeps
it unrounded, and on some CPUs that is enough to change a greedy token, so a
bfloat16 comparison would test the CPU's rounding, not the pipeline. In float32
both layouts do the same arithmetic on the same weights.

Its own module: a PP=2 runner (two engines) and its PP=1 reference (one) are the
three engines a module may have alive, so it uses no shared runner; two nodes
of one stage each are two.
"""

from __future__ import annotations

import pytest

from tests.pipelines.test_parallel import (
    engine_start,
    lose_the_worker_node,
    start,
    text,
    two_nodes,
    two_ranks_missing,
    wait_idle,
    workers,
)
from tests.support.runners import tiny_engine_env

pytestmark = [pytest.mark.own_engines(3), pytest.mark.skipif(bool(two_ranks_missing()), reason=two_ranks_missing())]


def test_pipeline_parallel_serves_the_tiny_model_like_one_stage_in_float32(tmp_path, tiny_model_dir):
    env = {**tiny_engine_env(tiny_model_dir, core=None), "DTYPE": "float32"}
    one_stage = start(tmp_path, "pp1", env)
    two_stages = start(tmp_path, "pp2", {**env, "PIPELINE_PARALLEL_SIZE": "2"})
    try:
        wait_idle(one_stage)
        wait_idle(two_stages)
        print(f"PP=2 tiny model: IDLE {two_stages.since_launch():.1f} s after launch")
        assert len(workers(two_stages)) == 2, [process.name() for process in two_stages.engine_processes()]
        started = engine_start(two_stages)
        assert started["pipeline_parallel_size"] == 2 and started["enforce_eager"] is False, started
        assert started["dtype"] == engine_start(one_stage)["dtype"] == "float32"
        assert text(two_stages) == text(one_stage), "PP=2 gives the text of PP=1 at temperature 0"
    finally:
        two_stages.stop()
        one_stage.stop()


def test_two_nodes_of_one_stage_each_serve_and_a_lost_worker_node_is_error(tmp_path, tiny_model_dir):
    """NNODES=2 with PIPELINE_PARALLEL_SIZE=2: the worker node's rank is the second stage; losing it is ERROR."""
    with two_nodes(tmp_path, tiny_model_dir, {"PIPELINE_PARALLEL_SIZE": "2"}) as (serving, worker):
        assert text(serving), "the two stages serve"
        lose_the_worker_node(serving, worker)
