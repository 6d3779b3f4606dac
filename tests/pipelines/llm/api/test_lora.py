"""LoRA adapters as model ids, in-process on a fake engine: selection by ``model`` on every API, /v1/models,
run-time load and unload, and every bad adapter refused with a message that names it.

The fake engine only records which adapter each request asked for; that an
adapter changes the answer, on vLLM's CPU kernels, over real HTTP, is
tests/pipelines/llm/real_engine/test_lora.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import structlog

from tests.support.apps import llm_app, llm_settings, ready_client, runner_settings
from tests.support.fake_engine import MODEL_CONFIG, FakeBackend, FakeEngine
from tests.support.http import QUESTION
from tests.support.lora_adapters import make_adapter, make_checkpoint

TOKEN = "lora-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER_CONFIG = {**MODEL_CONFIG, "hidden_size": 64, "head_dim": 16, "intermediate_size": 128}


@pytest.fixture
def base(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "base", MODEL_CONFIG)


@pytest.fixture
def sql(base, tmp_path) -> Path:
    return make_adapter(tmp_path / "sql", base, seed=1)


@pytest.fixture
def chat(base, tmp_path) -> Path:
    return make_adapter(tmp_path / "chat", base, seed=2)


async def start(aiohttp_client, base: Path, engine: FakeEngine | None = None, backend: FakeBackend | None = None,
                runtime: bool = False, **values: str):
    engine = engine or FakeEngine()
    if runtime:
        values.update(LORA_RUNTIME_UPDATES="true", AUTH_TOKEN=TOKEN)
        values.setdefault("LORA_ROOT", str(base.parent))  # the tests' adapters are made beside the base
    app = llm_app(engine, base, llm_settings(**values), backend=backend,
                  runner=runner_settings(AUTH_TOKEN=TOKEN) if runtime else None)
    return await ready_client(aiohttp_client, app), engine


async def health(client) -> str:
    return (await (await client.get("/health")).json())["status"]


def chat_body(model: str) -> dict:
    return {"model": model, "messages": QUESTION, "max_tokens": 3, "temperature": 0}


# Selection by model, on every API


async def test_each_api_sends_the_adapter_its_model_names_and_the_base_for_the_base(aiohttp_client, base, sql, chat):
    client, engine = await start(aiohttp_client, base, LORA_ADAPTERS=f"sql={sql},chat={chat}")
    base_id = str(base)
    requests = [
        ("/llm", {"model": "sql", "messages": QUESTION, "max_tokens": 3}, "sql"),
        ("/llm", {"model": "", "messages": QUESTION, "max_tokens": 3}, None),
        ("/llm", {"model": base_id, "messages": QUESTION, "max_tokens": 3}, None),
        ("/v1/chat/completions", chat_body("chat"), "chat"),
        ("/v1/chat/completions", chat_body(base_id), None),
        ("/v1/completions", {"model": "sql", "prompt": ["a", "b"], "max_tokens": 2}, "sql"),
    ]
    for path, body, adapter in requests:
        before = len(engine.submitted)
        response = await client.post(path, json=body)
        assert response.status == 200, await response.text()
        reply = await response.json()
        assert reply["model"] == (adapter or base_id)
        asked = [request.adapter for request in engine.submitted[before:]]
        assert asked and all((a.name if a else None) == adapter for a in asked), (path, asked)
    sql_adapter = next(a for a in engine.adapters.values() if a.name == "sql")
    assert sql_adapter.path == sql and engine.submitted[1].adapter == sql_adapter, "after the warm-up, on the base"


async def test_unknown_model_is_each_apis_own_error_and_reaches_no_engine(aiohttp_client, base, sql):
    client, engine = await start(aiohttp_client, base, LORA_ADAPTERS=f"sql={sql}")
    submitted = len(engine.submitted)
    response = await client.post("/llm", json={"model": "nope", "messages": QUESTION})
    assert response.status == 400
    msg = (await response.json())["detail"]["msg"]
    assert "'nope' is not served here" in msg and "'sql'" in msg
    response = await client.post("/v1/chat/completions", json=chat_body("nope"))
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'sql'" in error["message"]
    assert len(engine.submitted) == submitted


async def test_models_lists_the_base_and_each_adapter_with_its_parent(aiohttp_client, base, sql, chat):
    client, _ = await start(aiohttp_client, base, LORA_ADAPTERS=f"sql={sql},chat={chat}")
    cards = (await (await client.get("/v1/models")).json())["data"]
    assert [(card["id"], card["parent"]) for card in cards] == [(str(base), None), ("sql", str(base)),
                                                                  ("chat", str(base))]
    card = await (await client.get("/v1/models/chat")).json()
    assert card["id"] == "chat" and card["parent"] == str(base) and card["object"] == "model"


async def test_the_request_log_and_metrics_carry_the_adapter(aiohttp_client, base, sql):
    client, _ = await start(aiohttp_client, base, LORA_ADAPTERS=f"sql={sql}")
    with structlog.testing.capture_logs() as logs:
        assert (await client.post("/llm", json={"model": "sql", "messages": QUESTION, "max_tokens": 3})).status == 200
        assert (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 2})).status == 200
    assert [entry["model"] for entry in logs if entry["event"] == "request.done"] == ["sql", str(base)]
    text = await (await client.get("/metrics")).text()
    assert 'livepeer_runner_requests_total{code="200",model="sql",operation="genLLM",outcome="ok"} 1.0' in text
    assert 'livepeer_runner_completion_tokens_total{model="sql"} 3.0' in text
    assert f'livepeer_runner_completion_tokens_total{{model="{base}"}} 2.0' in text
    version = await (await client.get("/version")).json()
    assert version["model_id"] != "sql", "/version keeps the base id"


# The engine's LoRA settings


async def test_the_engine_gets_room_for_the_adapters_and_their_rank(aiohttp_client, base, sql, tmp_path):
    wide = make_adapter(tmp_path / "wide", base, seed=3, rank=12)
    backend = FakeBackend(FakeEngine())
    await start(aiohttp_client, base, backend=backend, LORA_ADAPTERS=f"sql={sql},wide={wide}")
    args = backend.args
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (True, 2, 16, 2), \
        "rank 12 needs vLLM's next rank, 16; a batch holds both adapters"


async def test_without_adapters_the_engine_has_no_lora(aiohttp_client, base):
    backend = FakeBackend(FakeEngine())
    await start(aiohttp_client, base, backend=backend)
    assert backend.args.enable_lora is False and backend.args.max_loras is None


async def test_runtime_updates_leave_room_for_adapters_loaded_later(aiohttp_client, base, sql):
    backend = FakeBackend(FakeEngine())
    await start(aiohttp_client, base, backend=backend, runtime=True, LORA_ADAPTERS=f"sql={sql}")
    assert (backend.args.max_loras, backend.args.max_lora_rank, backend.args.max_cpu_loras) == (4, 16, 4)


# Bad adapters at start: /health ERROR with the reason, nothing started


def start_failures(base: Path, tmp: Path) -> dict[str, tuple[dict[str, str], str]]:
    other_base = make_checkpoint(tmp / "other-base", OTHER_CONFIG)
    partial = make_adapter(tmp / "partial", base, seed=4)
    (partial / "adapter_model.safetensors").unlink()
    cut = make_adapter(tmp / "cut", base, seed=5)
    weights = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    foreign = make_adapter(tmp / "foreign", base, seed=6, base_model="meta-llama/Meta-Llama-3.1-8B-Instruct")
    misfit = make_adapter(tmp / "misfit", other_base, seed=7, base_model=str(base))
    gpt2 = make_adapter(tmp / "gpt2", base, seed=8)
    rename_modules(gpt2, "self_attn.q_proj", "attn.c_attn")
    wide = make_adapter(tmp / "wide", base, seed=9, rank=16)
    good = make_adapter(tmp / "good", base, seed=10)
    return {
        "missing folder": ({"LORA_ADAPTERS": f"gone={tmp / 'gone'}"}, f"adapter 'gone': {tmp / 'gone'} is not a folder"),
        "no weights": ({"LORA_ADAPTERS": f"partial={partial}"}, "adapter 'partial'"),
        "cut weights": ({"LORA_ADAPTERS": f"cut={cut}"}, "adapter 'cut'"),
        "a model, not an adapter": ({"LORA_ADAPTERS": f"model={other_base}"}, "so it is a model, not a LoRA adapter"),
        "another base by name": ({"LORA_ADAPTERS": f"foreign={foreign}"},
                                 "adapter 'foreign' was trained on 'meta-llama/Meta-Llama-3.1-8B-Instruct'"),
        "another base by shape": ({"LORA_ADAPTERS": f"misfit={misfit}"},
                                  "adapter 'misfit' does not fit this model's layers"),
        "modules the model lacks": ({"LORA_ADAPTERS": f"gpt2={gpt2}"},
                                    "adapter 'gpt2' adapts modules this model does not have"),
        "rank above MAX_LORA_RANK": ({"LORA_ADAPTERS": f"wide={wide}", "MAX_LORA_RANK": "8"},
                                     "adapter 'wide' has rank 16, above MAX_LORA_RANK=8: restart with MAX_LORA_RANK=16"),
        "the base model's id": ({"LORA_ADAPTERS": f"{base}={good}"}, "has the base model's id"),
        "the engine refuses it": ({"LORA_ADAPTERS": f"refused={good}"},
                                  "adapter 'refused': the engine cannot load it: vLLM does not yet support DoRA."),
    }


def rename_modules(adapter: Path, old: str, new: str) -> None:
    from safetensors.numpy import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = {name.replace(old, new): value for name, value in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))


START_FAILURES = ["missing folder", "no weights", "cut weights", "a model, not an adapter", "another base by name",
                  "another base by shape", "modules the model lacks", "rank above MAX_LORA_RANK",
                  "the base model's id", "the engine refuses it"]


@pytest.mark.parametrize("case", START_FAILURES)
async def test_a_bad_adapter_at_start_is_health_error_naming_it(aiohttp_client, base, tmp_path, case):
    values, reason = start_failures(base, tmp_path)[case]
    engine = FakeEngine()
    engine.refused_adapters["refused"] = "vLLM does not yet support DoRA."
    with structlog.testing.capture_logs() as logs:
        client, _ = await start(aiohttp_client, base, engine=engine, **values)
    assert await health(client) == "ERROR"
    [failed] = [entry for entry in logs if entry["event"] == "pipeline.load.failed"]
    assert reason in failed["reason"], failed["reason"]
    response = await client.post("/llm", json={"messages": QUESTION})
    assert response.status == 503 and reason in (await response.json())["detail"]["msg"]
    assert engine.submitted == []


async def test_every_bad_adapter_is_named_at_once(aiohttp_client, base, tmp_path):
    partial = make_adapter(tmp_path / "partial", base, seed=4)
    (partial / "adapter_model.safetensors").unlink()
    with structlog.testing.capture_logs() as logs:
        client, _ = await start(aiohttp_client, base, LORA_ADAPTERS=f"gone={tmp_path / 'gone'},partial={partial}")
    [failed] = [entry for entry in logs if entry["event"] == "pipeline.load.failed"]
    assert "adapter 'gone'" in failed["reason"] and "adapter 'partial'" in failed["reason"]


# Run time: load and unload


async def test_runtime_changes_are_refused_when_off(aiohttp_client, base, sql):
    client, engine = await start(aiohttp_client, base, LORA_ADAPTERS=f"sql={sql}")
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(sql)}),
                       ("/v1/unload_lora_adapter", {"lora_name": "sql"})):
        response = await client.post(path, json=body)
        assert response.status == 403
        assert "LORA_RUNTIME_UPDATES=true" in (await response.json())["error"]["message"]
    assert (await client.post("/llm", json={"model": "sql", "messages": QUESTION})).status == 200


async def test_runtime_changes_need_the_token(aiohttp_client, base, sql):
    client, _ = await start(aiohttp_client, base, runtime=True)
    response = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(sql)})
    assert response.status == 401


async def test_load_serve_unload_then_404(aiohttp_client, base, sql):
    client, engine = await start(aiohttp_client, base, runtime=True)
    response = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(sql)},
                                 headers=AUTH)
    assert response.status == 200, await response.text()
    assert await response.json() == {"lora_name": "sql", "status": "loaded",
                                     "message": "Success: LoRA adapter 'sql' added successfully."}
    [loaded] = engine.adapters.values()
    assert loaded.name == "sql" and loaded.path == sql
    assert [card["id"] for card in (await (await client.get("/v1/models", headers=AUTH)).json())["data"]] == \
        [str(base), "sql"]
    response = await client.post("/v1/chat/completions", json=chat_body("sql"), headers=AUTH)
    assert response.status == 200 and engine.submitted[-1].adapter == loaded

    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
    assert response.status == 200
    assert (await response.json())["status"] == "unloaded" and engine.adapters == {}
    response = await client.post("/v1/chat/completions", json=chat_body("sql"), headers=AUTH)
    assert response.status == 404 and (await response.json())["error"]["code"] == "model_not_found"
    response = await client.post("/llm", json={"model": "sql", "messages": QUESTION}, headers=AUTH)
    assert response.status == 400

    response = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(sql)},
                                 headers=AUTH)
    assert response.status == 200, "a name unloaded may be loaded again"
    assert [adapter.id for adapter in engine.adapters.values()] == [2], "under an id the engine never cached"


def runtime_failures(base: Path, tmp: Path, sql: Path) -> dict[str, tuple[dict, int, str]]:
    other_base = make_checkpoint(tmp / "other-base", OTHER_CONFIG)
    misfit = make_adapter(tmp / "misfit", other_base, seed=7, base_model=str(base))
    foreign = make_adapter(tmp / "foreign", base, seed=6, base_model="org/another-model")
    wide = make_adapter(tmp / "wide", base, seed=9, rank=32)
    partial = make_adapter(tmp / "partial", base, seed=4)
    (partial / "adapter_config.json").unlink()
    return {
        "missing folder": ({"lora_name": "x", "lora_path": str(tmp / "nowhere")}, 400, "adapter 'x'"),
        "partial folder": ({"lora_name": "x", "lora_path": str(partial)}, 400, "has no adapter_config.json"),
        "another base": ({"lora_name": "x", "lora_path": str(foreign)}, 400, "was trained on 'org/another-model'"),
        "another shape": ({"lora_name": "x", "lora_path": str(misfit)}, 400, "does not fit this model's layers"),
        "rank": ({"lora_name": "x", "lora_path": str(wide)}, 400, "rank 32, above MAX_LORA_RANK=16"),
        "the base's name": ({"lora_name": str(base), "lora_path": str(sql)}, 400, "has the base model's id"),
        "a loaded name": ({"lora_name": "sql", "lora_path": str(sql)}, 400, "adapter 'sql' is already loaded"),
        "no name": ({"lora_name": " ", "lora_path": str(sql)}, 400, "Both 'lora_name' and 'lora_path'"),
        "no body field": ({"lora_path": str(sql)}, 400, "lora_name"),
        "in place": ({"lora_name": "sql", "lora_path": str(sql), "load_inplace": True}, 400, "load_inplace"),
        "engine refuses": ({"lora_name": "refused", "lora_path": str(sql)}, 400, "the engine cannot load it: no"),
    }


RUNTIME_FAILURES = ["missing folder", "partial folder", "another base", "another shape", "rank", "the base's name",
                    "a loaded name", "no name", "no body field", "in place", "engine refuses"]


@pytest.mark.parametrize("case", RUNTIME_FAILURES)
async def test_a_bad_load_is_a_400_naming_it_and_the_adapters_keep_serving(aiohttp_client, base, sql, tmp_path, case):
    body, status, reason = runtime_failures(base, tmp_path, sql)[case]
    engine = FakeEngine()
    engine.refused_adapters["refused"] = "no"
    client, _ = await start(aiohttp_client, base, engine=engine, runtime=True, LORA_ADAPTERS=f"sql={sql}")
    loaded = dict(engine.adapters)
    response = await client.post("/v1/load_lora_adapter", json=body, headers=AUTH)
    assert response.status == status
    assert reason in (await response.json())["error"]["message"]
    assert engine.adapters == loaded
    assert await health(client) == "IDLE"
    response = await client.post("/llm", json={"model": "sql", "messages": QUESTION, "max_tokens": 2}, headers=AUTH)
    assert response.status == 200 and engine.submitted[-1].adapter.name == "sql"


async def test_unload_of_what_is_not_an_adapter(aiohttp_client, base, sql):
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_ADAPTERS=f"sql={sql}")
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=AUTH)
    assert response.status == 404 and "adapter 'nope' is not loaded" in (await response.json())["error"]["message"]
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": str(base)}, headers=AUTH)
    assert response.status == 400 and "is the base model" in (await response.json())["error"]["message"]
    assert len(engine.adapters) == 1


async def load(client, name: str, path: Path | str) -> None:
    response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                                 headers=AUTH)
    assert response.status == 200, await response.text()


async def test_unload_waits_for_the_adapters_requests_in_flight(aiohttp_client, base, sql):
    engine = FakeEngine(step_seconds=0.02)
    client, _ = await start(aiohttp_client, base, engine=engine, runtime=True)
    await load(client, "sql", sql)
    body = {"model": "sql", "messages": QUESTION, "max_tokens": 25, "stream": True}
    async with client.post("/llm", json=body, headers=AUTH) as stream:
        await stream.content.readline()  # the engine holds it now
        unload = asyncio.create_task(client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH))
        await asyncio.sleep(0.1)
        assert not unload.done(), "unloading waits while the adapter's request runs"
        late = await client.post("/llm", json={"model": "sql", "messages": QUESTION}, headers=AUTH)
        assert late.status == 400, "a request that comes while it unloads is refused"
        text = await stream.text()
    assert stream.status == 200 and '"finish_reason":"length"' in text, "the request in flight finished"
    assert (await unload).status == 200
    assert engine.adapters == {} and not any(request.aborted for request in engine.submitted)


async def test_unload_that_cannot_wait_says_why_and_the_adapter_keeps_serving(aiohttp_client, base, sql):
    engine = FakeEngine(step_seconds=0.05)
    client, _ = await start(aiohttp_client, base, engine=engine, runtime=True, LORA_UNLOAD_TIMEOUT="0.2")
    await load(client, "sql", sql)
    body = {"model": "sql", "messages": QUESTION, "max_tokens": 40, "stream": True}
    async with client.post("/llm", json=body, headers=AUTH) as stream:
        await stream.content.readline()
        response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
        assert response.status == 409
        message = (await response.json())["error"]["message"]
        assert "adapter 'sql' still has 1 requests in flight after LORA_UNLOAD_TIMEOUT (0.2 s)" in message
        assert "keeps serving" in message
        await stream.text()
    assert len(engine.adapters) == 1
    response = await client.post("/llm", json={"model": "sql", "messages": QUESTION, "max_tokens": 2}, headers=AUTH)
    assert response.status == 200
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
    assert response.status == 200, "once its requests are done it unloads"


async def steps_of(count: int, fail: bool = False):
    for step in range(count):
        yield step
    if fail:
        raise RuntimeError("the engine died")


@pytest.mark.parametrize("how", ["read to the end", "closed early", "failed", "never read, dropped", "never read, closed"])
async def test_an_adapter_request_is_counted_until_it_ends_however_it_ends(how):
    """What unloading waits for: each request held from submission until it ends, is closed, or is dropped unread."""
    import gc

    from pipelines.llm.served_models import InFlight

    in_flight = InFlight()
    held = in_flight.hold(steps_of(3, fail=how == "failed"))
    assert in_flight.count == 1 and not in_flight.idle.is_set()
    if how in ("read to the end", "failed"):
        with pytest.raises(RuntimeError) if how == "failed" else contextlib.nullcontext():
            assert [step async for step in held] == [0, 1, 2]
    elif how == "closed early":
        assert await anext(held) == 0
        await held.aclose()
    elif how == "never read, closed":
        await held.aclose()
    else:
        del held
        gc.collect()
    assert in_flight.count == 0 and in_flight.idle.is_set()


def models_with_a_download_under_way():
    """Run-time served models whose adapter files arrive only once the returned event is set."""
    from pipelines.llm.adapters import AdapterFiles
    from pipelines.llm.served_models import ServedModels

    models = ServedModels("base", runtime_updates=True)
    downloaded = asyncio.Event()

    async def prepare(name: str, source: str) -> AdapterFiles:
        await downloaded.wait()  # a download under way
        return AdapterFiles(name, Path(source), 8, None, (), None)

    models.use(FakeEngine(), prepare)
    return models, downloaded


async def test_two_changes_of_one_name_at_once_the_second_is_refused():
    from pipelines.llm.served_models import AdapterBusy

    models, downloaded = models_with_a_download_under_way()
    first = asyncio.create_task(models.load("x", "/first"))
    await asyncio.sleep(0)
    with pytest.raises(AdapterBusy, match="adapter 'x' is being loaded or unloaded right now"):
        await models.load("x", "/second")
    downloaded.set()
    assert (await first).adapter.path == Path("/first")


async def test_an_adapter_given_as_model_id_says_to_serve_its_base(base, sql):
    from pipelines.llm.host import EngineHost

    host = EngineHost(llm_settings(), str(sql), sql, backend=lambda: FakeBackend(FakeEngine()), gpus=0, cpus={0})
    with pytest.raises(ValueError, match="is a LoRA adapter, not a model: serve its base model as MODEL_ID"):
        await host.start()


# Run-time loads of a hostile caller: LORA_ROOT, no folder listed, bounded downloads, bounded adapters


HUB_ADAPTER = "standin-lora/runtime-adapter"
HUB_STALLED = "standin-lora/runtime-stalled-adapter"
HUB_NOT_ADAPTER = "standin-lora/runtime-not-an-adapter"
SECRET_NAMES = ("secret-notes.txt", "private.key")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from tests.support.hub_standin import HubRepo, HubStandin

    made = tmp_path_factory.mktemp("hub-adapter")
    folder = make_adapter(made / "adapter", make_checkpoint(made / "base", MODEL_CONFIG), seed=3)
    contents = {file.name: file.read_bytes() for file in folder.iterdir()}
    standin = HubStandin([
        HubRepo.from_contents(HUB_ADAPTER, contents),
        HubRepo.from_contents(HUB_STALLED, contents),
        HubRepo.from_contents(HUB_NOT_ADAPTER, {name: b"x" for name in SECRET_NAMES}),
    ]).start()
    yield standin
    standin.stop()


@pytest.fixture
def hub_endpoint(hub, monkeypatch):
    """huggingface_hub asks the stand-in, as it would with HF_ENDPOINT set at start."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("HF_TOKEN", "")
    return hub


