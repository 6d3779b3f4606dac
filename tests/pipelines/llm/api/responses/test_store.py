"""The store of finished responses: GET, store false, its bounds in count and bytes, DELETE, its settings."""

from __future__ import annotations

import openai
import pytest

from pipelines.llm.api import installed_apis
from pipelines.llm.api.responses import ResponsesAPI, ResponsesSettings
from runner.app import create_app
from runner.keys import STATE
from tests.support.apps import llm_app, ready_client, runner_settings
from tests.support.fake_engine import FakeEngine, scripted_text
from tests.support.responses import parse_stream


# 4. The store: GET, store false, its bound, 404s


async def test_a_stored_response_is_retrieved_as_it_was_answered(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    body = await (await client.post("/v1/responses", json={"input": "Capital?", "metadata": {"k": "v"}})).json()
    response = await client.get(f"/v1/responses/{body['id']}")
    assert response.status == 200 and await response.json() == body
    retrieved = await openai_client.responses.retrieve(body["id"])
    assert retrieved.output_text == "Paris." and retrieved.metadata == {"k": "v"} and retrieved.store
    events = parse_stream(await (await client.post("/v1/responses", json={"input": "Capital?", "stream": True})).text())
    streamed = events[-1]["response"]
    assert await (await client.get(f"/v1/responses/{streamed['id']}")).json() == streamed


async def test_store_false_keeps_nothing(client, openai_client, engine, model):
    answer = await openai_client.responses.create(model=model, input="Hi", store=False, max_output_tokens=2)
    assert answer.store is False
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.retrieve(answer.id)
    assert missing.value.body["param"] == "response_id" and answer.id in missing.value.body["message"]
    submitted = len(engine.submitted)
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.create(model=model, input="Hi", previous_response_id=answer.id)
    assert missing.value.body["param"] == "previous_response_id"
    assert len(engine.submitted) == submitted, "nothing reached the engine"


def small_store(size: int, store_bytes: int | None = None) -> type[ResponsesAPI]:
    settings = {"RESPONSES_STORE_SIZE": size} | ({} if store_bytes is None else {"RESPONSES_STORE_BYTES": store_bytes})

    class SmallStore(ResponsesAPI):
        def __init__(self, generation, models) -> None:
            super().__init__(generation, models, ResponsesSettings(**settings))

    return SmallStore


async def small_store_client(aiohttp_client, tmp_path, size: int, store_bytes: int | None = None):
    apis = [api for api in installed_apis() if api is not ResponsesAPI] + [small_store(size, store_bytes)]
    return await ready_client(aiohttp_client, llm_app(FakeEngine(), tmp_path / "model", apis=apis))


@pytest.mark.parametrize("size", [0, 2])
async def test_the_store_keeps_the_last_responses_only(aiohttp_client, tmp_path, size):
    client = await small_store_client(aiohttp_client, tmp_path, size)
    ids = []
    for _ in range(3):
        ids.append((await (await client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2})).json())["id"])
    statuses = [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids]
    assert statuses == ([404, 200, 200] if size == 2 else [404, 404, 404])
    gone = await (await client.get(f"/v1/responses/{ids[0]}")).json()
    assert set(gone["error"]) == {"message", "type", "param", "code"} and "RESPONSES_STORE_SIZE" in gone["error"]["message"]


async def test_the_store_is_bounded_in_bytes_the_oldest_dropped_first(aiohttp_client, tmp_path):
    """A caller's large inputs must not fill the process's memory: RESPONSES_STORE_BYTES bounds what is kept."""
    client = await small_store_client(aiohttp_client, tmp_path, size=100, store_bytes=9_000)
    ids = []
    for _ in range(4):  # 3 kB of input each, about 4 kB stored: two fit in 9 kB
        body = {"input": "x" * 3_000, "max_output_tokens": 2}
        ids.append((await (await client.post("/v1/responses", json=body)).json())["id"])
    statuses = [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids]
    assert statuses == [404, 404, 200, 200]
    store = next(api for api in client.app[STATE].pipeline.apis if isinstance(api, ResponsesAPI)).store
    assert 6_000 < store.bytes <= 9_000
    gone = await (await client.get(f"/v1/responses/{ids[0]}")).json()
    assert "RESPONSES_STORE_BYTES" in gone["error"]["message"]
    store.max_bytes = 3_500  # now smaller than one such response
    huge = await (await client.post("/v1/responses", json={"input": "x" * 3_000, "max_output_tokens": 2})).json()
    assert huge["store"] is True and (await client.get(f"/v1/responses/{huge['id']}")).status == 404, \
        "a response larger than the whole store is not kept"
    assert [(await client.get(f"/v1/responses/{response_id}")).status for response_id in ids[2:]] == [200, 200], \
        "and it drops nothing to make room"


async def test_delete_removes_a_stored_response(client, openai_client, engine, model):
    engine.script = scripted_text("Paris.")
    answer = await openai_client.responses.create(model=model, input="Capital?", max_output_tokens=4)
    deleted = await client.delete(f"/v1/responses/{answer.id}")
    assert deleted.status == 200 and await deleted.json() == {"id": answer.id, "object": "response", "deleted": True}
    assert (await client.get(f"/v1/responses/{answer.id}")).status == 404
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client.responses.create(model=model, input="And?", previous_response_id=answer.id)
    assert missing.value.body["param"] == "previous_response_id"
    again = await client.delete(f"/v1/responses/{answer.id}")
    assert again.status == 404 and (await again.json())["error"]["param"] == "response_id"
    other = await openai_client.responses.create(model=model, input="Capital?", max_output_tokens=4)
    await openai_client.responses.delete(other.id)  # the SDK's own call
    with pytest.raises(openai.NotFoundError):
        await openai_client.responses.retrieve(other.id)


def test_the_store_bounds_are_read_from_the_environment_at_start(monkeypatch):
    monkeypatch.setenv("RESPONSES_STORE_SIZE", "7")
    monkeypatch.setenv("RESPONSES_STORE_BYTES", "4096")
    assert (ResponsesSettings().store_size, ResponsesSettings().store_bytes) == (7, 4096)


async def test_an_invalid_store_size_is_health_error_with_the_reason(aiohttp_client, monkeypatch, tmp_path):
    monkeypatch.setenv("RESPONSES_STORE_SIZE", "-1")
    app = create_app(runner_settings(MODEL_ID=str(tmp_path / "model"), MODEL_DIR=str(tmp_path)))
    client = await aiohttp_client(app)
    assert (await (await client.get("/health")).json())["status"] == "ERROR"
    assert "RESPONSES_STORE_SIZE" in app[STATE].load_error
