"""Tensor and pipeline parallelism on real runner processes: several engine workers, the same text as one.

On this CPU machine every rank is a worker process bound to its own cores
(the runner derives VLLM_CPU_OMP_THREADS_BIND); the text at temperature 0 must
be the one a single worker gives.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from tests.support.nodes import NODE_SECRET, stranger_claims_node, stranger_hangs_up
from tests.support.runner_process import START_TIMEOUT, RunnerProcess, free_port, left_after
from tests.support.runners import TINY_MAX_MODEL_LEN, tiny_engine_env
from tests.support.streams import start_streams

# A TP=2 (or PP=2) runner is an engine core and two workers: it counts as two engines beside a shared runner.


def two_ranks_missing() -> str:
    """Why this machine cannot place two engine ranks ("" when it can): a core each on a CPU, a GPU each on a GPU."""
    from runner.hardware import NVML

    nvml = NVML()
    gpus = nvml.device_count()
    nvml.close()
    if gpus:
        return "" if gpus >= 2 else f"this machine has {gpus} GPU; two ranks need two"
    return "" if len(os.sched_getaffinity(0)) >= 2 else "this machine has one core; two ranks need two"


pytestmark = [pytest.mark.own_engines(2), pytest.mark.skipif(bool(two_ranks_missing()), reason=two_ranks_missing())]

PROMPT = {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
          "max_tokens": 24, "temperature": 0}


def complete(runner: RunnerProcess, body: dict = PROMPT, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        f"{runner.url}/llm", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def text(runner: RunnerProcess) -> str:
    return complete(runner)["choices"][0]["message"]["content"]


def workers(runner: RunnerProcess) -> list[psutil.Process]:
    """The engine's worker processes (vLLM names them VLLM::Worker_TP0, VLLM::Worker_PP1, ...)."""
    found = []
    for process in runner.engine_processes():
        try:
            if "Worker" in process.name() or "Worker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def engine_start(runner: RunnerProcess) -> dict:
    return next(json.loads(line) for line in runner.log_path.read_text().splitlines() if '"engine.start"' in line)


def start(tmp_path, name: str, env: dict[str, str], cpus: set[int] | None = None) -> RunnerProcess:
    runner = RunnerProcess(name, env, tmp_path / f"{name}.log", cpus=cpus)
    runner.start()
    return runner


def wait_idle(runner: RunnerProcess, timeout: float = START_TIMEOUT) -> None:
    assert runner.wait_until({"IDLE", "ERROR"}, timeout) == "IDLE", runner.log_tail(60)


def left_behind(processes: list[psutil.Process], timeout: float = 5) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [process for process in alive if process.status() != psutil.STATUS_ZOMBIE]


def test_tensor_parallel_serves_the_tiny_model_like_one_rank_and_a_dead_rank_is_error(tmp_path, tiny_model_dir,
                                                                                       tiny_runner):
    env = {**tiny_engine_env(tiny_model_dir, core=None), "TENSOR_PARALLEL_SIZE": "2"}
    runner = start(tmp_path, "tp2", env)
    try:
        wait_idle(runner)
        ranks = workers(runner)
        assert len(ranks) == 2, [process.name() for process in runner.engine_processes()]
        cores = sorted(os.sched_getaffinity(0))
        binding = engine_start(runner)["environment"]["VLLM_CPU_OMP_THREADS_BIND"]
        assert len(binding.split("|")) == 2 and set(binding.replace("|", ",").split(",")) <= {str(c) for c in cores}
        one_rank = text(tiny_runner)
        assert text(runner) == one_rank, "TP=2 gives the text of TP=1 at temperature 0"

        # One rank dies: the runner says ERROR within 5 s, and stops what is left of its engine on SIGTERM.
        engine = runner.engine_processes()
        killed_at = time.monotonic()
        ranks[1].kill()
        while runner.health() != "ERROR":
            assert time.monotonic() - killed_at < 5, "no ERROR within 5 s of a worker's death"
            time.sleep(0.1)
        runner.process.send_signal(signal.SIGTERM)
        assert runner.process.wait(timeout=8) == 0
        assert not left_behind(engine), "engine processes left behind"
    finally:
        runner.stop()


def node_processes(runner: RunnerProcess) -> list[psutil.Process]:
    """A runner and everything it started (a worker node's ranks run in a process group of their own), noted."""
    return runner.record_descendants()


def kill_outright(runner: RunnerProcess) -> float:
    """SIGKILL the runner's process, as a crash or the OOM killer ends it; the seconds until nothing it started runs.

    Its processes (its engine, a worker node's ranks, which ignore SIGTERM) have no one to stop them: each must end
    with its parent. Fails if any is left after 2 s.
    """
    started = node_processes(runner)[1:]
    assert started, "the runner had started nothing to leave behind"
    killed_at = time.monotonic()
    runner.process.kill()
    runner.process.wait()
    left = left_after(started, timeout=2)
    assert not left, f"processes outlived their runner, killed with SIGKILL: {left}"
    return time.monotonic() - killed_at


