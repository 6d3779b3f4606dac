"""The runner's own settings: what any pipeline needs to be served over HTTP.

Each pipeline reads its own tuning variables with a settings class of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def token_set(token: SecretStr | None) -> bool:
    """Whether AUTH_TOKEN turns authentication on: set, and more than whitespace (``AUTH_TOKEN=`` leaves it off).

    The one rule for the runner's routes and for every setting that needs a token to be safe to open.
    """
    return token is not None and bool(token.get_secret_value().strip())


class ListenSettings(BaseSettings):
    """Where the runner listens: with these valid it can at least say ERROR on /health."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    host: str = Field("0.0.0.0", alias="HOST")
    port: int = Field(8000, alias="PORT", ge=1, le=65535)


class RunnerSettings(ListenSettings):
    pipeline: str = Field("llm", alias="PIPELINE", min_length=1)
    model_id: str = Field(DEFAULT_MODEL_ID, alias="MODEL_ID", min_length=1)
    model_dir: Path = Field(
        Path("models"),
        alias="MODEL_DIR",
        description="Model store in the Hugging Face cache layout (a container mounts /models).",
    )
    verbose_logging: bool = Field(False, alias="VERBOSE_LOGGING")
    auth_token: SecretStr | None = Field(
        None, alias="AUTH_TOKEN", description="When set, /llm requires `Authorization: Bearer <token>`."
    )
    max_request_bytes: int = Field(
        1024 * 1024, alias="MAX_REQUEST_BYTES", ge=1024, description="Largest request body accepted (413 beyond)."
    )
    request_timeout: float = Field(
        600.0,
        alias="REQUEST_TIMEOUT",
        gt=0,
        description="Seconds one request may take; past it the request is stopped and fails.",
    )
    drain_timeout: float = Field(
        5.0,
        alias="DRAIN_TIMEOUT",
        ge=0,
        description="Seconds in-flight requests get to finish after SIGTERM (go-livepeer kills after 8).",
    )
    write_stall_timeout: float = Field(
        60.0,
        alias="WRITE_STALL_TIMEOUT",
        gt=0,
        description="Seconds a stream may wait for its client to read before it is cut (nginx's send_timeout).",
    )
    send_buffer_bytes: int = Field(
        256 * 1024,
        alias="SEND_BUFFER_BYTES",
        ge=4096,
        le=64 * 1024 * 1024,
        description="Kernel send buffer (SO_SNDBUF) of every connection: what a client that stops reading holds "
                    "of the runner's memory, and how soon WRITE_STALL_TIMEOUT starts to count (docs/security.md).",
    )
    load_wait_timeout: float = Field(
        180.0,
        alias="LOAD_WAIT_TIMEOUT",
        ge=0,
        description="Seconds a request that arrives while the model loads waits for it.",
    )

    api_processes: int = Field(
        1,
        alias="API_PROCESSES",
        ge=1,
        description="HTTP processes over the one engine, all on the one listening socket (docs/operations.md).",
    )

    @field_validator("api_processes")
    @classmethod
    def processes_fit_cores(cls, processes: int) -> int:
        cores = len(os.sched_getaffinity(0))
        if processes > cores:
            raise ValueError(
                f"API_PROCESSES={processes} is more HTTP processes than the {cores} cores this runner may use: each "
                f"one is a Python event loop that wants a core of its own, beside the engine's; set API_PROCESSES to "
                f"at most {cores} (1, the default, is one process)")
        return processes

    @field_validator("auth_token")
    @classmethod
    def token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        value = None if token is None else token.get_secret_value()
        if value and not value.strip():
            raise ValueError("AUTH_TOKEN is only whitespace: no client could send it, and it would look set while "
                             "protecting nothing; set a real token, or leave AUTH_TOKEN unset (or empty) for no "
                             "authentication")
        return token

    @classmethod
    def fallback(cls, listen: ListenSettings) -> RunnerSettings:
        """Defaults but for where to listen: for a runner whose own settings are invalid."""
        return cls.model_construct(**{name: getattr(listen, name) for name in ListenSettings.model_fields})
