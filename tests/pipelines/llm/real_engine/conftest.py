"""The real-engine API tests' SDK clients, one per SDK per shared runner (tests/conftest.py's runner fixtures)."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.http import IN_FLIGHT, wait_for_metric
from tests.support.runner_process import RunnerProcess
from tests.support.runners import GUARDED_AUTH_TOKEN, GUARDED_REQUEST_TIMEOUT
from tests.support.sdks import anthropic_sdk, openai_sdk


@pytest.fixture
async def idle_guarded_runner(guarded_runner) -> RunnerProcess:
    """The guarded runner, with nothing left in flight by an earlier test."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}) as http:
        await wait_for_metric(http, guarded_runner, IN_FLIGHT, 0, within=GUARDED_REQUEST_TIMEOUT + 10)
    return guarded_runner


@pytest.fixture
async def openai_default(default_runner):
    async with openai_sdk(default_runner.url) as sdk:
        yield sdk


@pytest.fixture
async def openai_tiny(tiny_runner):
    async with openai_sdk(tiny_runner.url) as sdk:
        yield sdk


@pytest.fixture
async def openai_guarded(idle_guarded_runner):
    async with openai_sdk(idle_guarded_runner.url, GUARDED_AUTH_TOKEN) as sdk:
        yield sdk


@pytest.fixture
async def openai_drained(drained_runner):
    async with openai_sdk(drained_runner.url) as sdk:
        yield sdk


@pytest.fixture
async def anthropic_default(default_runner):
    async with anthropic_sdk(default_runner.url) as sdk:
        yield sdk


@pytest.fixture
async def anthropic_guarded(idle_guarded_runner):
    async with anthropic_sdk(idle_guarded_runner.url, GUARDED_AUTH_TOKEN) as sdk:
        yield sdk
