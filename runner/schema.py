# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.jsontypes import Integer
from runner.operations import Operation


class APIErrorMessage(BaseModel):
    msg: str


class HTTPError(BaseModel):
    detail: APIErrorMessage


class ValidationError(BaseModel):
    loc: list[str | Integer]
    msg: str
    type: str


class HTTPValidationError(BaseModel):
    detail: list[ValidationError]


class HealthCheck(BaseModel):
    status: Literal['LOADING', 'OK', 'ERROR', 'IDLE']


class Version(BaseModel):
    pipeline: str
    model_id: str
    version: str


class GPUComputeInfo(BaseModel):
    id: str
    name: str
    memory_total: Integer
    memory_free: Integer
    major: Integer
    minor: Integer


class GPUUtilizationInfo(BaseModel):
    id: str
    name: str
    memory_total: Integer
    memory_free: Integer
    utilization_compute: Integer
    utilization_memory: Integer


class HardwareInformation(BaseModel):
    pipeline: str
    model_id: str
    gpu_info: dict[str, GPUComputeInfo]


class HardwareStats(BaseModel):
    pipeline: str
    model_id: str
    gpu_stats: dict[str, GPUUtilizationInfo]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    "OpenAI's error shape, on every error of OpenAI's /v1 operations."

    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    "Anthropic's error shape, on every error of the Messages operations and in a stream's `error` event."

    type: Literal['error']
    error: AnthropicErrorDetail


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        operation_id='health',
        method='GET',
        path='/health',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='ready',
        method='GET',
        path='/ready',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='readyz',
        method='GET',
        path='/readyz',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='version',
        method='GET',
        path='/version',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='hardwareInfo',
        method='GET',
        path='/hardware/info',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='hardwareStats',
        method='GET',
        path='/hardware/stats',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='metrics',
        method='GET',
        path='/metrics',
        request_model=None,
        authenticated=False,
        error_shape='livepeer',
    ),
)