def secret_folder(tmp: Path) -> Path:
    folder = tmp / "outside" / "secrets"
    folder.mkdir(parents=True)
    for name in SECRET_NAMES:
        (folder / name).write_text("do not tell")
    return folder


async def load_answer(client, lora_path: str, name: str = "x") -> tuple[int, str]:
    response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": lora_path},
                                 headers=AUTH)
    return response.status, (await response.json())["error"]["message"] if response.status != 200 else ""


async def test_a_local_path_outside_lora_root_is_refused_alike_whatever_is_there(aiohttp_client, base, sql, tmp_path):
    root = tmp_path / "root"
    inside = make_adapter(root / "inside", base, seed=5)
    secrets = secret_folder(tmp_path)
    foreign = make_adapter(tmp_path / "outside" / "adapter", base, seed=8)  # a whole adapter, but outside
    (root / "link").symlink_to(foreign)  # a link inside LORA_ROOT to a folder outside it
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_ROOT=str(root))
    outside = ["/etc", "/", str(secrets), str(tmp_path / "nowhere"), str(foreign), str(root / "link"),
               f"{root}/../outside/adapter", "../outside/adapter", "./inside", "~/x", "a/b/c"]
    answers = {path: await load_answer(client, path) for path in outside}
    assert {status for status, _ in answers.values()} == {400}
    assert len({message for _, message in answers.values()}) == 1, "the same answer, whatever lies there"
    [message] = {message for _, message in answers.values()}
    assert "LORA_ROOT" in message and "Hub id" in message
    assert engine.adapters == {}
    assert await load_answer(client, str(inside), "inside") == (200, "")


