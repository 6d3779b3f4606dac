"""The llm pipeline over an engine that emits tokens as fast as it is asked, for a real runner process.

``bench/frontend.py`` measures the front end's ceiling: the real ``python -m
runner`` process (settings, uvloop, middlewares, routes, the llm pipeline's
APIs and reply builders, the paced writer) over real HTTP, with the engine
taken out. No setting of the runner or the pipeline swaps vLLM for another
engine, and none is added: a runner finds its pipeline by name among the
``livepeer_runner.pipelines`` entry points (``runner/pipeline.py``), so this
module is plugged in the way a third-party pipeline is, as a distribution on
``PYTHONPATH`` (``plug_in``) naming ``PIPELINE=llm-frontend-bench``, and only
a process started with that folder on its path can load it. It is
``LLMPipeline`` itself with one thing changed: its host's backend hands out a
``FastEngine`` instead of importing vLLM.

``FastEngine`` follows the ``Engine`` protocol (it is the test suite's
``FakeEngine``, whose requests it does not record): every stream gets its next
tokens one event-loop turn after it asks, ``STREAM_INTERVAL`` of them at a time
(the first alone, the last at once, as vLLM bunches them), to ``max_tokens``
(finish reason "length"). Each token's text ends in ``TOKEN_MARK``, a byte that
appears nowhere else in a stream's deltas, so that a client counts tokens in raw
bytes without parsing JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from pipelines.llm.engine import Adapter, Sampling
from pipelines.llm.host import EngineHost
from pipelines.llm.pipeline import LLMPipeline
from pipelines.llm.settings import LLMSettings
from tests.support.fake_engine import MODEL_CONFIG, Delta, FakeBackend, FakeEngine, Step

PIPELINE_NAME = "llm-frontend-bench"
TOKEN_MARK = b"~"
WORDS = [" once~", " upon~", " a~", " time~", " there~", " was~", " a~", " runner~"]  # ~4 bytes a token, as BPE's


class FastEngine(FakeEngine):
    """Tokens as fast as they are asked for: no step time, no per-request records."""

    stream_interval = 1

    def share(self, index: int) -> dict:
        return {"index": index, "stream_interval": self.stream_interval}

    async def steps(self, prompt: list[int], sampling: Sampling, request_id: str,
                    adapter: Adapter | None = None) -> AsyncIterator[Step]:
        self.running.add(request_id)
        try:
            sent, total, interval = 0, sampling.max_tokens, self.stream_interval
            while sent < total:
                await asyncio.sleep(0)  # one loop turn, as a real engine's output queue hands a step over
                count = 1 if sent == 0 else min(interval, total - sent)
                words = [WORDS[(sent + i) % len(WORDS)] for i in range(count)]
                sent += count
                finish = "length" if sent >= total else None
                delta = Delta(0, "".join(words), [ord(word[1]) for word in words], None, finish)
                yield Step(prompt_token_ids=prompt if sent == count else None, outputs=[delta],
                           finished=finish is not None)
        finally:
            self.running.discard(request_id)


class FastBackend(FakeBackend):
    """The host's backend: a ``FastEngine`` that bunches tokens as the settings' STREAM_INTERVAL says."""

    def __init__(self) -> None:
        super().__init__(FastEngine())

    def start_engine(self, args, environment, clients: int = 1) -> FastEngine:
        engine = super().start_engine(args, environment, clients)
        engine.stream_interval = args.stream_interval
        return engine

    def join_engine(self, share: dict) -> FastEngine:
        """API_PROCESSES > 1: each extra process runs a stand-in of its own (it is fake, nothing to share)."""
        engine = super().join_engine(share)
        engine.stream_interval = share["stream_interval"]
        return engine


class FrontendBenchPipeline(LLMPipeline):
    """``LLMPipeline`` whose engine is a ``FastEngine``: only reachable through ``plug_in``'s entry point."""

    def __init__(self, model_id: str, model_dir: Path, settings: LLMSettings) -> None:
        host = EngineHost(settings, model_id, model_dir, backend=FastBackend, gpus=0)
        super().__init__(model_id, model_dir, settings, host=host)


def plug_in(folder: Path) -> dict[str, str]:
    """A distribution in ``folder`` that declares the pipeline, and a model folder; the runner's environment for it.

    The environment names the pipeline, puts ``folder`` (then this checkout) on
    ``PYTHONPATH`` and serves the model folder's path as its model id (the
    requests' ``model``).
    """
    root = Path(__file__).resolve().parent.parent.parent
    dist_info = folder / "frontend_bench_pipeline-0.1.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: frontend-bench-pipeline\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[livepeer_runner.pipelines]\n{PIPELINE_NAME} = {__name__}:FrontendBenchPipeline\n")
    model = folder / "frontend-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(MODEL_CONFIG))
    return {"PIPELINE": PIPELINE_NAME, "PYTHONPATH": f"{folder}:{root}", "MODEL_ID": str(model),
            "MODEL_DIR": str(folder)}
