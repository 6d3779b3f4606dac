"""The ``llm`` pipeline: its APIs on one engine.

It composes the parts and owns nothing else: the host starts the engine, the
generation path is every API's one way into it, and each API module serves its
own operations of openapi.yaml. HTTP is the runner's business.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from pipelines.llm.answers import reasoning_parser_for_template
from pipelines.llm.api import LLMAPI, installed_apis
from pipelines.llm.engine import Engine, Sampling
from pipelines.llm.generation import Generation
from pipelines.llm.grammar import GrammarGuard
from pipelines.llm.host import EngineHost
from pipelines.llm.replies import ReplyTracker
from pipelines.llm.served_models import ServedModels
from pipelines.llm.settings import LLMSettings
from pipelines.llm.tools import tool_parser_for_template
from runner.pipeline import EngineLoad, OperationError, Pipeline, RequestContext, Serve

log = structlog.get_logger(__name__)


def freeze_heap() -> None:
    """Leave what the load built out of the garbage collector's full passes from now on.

    The loaded process holds 650,000 objects or more (vLLM, torch, the tokenizer)
    that live as long as it does. A full collection walks them all: 0.3 s on an
    idle core here, and up to 1.25 s of a held event loop on the 2 busy cores
    while streams with 20 logprobs a token allocated fast enough to trigger one
    (``/ready`` waited that long). Frozen, a full pass walks only what serving
    has allocated since. vLLM's own server does the same once it has started.
    """
    gc.collect()
    gc.freeze()


class LLMPipeline(Pipeline):
    name = "llm"
    settings_class = LLMSettings

    def __init__(self, model_id: str, model_dir: Path, settings: LLMSettings,
                 host: EngineHost | None = None, apis: list[type[LLMAPI]] | None = None) -> None:
        super().__init__(model_id, model_dir, settings)
        self.settings = settings
        self.host = host if host is not None else EngineHost(settings, model_id, model_dir)
        self.generation = Generation(grammar=GrammarGuard(settings.grammar_compile_timeout))
        self.models = ServedModels(model_id, settings.lora_runtime_updates, settings.lora_unload_timeout,
                                   settings.lora_max_adapters)
        self.apis = [api(self.generation, self.models) for api in (apis if apis is not None else installed_apis())]
        self.OPERATIONS = tuple(operation for api in self.apis for operation in api.OPERATIONS)
        self.api_of = {operation.operation_id: api for api in self.apis for operation in api.OPERATIONS}
        self.joining: object | None = None  # in an extra API process: the engine to join (join_engine) instead of start

    def operations(self) -> Mapping[str, Serve]:
        if self.settings.worker_node:
            return {operation.operation_id: self.refuse_on_worker_node for operation in self.OPERATIONS}
        served: dict[str, Serve] = {}
        for api in self.apis:
            served.update(api.operations())
        return served

    async def refuse_on_worker_node(self, _body, _context: RequestContext):
        settings = self.settings
        raise OperationError(
            f"this runner is worker node {settings.node_rank} of {settings.nnodes} (NODE_RANK={settings.node_rank}): "
            f"it runs engine ranks and serves no requests; send them to the serving node (NODE_RANK=0, "
            f"{settings.master_addr})", status=503)

    def max_in_flight(self) -> int | None:
        return self.settings.max_in_flight

    def share_engine(self, processes: int) -> None:
        """API_PROCESSES > 1: the engine is started with room for that many clients (vLLM's multi-API-server way),
        on one node, and without LoRA (an adapter loaded through one process would be unknown to the others)."""
        settings = self.settings
        if settings.nnodes > 1:
            raise ValueError(f"NNODES={settings.nnodes}: an engine served from several nodes is served from one API "
                             "process (vLLM's API processes share an engine started on their own node): set "
                             "API_PROCESSES=1 (docs/api-processes.md)")
        if settings.lora_runtime_updates:
            raise ValueError("LORA_RUNTIME_UPDATES is served from one API process: an adapter loaded or unloaded "
                             "through one process would stay unknown to the others, and vLLM refuses run-time LoRA "
                             "updates with --api-server-count > 1 too; set API_PROCESSES=1 (docs/api-processes.md, "
                             "LoRA)")
        if settings.lora_adapters:
            raise ValueError("LoRA adapters (LORA_ADAPTERS) are served from one API process: each process keeps its "
                             "own list of adapters, and this runner does not keep them alike across processes (vLLM's "
                             "own --api-server-count does for static adapters); set API_PROCESSES=1, or serve without "
                             "adapters (docs/api-processes.md, LoRA)")
        self.host.clients = processes

    def engine_share(self, index: int) -> object:
        return self.host.share(index)

    def join_engine(self, share: object) -> None:
        self.joining = share

    def lose_engine(self, reason: str) -> None:
        self.host.lose_engine(reason)

    def describe(self) -> dict[str, object]:
        """The model, its adapters, the longest sequence, the APIs and the dtype: what discovery shows of this runner.

        Names only (adapter names, never their paths or Hub sources); from the
        running engine once it is loaded, from the settings before.
        """
        engine = self.generation.engine if self.generation.ready else None
        return {
            "model": self.model_id,
            "adapters": sorted(self.models.adapters),
            "max_model_len": engine.max_model_len if engine is not None else self.settings.max_model_len,
            "apis": [type(api).__module__.rsplit(".", 1)[-1] for api in self.apis],
            "dtype": engine.dtype if engine is not None else self.settings.dtype,
        }

    def admission_units(self, operation_id: str, body) -> int:
        """The engine sequences a request becomes (prompts x n), refused (400, naming the field) past
        MAX_PROMPTS_PER_REQUEST or past the whole admission bound, which no wait would make room for."""
        api = self.api_of.get(operation_id)
        if api is None or body is None:
            return 1
        size = api.request_size(operation_id, body)
        settings = self.settings
        if size.prompts > settings.max_prompts_per_request:
            raise OperationError(f"{size.prompts_param}: a list of {size.prompts} prompts is more than the "
                                 f"{settings.max_prompts_per_request} one request may hold (MAX_PROMPTS_PER_REQUEST)",
                                 param=size.prompts_param)
        if size.sequences > settings.max_in_flight:
            raise OperationError(
                f"{size.per_prompt_param}: this request becomes {size.sequences} engine sequences ({size.prompts} "
                f"prompts x {size.per_prompt}), more than the {settings.max_in_flight} this runner admits at once "
                "(MAX_NUM_SEQS + MAX_WAITING_REQUESTS): send fewer prompts or a smaller n",
                param=size.per_prompt_param if size.per_prompt > 1 else size.prompts_param)
        return size.sequences

    async def load(self) -> None:
        engine = await self.host.start() if self.joining is None else await self.host.join(self.joining)
        if engine is None:  # a worker node: its ranks run, nothing here to serve from
            return
        self.generation.use(engine, self.choose_tool_parser(engine), self.choose_reasoning_parser(engine))
        self.models.use(engine, self.host.prepare_adapter)
        for adapter in self.host.adapters:  # LORA_ADAPTERS: a refusal is a start failure, with the reason
            await self.models.add(adapter)
        await self.warm_up()
        freeze_heap()

    def choose_tool_parser(self, engine: Engine):
        """TOOL_CALL_PARSER, or the parser the chat template's tool-call syntax names; None when none fits."""
        names = engine.tool_parser_names()
        name = self.settings.tool_call_parser
        if name is not None and name not in names:
            raise ValueError(f"TOOL_CALL_PARSER={name!r} is not one of vLLM's tool-call parsers: {', '.join(names)}")
        if name is None:
            name = tool_parser_for_template(getattr(engine.tokenizer, "chat_template", None) or "")
        log.info("engine.tool_parser", name=name,
                 chosen_by="TOOL_CALL_PARSER" if self.settings.tool_call_parser else "chat template")
        return None if name is None else engine.tool_parser(name)

    def choose_reasoning_parser(self, engine: Engine):
        """REASONING_PARSER, or the parser the chat template's thinking syntax names; None when none fits.

        A parser named in REASONING_PARSER that is unknown, or that this model's
        tokenizer cannot serve, fails the start; one chosen from the template
        that the tokenizer cannot serve is left out, with a warning.
        """
        name = self.settings.reasoning_parser
        if name is not None:
            names = engine.reasoning_parser_names()
            if name not in names:
                raise ValueError(f"REASONING_PARSER={name!r} is not one of vLLM's reasoning parsers: {', '.join(names)}")
            try:
                parser = engine.reasoning_parser(name)
            except ValueError as exc:
                raise ValueError(f"REASONING_PARSER={name!r} does not fit this model: {exc}") from None
            log.info("engine.reasoning_parser", name=name, chosen_by="REASONING_PARSER")
            return parser
        name = reasoning_parser_for_template(getattr(engine.tokenizer, "chat_template", None) or "")
        if name is None:
            log.info("engine.reasoning_parser", name=None, chosen_by="chat template")
            return None
        try:
            parser = engine.reasoning_parser(name)
        except ValueError as exc:
            log.warning("engine.reasoning_parser.unfit", name=name, chosen_by="chat template", reason=str(exc),
                        effect="the model's thinking stays in its answers; set REASONING_PARSER to choose one")
            return None
        log.info("engine.reasoning_parser", name=name, chosen_by="chat template")
        return parser

    async def warm_up(self) -> None:
        """One short generation through the shared path, so the first request finds the engine warm."""
        context = RequestContext(request_id="warm-up")
        prompt = await self.generation.render_chat([{"role": "user", "content": "Hello"}])
        tracker = ReplyTracker(context, [len(prompt)])
        async for step in await self.generation.start(prompt, Sampling(max_tokens=4, temperature=0), context, self.models.base):
            tracker.take(step)
        log.info("engine.warm", completion_tokens=context.completion_tokens)

    def failure(self) -> str | None:
        return self.host.failure()

    def engine_load(self) -> EngineLoad:
        return EngineLoad(unfinished=self.generation.unfinished_requests(), submitted=self.generation.submitted,
                          batch_size=self.settings.max_num_seqs)

    def metrics_registry(self) -> CollectorRegistry | None:
        """The engine's own series (vllm:*), once it runs."""
        return self.host.metrics_registry()

    async def close(self) -> None:
        await self.host.close()
