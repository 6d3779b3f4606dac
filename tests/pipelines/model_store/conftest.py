"""The model store's fixtures: one Hub stand-in on loopback for the package's tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from huggingface_hub import constants

from tests.support.hub_repos import WEIGHTS, standin_hub
from tests.support.hub_standin import HubStandin


@pytest.fixture(scope="session")
def wanted(tiny_model_dir) -> list[str]:
    """Every file of the tiny model folder is one vLLM reads."""
    return sorted(file.name for file in tiny_model_dir.iterdir())


@pytest.fixture(scope="session")
def weights_sha256(tiny_model_dir) -> str:
    return hashlib.sha256((tiny_model_dir / WEIGHTS).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def hub(tiny_model_dir) -> Iterator[HubStandin]:
    standin = standin_hub(tiny_model_dir).start()
    yield standin
    standin.stop()


@pytest.fixture
def no_saved_token(monkeypatch, tmp_path) -> None:
    """Neither HF_TOKEN nor a saved login, whatever this machine has."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
