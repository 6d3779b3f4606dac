"""The model store in this process: local folders, store hits, and downloads from a Hub stand-in on loopback."""

from __future__ import annotations

import hashlib

import pytest
from huggingface_hub import constants

from pipelines.model_store import ModelDownloadError, resolve_model, wanted_files
from tests.support.hub_repos import (
    CUT_AT,
    GRANTED_TOKEN,
    PUBLIC,
    UNIT_FLAKY,
    UNIT_GATED,
    UNIT_PUBLIC,
    WEIGHTS,
    blob_names,
    repo_folder,
    snapshot_files,
)


def test_wanted_files_are_configs_tokenizer_and_one_set_of_weights(hub, wanted):
    repo_files = list(hub.repos[PUBLIC].files)
    assert wanted_files(repo_files) == wanted
    # Pickled weights only when there are no safetensors outside original/.
    assert wanted_files(["config.json", "pytorch_model.bin", "original/model.safetensors"]) == [
        "config.json",
        "pytorch_model.bin",
    ]



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

