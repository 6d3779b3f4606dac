"""LoRA adapters as model ids on a real vLLM engine (CPU backend, its punica kernels), over real HTTP.

Two runners of this module's own, started together:

- ``tiny``: the tiny test model with two local adapters and one from the Hub
  stand-in (a gated repository, downloaded at start with HF_TOKEN), and
  LORA_RUNTIME_UPDATES with a bearer token: every selection, run-time load and
  unload, and every bad adapter at run time;
- ``default``: the default model with one adapter made for it, run-time
  changes off.

The adapters are made here (random weights, PEFT's format) so that an adapter's
greedy answer differs from the base model's. Start failures are runner
processes that stop before any engine starts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support.hub_standin import HubRepo, HubStandin
from tests.support.lora_adapters import make_adapter
from tests.support.runner_process import DEFAULT_MODEL_ID, RunnerProcess
from tests.support.sdks import openai_sdk

pytestmark = pytest.mark.own_engines(2)

TOKEN = "lora-runner-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HUB_ADAPTER = "standin-lora/tiny-hub-adapter"
HUB_RUNTIME_ADAPTER = "standin-lora/tiny-runtime-adapter"
HUB_LARGE_ADAPTER = "standin-lora/tiny-large-adapter"  # rank 16: twice the bytes, more than LORA_MAX_BYTES
HUB_STALLED_ADAPTER = "standin-lora/tiny-stalled-adapter"
GRANTED = "hf_standin_lora_granted"
PROMPT = [{"role": "user", "content": "Tell me a story about a dragon."}]
MAX_TOKENS = 12


def hub_contents(folder: Path) -> dict[str, bytes]:
    contents = {file.name: file.read_bytes() for file in folder.iterdir()}
    return contents | {"README.md": b"# a LoRA adapter\n", ".gitattributes": b"*.safetensors filter=lfs\n"}


@dataclass
class LoRARunners:
    tiny: RunnerProcess
    default: RunnerProcess
    base: Path  # the tiny model
    adapters: dict[str, Path]  # local adapter folders by purpose


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir) -> Iterator[HubStandin]:
    folder = tmp_path_factory.mktemp("hub-adapters")
    gated = make_adapter(folder / "gated", tiny_model_dir, seed=21)
    public = make_adapter(folder / "public", tiny_model_dir, seed=22)
    large = make_adapter(folder / "large", tiny_model_dir, seed=23, rank=16)
    standin = HubStandin([
        HubRepo.from_contents(HUB_ADAPTER, hub_contents(gated), gated=True, granted_tokens=frozenset({GRANTED})),
        HubRepo.from_contents(HUB_RUNTIME_ADAPTER, hub_contents(public)),
        HubRepo.from_contents(HUB_LARGE_ADAPTER, hub_contents(large)),
        HubRepo.from_contents(HUB_STALLED_ADAPTER, hub_contents(public)),
    ]).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def runners(tmp_path_factory, tiny_model_dir, model_store, hub) -> Iterator[LoRARunners]:
    folder = tmp_path_factory.mktemp("lora")
    default_snapshot = next((model_store / f"models--{DEFAULT_MODEL_ID.replace('/', '--')}" / "snapshots").iterdir())
    adapters = {
        "sql": make_adapter(folder / "sql", tiny_model_dir, seed=1),
        "chat": make_adapter(folder / "chat", tiny_model_dir, seed=2),
        "smol": make_adapter(folder / "smol", default_snapshot, seed=3, scale=0.1, base_model=DEFAULT_MODEL_ID),
    }
    logs = tmp_path_factory.mktemp("lora-logs")
    tiny = RunnerProcess("lora-tiny", {
        "MODEL_ID": str(tiny_model_dir), "MAX_MODEL_LEN": "1024", "KV_CACHE_GIB": "0.25",
        "MODEL_DIR": str(folder / "store"), "HF_ENDPOINT": hub.url, "HF_HOME": str(folder / "hf-home"),
        "HF_TOKEN": GRANTED,
        "LORA_ADAPTERS": f"sql={adapters['sql']},chat={adapters['chat']},hub={HUB_ADAPTER}",
        "LORA_RUNTIME_UPDATES": "true", "AUTH_TOKEN": TOKEN, "LORA_UNLOAD_TIMEOUT": "60",
        # Run-time adapters may come from the tests' own folders; a download may take what a rank-8 adapter of the
        # tiny model takes, not a rank-16 one; a silent transfer is noticed within 2 s.
        "LORA_ROOT": str(tmp_path_factory.getbasetemp()),
        "LORA_MAX_BYTES": str(adapter_bytes(adapters["sql"]) + 4096), "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }, logs / "tiny.log", offline=False)
    default = RunnerProcess("lora-default", {
        # A KV cache of its own size: on a GPU the engine would otherwise take GPU_MEMORY_UTILIZATION of it,
        # beside the suite's other engines.
        "MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": str(model_store), "MAX_MODEL_LEN": "2048", "KV_CACHE_GIB": "1",
        "LORA_ADAPTERS": f"smol={adapters['smol']}",
    }, logs / "default.log")
    try:
        for runner in (tiny, default):
            runner.start()
        for runner in (tiny, default):
            assert runner.wait_until({"IDLE", "ERROR"}) == "IDLE", runner.log_tail()
        yield LoRARunners(tiny, default, tiny_model_dir, adapters)
    finally:
        for runner in (tiny, default):
            runner.stop()


def adapter_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


async def llm(http: aiohttp.ClientSession, runner: RunnerProcess, model: str, max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    async with http.post(f"{runner.url}/llm", json=body) as response:
        reply = await response.json()
        assert response.status == 200, reply
    assert reply["model"] == (model or runner.env["MODEL_ID"])
    return reply["choices"][0]["message"]["content"]


async def chat(http: aiohttp.ClientSession, runner: RunnerProcess, model: str) -> tuple[int, dict]:
    body = {"model": model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    async with http.post(f"{runner.url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


async def change(http: aiohttp.ClientSession, runner: RunnerProcess, what: str, **body) -> tuple[int, dict]:
    async with http.post(f"{runner.url}/v1/{what}_lora_adapter", json=body) as response:
        return response.status, await response.json()


# Selection: each adapter answers its own way, the same on every API


async def test_each_adapter_answers_otherwise_than_the_base_the_same_on_every_api(runners, http):
    tiny = runners.tiny
    answers = {model: await llm(http, tiny, model) for model in ("", "sql", "chat", "hub")}
    assert len(set(answers.values())) == 4, answers
    assert await llm(http, tiny, "sql") == answers["sql"], "greedy decoding through an adapter is deterministic"
    assert await llm(http, tiny, tiny.env["MODEL_ID"]) == answers[""], "the base by its id is the base"
    async with openai_sdk(tiny.url, TOKEN) as sdk:
        for model in ("sql", "chat", "hub"):
            completion = await sdk.chat.completions.create(model=model, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                           temperature=0)
            assert completion.model == model and completion.choices[0].message.content == answers[model]
            streamed = await sdk.chat.completions.create(model=model, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                         temperature=0, stream=True)
            assert "".join([chunk.choices[0].delta.content or "" async for chunk in streamed
                            if chunk.choices]) == answers[model]


async def test_adapters_mixed_in_one_batch_each_get_their_own_answer(runners, http):
    tiny = runners.tiny
    alone = {model: await llm(http, tiny, model, max_tokens=24) for model in ("", "sql", "chat")}
    models = ["sql", "chat", "", "chat", "sql", ""] * 2
    together = await asyncio.gather(*(llm(http, tiny, model, max_tokens=24) for model in models))
    assert together == [alone[model] for model in models]


async def test_models_lists_each_adapter_with_its_parent(runners):
    tiny = runners.tiny
    async with openai_sdk(tiny.url, TOKEN) as sdk:
        cards = {card.id: card for card in (await sdk.models.list()).data}
        base_id = tiny.env["MODEL_ID"]
        assert {"sql", "chat", "hub", base_id} <= set(cards)
        assert cards["sql"].parent == base_id and cards[base_id].parent is None
        assert (await sdk.models.retrieve("hub")).parent == base_id
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.chat.completions.create(model="nope", messages=PROMPT, max_tokens=2)
        assert missing.value.code == "model_not_found" and "'sql'" in missing.value.message


async def test_an_unknown_model_on_llm_is_400_naming_the_served_ids(runners, http):
    async with http.post(f"{runners.tiny.url}/llm", json={"model": "nope", "messages": PROMPT}) as response:
        assert response.status == 400
        msg = (await response.json())["detail"]["msg"]
    assert "'nope' is not served here" in msg and "'sql'" in msg and "'hub'" in msg


async def test_metrics_and_the_request_log_carry_the_adapter(runners, http):
    tiny = runners.tiny
    await llm(http, tiny, "chat")
    async with http.get(f"{tiny.url}/metrics") as response:
        text = await response.text()
    assert re.search(r'^livepeer_runner_requests_total\{code="200",model="chat",operation="genLLM",outcome="ok"\} '
                     r"[1-9]", text, re.MULTILINE)
    assert re.search(r'^livepeer_runner_completion_tokens_total\{model="chat"\} [1-9]', text, re.MULTILINE)
    done = [json.loads(line) for line in tiny.log_path.read_text().splitlines()
            if line.startswith("{") and '"request.done"' in line]
    assert any(entry["model"] == "chat" for entry in done)
    async with http.get(f"{tiny.url}/version") as response:
        assert (await response.json())["model_id"] == tiny.env["MODEL_ID"]


async def test_the_hub_adapter_was_fetched_into_the_store_with_the_token(runners, hub):
    fetched = {file for file, _ in hub.downloads(HUB_ADAPTER)}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}, "only what vLLM reads"
    assert {request.authorization for request in hub.requests_for(HUB_ADAPTER) if not request.is_cdn} == \
        {f"Bearer {GRANTED}"}
    store = Path(runners.tiny.env["MODEL_DIR"]) / ("models--" + HUB_ADAPTER.replace("/", "--"))
    assert store.is_dir()


# The default model


async def test_an_adapter_of_the_default_model_changes_its_answer(runners, http):
    default = runners.default
    base, adapted = await llm(http, default, ""), await llm(http, default, "smol")
    assert base != adapted and await llm(http, default, "smol") == adapted
    status, reply = await chat(http, default, "smol")
    assert status == 200 and reply["choices"][0]["message"]["content"] == adapted


async def test_runtime_changes_are_refused_when_off(runners, http):
    default = runners.default
    status, reply = await change(http, default, "load", lora_name="x", lora_path=str(runners.adapters["sql"]))
    assert status == 403 and "LORA_RUNTIME_UPDATES=true" in reply["error"]["message"]
    status, reply = await change(http, default, "unload", lora_name="smol")
    assert status == 403
    assert await llm(http, default, "smol"), "still served"


# Run time: load, serve, unload


async def test_load_serve_unload_then_404(runners, http, tmp_path):
    tiny = runners.tiny
    sql_answer = await llm(http, tiny, "sql")
    copy = make_adapter(tmp_path / "sql-copy", runners.base, seed=1)  # the same weights as sql
    status, reply = await change(http, tiny, "load", lora_name="sql-copy", lora_path=str(copy))
    assert status == 200 and reply["status"] == "loaded", reply
    assert await llm(http, tiny, "sql-copy") == sql_answer
    status, reply = await chat(http, tiny, "sql-copy")
    assert status == 200 and reply["choices"][0]["message"]["content"] == sql_answer

    status, reply = await change(http, tiny, "unload", lora_name="sql-copy")
    assert status == 200 and reply["status"] == "unloaded"
    status, reply = await chat(http, tiny, "sql-copy")
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    async with http.get(f"{tiny.url}/v1/models") as response:
        assert "sql-copy" not in {card["id"] for card in (await response.json())["data"]}
    assert await llm(http, tiny, "sql") == sql_answer, "the others keep serving"


async def test_load_from_the_hub_at_run_time(runners, http, hub, tmp_path):
    tiny = runners.tiny
    status, reply = await change(http, tiny, "load", lora_name="from-hub", lora_path=HUB_RUNTIME_ADAPTER)
    assert status == 200, reply
    local = make_adapter(tmp_path / "same", runners.base, seed=22)
    status, _ = await change(http, tiny, "load", lora_name="same-local", lora_path=str(local))
    assert status == 200
    assert await llm(http, tiny, "from-hub") == await llm(http, tiny, "same-local")
    for name in ("from-hub", "same-local"):
        assert (await change(http, tiny, "unload", lora_name=name))[0] == 200


async def test_unload_waits_for_the_adapters_stream_in_flight(runners, http, tmp_path):
    tiny = runners.tiny
    adapter = make_adapter(tmp_path / "long", runners.base, seed=31)
    assert (await change(http, tiny, "load", lora_name="long", lora_path=str(adapter)))[0] == 200
    body = {"model": "long", "messages": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    async with http.post(f"{tiny.url}/llm", json=body) as stream:
        await stream.content.readline()
        unload = asyncio.create_task(change(http, tiny, "unload", lora_name="long"))
        await asyncio.sleep(0.5)
        assert not unload.done(), "unloading waits while the adapter's request runs"
        text = await stream.text()
    assert '"finish_reason":"length"' in text and "data: [DONE]" in text
    assert (await unload)[0] == 200
    assert (await chat(http, tiny, "long"))[0] == 404


def bad_loads(runners: LoRARunners, tmp: Path) -> dict[str, tuple[dict, str]]:
    base = runners.base
    smol = runners.adapters["smol"]
    shaped_for_default = tmp / "shaped"
    make_adapter(shaped_for_default, next(Path(runners.default.env["MODEL_DIR"]).glob(
        f"models--{DEFAULT_MODEL_ID.replace('/', '--')}/snapshots/*")), seed=4, base_model=str(base))
    partial = make_adapter(tmp / "partial", base, seed=5)
    (partial / "adapter_model.safetensors").unlink()
    wide = make_adapter(tmp / "wide", base, seed=6, rank=32)
    dora = make_adapter(tmp / "dora", base, seed=7, config_overrides={"use_dora": True})
    return {
        "another base by name": ({"lora_name": "x", "lora_path": str(smol)},
                                 f"adapter 'x' was trained on '{DEFAULT_MODEL_ID}'"),
        "another base by shape": ({"lora_name": "x", "lora_path": str(shaped_for_default)},
                                  "adapter 'x' does not fit this model's layers"),
        "rank above MAX_LORA_RANK": ({"lora_name": "x", "lora_path": str(wide)},
                                     "adapter 'x' has rank 32, above MAX_LORA_RANK=16"),
        "missing folder": ({"lora_name": "x", "lora_path": str(tmp / "nowhere")}, "is not a folder"),
        "partial folder": ({"lora_name": "x", "lora_path": str(partial)}, "the folder is partial"),
        "unknown hub id": ({"lora_name": "x", "lora_path": "standin-lora/no-such-adapter"},
                           "adapter 'x': standin-lora/no-such-adapter is not a model on"),
        "the base model's id": ({"lora_name": str(base), "lora_path": str(partial)}, "has the base model's id"),
        "a served name": ({"lora_name": "chat", "lora_path": str(wide)}, "adapter 'chat' is already loaded"),
        "what vLLM refuses": ({"lora_name": "x", "lora_path": str(dora)},
                              "adapter 'x': the engine cannot load it: vLLM does not yet support DoRA."),
    }


BAD_LOADS = ["another base by name", "another base by shape", "rank above MAX_LORA_RANK", "missing folder",
             "partial folder", "unknown hub id", "the base model's id", "a served name", "what vLLM refuses"]


async def test_every_bad_load_is_400_naming_the_adapter_and_the_others_keep_serving(runners, http, tmp_path):
    tiny = runners.tiny
    before = {model: await llm(http, tiny, model) for model in ("", "chat")}
    for case, (body, reason) in bad_loads(runners, tmp_path).items():
        status, reply = await change(http, tiny, "load", **body)
        assert status == 400, (case, reply)
        assert reason in reply["error"]["message"], (case, reply["error"]["message"])
    async with http.get(f"{tiny.url}/health") as response:
        assert (await response.json())["status"] == "IDLE"
    assert {model: await llm(http, tiny, model) for model in ("", "chat")} == before
    async with http.get(f"{tiny.url}/v1/models") as response:
        assert "x" not in {card["id"] for card in (await response.json())["data"]}


async def test_a_path_outside_lora_root_is_one_refusal_that_reveals_nothing(runners, http, tmp_path):
    tiny = runners.tiny
    root = Path(tiny.env["LORA_ROOT"])
    link = tmp_path / "link-to-etc"
    link.symlink_to("/etc")
    answers = []
    for path in ("/etc", "/etc/passwd", str(root.parent), str(link), f"{root}/../etc", "../etc", "nowhere/at/all"):
        status, reply = await change(http, tiny, "load", lora_name="x", lora_path=path)
        answers.append((status, reply["error"]["message"]))
    assert {status for status, _ in answers} == {400} and len(set(answers)) == 1, answers
    [(_, message)] = set(answers)
    assert "LORA_ROOT" in message and "passwd" not in message and "hosts" not in message
    assert "adapter.load.outside_root" in tiny.log_path.read_text(), "the operator's log says what was refused"


async def test_the_operators_adapters_cannot_be_unloaded(runners, http):
    status, reply = await change(http, runners.tiny, "unload", lora_name="sql")
    assert status == 403 and reply["error"]["code"] == "adapter_pinned"
    assert await llm(http, runners.tiny, "sql"), "it keeps serving"


async def test_a_download_over_lora_max_bytes_is_refused_before_it_is_fetched(runners, http, hub):
    tiny = runners.tiny
    seen = len(hub.requests)
    status, reply = await change(http, tiny, "load", lora_name="large", lora_path=HUB_LARGE_ADAPTER)
    assert status == 400 and "more than LORA_MAX_BYTES" in reply["error"]["message"], reply
    assert hub.downloads(HUB_LARGE_ADAPTER, since=seen) == []
    store = Path(tiny.env["MODEL_DIR"])
    assert not (store / "models--standin-lora--tiny-large-adapter").exists(), "nothing left in the store"


async def test_a_download_stops_with_its_request_and_leaves_nothing(runners, hub):
    """The client gives up while the weights download (the Hub stand-in goes silent): the runner stops the download
    and removes its partial files; the next load is not held by it."""
    tiny = runners.tiny
    hub.stall_transfer(HUB_STALLED_ADAPTER, "adapter_model.safetensors", after_bytes=1000)
    folder = Path(tiny.env["MODEL_DIR"]) / "models--standin-lora--tiny-stalled-adapter"
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=3)) as impatient:
            with pytest.raises(asyncio.TimeoutError):
                await change(impatient, tiny, "load", lora_name="stalled", lora_path=HUB_STALLED_ADAPTER)
        async with aiohttp.ClientSession(headers=AUTH) as http:
            deadline = asyncio.get_running_loop().time() + 20
            while True:  # the stopped download ends within a read timeout (HF_HUB_DOWNLOAD_TIMEOUT=2)
                status, reply = await change(http, tiny, "load", lora_name="probe", lora_path="/nowhere")
                if status != 409 and not folder.exists():
                    break
                assert asyncio.get_running_loop().time() < deadline, (status, reply, folder.exists())
                await asyncio.sleep(0.2)
            hub.restore(HUB_STALLED_ADAPTER)
            status, reply = await change(http, tiny, "load", lora_name="stalled", lora_path=HUB_STALLED_ADAPTER)
            assert status == 200, reply
            assert (await change(http, tiny, "unload", lora_name="stalled"))[0] == 200
    finally:
        hub.restore(HUB_STALLED_ADAPTER)
    assert "adapter.load.stopped" in tiny.log_path.read_text()


async def test_unload_of_an_unknown_adapter_is_404(runners, http):
    status, reply = await change(http, runners.tiny, "unload", lora_name="nope")
    assert status == 404 and "adapter 'nope' is not loaded" in reply["error"]["message"]


async def test_runtime_changes_without_the_token_are_401(runners):
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.post(f"{runners.tiny.url}/v1/load_lora_adapter",
                                  json={"lora_name": "x", "lora_path": "y"}) as response:
            assert response.status == 401


# Start failures: /health ERROR with the reason, before any engine starts


BAD_ADAPTERS = ["unknown hub id", "another base", "rank above MAX_LORA_RANK"]


@pytest.fixture(scope="module")
def failed_starts(runners, hub, tmp_path_factory) -> Iterator[dict[str, RunnerProcess]]:
    """The runners that must stop at start, launched side by side when the first of their tests runs: each spends
    its seconds importing, and on two cores four of them take less than four one after the other."""
    folder = tmp_path_factory.mktemp("lora-failed-starts")
    sources = {"unknown hub id": ("standin-lora/no-such-adapter", {}),
               "another base": (str(runners.adapters["smol"]), {}),
               "rank above MAX_LORA_RANK": (str(runners.adapters["sql"]), {"MAX_LORA_RANK": "1"})}
    started = {"empty token": RunnerProcess("lora-empty-token", {
        "MODEL_ID": str(runners.base), "MODEL_DIR": str(folder / "empty-token" / "store"),
        "LORA_RUNTIME_UPDATES": "true", "AUTH_TOKEN": "",
    }, folder / "empty-token.log")}
    for index, (case, (source, env)) in enumerate(sources.items()):
        store = folder / f"bad-{index}"
        started[case] = RunnerProcess(f"lora-bad-{case}", {
            "MODEL_ID": str(runners.base), "MODEL_DIR": str(store / "store"), "HF_ENDPOINT": hub.url,
            "HF_HOME": str(store / "hf-home"), "HF_TOKEN": "", "LORA_ADAPTERS": f"x={source}", **env,
        }, folder / f"bad-{index}.log", offline=False)
    try:
        for runner in started.values():
            runner.start()
        yield started
    finally:
        for runner in started.values():
            if runner.process is not None:
                runner.stop()


def test_runtime_updates_with_an_empty_auth_token_is_error_at_start(failed_starts):
    runner = failed_starts["empty token"]
    try:
        assert runner.wait_until({"IDLE", "ERROR"}, timeout=120) == "ERROR"
        assert "set AUTH_TOKEN too (not empty" in runner.log_path.read_text(), runner.log_tail()
        assert not runner.engine_processes(), "no engine was started"
    finally:
        runner.stop()


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_bad_adapter_at_start_is_health_error_with_the_reason(failed_starts, case):
    reason = {
        "unknown hub id": "adapter 'x': standin-lora/no-such-adapter is not a model on",
        "another base": f"adapter 'x' was trained on '{DEFAULT_MODEL_ID}'",
        "rank above MAX_LORA_RANK": "adapter 'x' has rank 8, above MAX_LORA_RANK=1",
    }[case]
    runner = failed_starts[case]
    try:
        assert runner.wait_until({"IDLE", "ERROR"}, timeout=120) == "ERROR"
        failures = [json.loads(line) for line in runner.log_path.read_text().splitlines()
                    if line.startswith("{") and '"pipeline.load.failed"' in line]
        assert failures and reason in failures[0]["reason"], runner.log_tail()
        assert not runner.engine_processes(), "no engine was started"
    finally:
        runner.stop()
