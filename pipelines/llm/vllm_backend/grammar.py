"""The served model's tokenizer as xgrammar sees it, for the grammar check's worker (``pipelines.llm.grammar``).

Built as vLLM's ``XgrammarBackend`` builds it in the engine core, so the check
compiles the very grammar the engine would, token masks included (their
computation over the vocabulary is most of a compile's time).
"""

from __future__ import annotations

from typing import Any

import structlog
import xgrammar

log = structlog.get_logger(__name__)


def tokenizer_info(tokenizer: Any, vocab_size: int) -> str | None:
    """xgrammar's TokenizerInfo of ``tokenizer``, serialized; None (logged) when xgrammar cannot read it."""
    try:
        return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).serialize_json()
    except Exception as exc:  # e.g. a tokenizer that is no Hugging Face one: the engine's own checks still hold
        log.warning("grammar.no_tokenizer_info", reason=str(exc)[:500])
        return None
