"""The lines between nodes (pipelines.llm.nodes), over loopback, without an engine."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from pipelines.llm import nodes
from pipelines.llm.host import EngineHost
from pipelines.llm.nodes import ServingNodeLine, WorkerNodeLines
from pipelines.llm.settings import LLMSettings
from tests.support.fake_engine import FakeBackend, FakeEngine, fake_model_dir
from tests.support.nodes import NODE_SECRET, stranger_claims_node
from tests.support.runner_process import free_port


def settings(node_rank: int, port: int, **extra) -> LLMSettings:
    return LLMSettings(NNODES=3, NODE_RANK=node_rank, PIPELINE_PARALLEL_SIZE=3, TENSOR_PARALLEL_SIZE=2,
                       MASTER_ADDR="127.0.0.1", NODE_LINE_PORT=port, **{"NODE_SECRET": NODE_SECRET, **extra})


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
    assert set(serving.connected) == {1, 2} and not serving.all_joined.is_set()
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
    assert lost == [("worker node NODE_RANK=2 (engine ranks 4, 5) went away: its line closed (its runner stopped or "
                     "died); restart the worker nodes, then this runner")]
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
    challenge = json.loads(await reader.readline())["challenge"]
    proof = nodes.proof(NODE_SECRET, challenge, 1)
    writer.write(json.dumps({"node": 1, "joined": True, "proof": proof}).encode() + b"\n")  # then nothing: it hangs
    await asyncio.sleep(1.0)
    assert not lost, "silence is not judged while the engine starts"
    serving.watch_silence()
    await asyncio.sleep(1.0)
    assert lost and "no beat for 0.5 s" in lost[0] and "NODE_RANK=1" in lost[0]
    writer.close()
    await serving.close()


@pytest.fixture(autouse=True)
def _quiet_beats(monkeypatch):
    monkeypatch.setattr(nodes, "BEAT_INTERVAL", 0.05)
    monkeypatch.setattr(nodes, "CONNECT_RETRY", 0.05)


class BlockingBackend(FakeBackend):
    """Its engine "starts" until the test releases it, as a compile would."""

    def __init__(self, engine: FakeEngine, release: threading.Event) -> None:
        super().__init__(engine)
        self.release = release

    def start_engine(self, args, environment):
        self.release.wait(10)
        return super().start_engine(args, environment)


def serving_host(tmp_path, backend: FakeBackend, port: int, wait: float) -> EngineHost:
    model = fake_model_dir(tmp_path / "model")
    settings = LLMSettings.model_validate({"NNODES": 2, "NODE_RANK": 0, "TENSOR_PARALLEL_SIZE": 2, "NODE_SECRET": NODE_SECRET,
                                           "NODE_LINE_PORT": port, "MASTER_WAIT_TIMEOUT": wait})
    return EngineHost(settings, str(model), model, backend=lambda: backend, gpus=0, cpus={0, 1})


async def test_a_worker_node_that_never_joins_is_a_join_timeout_that_names_it(tmp_path):
    release = threading.Event()
    backend = BlockingBackend(FakeEngine(), release)
    port = free_port()
    host = serving_host(tmp_path, backend, port, wait=0.5)
    try:
        with pytest.raises(ValueError) as failure:
            await host.start()
    finally:
        release.set()
        await host.close()
    assert str(failure.value).startswith(
        "not every worker node joined within MASTER_WAIT_TIMEOUT (0.5 s): worker node NODE_RANK=1 (engine rank 1) "
        f"never reached this node's line at NODE_LINE_PORT={port}"), failure.value
    assert backend.stopped_processes == 1, "the half-started engine is ended"


async def test_once_every_node_joined_a_slow_start_is_no_join_failure_and_a_lost_node_ends_the_engine(tmp_path):
    release = threading.Event()
    engine = FakeEngine()
    backend = BlockingBackend(engine, release)
    port = free_port()
    host = serving_host(tmp_path, backend, port, wait=1.0)
    worker = ServingNodeLine(LLMSettings.model_validate({"NNODES": 2, "NODE_RANK": 1, "TENSOR_PARALLEL_SIZE": 2, "NODE_SECRET": NODE_SECRET,
                                                         "NODE_LINE_PORT": port}))
    starting = asyncio.create_task(host.start())
    worker.mark_joined()
    worker.start()
    await asyncio.sleep(2.0)  # twice MASTER_WAIT_TIMEOUT, all joined: still starting
    assert not starting.done()
    release.set()
    assert await asyncio.wait_for(starting, 5) is engine
    assert host.failure() is None
    await worker.close()
    await asyncio.sleep(0.3)
    assert host.failure().startswith("worker node NODE_RANK=1 (engine rank 1) went away: its line closed")
    await host.close()
    assert backend.stopped_processes == 1, "the engine is ended, so requests in flight fail instead of hanging"


async def test_a_line_port_in_use_says_which_setting_to_change():
    port = free_port()
    first = WorkerNodeLines(settings(0, port), print)
    await first.open()
    try:
        with pytest.raises(ValueError, match=f"NODE_LINE_PORT={port}"):
            await WorkerNodeLines(settings(0, port), print).open()
    finally:
        await first.close()


def test_several_nodes_need_a_node_secret_that_nobody_guesses():
    for secret, says in ((None, "(it is unset)"), ("short", "(it has 5 characters that are not blank)"),
                         (" " * 40, "(it has 0 characters")):
        values = {"NNODES": "2", "TENSOR_PARALLEL_SIZE": "2"} | ({"NODE_SECRET": secret} if secret is not None else {})
        with pytest.raises(ValueError) as refused:
            LLMSettings.model_validate(values)
        assert "NNODES=2 needs NODE_SECRET, the same secret on every node, of at least 16 characters" in str(refused.value)
        assert says in str(refused.value)
    assert LLMSettings.model_validate({"NODE_SECRET": "x"}).nnodes == 1, "one node has no lines: no secret needed"
    assert NODE_SECRET not in repr(settings(0, 1)), "the secret is never shown"


async def test_a_stranger_on_the_line_port_changes_nothing_and_the_real_node_still_joins():
    """Before: a stranger who connected first, said {"node": 1} and hung up made the serving node ERROR for good."""
    port = free_port()
    lost: list[str] = []
    serving = WorkerNodeLines(settings(0, port), lost.append)
    await serving.open()
    try:
        # A stranger connects first, says {"node": 1} and hangs up, as the did.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b'{"node": 1}\n')
        writer.close()
        await asyncio.sleep(0.2)
        assert not lost, "a stranger's hang-up is no lost node"
        # One that reads the challenge and answers it without the secret is told why.
        answer = await asyncio.to_thread(stranger_claims_node, port, 1)
        assert answer == {"refused": "its proof does not match this node's NODE_SECRET (a stranger, or a node given "
                                     "another secret)"}
        # One that sends no JSON is refused too.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\xff\xfe garbage\n")
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.2)
        assert not lost and not serving.connected and serving.refused == 3
        assert "3 connections to NODE_LINE_PORT did not prove to know NODE_SECRET and were refused" in serving.missing()
        # The real nodes still connect and join; a stranger's claim to a node already connected changes nothing either.
        one, two = ServingNodeLine(settings(1, port)), ServingNodeLine(settings(2, port))
        one.mark_joined()
        two.mark_joined()
        one.start()
        two.start()
        await asyncio.wait_for(serving.all_joined.wait(), 2)
        assert (await asyncio.to_thread(stranger_claims_node, port, 1))["refused"].startswith("its proof does not match")
        await asyncio.sleep(0.2)
        assert not lost and set(serving.connected) == {1, 2} and one.refused is None
        await one.close()
        await asyncio.sleep(0.2)
        assert len(lost) == 1 and "NODE_RANK=1" in lost[0], "the real node's line still counts"
        await two.close()
    finally:
        await serving.close()


async def test_a_worker_node_given_another_secret_is_refused_and_told_why():
    port = free_port()
    lost: list[str] = []
    serving = WorkerNodeLines(settings(0, port), lost.append)
    await serving.open()
    other = ServingNodeLine(settings(1, port, NODE_SECRET="another-secret-of-16-chars"))
    other.start()
    try:
        await asyncio.wait_for(other.lost.wait(), 2)
        assert other.refused == (f"the serving node at 127.0.0.1:{port} refused this node's line: its proof does not "
                                 "match this node's NODE_SECRET (a stranger, or a node given another secret)")
        assert not lost and not serving.connected
    finally:
        await other.close()
        await serving.close()
