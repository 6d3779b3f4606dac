"""A worker node's ranks: ``python -m pipelines.llm.vllm_backend.worker MODEL NAME READY_FD ENVIRONMENT GPU``.

This node's share of the engine's ranks, as ``vllm serve --headless`` runs them
for the mp backend over several nodes. ``pipelines.llm.worker_node`` starts it
in a process group of its own, bound to its runner (``pipelines.llm.lifeline``), with the variables the runner
adds to the engine's environment and this node's least capable GPU (JSON; the variables are set before the
ranks start, which is this process's start), and its settings as JSON on stdin (not in its command line, which
every user of the machine may read: they hold NODE_SECRET). It writes one line to READY_FD once the local ranks
have joined the master, then returns when one of them dies. Its ranks die with it, however it dies.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import structlog
from vllm.usage.usage_lib import UsageContext
from vllm.v1.executor.multiproc_executor import MultiprocExecutor

from pipelines.llm import lifeline
from pipelines.llm.layout import GPU
from pipelines.llm.settings import LLMSettings
from pipelines.llm.vllm_backend.args import engine_args

log = structlog.get_logger(__name__)


def run_worker_node(model_path: Path, served_name: str, ready_fd: int, settings: LLMSettings, gpu: GPU | None) -> None:
    model_config = json.loads((model_path / "config.json").read_text())
    args = engine_args(settings, model_path, served_name, model_config, gpu)
    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    lifeline.bind_children()  # the ranks die with this process, which dies with its runner
    executor = MultiprocExecutor(vllm_config, monitor_workers=False)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    executor.start_worker_monitor(inline=True)  # returns once a local rank has died
    log.error("worker_node.rank_died")


if __name__ == "__main__":
    model, name, fd, environment_json, gpu_json = sys.argv[1:6]
    settings = LLMSettings.model_validate_json(sys.stdin.read())
    os.environ.update(json.loads(environment_json))
    gpu = json.loads(gpu_json)
    run_worker_node(Path(model), name, int(fd), settings,
                    GPU(gpu["name"], tuple(gpu["capability"])) if gpu else None)
