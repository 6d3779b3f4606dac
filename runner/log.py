"""structlog set-up: JSON lines in a container, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (vLLM, aiohttp) log through the standard library: keep their lines
    # but at our level, so VERBOSE_LOGGING governs them too.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
