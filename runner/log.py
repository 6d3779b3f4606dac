"""structlog set-up: JSON lines in a container, readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import structlog


def json_fallback(value: Any) -> Any:
    """What JSON cannot hold, as structlog's JSONRenderer writes it: its ``__structlog__()``, else its repr."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


JSON_ENCODER = json.JSONEncoder(default=json_fallback)


def json_line(event_dict: dict, **_: Any) -> str:
    """``json.dumps`` of a log line on one encoder built once: ``json.dumps`` builds one for every call it is given
    ``default`` (JSONRenderer always gives it), and the runner writes a line for every request."""
    return JSON_ENCODER.encode(event_dict)


def configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer(serializer=json_line)
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
