"""Real runner processes that download their model from a Hub stand-in on loopback (HF_ENDPOINT).

Each checks /health as go-livepeer reads it, the reason in the log, and that the
model it fetched serves POST /llm. The model store's own rules are in test_resolve.py.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hub_repos import (
    CUT_AT,
    GATED,
    GATED_FLAKY,
    GRANTED_TOKEN,
    WEIGHTS,
    blob_names,
    repo_folder,
    snapshot_files,
)
from tests.support.hub_standin import HubStandin
from tests.support.runner_process import RunnerProcess

# The resumed runner serves: one engine of this module's own.
pytestmark = pytest.mark.own_engines(1)


def download_runner(name: str, model_id: str, model_dir: Path, logs: Path, hub: HubStandin, **env) -> RunnerProcess:
    return RunnerProcess(
        name,
        {
            "MODEL_ID": model_id,
            "MODEL_DIR": str(model_dir),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(model_dir.parent / "hf-home"),  # no saved login, no xet cache of this machine's
            "HF_TOKEN": "",  # none, whatever this machine's environment holds; huggingface_hub reads "" as unset
            "MAX_MODEL_LEN": "1024",
            "KV_CACHE_GIB": "0.25",
            **env,
        },
        logs / f"{name}.log",
        offline=False,
    )


@dataclass
class DownloadRunners:
    runners: dict[str, RunnerProcess]
    first_health: dict[str, str]  # each runner's first answer to GET /health


@pytest.fixture(scope="module")
def download_runners(hub, tmp_path_factory) -> Iterator[DownloadRunners]:
    """The runners of the two scenarios, started together; a test may add one of its own."""
    logs = tmp_path_factory.mktemp("download-runner-logs")
    stores = tmp_path_factory.mktemp("download-stores")
    runners = {
        "gated": download_runner("gated", GATED, stores / "gated" / "models", logs, hub),
        "cut": download_runner(
            "cut", GATED_FLAKY, stores / "flaky" / "models", logs, hub, HF_TOKEN=GRANTED_TOKEN
        ),
    }
    hub.cut_transfer(GATED_FLAKY, WEIGHTS, after_bytes=CUT_AT)
    try:
        for runner in runners.values():
            runner.start()
        first_health = {name: runner.wait_until({"LOADING", "IDLE", "ERROR"}) for name, runner in runners.items()}
        yield DownloadRunners(runners, first_health)
    finally:
        hub.restore(GATED_FLAKY)
        for runner in runners.values():
            if runner.process is not None:
                runner.stop()


def log_events(runner: RunnerProcess, event: str) -> list[dict]:
    found = []
    for line in runner.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def load_failure(runner: RunnerProcess) -> str:
    failures = log_events(runner, "pipeline.load.failed")
    assert failures, f"no pipeline.load.failed in the log of {runner.name}:\n{runner.log_tail()}"
    return failures[0]["reason"]


def chat(runner: RunnerProcess) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(
        f"{runner.url}/llm", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.load(response)


def test_runner_reports_a_gated_model_without_hf_token(download_runners, hub):
    runner = download_runners.runners["gated"]
    assert runner.wait_until({"IDLE", "ERROR"}) == "ERROR"
    reason = load_failure(runner)
    assert reason.startswith("ModelDownloadError: ")
    assert GATED in reason and "gated" in reason and "no HF_TOKEN is set" in reason
    assert hub.downloads(GATED) == []


def test_runner_cut_mid_download_fails_and_the_next_start_resumes_and_serves(download_runners, hub, wanted,
                                                                            weights_sha256):
    """A store miss downloads only what vLLM reads; a transfer cut mid-file is ERROR with the reason, and the
    next start resumes the file where it stopped, fetches nothing twice, and serves."""
    first = download_runners.runners["cut"]
    assert download_runners.first_health["cut"] == "LOADING"
    try:
        assert first.wait_until({"IDLE", "ERROR"}) == "ERROR"
    finally:
        hub.restore(GATED_FLAKY)
    reason = load_failure(first)
    assert WEIGHTS in reason and f"after {CUT_AT} of" in reason and "resumes" in reason
    model_dir = Path(first.env["MODEL_DIR"])
    partial = repo_folder(model_dir, GATED_FLAKY) / "blobs" / f"{weights_sha256}.incomplete"
    assert partial.stat().st_size == CUT_AT
    first.stop()

    seen = len(hub.requests)
    second = download_runner(
        "cut-again", GATED_FLAKY, model_dir, first.log_path.parent, hub, HF_TOKEN=GRANTED_TOKEN
    )
    download_runners.runners["cut-again"] = second
    second.start()
    assert second.wait_until({"IDLE", "ERROR"}) == "IDLE", second.log_tail()

    assert [r for f, r in hub.downloads(GATED_FLAKY, since=seen) if f == WEIGHTS] == [f"bytes={CUT_AT}-"]
    weights = repo_folder(model_dir, GATED_FLAKY) / "snapshots" / hub.repos[GATED_FLAKY].commit / WEIGHTS
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == weights_sha256
    assert not partial.exists()
    resumed = [event for event in log_events(second, "model.download.file") if event["file"] == WEIGHTS]
    assert resumed and resumed[0]["resumed_from"] == CUT_AT
    hub_requests = [r for r in hub.requests_for(GATED_FLAKY) if not r.is_cdn]
    assert {r.authorization for r in hub_requests} == {f"Bearer {GRANTED_TOKEN}"}, "HF_TOKEN reached the Hub"

    status, reply = chat(second)
    assert status == 200 and reply["model"] == GATED_FLAKY and reply["usage"]["completion_tokens"] == 4

    snapshot = repo_folder(model_dir, GATED_FLAKY) / "snapshots" / hub.repos[GATED_FLAKY].commit
    assert snapshot_files(snapshot) == wanted
    assert len(blob_names(model_dir, GATED_FLAKY)) == len(wanted), "no decoy and no partial file in the store"
    fetched = [file for file, _ in hub.downloads(GATED_FLAKY)]
    assert sorted(set(fetched)) == wanted
    assert sorted(file for file in fetched if file != WEIGHTS) == [file for file in wanted if file != WEIGHTS], \
        "only the cut file is fetched more than once (its retries, then its resumption)"
    assert not [r.path for r in hub.requests_for(GATED_FLAKY) if "pytorch_model.bin" in r.path or "/original/" in r.path]
    downloaded = [event["file"] for runner in (first, second) for event in log_events(runner, "model.download.file")
                  if not event.get("already_stored")]
    assert sorted(downloaded) == wanted, "each file stored once, by one of the two starts"
    assert log_events(second, "model.download.done")
