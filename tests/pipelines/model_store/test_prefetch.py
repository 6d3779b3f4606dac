"""The prefetch command (``python -m pipelines.model_store``), as a process of its own, against a Hub stand-in."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.model_store import resolve_model
from tests.support.hub_repos import (
    CUT_AT,
    PREFETCH_FLAKY,
    PREFETCH_PUBLIC,
    WEIGHTS,
    repo_folder,
    snapshot_files,
)
from tests.support.hub_standin import HubStandin
from tests.support.runner_process import ROOT


def prefetch_command(model_id: str, model_dir: Path, hub: HubStandin) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(model_dir.parent / "hf-home"),  # no saved login of this machine's
        "HF_TOKEN": "",  # huggingface_hub reads "" as unset
    }
    return [sys.executable, "-m", "pipelines.model_store", model_id, "--model-dir", str(model_dir)], env


def prefetch(model_id: str, model_dir: Path, hub: HubStandin) -> subprocess.CompletedProcess:
    command, env = prefetch_command(model_id, model_dir, hub)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def progress_lines(stderr: str) -> list[dict]:
    """Every line of the command's stderr is a JSON object when stderr is not a terminal."""
    return [json.loads(line) for line in stderr.splitlines()]


def test_prefetch_downloads_a_model_and_prints_json_progress(hub, wanted, tmp_path):
    model_dir = tmp_path / "models"
    done = prefetch(PREFETCH_PUBLIC, model_dir, hub)

    assert done.returncode == 0, done.stderr
    snapshot = repo_folder(model_dir, PREFETCH_PUBLIC) / "snapshots" / hub.repos[PREFETCH_PUBLIC].commit
    assert done.stdout.strip() == str(snapshot)
    assert snapshot_files(snapshot) == wanted
    lines = progress_lines(done.stderr)
    sizes = {name: len(file.content) for name, file in hub.repos[PREFETCH_PUBLIC].files.items()}
    starts = {line["file"]: line for line in lines if line["event"] == "file.start"}
    ends = {line["file"]: line for line in lines if line["event"] == "file.done"}
    assert sorted(starts) == sorted(ends) == wanted
    assert all(starts[name]["bytes"] == ends[name]["bytes"] == sizes[name] for name in wanted)
    assert all(line["resume_from"] == 0 for line in starts.values())
    assert {line["event"] for line in lines} <= {"file.start", "file.progress", "file.done"}

    # The runner's start finds it in the store: no Hub request at all.
    seen = len(hub.requests)
    assert resolve_model(PREFETCH_PUBLIC, model_dir, endpoint=hub.url) == snapshot
    assert hub.requests_for(PREFETCH_PUBLIC, since=seen) == []


def test_prefetch_of_an_unknown_model_exits_non_zero_with_one_line(hub, tmp_path):
    done = prefetch("standin-org/no-such-model", tmp_path / "models", hub)
    assert done.returncode == 1
    assert done.stdout == ""
    message = done.stderr.strip()
    assert "\n" not in message
    assert message.startswith("prefetch of standin-org/no-such-model failed: standin-org/no-such-model is not a model on")


def test_prefetch_killed_mid_file_is_resumed_by_the_next_run(hub, tmp_path, weights_sha256):
    model_dir = tmp_path / "models"
    partial = repo_folder(model_dir, PREFETCH_FLAKY) / "blobs" / f"{weights_sha256}.incomplete"
    command, env = prefetch_command(PREFETCH_FLAKY, model_dir, hub)
    # The weights' connection drops after CUT_AT bytes and the CDN stays down: the command
    # keeps retrying, and is killed there, as an operator's Ctrl-C or a lost machine would.
    hub.cut_transfer(PREFETCH_FLAKY, WEIGHTS, after_bytes=CUT_AT)
    try:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (partial.exists() and partial.stat().st_size == CUT_AT):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the cut transfer never kept its bytes"
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.communicate(timeout=30)
    finally:
        hub.restore(PREFETCH_FLAKY)
    assert process.returncode == -signal.SIGKILL, "killed mid-file, not ended by itself"
    assert partial.stat().st_size == CUT_AT

    seen = len(hub.requests)
    resumed = prefetch(PREFETCH_FLAKY, model_dir, hub)
    assert resumed.returncode == 0, resumed.stderr
    assert [r for f, r in hub.downloads(PREFETCH_FLAKY, since=seen) if f == WEIGHTS] == [f"bytes={CUT_AT}-"]
    lines = [line for line in progress_lines(resumed.stderr) if line["file"] == WEIGHTS]
    assert lines[0] == {"event": "file.start", "file": WEIGHTS, "bytes": len(hub.repos[PREFETCH_FLAKY].files[WEIGHTS].content), "resume_from": CUT_AT}
    assert lines[-1]["event"] == "file.done" and lines[-1]["resumed_from"] == CUT_AT
    snapshot = Path(resumed.stdout.strip())
    assert hashlib.sha256((snapshot / WEIGHTS).read_bytes()).hexdigest() == weights_sha256
    assert not partial.exists()

    seen = len(hub.requests)
    hit = prefetch(PREFETCH_FLAKY, model_dir, hub)
    assert hit.returncode == 0 and hit.stdout == resumed.stdout and hit.stderr == ""
    assert hub.requests_for(PREFETCH_FLAKY, since=seen) == [], "a store hit"