def post(runner: RunnerProcess, body: dict = PROMPT) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{runner.url}/llm", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def sigterm_exit_seconds(runner: RunnerProcess) -> tuple[float, list[psutil.Process]]:
    processes = node_processes(runner)
    sent_at = time.monotonic()
    runner.process.send_signal(signal.SIGTERM)
    runner.process.wait(timeout=8)
    return time.monotonic() - sent_at, left_behind(processes, timeout=1)


def node_ports() -> tuple[int, int]:
    """A MASTER_PORT and a NODE_LINE_PORT for a pair of nodes on loopback (both free now)."""
    return free_port(), free_port()


def two_node_env(tiny_model_dir, ports: tuple[int, int], node_rank: int,
                 layout: dict[str, str] | None = None) -> dict[str, str]:
    master_port, line_port = ports
    return {**tiny_engine_env(tiny_model_dir, core=None),
            **(layout or {"TENSOR_PARALLEL_SIZE": "2"}), "NNODES": "2", "NODE_RANK": str(node_rank),
            "NODE_SECRET": NODE_SECRET,
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "NODE_LINE_PORT": str(line_port)}


@contextlib.contextmanager
def two_nodes(tmp_path, tiny_model_dir, layout: dict[str, str] | None = None,
              ) -> Iterator[tuple[RunnerProcess, RunnerProcess]]:
    """A serving node and a worker node on loopback, a core each, both IDLE; both stopped at the end."""
    cores = sorted(os.sched_getaffinity(0))
    ports = node_ports()
    serving = start(tmp_path, "node0", two_node_env(tiny_model_dir, ports, 0, layout), cpus={cores[0]})
    worker = start(tmp_path, "node1", two_node_env(tiny_model_dir, ports, 1, layout), cpus={cores[-1]})
    try:
        wait_idle(serving)
        wait_idle(worker)
        print(f"two-node start ({layout or 'TP=2'}): serving node IDLE at {serving.since_launch():.1f} s, "
              f"worker node at {worker.since_launch():.1f} s")
        # The join is told apart from the engine's start: the serving node logs it before its load is done.
        events = [json.loads(line) for line in serving.log_path.read_text().splitlines() if line.startswith("{")]
        names = [event["event"] for event in events]
        assert "serving_node.worker_nodes_joined" in names, names
        assert names.index("serving_node.worker_nodes_joined") < names.index("pipeline.load.done"), names
        joined = events[names.index("serving_node.worker_nodes_joined")]
        print(f"worker node joined {joined['seconds']} s after the serving node's engine start began; its load took "
              f"{events[names.index('pipeline.load.done')]['seconds']} s in all")
        yield serving, worker
    finally:
        serving.stop()
        worker.stop()


def lose_the_worker_node(serving: RunnerProcess, worker: RunnerProcess, how: str = "kill") -> float:
    """Lose the worker node with a stream in flight on the serving node: ``kill`` its runner, or ``sigterm`` it.

    A worker node's runner killed with SIGKILL (a crash, the OOM killer) must take
    its ranks with it within 2 s; one sent SIGTERM must exit with 0 within 6 s,
    leaving nothing behind. Either way, checks that the serving node says ERROR within 5 s, names the node
    in its log, ends the stream with its in-band error (no hang), refuses new
    requests with 503 and stops within 8 s of SIGTERM, leaving nothing behind.
    Returns the seconds from the kill or the SIGTERM to ERROR.
    """
    [stream] = start_streams(f"{serving.url}/llm", 1, max_tokens=TINY_MAX_MODEL_LEN - 64)
    if how == "kill":
        lost_at = time.monotonic()
        gone = kill_outright(worker)
        print(f"worker node's runner killed (SIGKILL): its ranks were gone {gone:.3f} s later")
    else:
        lost_at = time.monotonic()
        seconds, left = sigterm_exit_seconds(worker)
        print(f"worker node exited {seconds:.2f} s after SIGTERM")
        assert worker.process.returncode == 0, worker.log_tail()
        assert seconds <= 6 and not left, (seconds, left)
    while serving.health() != "ERROR":
        assert time.monotonic() - lost_at < 5, "no ERROR within 5 s of losing the worker node"
        time.sleep(0.05)
    seconds = time.monotonic() - lost_at
    print(f"serving node ERROR {seconds:.2f} s after the worker node was lost ({how})")
    stream.join(timeout=30)
    assert not stream.is_alive(), "the stream in flight hangs after the worker node was lost"
    print(f"the stream in flight ended {stream.ended_at - lost_at:.2f} s after the loss: {stream.error!r}")
    assert stream.error or stream.failure, "the stream in flight ends with an error"
    status, body = post(serving)
    assert status == 503, (status, body)
    [lost] = [json.loads(line) for line in serving.log_path.read_text().splitlines()
              if '"serving_node.worker_node_lost"' in line]
    assert lost["node"] == 1 and lost["ranks"], lost
    seconds_to_exit, left = sigterm_exit_seconds(serving)
    print(f"serving node exited {seconds_to_exit:.2f} s after SIGTERM")
    assert seconds_to_exit <= 8
    assert not left, f"left behind: {left}"
    return seconds


