"""Model downloads against a stand-in of the Hugging Face Hub on loopback (tests/hub_standin.py).

The stand-in serves the tiny Llama (tests/tiny_model.py) as Hub repositories,
with decoys vLLM must not fetch: `pytorch_model.bin` beside the safetensors
weights, and Meta's `original/` folder. The first tests call the model store
in this process; the last ones start real runner processes (`python -m
runner`, HF_ENDPOINT pointing at the stand-in) and check /health, the log and
POST /llm.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants

from pipelines.model_store import ModelDownloadError, resolve_model, wanted_files
from tests.support.runner_process import RunnerProcess
from tests.support.hub_standin import HubRepo, HubStandin

# The fresh runner and the resumed one serve: two engines of this module's own.
pytestmark = pytest.mark.own_engines(2)

# Repositories the runner processes download, one per scenario.
PUBLIC = "standin-org/tiny-llama"
GATED = "standin-gated/tiny-llama"
GATED_FLAKY = "standin-gated/tiny-llama-flaky"
# Repositories the in-process tests download, apart so that request logs do not mix.
UNIT_PUBLIC = "standin-unit/tiny-llama"
UNIT_GATED = "standin-unit/tiny-llama-gated"
UNIT_FLAKY = "standin-unit/tiny-llama-flaky"
# Repositories the prefetch command downloads.
PREFETCH_PUBLIC = "standin-prefetch/tiny-llama"
PREFETCH_FLAKY = "standin-prefetch/tiny-llama-flaky"
REPO_ROOT = Path(__file__).resolve().parents[2]

GRANTED_TOKEN = "hf_standin_granted"
WEIGHTS = "model.safetensors"
CUT_AT = 300_000  # bytes of the weights (679 kB) sent before the connection drops
DECOYS = {
    "pytorch_model.bin": b"decoy pickled weights " * 4096,
    "original/consolidated.pth": b"decoy Meta checkpoint " * 4096,
    "original/params.json": b'{"dim": 64}',
    "README.md": b"# tiny llama\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}


@pytest.fixture(scope="module")
def wanted(tiny_model_dir) -> list[str]:
    """Every file of the tiny model folder is one vLLM reads."""
    return sorted(file.name for file in tiny_model_dir.iterdir())


@pytest.fixture(scope="module")
def weights_sha256(tiny_model_dir) -> str:
    return hashlib.sha256((tiny_model_dir / WEIGHTS).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tiny_model_dir) -> Iterator[HubStandin]:
    contents = {file.name: file.read_bytes() for file in tiny_model_dir.iterdir()} | DECOYS
    granted = {"gated": True, "granted_tokens": frozenset({GRANTED_TOKEN})}
    standin = HubStandin(
        [
            HubRepo.from_contents(PUBLIC, contents),
            HubRepo.from_contents(GATED, contents, **granted),
            HubRepo.from_contents(GATED_FLAKY, contents, **granted),
            HubRepo.from_contents(UNIT_PUBLIC, contents),
            HubRepo.from_contents(UNIT_GATED, contents, **granted),
            HubRepo.from_contents(UNIT_FLAKY, contents),
            HubRepo.from_contents(PREFETCH_PUBLIC, contents),
            HubRepo.from_contents(PREFETCH_FLAKY, contents),
        ]
    ).start()
    yield standin
    standin.stop()


@pytest.fixture
def no_saved_token(monkeypatch, tmp_path) -> None:
    """Neither HF_TOKEN nor a saved login, whatever this machine has."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))


def repo_folder(model_dir: Path, repo_id: str) -> Path:
    return model_dir / ("models--" + repo_id.replace("/", "--"))


def snapshot_files(snapshot: Path) -> list[str]:
    return sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())


def blob_names(model_dir: Path, repo_id: str) -> list[str]:
    return sorted(path.name for path in (repo_folder(model_dir, repo_id) / "blobs").iterdir())


# What is wanted


