"""POST /llm end to end: real runner processes, real vLLM engines, real HTTP.

Most tests use a tiny random Llama (tests/tiny_model.py) whose end-of-sequence
token can never win at temperature 0, so generations run exactly as long as
max_tokens says. The factual check uses the default model.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from tests.support.http import (
    BAD_422,
    NOT_JSON_BODIES,
    QUESTION,
    STORY,
    metric,
    post,
    read_stream,
    wait_for_metric,
)
from tests.support.runner_process import RunnerProcess
from tests.support.runners import DOOMED_STREAM_INTERVAL, TINY_MAX_MODEL_LEN


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session




async def stream(http, runner, body) -> list[dict]:
    async with http.post(f"{runner.url}/llm", json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events, _ = await read_stream(response)
        assert response.content.at_eof()
    return events




# 1. Chat template and exact usage


async def test_chat_template_is_applied_once_with_one_bos(http, tiny_runner, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(STORY, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>\n"), "the generation prompt is part of the prompt"
    expected = tokenizer.encode(text, add_special_tokens=False)
    assert expected.count(tokenizer.bos_token_id) == 1
    # The trap this guards against: tokenizing the rendered template with special tokens adds a second BOS.
    assert tokenizer.encode(text).count(tokenizer.bos_token_id) == 2

    status, body = await post(http, tiny_runner, {"messages": STORY, "max_tokens": 3, "temperature": 0})
    assert status == 200
    # prompt_tokens is counted from the token ids the engine reports it saw.
    assert body["usage"]["prompt_tokens"] == len(expected)


async def test_usage_counts_the_engines_tokens(http, tiny_runner):
    status, body = await post(http, tiny_runner, {"messages": STORY, "max_tokens": 37, "temperature": 0})
    assert status == 200
    usage = body["usage"]
    assert usage["completion_tokens"] == 37
    assert usage["total_tokens"] == usage["prompt_tokens"] + 37


ENGINE_SERIES = (
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:iteration_tokens_total_count",
)


async def engine_series(http, runner: RunnerProcess) -> dict[str, float]:
    """vLLM's own series on /metrics, by name (one engine, one model: one value each)."""
    async with http.get(f"{runner.url}/metrics") as response:
        text = await response.text()
    assert "livepeer_runner_requests_in_flight" in text, "the runner's series stay"
    found = {}
    for name in ENGINE_SERIES:
        match = re.search(rf'^{re.escape(name)}{{[^}}]*model_name="[^"]+"[^}}]*}} (\S+)$', text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        found[name] = float(match.group(1))
    return found


async def test_metrics_have_the_engines_own_series(http, tiny_runner):
    before = await engine_series(http, tiny_runner)
    status, body = await post(http, tiny_runner, {"messages": STORY, "max_tokens": 9, "temperature": 0})
    assert status == 200
    prompt_tokens = body["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10
    while True:
        after = await engine_series(http, tiny_runner)
        generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        if generated >= 9 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert generated == 9, "vLLM counts the tokens it generated"
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == prompt_tokens
    assert after["vllm:iteration_tokens_total_count"] > before["vllm:iteration_tokens_total_count"]
    assert 0 <= after["vllm:kv_cache_usage_perc"] <= 1


# 2. Non-streamed replies


async def test_plain_reply_holds_the_whole_message(http, tiny_runner):
    status, body = await post(http, tiny_runner, {"messages": STORY, "max_tokens": 20, "temperature": 0})
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == str(tiny_runner.env["MODEL_ID"])
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]


async def test_max_tokens_one_gives_length(http, tiny_runner):
    status, body = await post(http, tiny_runner, {"messages": QUESTION, "max_tokens": 1})
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


async def test_default_model_knows_the_capital_of_france(http, default_runner):
    status, body = await post(http, default_runner, {"messages": QUESTION, "temperature": 0, "max_tokens": 64})
    assert status == 200
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    events = await stream(http, default_runner, {"messages": QUESTION, "temperature": 0, "max_tokens": 64})
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == body["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"] == body["usage"]


# 3. Streamed replies


async def test_stream_follows_the_contract(http, tiny_runner):
    body = {"messages": STORY, "max_tokens": 50, "temperature": 0}
    events = await stream(http, tiny_runner, body)
    assert all(len(event["choices"]) == 1 for event in events)
    *content, last = events
    assert content, "content events come before the final one"
    for event in content:
        choice = event["choices"][0]
        assert choice["finish_reason"] == ""
        assert choice["delta"]["role"] == "assistant" and choice["delta"]["content"]
    assert last["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0]["finish_reason"] == "length"
    completion = [event["usage"]["completion_tokens"] for event in events]
    assert completion == sorted(completion) and completion[-1] == 50
    assert len({event["usage"]["prompt_tokens"] for event in events}) == 1
    assert len({event["id"] for event in events}) == 1

    status, whole = await post(http, tiny_runner, body)
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == whole["choices"][0]["message"]["content"]
    assert last["usage"] == whole["usage"]


async def test_stream_interval_gathers_tokens_per_event_with_exact_usage(http, tiny_runner, doomed_runner):
    """STREAM_INTERVAL=4: the same text as one token per event, in events of up to four tokens, usage exact."""
    body = {"messages": STORY, "max_tokens": 50, "temperature": 0}
    one_each = await stream(http, tiny_runner, body)
    gathered = await stream(http, doomed_runner, body)
    text = "".join(event["choices"][0]["delta"]["content"] for event in gathered)
    assert text == "".join(event["choices"][0]["delta"]["content"] for event in one_each)
    assert gathered[-1]["usage"] == one_each[-1]["usage"]
    counts = [event["usage"]["completion_tokens"] for event in gathered]
    steps = [later - earlier for earlier, later in zip([0, *counts], counts)]
    assert counts[0] == 1, "the first token goes at once"
    assert max(steps) <= DOOMED_STREAM_INTERVAL and len(gathered) < len(one_each) / 2, steps
    assert gathered[-1]["choices"][0]["finish_reason"] == "length"
    start = engine_start_event(doomed_runner)
    assert (start["stream_interval"], start["enable_prefix_caching"]) == (DOOMED_STREAM_INTERVAL, False)


async def test_stream_events_are_flushed_as_tokens_come(http, tiny_runner):
    started = time.monotonic()
    async with http.post(
        f"{tiny_runner.url}/llm", json={"messages": STORY, "max_tokens": 600, "temperature": 0, "stream": True}
    ) as response:
        first_line = await response.content.readline()
        first_event_at = time.monotonic() - started
        assert first_line.startswith(b"data: {")
        await response.read()
    total = time.monotonic() - started
    assert first_event_at < total / 10, f"first event at {first_event_at:.3f} s of {total:.3f} s"


# 4. The model field


async def test_model_field_must_be_empty_or_the_served_id(http, tiny_runner):
    served = tiny_runner.env["MODEL_ID"]
    for model in ("", served):
        status, _ = await post(http, tiny_runner, {"messages": QUESTION, "model": model, "max_tokens": 2})
        assert status == 200
    status, body = await post(http, tiny_runner, {"messages": QUESTION, "model": "other/model", "max_tokens": 2})
    assert status == 400
    assert "other/model" in body["detail"]["msg"] and served in body["detail"]["msg"]


# 5. Bad input


async def test_bad_input_is_refused_before_the_engine(http, tiny_runner):
    submitted = await metric(http, tiny_runner, "livepeer_runner_engine_requests_total")
    url = f"{tiny_runner.url}/llm"

    for body, loc in BAD_422:
        status, answer = await post(http, tiny_runner, body)
        assert status == 422, body
        assert loc in [error["loc"] for error in answer["detail"]], (body, answer)

    for data, content_type in NOT_JSON_BODIES:
        async with http.post(url, data=data, headers={"Content-Type": content_type}) as response:
            assert response.status == 422
            assert (await response.json())["detail"][0]["loc"] == ["body"]

    status, answer = await post(http, tiny_runner, {"messages": []})
    assert status == 400 and "at least one message" in answer["detail"]["msg"]
    status, answer = await post(http, tiny_runner, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and "wizard" in answer["detail"]["msg"]
    status, answer = await post(http, tiny_runner, {"messages": QUESTION, "max_tokens": TINY_MAX_MODEL_LEN})
    assert status == 400
    assert str(TINY_MAX_MODEL_LEN) in answer["detail"]["msg"] and "MAX_MODEL_LEN" in answer["detail"]["msg"]

    async with http.post(url, json={"messages": [{"role": "user", "content": "x" * 2_000_000}]}) as response:
        assert response.status == 413
        assert "msg" in (await response.json())["detail"]

    assert await metric(http, tiny_runner, "livepeer_runner_engine_requests_total") == submitted
    status, _ = await post(http, tiny_runner, {"messages": QUESTION, "max_tokens": 2})
    assert status == 200, "the runner keeps serving"


# 6. Clients that go away


async def start_long_generation(http, runner, stream: bool) -> asyncio.Task:
    body = {"messages": STORY, "max_tokens": 4000, "temperature": 0, "stream": stream}

    async def call():
        async with http.post(f"{runner.url}/llm", json=body) as response:
            await response.read()

    task = asyncio.create_task(call())
    await wait_for_metric(http, runner, "livepeer_runner_engine_requests_unfinished", 1, within=10)
    return task


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
async def test_client_that_disconnects_stops_its_generation(http, tiny_runner, streamed):
    bound = max(1.0, 10 * await asyncio.to_thread(tiny_runner.pace))
    async with aiohttp.ClientSession() as client:
        task = await start_long_generation(client, tiny_runner, streamed)
        await asyncio.sleep(0.3)
        assert not task.done(), "4000 tokens take longer than this"
        task.cancel()
    # Closing the session drops the connection, as a user closing a tab does.
    seconds = await wait_for_metric(http, tiny_runner, "livepeer_runner_engine_requests_unfinished", 0, within=2 * bound)
    assert seconds < bound, f"the engine held the request {seconds:.2f} s; a two-token call takes {bound / 10:.2f} s"
    assert tiny_runner.health() == "IDLE"


# 8. Version and hardware


async def test_version_and_hardware_shapes(http, tiny_runner):
    async with http.get(f"{tiny_runner.url}/version") as response:
        version = await response.json()
    assert version["pipeline"] == "llm" and version["model_id"] == tiny_runner.env["MODEL_ID"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version["version"])
    for path, key in (("/hardware/info", "gpu_info"), ("/hardware/stats", "gpu_stats")):
        async with http.get(f"{tiny_runner.url}{path}") as response:
            body = await response.json()
        assert body["pipeline"] == "llm" and body["model_id"] == tiny_runner.env["MODEL_ID"]
        assert isinstance(body[key], dict)


# 9. CPU engine choices


def engine_start_event(runner: RunnerProcess) -> dict:
    for line in runner.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"engine.start"' in line:
            return json.loads(line)
    raise AssertionError(f"no engine.start line in the log of {runner.name}")


def test_engine_choices_follow_the_platform(default_runner, model_store):
    """On a CPU: float32, eager mode, a KV cache sized from the model.
    On a GPU: vLLM's own choices (compiled graphs, the cache from GPU_MEMORY_UTILIZATION)."""
    import psutil

    from pipelines.llm.layout import cpu_kv_cache_bytes
    from pipelines.llm.settings import LLMSettings

    event = engine_start_event(default_runner)
    assert (event["enable_prefix_caching"], event["stream_interval"]) == (True, 1)
    if "VLLM_CACHE_ROOT" not in os.environ:  # the user's choice wins
        cache = str(model_store.resolve() / "vllm-cache")
        assert event["environment"]["VLLM_CACHE_ROOT"] == cache, "the compile cache is in the model store"
    if event["platform"] != "cpu":
        assert (event["dtype"], event["enforce_eager"], event["kv_cache_bytes"]) == ("auto", False, None), event
        return
    dtype = "float32"  # on every CPU: bfloat16 flips the default model's greedy answers (layout.engine_dtype)
    assert event["dtype"] == dtype
    assert event["enforce_eager"] is True
    if "TORCH_COMPILE_DISABLE" not in os.environ:  # eager means no torch.compile in the engine either
        assert event["environment"]["TORCH_COMPILE_DISABLE"] == "1"
    config = json.loads((Path(event["model_path"]) / "config.json").read_text())
    expected = cpu_kv_cache_bytes(LLMSettings(), config, dtype, psutil.virtual_memory().total)
    assert 0 < event["kv_cache_bytes"] == expected <= 4 * 1024**3


def logged_cpu_ids(log: str, name: str) -> set[int]:
    """A CPU list from vLLM's own report of its thread layout (``core ids=[0, 1]``, ``reserved_cpus=[]``)."""
    found = re.search(rf"{name}=\[([\d, ]*)\]", log)
    assert found, f"vLLM reported no {name} in the runner's log"
    return {int(cpu) for cpu in found.group(1).split(",") if cpu.strip()}


def test_on_a_small_machine_the_engine_worker_computes_on_every_core(default_runner):
    import psutil

    from pipelines.llm.layout import SMALL_MACHINE_CORES

    cores = os.sched_getaffinity(0)
    event = engine_start_event(default_runner)
    # What the runner set to place the engine's threads (the compile cache's place and eager mode aside).
    placed = {name: value for name, value in event["environment"].items()
              if name not in ("VLLM_CACHE_ROOT", "TORCH_COMPILE_DISABLE")}
    if event["platform"] != "cpu":
        assert placed == {}, "the runner places no threads beside a GPU engine"
        return
    workers = [process for process in psutil.Process(default_runner.process.pid).children(recursive=True)
               if process.name() == "VLLM::Worker"]
    assert len(workers) == 1, "one vLLM worker process under the runner"
    # vLLM binds each thread of its worker's OpenMP team to one core, one logical CPU per physical
    # core of its NUMA node: its own report says which, and which it kept for its scheduler.
    used = set().union(*(os.sched_getaffinity(thread.id) for thread in workers[0].threads()))
    log = default_runner.log_path.read_text(errors="replace")
    team, reserved = logged_cpu_ids(log, "core ids"), logged_cpu_ids(log, "reserved_cpus")
    assert used == team <= cores
    if len(cores) <= SMALL_MACHINE_CORES:
        assert placed == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        assert reserved == set()
        if psutil.cpu_count(logical=False) == psutil.cpu_count():  # no SMT: every allowed CPU is a core
            assert used == cores
    else:  # vLLM's own layout: one core kept for its scheduler process
        assert placed == {}
        assert len(reserved) == 1 and not reserved & team