async def test_no_answer_lists_a_folder_or_quotes_its_files(aiohttp_client, base, tmp_path):
    root = tmp_path / "root"
    partial = secret_folder(root)
    (partial / "config.json").write_text("{}")
    garbled = make_adapter(root / "garbled", base, seed=5)
    (garbled / "adapter_config.json").write_bytes(b"\xffsecret-notes.txt {{{")
    cut = make_adapter(root / "cut", base, seed=6)
    (cut / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"private.key\": 1}")
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_ROOT=str(root))
    for folder in (partial, garbled, cut):
        status, message = await load_answer(client, str(folder))
        assert status == 400, message
        assert not any(name in message for name in SECRET_NAMES) and "a model" not in message, message
        assert "\\xff" not in message and "0xff" not in message, message


async def test_adapters_loaded_at_start_cannot_be_unloaded_at_run_time(aiohttp_client, base, sql, chat):
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_ADAPTERS=f"sql={sql}")
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "adapter_pinned" and "LORA_ADAPTERS" in error["message"]
    assert [adapter.name for adapter in engine.adapters.values()] == ["sql"]
    await load(client, "chat", chat)
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"}, headers=AUTH)
    assert response.status == 200, "one loaded at run time can"


async def test_the_number_of_adapters_is_bounded(aiohttp_client, base, sql, chat, tmp_path):
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_ADAPTERS=f"sql={sql}", LORA_MAX_ADAPTERS="2")
    await load(client, "chat", chat)
    status, message = await load_answer(client, str(make_adapter(tmp_path / "third", base, seed=9)), "third")
    assert status == 409 and "LORA_MAX_ADAPTERS=2" in message
    assert len(engine.adapters) == 2
    assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"}, headers=AUTH)).status == 200
    await load(client, "third", tmp_path / "third")


