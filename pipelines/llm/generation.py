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

from pipelines.llm.answers import AnswerReader
from pipelines.llm.conversation import with_system_text
from pipelines.llm.engine import Engine, GenerationStep, ReasoningParser, Sampling, SamplingRefused, ToolCallParser
from pipelines.llm.grammar import GrammarGuard
from pipelines.llm.served_models import ServedModel
from pipelines.llm.tools import ToolPlan, written_calls
from runner.offload import Offload
from runner.pipeline import OperationError, RequestContext

# Chat template arguments a request may not set through chat_template_kwargs (as vLLM refuses them).
REFUSED_TEMPLATE_KWARGS = ("chat_template", "tokenize")
# The template call's own arguments (and the template's "messages", which the conversation becomes): set by their own
# request fields, never through chat_template_kwargs.
OWN_TEMPLATE_ARGS = ("conversation", "messages", "tools", "documents", "add_generation_prompt",
                     "continue_final_message",
                     "return_dict", "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
                     "return_assistant_tokens_mask")


class EngineNotReady(RuntimeError):
    """A request reached the generation path before the engine was up (the runner waits for the load first)."""


class Generation:
    """Every API's one way into the engine. The tokenizer's work (chat templates, encoding, decoding) and the
    engine's checks of a constrained request (grammar compiles) run on ``offload``'s threads, never on the loop."""

    def __init__(self, offload: Offload | None = None, grammar: GrammarGuard | None = None) -> None:
        self.offload = offload if offload is not None else Offload(name="generation")
        self.grammar = grammar if grammar is not None else GrammarGuard()  # grammar compiles, time-limited
        self._engine: Engine | None = None
        self.tool_parser: ToolCallParser | None = None  # for tool_choice "auto", when one fits the model
        self.reasoning_parser: ReasoningParser | None = None  # a reasoning model's thinking syntax
        self.submitted = 0  # engine requests handed over since the start

    def use(self, engine: Engine, tool_parser: ToolCallParser | None,
            reasoning_parser: ReasoningParser | None = None) -> None:
        """Serve from ``engine`` from now on (once the pipeline has loaded it)."""
        self._engine, self.tool_parser, self.reasoning_parser = engine, tool_parser, reasoning_parser

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

    async def render_chat(self, conversation: list[dict], tools: list[dict] | None = None, *,
                    instructions: str | None = None, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                    documents: list[dict] | None = None, add_special_tokens: bool = False) -> list[int]:
        """The one chat-template step of every API: the conversation as prompt token ids.

        ``instructions``: the runner's own tool-call syntax, taught in the system
        turn to a model whose template knows none (``ToolPlan.instructions``); the
        conversation's earlier calls are then written in that syntax too.
        ``continue_final_message`` leaves the last (assistant) message open for the
        model to continue.
        """
        if add_generation_prompt and continue_final_message:
            raise OperationError("continue_final_message and add_generation_prompt cannot both be true: set "
                                 "add_generation_prompt to false to continue the last message",
                                 param="continue_final_message")
        if continue_final_message and (not conversation or conversation[-1]["role"] != "assistant"):
            raise OperationError("continue_final_message needs an assistant message last, to continue",
                                 param="continue_final_message")
        extra = {}
        for name, value in (chat_template_kwargs or {}).items():
            if name in REFUSED_TEMPLATE_KWARGS:
                raise OperationError(f"chat_template_kwargs may not set {name!r}: this runner renders the model's "
                                     "own chat template only", param="chat_template_kwargs")
            if name not in OWN_TEMPLATE_ARGS:
                extra[name] = value
        if instructions:
            conversation = with_system_text(written_calls(conversation), instructions)
        if documents is not None:
            extra["documents"] = documents
        tokenizer = self.engine.tokenizer

        def render() -> list[int]:
            text = tokenizer.apply_chat_template(
                conversation, tools=tools or None, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **extra,
            )
            # The template already holds any BOS it wants: encoding it with special
            # tokens again would put a second one in front (unless asked for).
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

        try:
            return await self.offload.run(render)
        except (TemplateError, ValueError, TypeError) as exc:  # e.g. templates that insist user and assistant alternate
            raise OperationError(f"the model's chat template refuses these messages: {exc}", param="messages") from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A raw prompt's token ids, with the special tokens the model puts in front of a text."""
        return await self.offload.run(self.engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return await self.offload.run(self.engine.tokenizer.decode, token_ids)

    async def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token as the tokenizer's vocabulary writes it."""
        return await self.offload.run(self.engine.tokenizer.convert_ids_to_tokens, list(token_ids))

    def truncate(self, prompt: list[int], keep: int | None, side: str | None = None) -> list[int]:
        """vLLM's truncate_prompt_tokens: keep ``keep`` tokens (-1: as many as the model allows with room for one
        more), the last ones unless ``side`` is "right"."""
        if keep is None:
            return prompt
        if keep < 0:
            keep = self.max_model_len - 1
        elif keep >= self.max_model_len:
            raise OperationError(f"truncate_prompt_tokens is {keep}: it must be less than this model's limit of "
                                 f"{self.max_model_len} tokens (MAX_MODEL_LEN)", param="truncate_prompt_tokens")
        if keep == 0:  # vLLM's engine refuses an empty prompt
            raise OperationError("truncate_prompt_tokens is 0: it would leave no prompt; keep at least one token",
                                 param="truncate_prompt_tokens")
        if len(prompt) <= keep:
            return prompt
        return prompt[:keep] if side == "right" else prompt[-keep:]

    def answer_reader(self, plan: ToolPlan, sampling: Sampling, prompt: Sequence[int] | None = None,
                      chat_body: dict | None = None) -> AnswerReader:
        """A reader for one choice's answer: the model's thinking told apart (unless the output is constrained from
        its first token: then the model has no room to think), and its tool calls read by the plan."""
        thinking = self.reasoning_parser if not (sampling.constrained_from_start or plan.schema is not None) else None
        return AnswerReader(plan, self.tool_parser if plan.mode == "auto" else None, chat_body,
                            reasoning_parser=thinking, prompt_token_ids=prompt)

    def check_length(self, prompt: list[int], sampling: Sampling, length_param: str = "max_tokens") -> None:
        if not prompt:
            raise OperationError("the prompt is empty: the engine needs at least one token to continue from")
        limit = self.max_model_len
        if len(prompt) + sampling.max_tokens > limit:
            raise OperationError(
                f"the prompt is {len(prompt)} tokens and {length_param} is {sampling.max_tokens}: "
                f"{len(prompt) + sampling.max_tokens} is more than this model's limit of "
                f"{limit} tokens (MAX_MODEL_LEN)",
                param=length_param,
                code="context_length_exceeded",
            )

    async def start(self, prompt: list[int], sampling: Sampling, context: RequestContext, model: ServedModel,
                    length_param: str = "max_tokens") -> AsyncIterator[GenerationStep]:
        """Hand one prompt to the engine, for ``model`` (the base, or a LoRA adapter on it), after the checks every API shares.

        The engine takes the request when the iterator is first read; closing it early aborts it.
        """
        self.check_length(prompt, sampling, length_param)
        try:
            steps = await self.engine_request(prompt, sampling, model)
        except SamplingRefused as exc:  # the spec allows what the engine refuses, e.g. a temperature above 2
            raise OperationError(str(exc), param=exc.param) from None
        context.prompt_tokens += len(prompt)
        context.model = model.id
        self.submitted += 1
        if model.adapter is not None:  # counted while in flight: unloading the adapter waits for it
            return model.in_flight.hold(steps)
        return steps

    async def engine_request(self, prompt: list[int], sampling: Sampling,
                             model: ServedModel) -> AsyncIterator[GenerationStep]:
        """The engine's request for one prompt; the engine's checks of a constrained one (its grammar is compiled)
        on a worker thread."""
        if not sampling.heavy_checks:
            return self.engine.generate(prompt, sampling, uuid.uuid4().hex, model.adapter)
        await self.grammar.check(sampling, self.engine)
        return await self.offload.run(self.engine.generate, prompt, sampling, uuid.uuid4().hex, model.adapter)

    async def start_all(self, runs: Sequence[tuple[list[int], Sampling]], context: RequestContext, model: ServedModel,
                        length_param: str = "max_tokens") -> AsyncIterator[tuple[int, GenerationStep]]:
        """Several prompts of one request, all in the engine at once: each step with its prompt's place.

        Every prompt is checked before any is submitted. The engine takes a
        request only when its iterator is first read, so reading them one after
        the other would run the prompts one after the other: ``merged`` reads
        them all at once.
        """
        for prompt, sampling in runs:
            self.check_length(prompt, sampling, length_param)
        return merged([await self.start(prompt, sampling, context, model, length_param) for prompt, sampling in runs])


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
