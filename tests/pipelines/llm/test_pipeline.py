"""The llm pipeline composes its APIs: a new surface is one module and its part of the spec, nothing else.

A throwaway ``/v1/shout`` API is installed into a folder of its own (its module,
its protocol module generated from a spec fragment, and a dist-info with its
entry point) and served by the llm pipeline beside every other API, with no
file of the pipeline changed.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from runner import codegen
from runner.pipeline import OperationError, RequestContext
from tests.support.apps import llm_app, llm_pipeline, llm_settings, ready_client
from tests.support.fake_engine import DEFAULT_WORDS, FakeEngine
from tests.support.http import QUESTION
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
        prompt = self.generation.render_chat([{"role": "user", "content": request.text}])
        tracker = ReplyTracker(context, [len(prompt)])
        async for step in self.generation.start(prompt, Sampling(max_tokens=request.words), context, self.models.base):
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
