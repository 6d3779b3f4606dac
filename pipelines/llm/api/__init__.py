"""The llm pipeline's API surfaces: peers over one shared serving base.

Each API is one module with a subclass of ``LLMAPI``: the operations of
openapi.yaml it serves (its part of the spec, generated into a protocol module)
and the coroutines that serve them, built on the shared ``Generation`` (the one
path into the engine) and ``ServedModels``. The pipeline serves every API
installed under the ``livepeer_runner.llm_apis`` entry-point group, so a new
surface is one module, its part of openapi.yaml and one entry point, with no
change to any other API or to the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

from pipelines.llm.generation import Generation
from pipelines.llm.served_models import ServedModels
from runner.operations import Operation
from runner.pipeline import Serve

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


class LLMAPI:
    """The shared serving base: what every API of the llm pipeline is handed."""

    OPERATIONS: ClassVar[tuple[Operation, ...]]

    def __init__(self, generation: Generation, models: ServedModels) -> None:
        self.generation = generation
        self.models = models

    def operations(self) -> Mapping[str, Serve]:
        """Each of ``OPERATIONS``'s operationIds with the coroutine that serves it."""
        raise NotImplementedError

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