def test_wanted_files_are_configs_tokenizer_and_one_set_of_weights(hub, wanted):
    repo_files = list(hub.repos[PUBLIC].files)
    assert wanted_files(repo_files) == wanted
    # Pickled weights only when there are no safetensors outside original/.
    assert wanted_files(["config.json", "pytorch_model.bin", "original/model.safetensors"]) == [
        "config.json",
        "pytorch_model.bin",
    ]


# The model store in this process


def test_store_miss_downloads_only_what_vllm_reads_and_then_hits(hub, wanted, tmp_path):
    model_dir = tmp_path / "models"
    path = resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)

    assert path == repo_folder(model_dir, UNIT_PUBLIC) / "snapshots" / hub.repos[UNIT_PUBLIC].commit
    assert snapshot_files(path) == wanted
    assert sorted(file for file, _ in hub.downloads(UNIT_PUBLIC)) == wanted
    assert len(blob_names(model_dir, UNIT_PUBLIC)) == len(wanted)

    seen = len(hub.requests)
    assert resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url) == path
    assert hub.requests_for(UNIT_PUBLIC, since=seen) == [], "a complete store needs no Hub"


def test_incomplete_snapshot_is_completed_not_trusted(hub, wanted, tmp_path):
    """What an interrupted snapshot_download leaves: the ref and some files, not all."""
    model_dir = tmp_path / "models"
    path = resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)
    (path / WEIGHTS).unlink()
    for blob in (repo_folder(model_dir, UNIT_PUBLIC) / "blobs").iterdir():
        if blob.stat().st_size > 100_000:
            blob.unlink()

    seen = len(hub.requests)
    assert resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url) == path
    assert snapshot_files(path) == wanted
    assert hub.downloads(UNIT_PUBLIC, since=seen) == [(WEIGHTS, None)], "only the missing file is fetched"


def test_store_filled_by_hand_needs_config_and_weights(hub, tmp_path):
    """A store without huggingface_hub's file list (as `make models` writes it) is judged by its files."""
    model_dir = tmp_path / "models"
    commit = hub.repos[UNIT_PUBLIC].commit
    snapshot = repo_folder(model_dir, UNIT_PUBLIC) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    for name, content in hub.repos[UNIT_PUBLIC].files.items():
        if name.endswith(".json") and "/" not in name:
            (snapshot / name).write_bytes(content.content)

    seen = len(hub.requests)
    resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)
    assert (WEIGHTS, None) in hub.downloads(UNIT_PUBLIC, since=seen), "a snapshot without weights is a miss"

    seen = len(hub.requests)
    resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)
    assert hub.requests_for(UNIT_PUBLIC, since=seen) == []


def test_gated_model_without_a_token_names_the_model_and_hf_token(hub, tmp_path, no_saved_token):
    with pytest.raises(ModelDownloadError) as failure:
        resolve_model(UNIT_GATED, tmp_path / "models", endpoint=hub.url)
    message = str(failure.value)
    assert UNIT_GATED in message and "gated" in message and "no HF_TOKEN is set" in message
    assert "You must have access to it and be authenticated" in message, "the Hub's own words"
    assert hub.downloads(UNIT_GATED) == []


def test_gated_model_with_a_token_not_granted_says_so(hub, tmp_path):
    with pytest.raises(ModelDownloadError, match="HF_TOKEN given has not been granted access"):
        resolve_model(UNIT_GATED, tmp_path / "models", endpoint=hub.url, token="hf_someone_else")


def test_gated_model_downloads_with_hf_token(hub, wanted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GRANTED_TOKEN)
    seen = len(hub.requests)
    path = resolve_model(UNIT_GATED, tmp_path / "models", endpoint=hub.url)

    assert snapshot_files(path) == wanted
    requests = hub.requests_for(UNIT_GATED, since=seen)
    assert {r.authorization for r in requests if not r.is_cdn} == {f"Bearer {GRANTED_TOKEN}"}
    assert {r.authorization for r in requests if r.is_cdn} == {None}, "the token never leaves the Hub"


def test_unknown_model_is_a_clear_error(hub, tmp_path):
    with pytest.raises(ModelDownloadError, match="standin-org/no-such-model is not a model on"):
        resolve_model("standin-org/no-such-model", tmp_path / "models", endpoint=hub.url)