def test_lora_adapters_beyond_lora_max_adapters_is_an_error_at_start(sql):
    with pytest.raises(ValueError, match="LORA_ADAPTERS lists 2 adapters, more than LORA_MAX_ADAPTERS=1"):
        llm_settings(LORA_ADAPTERS=f"a={sql},b={sql}", LORA_MAX_ADAPTERS="1")


async def test_run_time_loads_go_one_at_a_time():
    from pipelines.llm.served_models import AdapterBusy

    models, downloaded = models_with_a_download_under_way()
    first = asyncio.create_task(models.load("x", "org/first"))
    await asyncio.sleep(0)
    with pytest.raises(AdapterBusy, match="adapter 'x' is being loaded: run-time loads go one at a time"):
        await asyncio.wait_for(models.load("y", "org/second"), timeout=1)  # refused at once, not queued
    downloaded.set()
    await first
    assert (await models.load("y", "/second")).adapter.path == Path("/second"), "once it is done, the next goes"


@pytest.mark.parametrize("token", ["", "   "])
async def test_runtime_updates_with_an_empty_or_blank_auth_token_is_error_at_start(aiohttp_client, base, token):
    with pytest.raises(ValueError, match=r"set AUTH_TOKEN too \(not empty, not only whitespace"):
        llm_settings(LORA_RUNTIME_UPDATES="true", AUTH_TOKEN=token)


