"""GET /v1/models and /v1/models/{model} on a fake engine, in-process, through the official ``openai`` SDK."""

from __future__ import annotations

import openai
import pytest

from tests.support.fake_engine import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=2048)


async def test_the_served_model_is_listed_and_retrieved_and_another_is_404(openai_client, tmp_path):
    model = str(tmp_path / "model")  # a local folder's path: an id with slashes
    listed = await openai_client.models.list()
    assert [(card.id, card.object, card.owned_by) for card in listed.data] == [(model, "model", "livepeer")]
    assert listed.data[0].model_extra["max_model_len"] == 2048
    card = await openai_client.models.retrieve(model)
    assert card.id == model and card.created == listed.data[0].created
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.models.retrieve("someone/else")
    assert missing.value.body["code"] == "model_not_found"


async def test_a_model_id_past_the_path_bound_is_a_400_in_openais_shape(openai_client):
    with pytest.raises(openai.BadRequestError) as refused:  # was a 404 with the whole id in it
        await openai_client.models.retrieve("m" * 4000)
    assert refused.value.body["param"] == "model" and "at most 256" in refused.value.body["message"]
