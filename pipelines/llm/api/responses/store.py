"""The store of finished responses: the last ones of this process, bounded in count and bytes, for ``GET`` and
``previous_response_id`` until ``DELETE`` removes them; and its settings."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.llm.api.responses.conversation import Message
from pipelines.llm.schema import ResponsesResponse
from runner.pipeline import OperationError

log = structlog.get_logger(__name__)

# 64 MiB: the default count (1,000) of responses at 64 KiB each; what a 1,000-response store of 1 MiB requests
# (MAX_REQUEST_BYTES) would otherwise hold is about 1 GiB of the process's memory.
STORE_BYTES_DEFAULT = 64 * 1024 * 1024


class ResponsesSettings(BaseSettings):
    """The Responses API's own setting, read with the pipeline at start."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    store_size: int = Field(
        1000, alias="RESPONSES_STORE_SIZE", ge=0,
        description="Finished responses kept in memory for GET /v1/responses/{id} and previous_response_id "
                    "(the oldest dropped first; 0 keeps none)",
    )
    store_bytes: int = Field(
        STORE_BYTES_DEFAULT, alias="RESPONSES_STORE_BYTES", ge=0,
        description="Bytes the stored responses may hold in all, counted as their JSON and their conversation's "
                    "text (the oldest dropped first; a response larger than all of it is not stored)",
    )


@dataclass(frozen=True)
class StoredResponse:
    response: ResponsesResponse
    history: tuple[Message, ...]  # its conversation without its instructions, then its output

    def size(self) -> int:
        """What it holds, in bytes: its JSON and the text of its conversation (what a caller can make large)."""
        text = sum(len(message.content or "") + sum(len(part) for call in message.calls for part in call)
                   for message in self.history)
        return len(self.response.model_dump_json(exclude_unset=True)) + text


class ResponseStore:
    """The last finished responses of this process, at most ``size`` of them and ``max_bytes`` in all, the oldest
    dropped first."""

    def __init__(self, size: int, max_bytes: int = STORE_BYTES_DEFAULT) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.kept: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self.bytes = 0  # what the kept responses hold

    def put(self, stored: StoredResponse) -> None:
        if self.size == 0:
            return
        size = stored.size()
        if size > self.max_bytes:
            log.warning("responses.store.too_large", response_id=stored.response.id, bytes=size,
                        store_bytes=self.max_bytes, effect="not stored: GET and previous_response_id answer 404")
            return
        self.delete(stored.response.id)
        self.kept[stored.response.id] = (stored, size)
        self.bytes += size
        while len(self.kept) > self.size or self.bytes > self.max_bytes:
            _, (_, dropped) = self.kept.popitem(last=False)
            self.bytes -= dropped

    def get(self, response_id: str) -> StoredResponse | None:
        kept = self.kept.get(response_id)
        return None if kept is None else kept[0]

    def delete(self, response_id: str) -> bool:
        """Forget a stored response; False when none of that id is kept."""
        kept = self.kept.pop(response_id, None)
        if kept is None:
            return False
        self.bytes -= kept[1]
        return True

    def find(self, response_id: str, param: str) -> StoredResponse:
        stored = self.get(response_id)
        if stored is None:
            raise self.not_found(response_id, param)
        return stored

    def not_found(self, response_id: str, param: str) -> OperationError:
        return OperationError(
            f"Response with id {response_id!r} not found: this runner keeps the last {self.size} stored responses "
            f"of this process, {self.max_bytes} bytes in all (RESPONSES_STORE_SIZE, RESPONSES_STORE_BYTES), in "
            "memory, only those sent with store true, until they are deleted",
            status=404, param=param,
        )
