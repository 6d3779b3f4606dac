"""The runner's life as go-livepeer sees it, on real runner processes.

Starting, loading, serving, failing to load, losing the engine, and stopping on
SIGTERM, each read through /health and the status codes the orchestrator acts on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from pipelines.llm.host import count_gpus
from tests.support.runner_process import (
    RunnerProcess,
    get_json,
    left_after,
    post_json,
    started_ahead,
    still_running,
)
from tests.support.runners import TINY_MAX_MODEL_LEN, tiny_engine_env
from tests.support.streams import start_streams

# The cut stream's runner and test_sigterm_while_the_engine_starts_stops_it's are engines of their own, one at a
# time: the first starts with the module, behind the tests before its own; the drain test stops the shared drained
# runner.
pytestmark = [pytest.mark.own_engines(1), pytest.mark.ends_runners("drained")]

SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
AT_EXIT_TRACKER_GRACE = 0.5  # seconds; it ends once it reads its pipe's end, milliseconds after the runner's exit


def test_health_answers_loading_at_once_then_idle(tiny_runner):
    answered = [(at, status) for at, status in tiny_runner.timeline if status is not None]
    first_at, first_status = answered[0]
    assert first_status == "LOADING"
    statuses = [status for _, status in answered]
    # Ready is IDLE, or OK while this runner serves the request it was sent as it loaded.
    ready_at = next(index for index, status in enumerate(statuses) if status != "LOADING")
    assert statuses[ready_at] in {"IDLE", "OK"}, statuses
    assert set(statuses[:ready_at]) == {"LOADING"}, "nothing but LOADING until the engine is warm"
    assert "IDLE" in statuses[ready_at:]
    # The suite starts six runners at once on two cores; alone, the first answer comes in under a
    # second (`make bench` measures it). Here it must come long before the engine is ready.
    ready_s = answered[ready_at][0]
    assert first_at < min(30, ready_s / 2), f"/health first answered {first_at:.1f} s, ready at {ready_s:.1f} s"
    assert "ERROR" not in statuses


def test_request_sent_while_loading_waits_and_is_served(tiny_runner):
    sent_at, _ = tiny_runner.loading_request
    deadline = time.monotonic() + 60
    while tiny_runner.loading_request[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tiny_runner.loading_request[1] == 200
    idle_at = next(at for at, status in tiny_runner.timeline if status == "IDLE")
    assert sent_at < idle_at, "the request was sent before the runner was ready"


def test_never_idle_while_a_request_is_in_flight(tiny_runner):
    """The orchestrator pools a container that says IDLE and sends it more work."""
    seen: list[str] = []
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 1500, "temperature": 0}
    status: list[int] = []
    request = threading.Thread(target=lambda: status.append(post_json(f"{tiny_runner.url}/llm", body)))
    request.start()
    while request.is_alive():
        seen.append(get_json(f"{tiny_runner.url}/health")["status"])
        time.sleep(0.05)
    assert status == [200]
    assert "OK" in seen
    # Between the thread starting and the request arriving, IDLE is the truth; so it is between the
    # runner's sending the answer's last byte and the thread's return (on a loaded machine, several polls).
    first_ok, last_ok = seen.index("OK"), len(seen) - 1 - seen[::-1].index("OK")
    assert "IDLE" not in seen[first_ok:last_ok], seen
    assert get_json(f"{tiny_runner.url}/health")["status"] == "IDLE"


def failing_runner(tmp_path, name: str, cpus: set[int] | None = None, **env: str) -> RunnerProcess:
    runner = RunnerProcess(name, env, tmp_path / f"{name}.log", cpus=cpus)
    runner.start()
    return runner


def test_load_failures_say_error_with_the_reason(tmp_path, tiny_model_dir):
    """In a real process, on a real model's config and this process's own cores; every other reason a start
    fails is checked in-process on the host (tests/pipelines/llm/test_host.py)."""
    tiny = str(tiny_model_dir)
    gpus = count_gpus()
    cases = {
        "unknown-model": ({"MODEL_ID": "nobody/no-such-model", "MODEL_DIR": str(tmp_path)}, "nobody/no-such-model"),
        "tensor-parallel": ({"MODEL_ID": tiny, "TENSOR_PARALLEL_SIZE": "3"}, "TENSOR_PARALLEL_SIZE=3 must divide"),
        # Each rank needs a device: on a machine without a GPU a core, so 4 ranks on the one core it is given.
        "devices": ({"MODEL_ID": tiny, "TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2"},
                    f"= 4 GPUs, but this machine has {gpus}" if gpus else
                    "= 4 ranks of at least one core each, but this machine has 1 core:"),
    }
    if gpus >= 4:
        del cases["devices"]
    if not gpus:  # on a GPU, USE_8BIT starts (tests/pipelines/llm/test_host.py has its refusals there)
        cases["8bit"] = ({"MODEL_ID": tiny, "USE_8BIT": "true"}, "USE_8BIT needs an NVIDIA GPU")
    runners = {
        name: failing_runner(tmp_path, name, cpus={min(os.sched_getaffinity(0))} if name == "devices" else None, **env)
        for name, (env, _) in cases.items()
    }
    try:
        for name, (_, reason) in cases.items():
            runner = runners[name]
            assert runner.wait_until({"ERROR", "IDLE"}, timeout=120) == "ERROR", name
            assert runner.process.poll() is None, "the process stays up to report the failure"
            failures = [
                json.loads(line) for line in runner.log_path.read_text().splitlines()
                if '"pipeline.load.failed"' in line
            ]
            assert failures and reason in failures[0]["reason"], (name, failures)
            assert post_json(f"{runner.url}/llm", SHORT) == 503, name
    finally:
        for runner in runners.values():
            runner.stop()


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended, or a zombie: psutil cannot read it any more
        return ""


def left_at_exit(runner: RunnerProcess) -> list[psutil.Process]:
    """What the runner started that still runs now that its process has exited (it must have ended them first).

    multiprocessing's resource tracker is the one process allowed to outlive it,
    by as long as it takes to see it gone (it removes the shared memory the
    engine's processes leave, then ends): AT_EXIT_TRACKER_GRACE.
    """
    assert runner.process.poll() is not None
    left = runner.left_behind()
    trackers = [process for process in left if "resource_tracker" in command_line(process)]
    # One that ended while it was looked at (its command line then reads empty) is gone, not left.
    left = [process for process in left if process not in trackers and still_running(process)]
    if trackers:
        began = time.monotonic()
        late = left_after(trackers, AT_EXIT_TRACKER_GRACE)
        print(f"resource tracker ended {time.monotonic() - began:.3f} s after the runner's exit")
        left += late
    return left


@pytest.fixture(scope="module", autouse=True)
def cut_runner(request, tmp_path_factory, tiny_model_dir) -> Iterator[RunnerProcess]:
    """The cut stream's runner: started with the module, its engine starts while the tests before its own run.

    Its test comes before the drain test, so that no engine is starting while that one times its streams.
    """
    runner = RunnerProcess("cut", tiny_engine_env(tiny_model_dir, core=None), tmp_path_factory.mktemp("cut") / "cut.log")
    with started_ahead(request, runner, CUT_TEST):
        yield runner


CUT_TEST = "test_sigterm_cuts_a_stream_that_outlasts_drain_timeout_with_its_error_and_exits_within_8_s"


def test_sigterm_cuts_a_stream_that_outlasts_drain_timeout_with_its_error_and_exits_within_8_s(cut_runner):
    runner = cut_runner
    try:
        assert runner.wait_until({"IDLE", "ERROR"}) == "IDLE", runner.log_tail()
        [stream] = start_streams(f"{runner.url}/llm", 1, max_tokens=TINY_MAX_MODEL_LEN - 64)
        runner.record_descendants()
        signalled_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        exit_code = runner.process.wait(timeout=30)
        took = time.monotonic() - signalled_at
        stream.join(timeout=5)
        print(f"SIGTERM with a stream outlasting DRAIN_TIMEOUT (5 s): stream ended "
              f"{stream.ended_at - signalled_at:.2f} s, process exited {took:.2f} s after the signal")
        assert stream.error and "DRAIN_TIMEOUT" in stream.error, (stream.status, stream.done, stream.error,
                                                                  stream.failure, len(stream.events))
        assert stream.done, "the cut stream still ends with [DONE] after its error event"
        assert exit_code == 0
        assert took <= 8, f"exit took {took:.1f} s; go-livepeer kills after 8"
        assert not left_at_exit(runner), "processes of the runner outlived it"
    finally:
        runner.stop()


def test_sigterm_drains_in_flight_streams_refuses_new_and_exits_within_6_s(drained_runner):
    """Three streams in flight at SIGTERM finish; the process (not a log line) is gone within 6 s, engine and all."""
    url = f"{drained_runner.url}/llm"
    # Streams that last about 2 s here, on this machine's pace: three of 400 tokens, timed. A token late in a
    # stream costs more than an early one, so the pace is read on streams not much shorter than the real ones, and
    # 2 s leaves DRAIN_TIMEOUT (5 s) room for 2.5 times that. (This runner's reasoning parser holds back a
    # thinking model's events until the end: streams are seen in flight on /health.)
    began = time.monotonic()
    for stream in start_streams(url, 3, max_tokens=400, first_event=False):
        stream.join(timeout=60)
    max_tokens = min(3500, int(400 * 2.0 / max(0.05, time.monotonic() - began)))
    streams = start_streams(url, 3, max_tokens=max_tokens, first_event=False)
    deadline = time.monotonic() + 20
    while get_json(f"{drained_runner.url}/health")["status"] != "OK" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    assert len(drained_runner.record_descendants()) > 1
    signalled_at = time.monotonic()
    drained_runner.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert post_json(url, SHORT) == 503
    exit_code = drained_runner.process.wait(timeout=30)
    took = time.monotonic() - signalled_at
    for stream in streams:
        stream.join(timeout=5)
    print(f"SIGTERM with 3 streams of {max_tokens} tokens in flight: streams done {max(s.ended_at for s in streams) - signalled_at:.2f} s, "
          f"process exited {took:.2f} s after the signal")
    assert all(stream.finished_normally for stream in streams), [(s.status, s.done, s.error, s.failure) for s in streams]
    assert exit_code == 0
    assert took <= 6, f"exit took {took:.1f} s; within DRAIN_TIMEOUT the budget is 6 s (go-livepeer kills after 8)"
    assert not left_at_exit(drained_runner), "processes of the runner outlived it"


def test_sigterm_while_the_engine_starts_stops_it(tmp_path, tiny_model_dir):
    """go-livepeer may give up on a container that is still LOADING: it must go within 8 s, engine and all.

    SIGTERM once the engine's first process runs, while it starts: the stop must
    end what the start has started, and the start must start nothing after that.
    The process table is read every 10 ms until the runner exits, so that a
    process started during the stop is seen too.
    """
    env = tiny_engine_env(tiny_model_dir, core=None)
    runner = RunnerProcess("stopped-loading", env,
                           tmp_path / "stopped-loading.log")
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while not runner.engine_processes() and time.monotonic() < deadline:
            assert runner.process.poll() is None, runner.log_tail()
            time.sleep(0.01)
        assert runner.engine_processes(), f"the engine never started:\n{runner.log_tail()}"
        assert runner.health() == "LOADING"
        signalled_at = time.monotonic()
        runner.process.send_signal(signal.SIGTERM)
        while runner.process.poll() is None and time.monotonic() - signalled_at < 30:
            runner.record_descendants()
            time.sleep(0.01)
        exit_code = runner.process.wait(timeout=1)
        took = time.monotonic() - signalled_at
        print(f"SIGTERM while the engine starts: process exited {took:.2f} s after the signal; it had started "
              f"{len(runner.descendants)} processes")
        assert took < 8, f"exit took {took:.1f} s; go-livepeer kills after 8"
        assert exit_code == 0
        # Before: the runner exited in 1.06 s and its engine process outlived it by about 2 s, re-parented to PID 1.
        assert not left_at_exit(runner), "processes of the runner outlived it"
        assert '"engine.start_stopped"' in runner.log_path.read_text()
    finally:
        runner.stop()


async def test_a_drain_past_its_timeout_cuts_a_stream_with_its_in_band_error_and_a_request_with_a_500(aiohttp_client):
    """No engine: the scripted pipeline holds both requests open until the drain's cut."""
    from runner.app import create_app
    from runner.keys import STATE
    from runner.settings import RunnerSettings
    from tests.runner.test_routes import VALID, ScriptedPipeline, wait_for_health

    pipeline = ScriptedPipeline()
    pipeline.release_load.set()
    client = await aiohttp_client(create_app(RunnerSettings(), pipeline=pipeline))
    await wait_for_health(client, "IDLE")
    pipeline.gate.clear()
    stream = await client.post("/llm", json={**VALID, "stream": True})
    assert stream.status == 200
    plain = asyncio.create_task(client.post("/llm", json=VALID))
    state = client.app[STATE]
    while state.in_flight < 2:
        await asyncio.sleep(0.01)
    assert await state.drain(0.1, cut_reason="cut by the drain") == 2
    assert state.in_flight == 0, "the cut requests ended within the cut's grace"
    blocks = (await stream.read()).decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    ending = json.loads(blocks[-3].removeprefix("data: "))
    assert ending["choices"][0]["finish_reason"] == "error" and ending["error"]["msg"] == "cut by the drain"
    response = await plain
    assert response.status == 500 and (await response.json())["detail"]["msg"] == "cut by the drain"
