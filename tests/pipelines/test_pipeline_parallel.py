"""PIPELINE_PARALLEL_SIZE=2 with nothing else set: compiled on CPUs by itself, two stages, the text of one.

The PP=1 reference is the shared tiny runner. On a CPU both runners are the
tiny model in float32 (DTYPE=auto is float32 on every CPU; the test checks
it): in bfloat16 the hidden state handed from one stage to the next is rounded
where one stage keeps it unrounded, and on some CPUs that is enough to change a
greedy token, so a bfloat16 comparison would test the CPU's rounding, not the
pipeline. In float32 both layouts do the same arithmetic on the same weights.

Its own module: a PP=2 runner is two engines, so beside the tiny runner it is the
three a module may have alive; so are two nodes of one stage each.
"""

from __future__ import annotations

import pytest

from pipelines.llm.host import count_gpus
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

pytestmark = [pytest.mark.own_engines(2), pytest.mark.skipif(bool(two_ranks_missing()), reason=two_ranks_missing())]


def test_pipeline_parallel_serves_the_tiny_model_like_one_stage_in_float32(tmp_path, tiny_model_dir, tiny_runner):
    one_stage = tiny_runner
    two_stages = start(tmp_path, "pp2", {**tiny_engine_env(tiny_model_dir, core=None), "PIPELINE_PARALLEL_SIZE": "2"})
    try:
        wait_idle(two_stages)
        print(f"PP=2 tiny model: IDLE {two_stages.since_launch():.1f} s after launch")
        assert len(workers(two_stages)) == 2, [process.name() for process in two_stages.engine_processes()]
        started = engine_start(two_stages)
        assert started["pipeline_parallel_size"] == 2 and started["enforce_eager"] is False, started
        # DTYPE=auto on both: float32 on a CPU; on a GPU, the checkpoint's on both.
        dtype = engine_start(one_stage)["dtype"]
        assert started["dtype"] == dtype and (dtype == "float32" or count_gpus()), (started["dtype"], dtype)
        assert text(two_stages) == text(one_stage), "PP=2 gives the text of PP=1 at temperature 0"
    finally:
        two_stages.stop()


def test_two_nodes_of_one_stage_each_serve_and_a_lost_worker_node_is_error(tmp_path, tiny_model_dir):
    """NNODES=2 with PIPELINE_PARALLEL_SIZE=2: the worker node's rank is the second stage; losing it is ERROR."""
    with two_nodes(tmp_path, tiny_model_dir, {"PIPELINE_PARALLEL_SIZE": "2"}) as (serving, worker):
        assert text(serving), "the two stages serve"
        lose_the_worker_node(serving, worker)