def test_offline_store_miss_says_hf_hub_offline(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    with pytest.raises(ModelDownloadError, match="not in the model store .* HF_HUB_OFFLINE is set"):
        resolve_model(UNIT_PUBLIC, tmp_path / "models", endpoint=hub.url)
    assert hub.requests_for(UNIT_PUBLIC, since=seen) == []


def test_cut_download_keeps_its_bytes_and_resumes_with_a_range(hub, tmp_path, weights_sha256):
    model_dir = tmp_path / "models"
    hub.cut_transfer(UNIT_FLAKY, WEIGHTS, after_bytes=CUT_AT)
    try:
        with pytest.raises(ModelDownloadError, match=f"after {CUT_AT} of .* bytes .* resumes"):
            resolve_model(UNIT_FLAKY, model_dir, endpoint=hub.url)
    finally:
        hub.restore(UNIT_FLAKY)
    partial = repo_folder(model_dir, UNIT_FLAKY) / "blobs" / f"{weights_sha256}.incomplete"
    assert partial.stat().st_size == CUT_AT
    weights_gets = [r for f, r in hub.downloads(UNIT_FLAKY) if f == WEIGHTS]
    assert weights_gets[0] is None and set(weights_gets[1:]) == {f"bytes={CUT_AT}-"}, "retries resume too"

    seen = len(hub.requests)
    path = resolve_model(UNIT_FLAKY, model_dir, endpoint=hub.url)
    assert [r for f, r in hub.downloads(UNIT_FLAKY, since=seen) if f == WEIGHTS] == [f"bytes={CUT_AT}-"]
    assert hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest() == weights_sha256
    assert not partial.exists()


def test_kept_bytes_that_do_not_match_are_discarded(hub, tmp_path, weights_sha256):
    model_dir = tmp_path / "models"
    blobs = repo_folder(model_dir, UNIT_PUBLIC) / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / f"{weights_sha256}.incomplete"
    partial.write_bytes(b"\0" * 1000)

    with pytest.raises(ModelDownloadError, match="sha256 .* discarded"):
        resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)
    assert not partial.exists()
    path = resolve_model(UNIT_PUBLIC, model_dir, endpoint=hub.url)
    assert hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest() == weights_sha256


# The prefetch command, as a process of its own


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
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


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
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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


# Real runner processes


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
    """The runners of the three scenarios, started together; a test may add one of its own."""
    logs = tmp_path_factory.mktemp("download-runner-logs")
    stores = tmp_path_factory.mktemp("download-stores")
    runners = {
        "fresh": download_runner("fresh", PUBLIC, stores / "fresh" / "models", logs, hub),
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


def test_runner_cut_mid_download_fails_and_the_next_start_resumes(download_runners, hub, weights_sha256):
    first = download_runners.runners["cut"]
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
    assert status == 200 and reply["model"] == GATED_FLAKY


def test_runner_downloads_on_a_store_miss_and_serves(download_runners, hub, wanted):
    runner = download_runners.runners["fresh"]
    assert download_runners.first_health["fresh"] == "LOADING"
    assert runner.wait_until({"IDLE", "ERROR"}) == "IDLE", runner.log_tail()

    status, reply = chat(runner)
    assert status == 200 and reply["model"] == PUBLIC and reply["usage"]["completion_tokens"] == 4

    model_dir = Path(runner.env["MODEL_DIR"])
    snapshot = repo_folder(model_dir, PUBLIC) / "snapshots" / hub.repos[PUBLIC].commit
    assert snapshot_files(snapshot) == wanted
    assert len(blob_names(model_dir, PUBLIC)) == len(wanted), "no decoy and no partial file in the store"
    assert sorted(file for file, _ in hub.downloads(PUBLIC)) == wanted
    assert not [r.path for r in hub.requests_for(PUBLIC) if "pytorch_model.bin" in r.path or "/original/" in r.path]
    assert sorted(event["file"] for event in log_events(runner, "model.download.file")) == wanted
    assert log_events(runner, "model.download.done")
