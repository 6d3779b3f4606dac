"""openapi.yaml against a live runner: schemathesis calls every operation with
valid and invalid input and checks each answer against the spec.

The runner is a real process with the tiny model and a bearer token (the
guarded runner), so the spec's security scheme is enforced and checked too.
Every answer must be one the spec documents for the operation, with its
content type and body shape; none may be a 5xx. A streamed reply must also
keep the contract's framing, which the spec cannot express: one `data:` line
per event, each with exactly one choice, a finish reason on the last event,
then `data: [DONE]`.

Generation is kept short (see `keep_generation_short`): the tiny model always
runs to max_tokens, and the spec's default of 256 tokens, times a few hundred
examples, would take minutes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import zlib
from typing import Any

import aiohttp
import jsonschema
import pytest
import schemathesis
import yaml

from pipelines.llm.conversation import TEMPLATE_ROLES
from tests.support.runner_process import ROOT, RunnerProcess
from tests.support.runners import GUARDED_AUTH_TOKEN, TINY_MAX_MODEL_LEN

SPEC_PATH = ROOT / "openapi.yaml"
FUZZ_MAX_TOKENS = 16
# Examples per operation in the fuzzing phase, on top of the coverage phase's
# deterministic edge cases. FUZZ_EXAMPLES and FUZZ_SEED widen a local hunt; FUZZ_PATH (a regex) narrows it
# to the operations whose path matches.
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20251122"))
FUZZ_PATH = os.environ.get("FUZZ_PATH")

config = schemathesis.Config.from_dict(
    {
        "seed": FUZZ_SEED,
        "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},  # the spec has no links between operations
        "auth": {"openapi": {"HTTPBearer": {"bearer": GUARDED_AUTH_TOKEN},
                             "AnthropicAPIKey": {"api_key": GUARDED_AUTH_TOKEN}}},
        # A short stream holds at most FUZZ_MAX_TOKENS + 2 events: read them all.
        "max-stream-events": 4 * FUZZ_MAX_TOKENS,
        "request-timeout": 60,
        "checks": {
            # A request the schema allows may still be one the model cannot serve
            # (a role it does not know, another model, a prompt that is too long):
            # the spec documents that as 400.
            # The OpenAI and Anthropic operations answer another model than the served one with 404.
            # Run-time LoRA adapter changes are off on this runner (LORA_RUNTIME_UPDATES): 403.
            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "403", "404"]},
            # /llm refuses a body that does not match with 422, the OpenAI and Anthropic operations with 400.
            "negative_data_rejection": {"expected-statuses": ["400", "401", "404", "413", "422"]},
        },
    }
)
schema = schemathesis.openapi.from_path(SPEC_PATH, config=config)
if FUZZ_PATH:
    schema = schema.include(path_regex=FUZZ_PATH)

_spec = yaml.safe_load(SPEC_PATH.read_text())

def component_validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": _spec["components"]})


LLM_RESPONSE = component_validator("LLMResponse")
ANTHROPIC_EVENT = component_validator("AnthropicStreamEvent")
STREAM_EVENTS = {  # what each streaming path's events are
    "/v1/chat/completions": component_validator("ChatCompletionChunk"),
    "/v1/completions": component_validator("Completion"),
    "/v1/responses": component_validator("ResponsesStreamEvent"),
}
ROLES = tuple(role for role in TEMPLATE_ROLES if role != "tool")  # a tool message needs the call it answers


def keep_generation_short(body: Any, path: str = "/llm", model_id: str = "") -> Any:
    """The body as sent: as valid or invalid as generated, but quick to serve.

    Only values the schema allows are changed, into other values it allows, so
    a positive case stays positive and a negative one negative. A max_tokens
    the tiny model could serve becomes one of at most FUZZ_MAX_TOKENS (larger
    ones stay: they must be refused, quickly). Half the bodies, picked by a
    hash so a seed replays exactly, are also made servable (known roles, no
    model, at least one message): hypothesis rarely draws them by itself, and
    only they reach the engine and the streaming path.
    """
    if not isinstance(body, dict):
        return body
    body = dict(body)
    servable = zlib.crc32(repr(sorted(body.items(), key=repr)).encode()) % 2 == 0
    if path.startswith("/v1/messages"):
        return keep_anthropic_generation_short(body, servable, model_id)
    if path.startswith("/v1/"):
        return keep_openai_generation_short(body, servable, model_id, path)
    max_tokens = body.get("max_tokens", 256)
    # 1e3 is an integer too (runner/jsontypes.py), and as slow to generate as 1000.
    if type(max_tokens) in (int, float) and float(max_tokens).is_integer():
        if max_tokens > FUZZ_MAX_TOKENS and (servable or max_tokens <= TINY_MAX_MODEL_LEN):
            body["max_tokens"] = int(max_tokens) % FUZZ_MAX_TOKENS + 1
    if servable:
        make_servable(body, "")
    return body


def make_servable(body: dict, model: str, roles: tuple[str, ...] = ROLES) -> None:
    """The body made servable: this model where it names one, at least one message, each in one of these roles."""
    if isinstance(body.get("model"), str):
        body["model"] = model
    messages = body.get("messages")
    if messages == []:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    elif isinstance(messages, list):
        body["messages"] = [
            {**message, "role": roles[index % len(roles)]}
            if isinstance(message, dict) and isinstance(message.get("role"), str)
            else message
            for index, message in enumerate(messages)
        ]


def keep_openai_generation_short(body: dict, servable: bool, model_id: str, path: str = "") -> dict:
    """keep_generation_short for the OpenAI operations: their max_tokens defaults to all the room there is."""
    if path == "/v1/responses":
        return keep_responses_generation_short(body, servable, model_id)
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        # A null max_completion_tokens is no limit either: max_tokens, or all the room there is, applies.
        if value is None and field == "max_tokens" and body.get("max_completion_tokens") is None:
            body[field] = FUZZ_MAX_TOKENS
        elif type(value) in (int, float) and float(value).is_integer() and FUZZ_MAX_TOKENS < value <= TINY_MAX_MODEL_LEN:
            body[field] = int(value) % FUZZ_MAX_TOKENS + 1
    if servable:
        make_servable(body, model_id)
    return body


def keep_responses_generation_short(body: dict, servable: bool, model_id: str) -> dict:
    """keep_generation_short for /v1/responses: max_output_tokens, and an input to answer."""
    value = body.get("max_output_tokens")
    if value is None:
        body["max_output_tokens"] = FUZZ_MAX_TOKENS
    elif type(value) in (int, float) and float(value).is_integer() and FUZZ_MAX_TOKENS < value <= TINY_MAX_MODEL_LEN:
        body["max_output_tokens"] = int(value) % FUZZ_MAX_TOKENS + 1
    if servable:
        if isinstance(body.get("model"), str):
            body["model"] = model_id
        if body.get("input") in (None, []):
            body["input"] = "Hello"
    return body


def keep_anthropic_generation_short(body: dict, servable: bool, model_id: str) -> dict:
    """keep_generation_short for the Anthropic operations: max_tokens is required, roles are user and assistant."""
    value = body.get("max_tokens")
    if type(value) in (int, float) and float(value).is_integer() and FUZZ_MAX_TOKENS < value <= TINY_MAX_MODEL_LEN:
        body["max_tokens"] = int(value) % FUZZ_MAX_TOKENS + 1
    if servable:
        make_servable(body, model_id, ("user", "assistant"))
    return body


def anthropic_stream_follows_the_spec(text: str) -> None:
    """Anthropic's framing: named events, each `event:` then `data:`, from message_start to message_stop."""
    assert text.endswith("\n\n") and "[DONE]" not in text, f"not Anthropic's ending: ...{text[-300:]!r}"
    names = []
    for block in text.split("\n\n")[:-1]:
        event_line, data_line = block.split("\n")
        name = event_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert name != "error", f"the stream failed: {data}"
        assert data["type"] == name, block
        ANTHROPIC_EVENT.validate(data)
        names.append(name)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names


