# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from runner.jsontypes import Integer
from runner.operations import Operation
from runner.schema import APIErrorMessage


class LLMMessage(BaseModel):
    role: str
    content: str


class LLMRequest(BaseModel):
    messages: list[LLMMessage]
    model: str = ''
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: Integer = Field(default=256, ge=1)
    top_p: float = Field(default=1.0, le=1, gt=0)
    top_k: Integer = Field(default=-1, ge=-1)
    stream: bool = False


class LLMTokenUsage(BaseModel):
    prompt_tokens: Integer
    completion_tokens: Integer
    total_tokens: Integer


class LLMChoice(BaseModel):
    index: Integer
    finish_reason: str = ''
    delta: LLMMessage | None = None
    message: LLMMessage | None = None


class LLMResponse(BaseModel):
    id: str
    model: str
    created: Integer
    usage: LLMTokenUsage
    choices: list[LLMChoice]
    error: APIErrorMessage | None = None


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        operation_id='genLLM',
        method='POST',
        path='/llm',
        request_model=LLMRequest,
        authenticated=True,
    ),
)
