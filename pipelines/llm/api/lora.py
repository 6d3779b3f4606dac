"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: vLLM's run-time LoRA adapter changes.

The bodies are vLLM's. They are open only with LORA_RUNTIME_UPDATES=true, which
the settings refuse without AUTH_TOKEN: loading reads files (or downloads a Hub
repository) into the engine. The adapter's checks, the engine and the served
ids are ``ServedModels``' business; this module maps their outcomes to answers.
"""

from __future__ import annotations

import structlog

from pipelines.llm.adapters import AdapterError
from pipelines.llm.api.openai_base import OpenAIAPI
from pipelines.llm.schema import LoadLoRAAdapterRequest, LoRAAdapterStatus, UnloadLoRAAdapterRequest
from pipelines.llm.served_models import AdapterBusy, AdapterPinned, UnknownAdapter
from runner.pipeline import OperationError, RequestContext

log = structlog.get_logger(__name__)


class LoRAAPI(OpenAIAPI):
    SERVES = {"loadLoRAAdapter": "load", "unloadLoRAAdapter": "unload"}

    def require_runtime_updates(self) -> None:
        if not self.models.runtime_updates:
            raise OperationError(
                "run-time LoRA adapter changes are off: start the runner with LORA_RUNTIME_UPDATES=true (and "
                "AUTH_TOKEN), or list the adapters in LORA_ADAPTERS", status=403, code="lora_runtime_updates_off")

    async def load(self, request: LoadLoRAAdapterRequest, context: RequestContext) -> LoRAAdapterStatus:
        self.require_runtime_updates()
        name, source = request.lora_name.strip(), request.lora_path.strip()
        if not name or not source:
            raise OperationError("Both 'lora_name' and 'lora_path' must be provided.",
                                 param="lora_name" if not name else "lora_path")
        if request.load_inplace:
            raise OperationError(f"load_inplace is not served here: unload {name!r}, then load it again",
                                 param="load_inplace")
        try:
            served = await self.models.load(name, source)
        except (AdapterError, AdapterBusy) as exc:
            log.info("adapter.load.refused", model=name, source=source, reason=str(exc))
            raise OperationError(str(exc), status=409 if isinstance(exc, AdapterBusy) else 400,
                                 param=None if isinstance(exc, AdapterError) else "lora_name") from None
        context.model = served.id
        return LoRAAdapterStatus(lora_name=name, status="loaded",
                                 message=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: UnloadLoRAAdapterRequest, context: RequestContext) -> LoRAAdapterStatus:
        self.require_runtime_updates()
        name = request.lora_name.strip()
        if not name:
            raise OperationError("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        try:
            await self.models.unload(name)
        except UnknownAdapter as exc:
            raise OperationError(str(exc), status=404, param="lora_name", code="model_not_found") from None
        except AdapterPinned as exc:
            raise OperationError(str(exc), status=403, param="lora_name", code="adapter_pinned") from None
        except (AdapterError, AdapterBusy) as exc:
            log.info("adapter.unload.refused", model=name, reason=str(exc))
            raise OperationError(str(exc), status=409 if isinstance(exc, AdapterBusy) else 400,
                                 param="lora_name") from None
        context.model = name
        return LoRAAdapterStatus(lora_name=name, status="unloaded",
                                 message=f"Success: LoRA adapter '{name}' removed successfully.")
