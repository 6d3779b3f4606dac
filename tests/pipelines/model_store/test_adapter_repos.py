"""LoRA adapter repositories in the model store, against the Hub stand-in on loopback.

An adapter repository has adapter_config.json and adapter_model.safetensors
and no config.json; it is found, downloaded, resumed and prefetched as a model
is (test_resolve.py and test_runner_downloads.py prove those paths for models).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.model_store import ModelDownloadError, resolve_model
from tests.support.hub_standin import HubRepo, HubStandin
from tests.support.lora_adapters import make_adapter
from tests.support.runner_process import ROOT

ADAPTER = "standin-lora/unit-adapter"
GATED = "standin-lora/unit-gated-adapter"
PREFETCHED = "standin-lora/prefetched-adapter"
FLAKY = "standin-lora/flaky-adapter"
GRANTED = "hf_standin_adapter_granted"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir) -> Iterator[HubStandin]:
    folder = make_adapter(tmp_path_factory.mktemp("adapter") / "adapter", tiny_model_dir, seed=1)
    contents = {file.name: file.read_bytes() for file in folder.iterdir()}
    contents |= {"README.md": b"# adapter\n", "training_args.bin": b"pickled training arguments " * 64}
    standin = HubStandin([
        HubRepo.from_contents(ADAPTER, contents),
        HubRepo.from_contents(GATED, contents, gated=True, granted_tokens=frozenset({GRANTED})),
        HubRepo.from_contents(PREFETCHED, contents),
        HubRepo.from_contents(FLAKY, contents),
    ]).start()
    yield standin
    standin.stop()


def files(snapshot: Path) -> list[str]:
    return sorted(path.name for path in snapshot.iterdir())


def test_an_adapter_repo_downloads_its_config_and_weights_then_hits(hub, tmp_path):
    model_dir = tmp_path / "models"
    path = resolve_model(ADAPTER, model_dir, endpoint=hub.url)
    assert files(path) == ADAPTER_FILES
    assert sorted(name for name, _ in hub.downloads(ADAPTER)) == ADAPTER_FILES, "not the README nor training args"
    seen = len(hub.requests)
    assert resolve_model(ADAPTER, model_dir, endpoint=hub.url) == path
    assert hub.requests_for(ADAPTER, since=seen) == [], "a complete adapter in the store needs no Hub"


def test_an_adapter_without_its_weights_in_the_store_is_completed(hub, tmp_path):
    model_dir = tmp_path / "models"
    path = resolve_model(ADAPTER, model_dir, endpoint=hub.url)
    (path / "adapter_model.safetensors").unlink()
    for blob in (model_dir / ("models--" + ADAPTER.replace("/", "--")) / "blobs").iterdir():
        if blob.stat().st_size > 10_000:
            blob.unlink()
    seen = len(hub.requests)
    assert resolve_model(ADAPTER, model_dir, endpoint=hub.url) == path
    assert hub.downloads(ADAPTER, since=seen) == [("adapter_model.safetensors", None)]


def test_a_gated_adapter_needs_hf_token(hub, tmp_path, monkeypatch):
    with pytest.raises(ModelDownloadError, match="gated model and the HF_TOKEN given has not been granted"):
        resolve_model(GATED, tmp_path / "models", endpoint=hub.url, token="hf_someone_else")
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert files(resolve_model(GATED, tmp_path / "models", endpoint=hub.url)) == ADAPTER_FILES


def test_a_repo_with_neither_config_says_what_it_lacks(hub, tmp_path):
    with pytest.raises(ModelDownloadError) as failure:
        resolve_model("standin-lora/no-such-adapter", tmp_path / "models", endpoint=hub.url)
    assert "is not a model on" in str(failure.value)


def prefetch(repo: str, model_dir: Path, hub: HubStandin) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(model_dir.parent / "hf-home"), "HF_TOKEN": ""}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "pipelines.model_store", repo, "--model-dir", str(model_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_prefetch_fetches_an_adapter_and_a_second_run_is_a_hit(hub, tmp_path):
    model_dir = tmp_path / "models"
    done = prefetch(PREFETCHED, model_dir, hub)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert files(path) == ADAPTER_FILES
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert events.count("file.done") == 2
    seen = len(hub.requests)
    again = prefetch(PREFETCHED, model_dir, hub)
    assert again.returncode == 0 and again.stdout == done.stdout
    assert hub.requests_for(PREFETCHED, since=seen) == []


def test_a_cut_adapter_download_is_resumed(hub, tmp_path):
    model_dir = tmp_path / "models"
    hub.cut_transfer(FLAKY, "adapter_model.safetensors", after_bytes=20_000)
    try:
        with pytest.raises(ModelDownloadError, match="the next start resumes from there"):
            resolve_model(FLAKY, model_dir, endpoint=hub.url)
    finally:
        hub.restore(FLAKY)
    seen = len(hub.requests)
    path = resolve_model(FLAKY, model_dir, endpoint=hub.url)
    assert files(path) == ADAPTER_FILES
    [(name, byte_range)] = hub.downloads(FLAKY, since=seen)
    assert name == "adapter_model.safetensors" and byte_range == "bytes=20000-", "from where it stopped"
