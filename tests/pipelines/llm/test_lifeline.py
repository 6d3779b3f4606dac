"""No process outlives its parent (pipelines.llm.lifeline), on real processes that ignore SIGTERM; no engine.

The issue: a worker node's runner killed with SIGKILL left its ranks running
11 minutes later, re-parented to PID 1; one ignored SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pipelines.llm.lifeline import left_after, running
from tests.support.runner_process import ROOT


def tree(tmp_path, mode: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    parent = subprocess.Popen([sys.executable, "-m", "tests.support.process_tree", mode, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    started = json.loads(parent.stdout.readline())
    return parent, [psutil.Process(pid) for pid in started["pids"]]


def kill_and_count_left(parent: subprocess.Popen, processes: list[psutil.Process]) -> list[psutil.Process]:
    time.sleep(0.5)
    try:
        assert all(running(process) for process in processes), "the tree lives while its root does"
    finally:  # a failed check leaves no tree behind (its processes ignore SIGTERM)
        parent.kill()
        parent.wait()
    left = left_after(processes, 2.0)
    for process in left:
        process.kill()
    return left


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_multiprocessing_children_and_grandchildren_die_with_a_killed_parent(tmp_path, method):
    """Started from a thread that has ended, ignoring SIGTERM: all four go when their root is SIGKILLed."""
    parent, processes = tree(tmp_path, method)
    assert len(processes) == 4
    killed_at = time.monotonic()
    assert not kill_and_count_left(parent, processes), "processes outlived their parent"
    gone = time.monotonic() - killed_at - 0.5
    print(f"a tree of 2 children and 2 grandchildren gone {gone:.3f} s after its root's SIGKILL")


def test_a_bound_command_dies_with_a_killed_parent(tmp_path):
    parent, processes = tree(tmp_path, "command")
    assert not kill_and_count_left(parent, processes), "the command outlived its parent"


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    """The parent may die before its child asks for the signal: the child sees it, and ends."""
    child = subprocess.run([sys.executable, "-m", "pipelines.llm.lifeline", str(os.getpid() + 10**6), "sleep", "30"],
                           cwd=ROOT, timeout=20)
    assert child.returncode == -signal.SIGKILL


def test_a_stopping_process_starts_no_more_children(tmp_path):
    """A stop counts the children to end once no start can add one (a start cut short may still be under way)."""
    refused = subprocess.run([sys.executable, "-m", "tests.support.process_tree", "refused", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert json.loads(refused.stdout) == {"refused": "this process is stopping: it starts no more processes"}
