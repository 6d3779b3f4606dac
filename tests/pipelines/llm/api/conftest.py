"""The fake-engine API tests' fixtures: the engine, the app served on it, the model's id, each SDK on it."""

from __future__ import annotations

import pytest

from tests.support.apps import served_client
from tests.support.fake_engine import FakeEngine
from tests.support.sdks import anthropic_sdk, openai_sdk


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def model(tmp_path) -> str:
    """The id the app serves: the model folder's path."""
    return str(tmp_path / "model")


@pytest.fixture
async def client(aiohttp_client, engine, tmp_path):
    """The llm app on `engine`, ready, the warm-up's request forgotten."""
    return await served_client(aiohttp_client, engine, tmp_path)


@pytest.fixture
async def openai_client(client):
    async with openai_sdk(str(client.make_url(""))) as sdk:
        yield sdk


@pytest.fixture
async def anthropic_client(client):
    async with anthropic_sdk(str(client.make_url(""))) as sdk:
        yield sdk