def openai_stream_follows_the_spec(events: list[dict], case) -> None:
    validator = STREAM_EVENTS[case.path]
    for event in events:
        assert "error" not in event, f"the stream failed: {event}"
        validator.validate(event)


def stream_follows_the_contract(ctx, response, case) -> None:
    """A text/event-stream answer is framed as the contract says, event by event."""
    content_type = (response.headers.get("content-type") or [""])[0]
    asked_to_stream = isinstance(case.body, dict) and case.body.get("stream") is True
    if response.status_code == 200 and case.path == "/llm":
        assert content_type.startswith("text/event-stream") == asked_to_stream, (
            f"stream={case.body.get('stream')!r} was answered with {content_type}"
        )
    if not content_type.startswith("text/event-stream"):
        return
    text = response.content.decode()
    if case.path == "/v1/messages":
        anthropic_stream_follows_the_spec(text)
        return
    assert text.endswith("\n\ndata: [DONE]\n\n"), f"the stream does not end with [DONE]: ...{text[-300:]!r}"
    events = []
    for block in text.split("\n\n")[:-2]:
        assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block!r}"
        events.append(json.loads(block.removeprefix("data: ")))
    if case.path != "/llm":
        openai_stream_follows_the_spec(events, case)
        return
    for event in events:
        LLM_RESPONSE.validate(event)
        assert len(event["choices"]) == 1, f"an event without exactly one choice: {event}"
    assert events, "no event before [DONE]"
    reasons = [event["choices"][0].get("finish_reason", "") for event in events]
    assert reasons[-1] in ("stop", "length"), f"the last event's finish_reason is {reasons[-1]!r}"
    assert not any(reasons[:-1]), f"a finish reason before the last event: {reasons}"
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= case.body.get("max_tokens", 256)