async def test_a_blank_auth_token_is_refused_and_an_empty_one_is_no_auth(aiohttp_client, base, monkeypatch):
    """The runner's settings refuse AUTH_TOKEN of only whitespace (python -m runner then says ERROR with the
    reason); AUTH_TOKEN= (empty) leaves authentication off, as unset does, by the one rule runner.settings.token_set."""
    from pydantic import ValidationError

    from runner.settings import RunnerSettings, token_set

    monkeypatch.setenv("AUTH_TOKEN", " \t ")
    with pytest.raises(ValidationError, match="AUTH_TOKEN is only whitespace"):
        RunnerSettings()
    monkeypatch.setenv("AUTH_TOKEN", "")
    assert not token_set(RunnerSettings().auth_token)
    app = llm_app(FakeEngine(), base, runner=runner_settings(AUTH_TOKEN=""))
    client = await ready_client(aiohttp_client, app)
    assert (await client.post("/llm", json={"messages": QUESTION, "max_tokens": 2})).status == 200


async def test_a_hub_adapter_is_downloaded_into_the_store(aiohttp_client, base, hub_endpoint):
    client, engine = await start(aiohttp_client, base, runtime=True)
    await load(client, "hubbed", HUB_ADAPTER)
    [loaded] = engine.adapters.values()
    assert loaded.path.is_relative_to(base) and "models--standin-lora--runtime-adapter" in str(loaded.path)


