"""The ``llm`` pipeline: chat and text completions from a vLLM engine, behind every API in ``api/``.

``pipeline.LLMPipeline`` is the runner's entry point; see its module for how the parts fit.
"""
