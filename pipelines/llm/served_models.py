"""The model ids this runner answers to, and which model each one means."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ServedModel:
    id: str
    parent: str | None = None  # the base model's id, for a model served on top of it


class ServedModels:
    """Every id a request's ``model`` may name; the one place a name is looked up."""

    def __init__(self, base_id: str) -> None:
        self.base = ServedModel(base_id)
        self.created = int(time.time())  # OpenAI's model cards carry when the model was made available

    def find(self, name: str) -> ServedModel | None:
        return self.base if name == self.base.id else None

    def all(self) -> list[ServedModel]:
        return [self.base]

    def names(self) -> str:
        """The served ids, for an error message that says what a client may ask for instead."""
        return ", ".join(repr(model.id) for model in self.all())