async def test_a_download_over_lora_max_bytes_is_refused_and_leaves_nothing(aiohttp_client, base, hub_endpoint):
    client, engine = await start(aiohttp_client, base, runtime=True, LORA_MAX_BYTES="1000")
    seen = len(hub_endpoint.requests)
    status, message = await load_answer(client, HUB_ADAPTER)
    assert status == 400 and "LORA_MAX_BYTES (1000 bytes)" in message
    assert hub_endpoint.downloads(HUB_ADAPTER, since=seen) == [], "refused before a byte of it was fetched"
    assert not list(base.glob("models--*")) and engine.adapters == {}


async def test_a_hub_repo_that_is_not_an_adapter_is_refused_without_its_file_list(aiohttp_client, base, hub_endpoint):
    client, _ = await start(aiohttp_client, base, runtime=True)
    status, message = await load_answer(client, HUB_NOT_ADAPTER)
    assert status == 400 and "adapter_config.json" in message
    assert not any(name in message for name in SECRET_NAMES) and str(base) not in message, message


async def test_a_download_stops_with_its_request_and_removes_its_partial_files(aiohttp_client, base, hub_endpoint):
    """The client goes away while the weights download: the download stops, and nothing of it stays in the store."""
    hub_endpoint.stall_transfer(HUB_STALLED, "adapter_model.safetensors", after_bytes=1000)
    client, engine = await start(aiohttp_client, base, runtime=True)
    seen = len(hub_endpoint.requests)
    loading = asyncio.create_task(client.post("/v1/load_lora_adapter", headers=AUTH,
                                              json={"lora_name": "stalled", "lora_path": HUB_STALLED}))
    blobs = base / "models--standin-lora--runtime-stalled-adapter" / "blobs"
    async with asyncio.timeout(10):
        while not list(blobs.glob("*.incomplete")) or not any(
                name == "adapter_model.safetensors" for name, _ in hub_endpoint.downloads(HUB_STALLED, since=seen)):
            await asyncio.sleep(0.02)
    loading.cancel()  # the client hangs up: the runner cancels its handler
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    async with asyncio.timeout(10):
        while list(base.glob("models--*")) or (await load_answer(client, str(base / "nowhere")))[0] == 409:
            await asyncio.sleep(0.05)
    assert engine.adapters == {}
    hub_endpoint.restore(HUB_STALLED)
    await load(client, "stalled", HUB_STALLED)  # the next load is not held by the stopped one
