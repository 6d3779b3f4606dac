"""The one path into the engine, for every API of the llm pipeline.

An API module turns its request into a conversation or a prompt and a
``Sampling``; ``Generation`` renders the chat template, checks the length
against the model's limit, hands the request to the engine and counts what it
submitted. API modules never touch the engine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

from jinja2 import TemplateError

from pipelines.llm.engine import Engine, GenerationStep, Sampling, SamplingRefused, ToolCallParser
from pipelines.llm.served_models import ServedModel
from runner.pipeline import OperationError, RequestContext


class EngineNotReady(RuntimeError):
    """A request reached the generation path before the engine was up (the runner waits for the load first)."""


class Generation:
    def __init__(self) -> None:
        self._engine: Engine | None = None
        self.tool_parser: ToolCallParser | None = None  # for tool_choice "auto", when one fits the model
        self.submitted = 0  # engine requests handed over since the start

    def use(self, engine: Engine, tool_parser: ToolCallParser | None) -> None:
        """Serve from ``engine`` from now on (once the pipeline has loaded it)."""
        self._engine, self.tool_parser = engine, tool_parser

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise EngineNotReady("the engine is not running")
        return self._engine

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def unfinished_requests(self) -> int:
        return self._engine.unfinished_requests() if self._engine is not None else 0

    def render_chat(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The one chat-template step of every API: the conversation as prompt token ids."""
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                conversation, tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:  # e.g. templates that insist user and assistant alternate
            raise OperationError(f"the model's chat template refuses these messages: {exc}", param="messages") from None
        # The template already holds any BOS it wants: encoding it with special
        # tokens again would put a second one in front.
        return tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """A raw prompt's token ids, with the special tokens the model puts in front of a text."""
        return self.engine.tokenizer.encode(text)

    def check_length(self, prompt: list[int], sampling: Sampling, length_param: str = "max_tokens") -> None:
        limit = self.max_model_len
        if len(prompt) + sampling.max_tokens > limit:
            raise OperationError(
                f"the prompt is {len(prompt)} tokens and {length_param} is {sampling.max_tokens}: "
                f"{len(prompt) + sampling.max_tokens} is more than this model's limit of "
                f"{limit} tokens (MAX_MODEL_LEN)",
                param=length_param,
                code="context_length_exceeded",
            )

    def start(self, prompt: list[int], sampling: Sampling, context: RequestContext, model: ServedModel,
              length_param: str = "max_tokens") -> AsyncIterator[GenerationStep]:
        """Hand one prompt to the engine, for ``model`` (the base, or a LoRA adapter on it), after the checks every API shares.

        The engine takes the request when the iterator is first read; closing it early aborts it.
        """
        self.check_length(prompt, sampling, length_param)
        try:
            steps = self.engine.generate(prompt, sampling, uuid.uuid4().hex, model.adapter)
        except SamplingRefused as exc:  # the spec allows what the engine refuses, e.g. a temperature above 2
            raise OperationError(str(exc)) from None
        context.prompt_tokens += len(prompt)
        context.model = model.id
        self.submitted += 1
        if model.adapter is not None:  # counted while in flight: unloading the adapter waits for it
            return model.in_flight.hold(steps)
        return steps

    def start_all(self, runs: Sequence[tuple[list[int], Sampling]], context: RequestContext, model: ServedModel,
                  length_param: str = "max_tokens") -> AsyncIterator[tuple[int, GenerationStep]]:
        """Several prompts of one request, all in the engine at once: each step with its prompt's place.

        Every prompt is checked before any is submitted. The engine takes a
        request only when its iterator is first read, so reading them one after
        the other would run the prompts one after the other: ``merged`` reads
        them all at once.
        """
        for prompt, sampling in runs:
            self.check_length(prompt, sampling, length_param)
        return merged([self.start(prompt, sampling, context, model, length_param) for prompt, sampling in runs])


async def merged(iterators: list[AsyncIterator[GenerationStep]]) -> AsyncIterator[tuple[int, GenerationStep]]:
    """The steps of several requests as they come, each with its request's place; closing it closes them all."""
    if len(iterators) == 1:
        try:
            async for step in iterators[0]:
                yield 0, step
        finally:
            await iterators[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(iterator)): place for place, iterator in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                place = pending.pop(future)
                try:
                    step = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[place]))] = place
                yield place, step
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            with contextlib.suppress(BaseException):
                await future
        for iterator in iterators:
            await iterator.aclose()
