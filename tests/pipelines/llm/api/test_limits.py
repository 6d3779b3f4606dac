"""Every API's bounds and client mistakes on a fake engine: each is a 4xx in its API's own shape, naming the field,
before the engine sees the request; none is a 500, none leaks Python's exception text or leaves a traceback.

The bounds and why each is what it is: docs/limits.md. The real engine's side (over real HTTP):
real_engine/test_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import structlog.testing

from pipelines.llm.limits import MAX_JSON_DEPTH, MAX_SCHEMA_PROPERTIES, depth_of, TooDeep
from tests.support.apps import llm_app, llm_settings, ready_client, runner_settings, served_client
from tests.support.http import raw_request

USER = [{"role": "user", "content": "hi"}]
DEEP = "[" * 5000  # Python's json runs out of recursion on it (a RecursionError, which is no ValueError)


def wide_schema(properties: int) -> dict:
    return {"type": "object", "properties": {f"p{index}": {"type": "string"} for index in range(properties)}}


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


async def refused(client, path: str, body: dict, status: int = 400) -> dict:
    """The answer to ``body``: ``status`` with a JSON body, and no traceback logged for it."""
    with structlog.testing.capture_logs() as logs:
        response = await client.post(path, json=body)
        document = await response.json()
    assert response.status == status, document
    assert not [entry for entry in logs if entry.get("exc_info")], "a client's mistake leaves no traceback"
    text = json.dumps(document)
    for leak in ("Traceback", "invalid literal", "RecursionError", "maximum recursion", "generation failed"):
        assert leak not in text
    return document


def openai_param(document: dict) -> str:
    assert set(document["error"]) == {"message", "type", "param", "code"}
    return document["error"]["param"]


@pytest.mark.parametrize("key", ["--1", "1e3", "+5", " 7", "１", "99999999999999999999", "-"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_logit_bias_key_that_is_no_token_id_is_a_400_naming_it(client, engine, path, key):
    body = {"model": client.model, "logit_bias": {key: 1}, "max_tokens": 2}
    body.update({"messages": USER} if "chat" in path else {"prompt": "hi"})
    document = await refused(client, path, body)
    assert openai_param(document) == "logit_bias"
    assert not engine.submitted


async def test_tool_call_arguments_nested_past_the_bound_are_a_400_naming_the_message(client, engine):
    for arguments in (DEEP, "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)):
        messages = [*USER, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]
        document = await refused(client, "/v1/chat/completions", {"model": client.model, "messages": messages})
        assert openai_param(document) == "messages.[1].tool_calls"
        assert "levels deep" in document["error"]["message"]
    assert not engine.submitted


async def test_responses_function_call_arguments_nested_past_the_bound_are_a_400(client, engine):
    items = [{"role": "user", "content": "hi"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": DEEP}]
    document = await refused(client, "/v1/responses", {"model": client.model, "input": items})
    assert openai_param(document) == "input.[1].arguments"


@pytest.mark.parametrize("field", ["json", "structural_tag"])
async def test_structured_outputs_nested_past_the_bound_are_a_400(client, engine, field):
    body = {"model": client.model, "messages": USER, "structured_outputs": {field: DEEP}}
    document = await refused(client, "/v1/chat/completions", body)
    assert openai_param(document) == f"structured_outputs.{field}"
    assert not engine.submitted


async def test_json_schemas_past_openais_structured_outputs_limits_are_a_400_naming_the_field(client, engine):
    wide, deep = wide_schema(MAX_SCHEMA_PROPERTIES + 1), deep_schema(MAX_JSON_DEPTH)
    for schema in (wide, deep):
        format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        body = {"model": client.model, "messages": USER, "response_format": format_}
        assert openai_param(await refused(client, "/v1/chat/completions", body)) == "response_format"
        body = {"model": client.model, "messages": USER, "structured_outputs": {"json": schema}}
        assert openai_param(await refused(client, "/v1/chat/completions", body)) == "structured_outputs.json"
        body = {"model": client.model, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                                          "schema": schema}}}
        assert openai_param(await refused(client, "/v1/responses", body)) == "text.format.schema"
    # Counted over all the tools together: two tools of 600 properties each are one grammar of 1,200.
    half = MAX_SCHEMA_PROPERTIES // 2 + 100
    tools = [{"type": "function", "function": {"name": f"f{index}", "parameters": wide_schema(half)}}
             for index in range(2)]
    body = {"model": client.model, "messages": USER, "tools": tools, "tool_choice": "required"}
    assert openai_param(await refused(client, "/v1/chat/completions", body)) == "tools"
    anthropic_tools = [{"name": f"f{index}", "input_schema": wide_schema(half)} for index in range(2)]
    document = await refused(client, "/v1/messages", {"model": client.model, "max_tokens": 4, "messages": USER,
                                                      "tools": anthropic_tools})
    assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"
    assert not engine.submitted


async def test_a_schema_within_the_limits_is_served(client, engine):
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": wide_schema(50)}}
    response = await client.post("/v1/chat/completions", json={"model": client.model, "messages": USER,
                                                               "response_format": format_, "max_tokens": 2})
    assert response.status == 200, await response.text()


def test_depth_of_counts_without_recursion():
    assert depth_of(3) == 0 and depth_of([]) == 1 and depth_of({"a": [1]}) == 2
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(TooDeep):
        depth_of(nested)


@pytest.mark.parametrize("token", [b"\xff", b"k\xff", b"\xed\xa0\x80"])
async def test_an_api_key_that_is_not_ascii_is_a_401_in_anthropics_shape(aiohttp_client, engine, tmp_path, token):
    client = await ready_client(aiohttp_client, llm_app(engine, tmp_path / "model",
                                                       runner=runner_settings(AUTH_TOKEN="k")))
    body = json.dumps({"model": str(tmp_path / "model"), "max_tokens": 4, "messages": USER}).encode()
    for header in ("x-api-key", "Authorization"):
        value = token if header == "x-api-key" else b"Bearer " + token
        with structlog.testing.capture_logs() as logs:
            status, head, answer = await raw_request(client.server.host, client.server.port, "POST", "/v1/messages",
                                                     {header: value, "Content-Type": b"application/json"}, body)
        assert status == 401, answer
        document = json.loads(answer)
        assert document["type"] == "error" and document["error"]["type"] == "authentication_error"
        assert not [entry for entry in logs if entry.get("exc_info")]


# Admission counts engine sequences: a request takes as many as it becomes (prompts x n).

async def test_20000_prompts_with_n_16_are_a_400_at_once_naming_the_prompt(client, engine):
    started = time.monotonic()
    document = await refused(client, "/v1/completions", {"model": client.model, "prompt": ["hi"] * 20_000, "n": 16,
                                                         "max_tokens": 4, "temperature": 1})
    assert time.monotonic() - started < 2
    assert openai_param(document) == "prompt"
    assert "MAX_PROMPTS_PER_REQUEST" in document["error"]["message"]
    assert not engine.submitted


async def test_max_prompts_per_request_is_a_setting(aiohttp_client, engine, tmp_path):
    client = await served_client(aiohttp_client, engine, tmp_path, llm_settings(MAX_PROMPTS_PER_REQUEST=3))
    body = {"model": client.model, "prompt": ["a", "b", "c", "d"], "max_tokens": 2}
    assert openai_param(await refused(client, "/v1/completions", body)) == "prompt"
    body["prompt"] = ["a", "b", "c"]
    assert (await client.post("/v1/completions", json=body)).status == 200


async def metric(client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


async def test_admission_counts_sequences_and_answers_503_with_retry_after_past_the_bound(aiohttp_client, engine,
                                                                                         tmp_path):
    # Capacity 4 sequences: 2 running, 2 waiting.
    client = await served_client(aiohttp_client, engine, tmp_path, llm_settings(MAX_NUM_SEQS=2,
                                                                                MAX_WAITING_REQUESTS=2))
    assert await metric(client, "livepeer_runner_admission_capacity") == 4
    engine.step_seconds = 0.05
    held = await client.post("/v1/completions", json={"model": client.model, "prompt": ["a", "b", "c"],
                                                      "max_tokens": 200, "stream": True})
    try:
        assert held.status == 200
        await held.content.readline()  # admitted and generating
        assert await metric(client, "livepeer_runner_admitted_sequences") == 3
        assert await metric(client, "livepeer_runner_requests_in_flight") == 1
        # One request, but two sequences: one more than the room left.
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json={"model": client.model, "messages": USER, "n": 2,
                                                                   "temperature": 1, "max_tokens": 2})
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 1, "refused at once, not queued"
        assert "engine sequences" in (await response.json())["error"]["message"]
        response = await client.post("/v1/messages", json={"model": client.model, "messages": USER,
                                                           "max_tokens": 2})
        assert response.status == 200, "the last place is one sequence"
    finally:
        held.close()
    for _ in range(100):
        if await metric(client, "livepeer_runner_admitted_sequences") == 0:
            break
        await asyncio.sleep(0.02)
    assert await metric(client, "livepeer_runner_admitted_sequences") == 0


async def test_a_request_larger_than_the_whole_bound_is_a_400_naming_n(aiohttp_client, engine, tmp_path):
    client = await served_client(aiohttp_client, engine, tmp_path, llm_settings(MAX_NUM_SEQS=2,
                                                                                MAX_WAITING_REQUESTS=2))
    body = {"model": client.model, "prompt": ["a", "b", "c"], "n": 2, "temperature": 1, "max_tokens": 2}
    document = await refused(client, "/v1/completions", body)
    assert openai_param(document) == "n" and "6 engine sequences" in document["error"]["message"]
    body = {"model": client.model, "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}
    assert openai_param(await refused(client, "/v1/completions", body)) == "prompt"
    body = {"model": client.model, "messages": USER, "n": 5, "temperature": 1, "max_tokens": 2}
    assert openai_param(await refused(client, "/v1/chat/completions", body)) == "n"
    assert not engine.submitted


# Every list and string a request body carries is bounded in openapi.yaml, but for these: text that becomes prompt
# tokens (bounded by MAX_REQUEST_BYTES and MAX_MODEL_LEN), the prompt list (MAX_PROMPTS_PER_REQUEST, a setting) and
# JSON schemas and tool inputs (bounded in depth and size by pipelines/llm/limits.py). docs/limits.md lists them all.
PROMPT_TEXT = {
    "LLMMessage.content", "ChatContentPart.text", "ChatToolCallFunction.arguments", "ChatMessage.content",
    "FunctionDefinition.description", "JSONSchemaFormat.description", "StructuredOutputs.json",
    "StructuredOutputs.structural_tag", "CompletionRequest.prompt", "ResponsesContentPart.text",
    "ResponsesInputItem.content", "ResponsesInputItem.arguments", "ResponsesInputItem.output",
    "ResponsesTool.description", "ResponsesTextFormat.description", "ResponsesRequest.input",
    "ResponsesRequest.instructions", "TokenizeRequest.prompt", "AnthropicTextBlock.text",
    "AnthropicToolResultPart.text",
    "AnthropicContentBlock.text", "AnthropicContentBlock.content", "AnthropicContentBlock.thinking",
    "AnthropicContentBlock.signature", "AnthropicContentBlock.data", "AnthropicMessageParam.content",
    "AnthropicTool.description", "AnthropicMessagesRequest.system", "AnthropicCountTokensRequest.system",
    "ChatCompletionRequest.documents",  # each document's values: text handed to the template
}
JSON_SCHEMAS = {"FunctionDefinition.parameters", "JSONSchemaFormat.schema", "StructuredOutputs.json",
                "ResponsesTool.parameters", "ResponsesTextFormat.schema", "AnthropicTool.input_schema",
                "AnthropicContentBlock.input"}
UNBOUNDED_BY_DESIGN = {"CompletionRequest.prompt"}  # MAX_PROMPTS_PER_REQUEST


def request_components() -> set[str]:
    import yaml

    from runner.codegen import SPEC_PATH, dependencies

    spec = yaml.safe_load(SPEC_PATH.read_text())
    schemas = spec["components"]["schemas"]
    found: set[str] = set()
    pending = [op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
               for item in spec["paths"].values() for op in item.values()
               if isinstance(op, dict) and "requestBody" in op]
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending.extend(dependencies(schemas[name]))
    return found


def unbounded(schema: dict, where: str) -> list[str]:
    if "anyOf" in schema:
        return [miss for option in schema["anyOf"] for miss in unbounded(option, where)]
    kind = schema.get("type")
    missing = []
    if kind == "string" and "maxLength" not in schema and "enum" not in schema:
        missing.append(where)
    if kind == "array":
        if "maxItems" not in schema:
            missing.append(where)
        missing += unbounded(schema.get("items", {}), where)
    if kind == "object" and "properties" not in schema:
        if "maxProperties" not in schema:
            missing.append(where)
        if isinstance(schema.get("additionalProperties"), dict):
            missing += unbounded(schema["additionalProperties"], where)
    return missing


def test_every_list_and_string_of_every_request_is_bounded_in_the_spec():
    import yaml

    from runner.codegen import SPEC_PATH

    schemas = yaml.safe_load(SPEC_PATH.read_text())["components"]["schemas"]
    missing = set()
    for name in request_components():
        for field, schema in schemas[name].get("properties", {}).items():
            missing.update(unbounded(schema, f"{name}.{field}"))
    allowed = PROMPT_TEXT | JSON_SCHEMAS | UNBOUNDED_BY_DESIGN
    assert sorted(missing - allowed) == [], "bound these in openapi.yaml (and list them in docs/limits.md)"
    assert sorted(allowed - missing) == [], "these are bounded now: take them off the lists"


def long_list(count: int, item) -> list:
    return [item] * count


# (path, a body past one bound, the param the refusal names); each is the smallest step past the bound.
PAST_A_BOUND = [
    ("/v1/chat/completions", {"messages": long_list(2049, USER[0])}, "messages"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a"] * 5}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a" * 1025]}, "stop.0"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"1" * 12: 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "bad_words": ["a"] * 129}, "bad_words"),
    ("/v1/chat/completions", {"messages": USER, "stop_token_ids": [1] * 1025}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": USER, "tools": long_list(129, {"type": "function",
                                                                          "function": {"name": "f"}})}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f" * 65}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_list(257, {"type": "text",
                                                                                       "text": "a"})}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"choice": ["a"] * 1001}},
     "structured_outputs.choice"),
    # vLLM's engine takes a 64-bit seed; a larger one could not even be handed to it.
    ("/v1/chat/completions", {"messages": USER, "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ("/v1/responses", {"input": "hi", "seed": 10**30}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 5}, "stop"),
    ("/v1/completions", {"prompt": "hi", "best_of": 17}, "best_of"),
    ("/v1/responses", {"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("/v1/responses", {"input": "hi", "metadata": {"k" * 65: "v"}}, "metadata"),
    ("/v1/responses", {"input": "hi", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ("/v1/responses", {"input": "hi", "stop": ["a"] * 5}, "stop"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "r" * 257}, "previous_response_id"),
    ("/tokenize", {"prompt": "hi", "model": "m" * 257}, "model"),
    ("/detokenize", {"tokens": [1] * 262_145}, "tokens"),
]
ANTHROPIC_PAST_A_BOUND = [
    {"stop_sequences": ["a"] * 5},
    {"stop_sequences": ["a"] * 40_000},
    {"metadata": {f"k{i}": "v" for i in range(17)}},
    {"tools": [{"name": "t" * 129, "input_schema": {"type": "object"}}]},
    {"messages": long_list(2049, USER[0])},
]


@pytest.mark.parametrize(("path", "body", "param"), PAST_A_BOUND, ids=[f"{p}:{q}" for p, _, q in PAST_A_BOUND])
async def test_past_a_bound_is_a_400_naming_the_field(client, engine, path, body, param):
    document = await refused(client, path, {"model": client.model, **body})
    assert openai_param(document) == param
    assert not engine.submitted


@pytest.mark.parametrize("body", ANTHROPIC_PAST_A_BOUND, ids=lambda body: next(iter(body)))
async def test_past_a_bound_is_a_400_in_anthropics_shape(client, engine, body):
    document = await refused(client, "/v1/messages", {"model": client.model, "max_tokens": 4, "messages": USER,
                                                      **body})
    assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"
    assert document["error"]["message"].startswith(next(iter(body)))
    assert not engine.submitted


async def test_past_a_bound_on_llm_is_a_422_at_the_field(client, engine):
    for body, loc in (({"messages": long_list(2049, USER[0])}, ["body", "messages"]),
                      ({"messages": USER, "model": "m" * 257}, ["body", "model"]),
                      ({"messages": [{"role": "r" * 65, "content": "hi"}]}, ["body", "messages", 0, "role"])):
        document = await refused(client, "/llm", body, status=422)
        assert document["detail"][0]["loc"] == loc
    assert not engine.submitted


async def test_at_the_bounds_a_request_is_served(client, engine):
    engine.max_model_len = 100_000  # room for 2,048 messages
    body = {"model": client.model, "messages": long_list(2048, USER[0]), "stop": ["a" * 1024] * 4, "max_tokens": 2,
            "bad_words": ["zz"] * 128}  # (the fake model's vocabulary is smaller than logit_bias's 300 keys)
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    body = {"model": client.model, "input": "hi", "max_output_tokens": 2,
            "metadata": {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}}
    response = await client.post("/v1/responses", json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["metadata"] == body["metadata"]


async def test_chat_template_kwargs_cannot_set_the_templates_messages(client, engine):
    """Jinja's render() took "messages" twice: a 400 that quoted Python's TypeError. The conversation is the request's
    messages, as the template call's other own arguments are their own fields'."""
    body = {"model": client.model, "messages": USER, "max_tokens": 2, "chat_template_kwargs": {"messages": 1}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
