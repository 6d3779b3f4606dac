"""``python -m runner``: the container's entry point."""

from __future__ import annotations

import sys

import structlog
from aiohttp import web
from pydantic import ValidationError

from runner.app import create_app
from runner.log import configure_logging
from runner.settings import RunnerSettings


def main() -> int:
    try:
        settings = RunnerSettings()
    except ValidationError as exc:
        print(f"invalid runner settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.verbose_logging)
    log = structlog.get_logger("runner")
    app = create_app(settings)
    log.info("runner.start", host=settings.host, port=settings.port, pipeline=settings.pipeline, model_id=settings.model_id)
    # handler_cancellation: a client that goes away cancels its handler, which stops its generation.
    web.run_app(app, host=settings.host, port=settings.port, handler_cancellation=True, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
