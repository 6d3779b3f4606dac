"""The prefetch command: ``python -m pipelines.model_store <hub id> [--model-dir DIR]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import structlog

from pipelines.model_store.errors import ModelDownloadError
from pipelines.model_store.progress import DownloadProgress, JsonLinesProgress, TerminalProgress
from pipelines.model_store.resolve import resolve_model


def prefetch(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.model_store",
        description="Download a Hugging Face Hub model, or a LoRA adapter, into the model store as the runner's start would "
        "(HF_TOKEN for gated models, HF_ENDPOINT for another hub); prints the snapshot folder.",
    )
    parser.add_argument("model_id", help="a Hub model or adapter id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "models")), help="the store (MODEL_DIR)"
    )
    args = parser.parse_args(argv)
    # The model store's own events would repeat the progress: only its warnings (retries) are shown.
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(30),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    progress: DownloadProgress = TerminalProgress(sys.stderr) if sys.stderr.isatty() else JsonLinesProgress(sys.stderr)
    try:
        path = resolve_model(args.model_id, args.model_dir, progress=progress)
    except ModelDownloadError as exc:
        print(f"prefetch of {args.model_id} failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(prefetch())