def test_two_nodes_on_loopback_serve_like_one_and_a_worker_node_killed_outright_is_error(tmp_path, tiny_model_dir,
                                                                                        tiny_runner):
    """Two nodes give one node's text; a stranger on the line port changes nothing; a worker node's runner killed
    with SIGKILL takes its ranks along, and the serving node says ERROR.

    tests/pipelines/test_pipeline_parallel.py kills one under pipeline parallelism; the serving node killed
    outright: test_a_worker_node_exits_when_the_serving_node_dies.
    """
    with two_nodes(tmp_path, tiny_model_dir) as (serving, worker):
        assert text(serving) == text(tiny_runner), "two nodes give the text of one at temperature 0"
        status, body = post(worker)
        assert status == 503 and "serves no requests" in body["detail"]["msg"], (status, body)
        line_port = int(serving.env["NODE_LINE_PORT"])
        stranger_hangs_up(line_port)
        assert stranger_claims_node(line_port)["refused"].startswith("its proof does not match this node's NODE_SECRET")
        time.sleep(1)
        assert serving.health() == "IDLE" and worker.health() == "IDLE", "a stranger's line changes nothing"
        assert text(serving)
        lose_the_worker_node(serving, worker, how="kill")


def test_a_worker_node_exits_when_the_serving_node_dies(tmp_path, tiny_model_dir):
    """The serving node killed outright (SIGKILL: a crash, the OOM killer): its engine goes with it, and the worker
    node sees its line close and stops, leaving nothing. (Its stop on SIGTERM: lose_the_worker_node's end.)"""
    with two_nodes(tmp_path, tiny_model_dir) as (serving, worker):
        worker_processes = node_processes(worker)
        gone = kill_outright(serving)
        print(f"serving node's runner killed (SIGKILL): its engine was gone {gone:.3f} s later")
        gone_at = time.monotonic()
        assert worker.process.wait(timeout=10) == 0, worker.log_tail()
        print(f"worker node exited {time.monotonic() - gone_at:.2f} s after the serving node")
        assert not left_behind(worker_processes, timeout=1), "worker node left processes behind"


def wait_error(runner: RunnerProcess, timeout: float) -> str:
    """The runner's ERROR reason (from its log) once /health says ERROR, within ``timeout`` seconds."""
    assert runner.wait_until({"ERROR", "IDLE"}, timeout) == "ERROR", runner.log_tail()
    return next(json.loads(line)["reason"] for line in runner.log_path.read_text().splitlines()
                if '"pipeline.load.failed"' in line)


def test_nodes_that_never_meet_are_error_naming_why_and_stop_on_sigterm(tmp_path, tiny_model_dir):
    """A worker node whose master never answers, and a serving node whose worker nodes never join (side by side)."""
    cores = sorted(os.sched_getaffinity(0))
    worker_wait, serving_wait = 3, 5
    worker = start(tmp_path, "lonely-node1", {**two_node_env(tiny_model_dir, node_ports(), 1),
                                               "MASTER_WAIT_TIMEOUT": str(worker_wait)}, cpus={cores[-1]})
    serving_ports = node_ports()
    serving = start(tmp_path, "lonely-node0", {**two_node_env(tiny_model_dir, serving_ports, 0),
                                                "MASTER_WAIT_TIMEOUT": str(serving_wait)}, cpus={cores[0]})
    # The stranger: connects to the waiting serving node's line port first, says {"node": 1}, hangs up.
    stranger = concurrent.futures.ThreadPoolExecutor(1).submit(stranger_hangs_up, serving_ports[1])
    try:
        reason = wait_error(worker, timeout=worker_wait + 60)  # + importing vLLM, and a loaded machine
        print(f"worker node without a master: ERROR at {worker.since_launch():.1f} s (MASTER_WAIT_TIMEOUT="
              f"{worker_wait} s)")
        assert "MASTER_WAIT_TIMEOUT" in reason and "MASTER_ADDR" in reason, reason

        reason = wait_error(serving, timeout=serving_wait + 60)
        print(f"serving node without worker nodes: ERROR at {serving.since_launch():.1f} s (MASTER_WAIT_TIMEOUT="
              f"{serving_wait} s)")
        print(f"its reason: {reason}")
        assert "MASTER_WAIT_TIMEOUT" in reason and "worker node NODE_RANK=1 (engine rank 1) never reached" in reason, \
            reason
        stranger.result(timeout=1)
        assert "1 connection to NODE_LINE_PORT did not prove to know NODE_SECRET and was refused" in reason, reason

        for node in (worker, serving):
            seconds, left = sigterm_exit_seconds(node)
            print(f"{node.name} exited {seconds:.2f} s after SIGTERM")
            assert not left, f"left behind: {left}"
    finally:
        worker.stop()
        serving.stop()
