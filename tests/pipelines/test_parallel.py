"""Tensor and pipeline parallelism on real runner processes: several engine workers, the same text as one.

On this CPU machine every rank is a worker process bound to its own cores
(the runner derives VLLM_CPU_OMP_THREADS_BIND); the text at temperature 0 must
be the one a single worker gives.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import psutil
import pytest

from tests.conftest import DEFAULT_MODEL_ID, START_TIMEOUT, TINY_MAX_MODEL_LEN, RunnerProcess

# A TP=2 (or PP=2) runner is an engine core and two workers: it counts as two engines beside a shared runner.
pytestmark = pytest.mark.own_engines(2)

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
    env = {"MODEL_ID": str(tiny_model_dir), "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN), "KV_CACHE_GIB": "0.25",
           "TENSOR_PARALLEL_SIZE": "2"}
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