_warmed: set[str] = set()


def warm_the_logprobs_path(runner: RunnerProcess) -> None:
    """Pay vLLM's one-time cost of its first request with logprobs before fuzzing.

    That first step takes 3 s on a 2-core AVX2-only CPU, more while the machine
    is busy, and held the engine past the guarded runner's 4 s REQUEST_TIMEOUT
    for the requests after it (a 500 each). It is a cost of the engine's start,
    not an answer the spec should see, so it is paid here, once per runner:
    one request with logprobs, however it ends, then a short one until it is
    served at once.
    """
    if runner.url in _warmed:
        return
    headers = {"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}", "Content-Type": "application/json"}

    def post(path: str, body: dict) -> int:
        request = urllib.request.Request(runner.url + path, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    post("/v1/completions", {"model": runner.env["MODEL_ID"], "prompt": "Hello", "max_tokens": 2, "logprobs": 2})
    deadline = time.monotonic() + 60
    while post("/llm", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}) != 200:
        assert time.monotonic() < deadline, "the guarded runner did not serve a one-token request within 60 s"
        time.sleep(0.5)
    _warmed.add(runner.url)


def test_the_fuzz_calls_every_operation_of_the_spec_bounds_included():
    """Every operation of openapi.yaml is fuzzed (unless FUZZ_PATH narrows a local hunt), and the coverage phase runs:
    it sends each bound's edge (maxItems, maxLength, maxProperties and one past each), which must be served or
    refused with a 4xx, never a 5xx."""
    if FUZZ_PATH:
        pytest.skip("FUZZ_PATH narrows the fuzz to some operations")
    fuzzed = {(result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()}
    in_spec = {(method.upper(), path) for path, item in _spec["paths"].items() for method in item
               if method in ("get", "post", "put", "delete", "patch")}
    assert fuzzed == in_spec
    assert config.projects.default.phases.coverage.enabled
    bounded = json.dumps(_spec["components"]["schemas"])
    assert all(bound in bounded for bound in ('"maxItems"', '"maxLength"', '"maxProperties"'))


@schema.parametrize()
def test_every_answer_is_one_the_spec_documents(case, guarded_runner: RunnerProcess):
    warm_the_logprobs_path(guarded_runner)
    case.body = keep_generation_short(case.body, case.path, guarded_runner.env["MODEL_ID"])
    case.call_and_validate(base_url=guarded_runner.url, additional_checks=[stream_follows_the_contract])


FOUND_BY_FUZZING = [
    # (body beyond messages, status, what the answer must say)
    ({"temperature": 3}, 400, "temperature"),  # vLLM allows at most 2; the spec has no maximum
    ({"temperature": 1e308}, 400, "temperature"),
    ({"top_k": 10**29}, 200, ""),  # beyond 64 bits: the engine could not even be handed it
    ({"top_k": 2**64 - 1}, 200, ""),
    ({"max_tokens": 5.0}, 200, ""),  # an integer to JSON Schema
    ({"top_k": 806425.0}, 200, ""),
]


@pytest.mark.parametrize(("extra", "status", "said"), FOUND_BY_FUZZING, ids=[str(case[0]) for case in FOUND_BY_FUZZING])
async def test_what_fuzzing_found_stays_fixed(guarded_runner: RunnerProcess, extra, status, said):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, **extra}
    headers = {"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{guarded_runner.url}/llm", json=body, headers=headers) as response:
            answer = await response.json()
    assert response.status == status, answer
    if status == 200:
        assert answer["usage"]["completion_tokens"] == int(body["max_tokens"])
    else:
        assert said in answer["detail"]["msg"]
