"""GET /v1/models and /v1/models/{model} on a fake engine, in-process, through the official ``openai`` SDK."""

from __future__ import annotations

import openai
import pytest

from tests.support.apps import llm_app, ready_client
from tests.support.fake_engine import FakeEngine


@pytest.fixture
async def sdk(aiohttp_client, tmp_path):
    served = await ready_client(aiohttp_client, llm_app(FakeEngine(max_model_len=2048), tmp_path / "model"))
    async with openai.AsyncOpenAI(base_url=str(served.make_url("/v1")), api_key="x", max_retries=0) as client:
        yield client


async def test_the_served_model_is_listed_and_retrieved_and_another_is_404(sdk, tmp_path):
    model = str(tmp_path / "model")  # a local folder's path: an id with slashes
    listed = await sdk.models.list()
    assert [(card.id, card.object, card.owned_by) for card in listed.data] == [(model, "model", "livepeer")]
    assert listed.data[0].model_extra["max_model_len"] == 2048
    card = await sdk.models.retrieve(model)
    assert card.id == model and card.created == listed.data[0].created
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("someone/else")
    assert missing.value.body["code"] == "model_not_found"
