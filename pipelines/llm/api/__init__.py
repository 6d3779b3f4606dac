"""The llm pipeline's API surfaces: peers over one shared serving base.

Each API is one module with a subclass of ``LLMAPI``: the operations of
openapi.yaml it serves (its part of the spec, generated into a protocol module)
and the coroutines that serve them, built on the shared ``Generation`` (the one
path into the engine) and ``ServedModels``. The base owns what every API shares
(as vLLM's ``OpenAIServing`` does): the model and adapter lookup, request and
in-band errors in the operation's error shape (its ``x-error-shape``) and the
chat prompt; the usage object of each wire format and the one read loop over a
generation's steps are ``replies``'s (``usage_json``, ``Reply``). The pipeline
serves every API installed under the ``livepeer_runner.llm_apis`` entry-point
group, so a new surface is one module, its part of openapi.yaml and one entry
point, with no change to any other API or to the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

from pipelines.llm import schema
from pipelines.llm.generation import Generation
from pipelines.llm.served_models import ServedModel, ServedModels
from pipelines.llm.tools import ToolPlan, plan_tools
from runner.operations import Operation
from runner.pipeline import OperationError, Serve, anthropic_error_document, openai_error_document

API_ENTRY_POINT_GROUP = "livepeer_runner.llm_apis"


@dataclass(frozen=True)
class RequestSize:
    """What one request becomes in the engine: ``prompts`` prompts (the field ``prompts_param``), each generated
    ``per_prompt`` times (the field ``per_prompt_param``, e.g. ``n``)."""

    prompts: int = 1
    per_prompt: int = 1
    prompts_param: str = "prompt"
    per_prompt_param: str = "n"

    @property
    def sequences(self) -> int:
        return self.prompts * self.per_prompt


def bad(msg: str, param: str | None = None) -> OperationError:
    """A request the model cannot serve: a 400, in the operation's error shape (the runner writes it)."""
    return OperationError(msg, status=400, param=param)


# A model name not served, by the operation's error shape: (message, status, param, code). OpenAI's words and code
# are vLLM's; the Livepeer contract answers 400.
MODEL_NOT_FOUND = {
    "openai": ("The model '{name}' does not exist; this runner serves {names}", 404, "model", "model_not_found"),
    "anthropic": ("model: {name!r} is not served here; this runner serves {names}", 404, "model", None),
    "livepeer": ("model {name!r} is not served here; this runner serves {names}", 400, None, None),
}


def in_band_error(shape: str, reason: str) -> bytes | tuple[bytes, bytes]:
    """The in-band ending of a stream that failed after its header went out, in an error shape's document (the
    one its SDK raises): OpenAI's error object as a data event, Anthropic's as its named ``error`` event."""
    if shape == "anthropic":
        return b"error", anthropic_error_document(500, reason)
    return openai_error_document(500, reason)


def openai_error_detail(reason: str) -> bytes:
    """The inside of OpenAI's error document for a server failure (``{"message", "type", "param", "code"}``), for
    events that carry it under a key of their own (Responses' ``response.failed``)."""
    document = openai_error_document(500, reason)
    return document[document.index(b":") + 1:-1]


class LLMAPI:
    """The shared serving base: what every API of the llm pipeline is handed, and what they share.

    ``SERVES`` names, for each operationId of the spec the API serves, the coroutine that serves it; ``OPERATIONS``
    are those operations of the llm pipeline's generated protocol module (an API whose operations come from a
    protocol module of its own sets ``OPERATIONS`` itself).
    """

    OPERATIONS: ClassVar[tuple[Operation, ...]]
    SERVES: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.SERVES and "OPERATIONS" not in cls.__dict__:
            cls.OPERATIONS = spec_operations(schema.OPERATIONS, *cls.SERVES)

    def __init__(self, generation: Generation, models: ServedModels) -> None:
        self.generation = generation
        self.models = models

    @property
    def error_shape(self) -> str:
        """The API's error shape (openapi.yaml's ``x-error-shape`` of its operations)."""
        return self.OPERATIONS[0].error_shape

    def served(self, name: str | None, blank_is_base: bool = False) -> ServedModel:
        """The model (base or adapter) a request names; with ``blank_is_base``, "" (or none) is the base model.
        Any other name not served is refused in the API's error shape."""
        if not name and blank_is_base:
            return self.models.base
        model = self.models.find(name or "")
        if model is None:
            message, status, param, code = MODEL_NOT_FOUND[self.error_shape]
            raise OperationError(message.format(name=name, names=self.models.names()), status=status, param=param,
                                 code=code)
        return model

    async def chat_prompt(self, turns: list[dict], tools: list[dict], tool_choice: str | dict | None = None,
                          parallel_tool_calls: bool | None = None, **rendering) -> tuple[list[int], ToolPlan]:
        """Every chat-shaped API's prompt: the tool plan for OpenAI-style function ``tools``, then the turns as the
        chat template renders them with it (``rendering``: ``Generation.render_chat``'s options)."""
        plan = plan_tools(tools, tool_choice, parallel_tool_calls, self.generation.tool_parser is not None)
        prompt = await self.generation.render_chat(turns, plan.template_tools, instructions=plan.instructions,
                                                   **rendering)
        return prompt, plan


    def operations(self) -> Mapping[str, Serve]:
        """Each of ``OPERATIONS``'s operationIds with the coroutine that serves it."""
        return {operation_id: getattr(self, name) for operation_id, name in self.SERVES.items()}

    def request_size(self, operation_id: str, body) -> RequestSize:
        """What a request of one of ``OPERATIONS`` becomes in the engine, read from its body alone (it runs before
        admission): one prompt, generated once, unless the API says more."""
        return RequestSize()


def spec_operations(operations: Iterable[Operation], *operation_ids: str) -> tuple[Operation, ...]:
    """The operations of a generated protocol module that one API serves, by operationId."""
    by_id = {operation.operation_id: operation for operation in operations}
    missing = [operation_id for operation_id in operation_ids if operation_id not in by_id]
    if missing:
        raise LookupError(f"openapi.yaml has no operations {missing}")
    return tuple(by_id[operation_id] for operation_id in operation_ids)


class UnknownAPI(LookupError):
    pass


def installed_apis() -> list[type[LLMAPI]]:
    """Every API installed for the llm pipeline, by entry-point name."""
    apis = []
    for entry in sorted(entry_points(group=API_ENTRY_POINT_GROUP), key=lambda entry: entry.name):
        try:
            api = entry.load()
        except Exception as exc:  # a broken API package is a start failure, not a traceback
            raise UnknownAPI(f"the llm API {entry.name!r} ({entry.value}) cannot be imported: {exc}") from exc
        if not (isinstance(api, type) and issubclass(api, LLMAPI)):
            raise UnknownAPI(f"the llm API entry point {entry.name!r} does not name an LLMAPI subclass")
        apis.append(api)
    return apis
