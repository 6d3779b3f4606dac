"""The Hub stand-in's repositories for the model store's tests, and how to look into a store.

The stand-in (tests/support/hub_standin.py) serves the tiny Llama
(tests/support/tiny_model.py) as Hub repositories, with decoys vLLM must not
fetch: `pytorch_model.bin` beside the safetensors weights, and Meta's
`original/` folder; one repository per scenario, so that request logs do not mix.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.hub_standin import HubRepo, HubStandin

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



def standin_hub(tiny_model_dir: Path) -> HubStandin:
    """Every scenario's repository, on a stand-in of the Hub that is not started yet."""
    contents = {file.name: file.read_bytes() for file in tiny_model_dir.iterdir()} | DECOYS
    granted = {"gated": True, "granted_tokens": frozenset({GRANTED_TOKEN})}
    return HubStandin([
        HubRepo.from_contents(PUBLIC, contents),
        HubRepo.from_contents(GATED, contents, **granted),
        HubRepo.from_contents(GATED_FLAKY, contents, **granted),
        HubRepo.from_contents(UNIT_PUBLIC, contents),
        HubRepo.from_contents(UNIT_GATED, contents, **granted),
        HubRepo.from_contents(UNIT_FLAKY, contents),
        HubRepo.from_contents(PREFETCH_PUBLIC, contents),
        HubRepo.from_contents(PREFETCH_FLAKY, contents),
    ])


def repo_folder(model_dir: Path, repo_id: str) -> Path:
    return model_dir / ("models--" + repo_id.replace("/", "--"))


def snapshot_files(snapshot: Path) -> list[str]:
    return sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())


def blob_names(model_dir: Path, repo_id: str) -> list[str]:
    return sorted(path.name for path in (repo_folder(model_dir, repo_id) / "blobs").iterdir())

