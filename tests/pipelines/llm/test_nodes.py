"""The lines between nodes (pipelines.llm.nodes), over loopback, without an engine."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.llm import nodes
from pipelines.llm.nodes import ServingNodeLine, WorkerNodeLines
from pipelines.llm.settings import LLMSettings
from tests.support.runner_process import free_port


def settings(node_rank: int, port: int, **extra) -> LLMSettings:
    return LLMSettings(NNODES=3, NODE_RANK=node_rank, PIPELINE_PARALLEL_SIZE=3, TENSOR_PARALLEL_SIZE=2,
                       MASTER_ADDR="127.0.0.1", NODE_LINE_PORT=port, **extra)


def test_the_line_port_defaults_to_the_port_after_master_port():
    assert LLMSettings(MASTER_PORT=29501).node_line_port == 29502
    assert LLMSettings(MASTER_PORT=29501, NODE_LINE_PORT=4000).node_line_port == 4000


async def test_join_is_told_apart_from_start_and_a_closed_line_is_a_lost_node_named_with_its_ranks():
    port = free_port()
    lost: list[str] = []
    serving = WorkerNodeLines(settings(0, port), lost.append)
    await serving.open()
    one, two = ServingNodeLine(settings(1, port)), ServingNodeLine(settings(2, port))
    one.start()
    two.start()
    await asyncio.sleep(0.3)
    assert serving.connected == {1, 2} and not serving.all_joined.is_set()
    assert serving.missing() == ("worker node NODE_RANK=1 (engine ranks 2, 3) connected, but its ranks have not joined "
                                 "the engine's master yet; worker node NODE_RANK=2 (engine ranks 4, 5) connected, but "
                                 "its ranks have not joined the engine's master yet")
    one.mark_joined()
    await asyncio.sleep(0.2)
    assert serving.joined == {1} and "NODE_RANK=2" in serving.missing() and "NODE_RANK=1" not in serving.missing()
    two.mark_joined()
    await asyncio.wait_for(serving.all_joined.wait(), 1)
    await two.close()
    await asyncio.sleep(0.2)
    assert lost == ["worker node NODE_RANK=2 (engine ranks 4, 5) went away: its line closed (its runner stopped or "
                    "died); restart the worker nodes, then this runner"]
    # The serving node's stop closes the other line: the worker node sees it go, and no loss is reported.
    await serving.close()
    await asyncio.wait_for(one.lost.wait(), 1)
    assert len(lost) == 1
    await one.close()


async def test_a_node_that_never_connects_is_named_and_a_silent_line_is_lost(monkeypatch):
    monkeypatch.setattr(nodes, "BEAT_TIMEOUT", 0.5)
    port = free_port()
    lost: list[str] = []
    serving = WorkerNodeLines(settings(0, port), lost.append)
    await serving.open()
    assert serving.missing().startswith(f"worker node NODE_RANK=1 (engine ranks 2, 3) never reached this node's line "
                                        f"at NODE_LINE_PORT={port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"node": 1, "joined": true}\n')  # then nothing: a node that hangs
    await asyncio.sleep(1.0)
    assert lost and "no beat for 0.5 s" in lost[0] and "NODE_RANK=1" in lost[0]
    writer.close()
    await serving.close()


@pytest.fixture(autouse=True)
def _quiet_beats(monkeypatch):
    monkeypatch.setattr(nodes, "BEAT_INTERVAL", 0.05)
