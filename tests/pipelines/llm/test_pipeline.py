"""The llm pipeline composes its APIs: a new surface is one module and its part of the spec, nothing else.

A throwaway ``/v1/shout`` API is installed into a folder of its own (its module,
its protocol module generated from a spec fragment, and a dist-info with its
entry point) and served by the llm pipeline beside every other API, with no
file of the pipeline changed.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from runner import codegen
from runner.keys import STATE
from runner.pipeline import OperationError, RequestContext
from tests.support.apps import llm_app, llm_pipeline, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import DEFAULT_WORDS, MODEL_CONFIG, FakeEngine
from tests.support.http import QUESTION
from tests.support.lora_adapters import make_adapter, make_checkpoint
from tests.support.nodes import NODE_SECRET

SHOUT_SPEC = {
    "x-pipeline-modules": {"llm": "shout_schema.py"},
    "paths": {
        "/v1/shout": {
            "post": {
                "operationId": "shout",
                "x-pipeline": "llm",
                "x-error-shape": "openai",
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ShoutRequest"}}}},
            }
        }
    },
    "components": {"schemas": {
        "ShoutRequest": {"x-pipeline": "llm", "type": "object", "additionalProperties": False,
                         "properties": {"text": {"type": "string"}, "words": {"type": "integer", "minimum": 1}},
                         "required": ["text", "words"]},
        "ShoutResponse": {"x-pipeline": "llm", "type": "object", "properties": {"shout": {"type": "string"}},
                          "required": ["shout"]},
    }},
}

SHOUT_API = '''
import shout_schema
from shout_schema import ShoutRequest, ShoutResponse

from pipelines.llm.api import LLMAPI, spec_operations
from pipelines.llm.engine import Sampling
from pipelines.llm.replies import ReplyTracker


class ShoutAPI(LLMAPI):
    OPERATIONS = spec_operations(shout_schema.OPERATIONS, "shout")

    def operations(self):
        return {"shout": self.shout}

    async def shout(self, request: ShoutRequest, context):
        prompt = await self.generation.render_chat([{"role": "user", "content": request.text}])
        tracker = ReplyTracker(context, [len(prompt)])
        async for step in await self.generation.start(prompt, Sampling(max_tokens=request.words), context, self.models.base):
            tracker.take(step)
        return ShoutResponse(shout=tracker.choices[0].text.upper())
'''


@pytest.fixture
def shout_site(tmp_path, monkeypatch):
    site = tmp_path / "shout-site"
    site.mkdir()
    (site / "shout_schema.py").write_text(codegen.generate(SHOUT_SPEC, "llm"))
    (site / "shout_api.py").write_text(textwrap.dedent(SHOUT_API))
    dist_info = site / "shout_api-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-api\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[livepeer_runner.llm_apis]\nshout = shout_api:ShoutAPI\n")
    monkeypatch.syspath_prepend(str(site))
    return site


async def test_a_new_api_is_one_module_and_its_spec_part(shout_site, aiohttp_client, tmp_path):
    engine = FakeEngine()
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model"))
    response = await client.post("/v1/shout", json={"text": "hi", "words": 3})
    assert response.status == 200
    assert await response.json() == {"shout": "".join(DEFAULT_WORDS[:3]).upper()}
    refused = await client.post("/v1/shout", json={"text": "hi", "words": 3, "volume": 11})
    assert refused.status == 400 and (await refused.json())["error"]["param"] == "volume", "its spec, its error shape"
    assert (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 1})).status == 200, "beside the others"
    metrics = await (await client.get("/metrics")).text()
    assert re.search(r'livepeer_runner_requests_total\{code="200",model="[^"]+",operation="shout",outcome="ok"\} 1\.0', metrics)


async def test_a_worker_node_refuses_every_api_with_503(tmp_path):
    """NODE_RANK > 0 runs engine ranks only: every operation of every API says where to send requests instead."""
    pipeline = llm_pipeline(FakeEngine(), tmp_path / "model", llm_settings(NNODES="2", NODE_RANK="1", NODE_SECRET=NODE_SECRET,
                                                                           TENSOR_PARALLEL_SIZE="2"))
    served = pipeline.operations()
    assert served.keys() == {operation.operation_id for operation in pipeline.OPERATIONS}
    for serve in served.values():
        with pytest.raises(OperationError) as refused:
            await serve(None, RequestContext("x"))
        assert refused.value.status == 503
        assert "worker node 1 of 2" in refused.value.msg and "NODE_RANK=0" in refused.value.msg


# What discovery shows of the runner (go-livepeer's Live Runner metadata)


async def test_describe_names_the_model_its_adapters_the_apis_and_the_engine_and_nothing_secret(
        aiohttp_client, tmp_path):
    base = make_checkpoint(tmp_path / "base", MODEL_CONFIG)
    sql, chat = make_adapter(tmp_path / "sql", base, seed=1), make_adapter(tmp_path / "chat", base, seed=2)
    settings = llm_settings(LORA_ADAPTERS=f"sql={sql},chat={chat}", MAX_MODEL_LEN=2048)
    app = llm_app(FakeEngine(max_model_len=2048), base, settings,
                  runner=runner_settings(AUTH_TOKEN="describe-test-token"))
    pipeline = app[STATE].pipeline
    before = pipeline.describe()
    assert before["adapters"] == [] and before["dtype"] == "auto", "before the load: the settings' own values"
    await ready_client(aiohttp_client, app)
    described = pipeline.describe()
    assert described == {
        "model": pipeline.model_id,
        "adapters": ["chat", "sql"],
        "max_model_len": 2048,
        "apis": ["anthropic", "chat_completion", "completion", "livepeer", "lora", "models", "responses", "tokenize"],
        "dtype": "float32",
    }
    assert list(described) == ["model", "adapters", "max_model_len", "apis", "dtype"], "in the order of their worth"
    text = json.dumps(described)
    assert str(sql) not in text and str(chat) not in text, "adapter names, never where they come from"
    assert "describe-test-token" not in text


async def test_the_loaded_heap_is_frozen_out_of_full_collections_once_warm(aiohttp_client, tmp_path, monkeypatch):
    """A full collection over the loaded heap held /ready for up to 1.25 s under hostile streams (docs/security.md)."""
    frozen = []
    monkeypatch.setattr("pipelines.llm.pipeline.gc.freeze", lambda: frozen.append("frozen"))
    engine = FakeEngine()
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path))
    assert (await (await client.get("/health")).json())["status"] == "IDLE"
    assert frozen == ["frozen"] and engine.submitted  # once, after the warm-up request
