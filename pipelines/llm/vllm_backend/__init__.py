"""The vLLM backend: the only package that imports vLLM.

``pipelines.llm.host`` imports it once loading starts; everything else in the
pipeline talks to the engine through the ``Engine`` protocol.
"""

from pipelines.llm.vllm_backend.args import engine_args, platform
from pipelines.llm.vllm_backend.engine import VLLMEngine, stop_engine_processes

start_engine = VLLMEngine.start
join_engine = VLLMEngine.join

__all__ = ["VLLMEngine", "engine_args", "join_engine", "platform", "start_engine", "stop_engine_processes"]
