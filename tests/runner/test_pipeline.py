"""The pipeline contract: a pipeline nobody in runner/ knows of plugs in through its entry point.

A throwaway ``echo`` pipeline is installed into a folder of its own (its module,
its protocol module generated from its own part of a spec, and a dist-info with
its entry point) and served by ``python -m runner``, the container's entry
point, with nothing in runner/ changed. Settings the runner cannot serve with
are /health ERROR with the reason, as go-livepeer reads it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner import codegen
from tests.support.runner_process import ROOT, RunnerProcess, get_json, post_json

ECHO_SPEC = {
    "x-pipeline-modules": {"echo": "echo_schema.py"},
    "paths": {
        "/echo": {
            "post": {
                "operationId": "genEcho",
                "x-pipeline": "echo",
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/EchoRequest"}}}},
            }
        }
    },
    "components": {
        "schemas": {
            "EchoRequest": {
                "x-pipeline": "echo",
                "type": "object",
                "properties": {"text": {"type": "string"}, "times": {"type": "integer", "minimum": 1, "default": 1}},
                "required": ["text"],
            },
            "EchoResponse": {
                "x-pipeline": "echo",
                "type": "object",
                "properties": {"echo": {"type": "string"}},
                "required": ["echo"],
            },
        }
    },
}

ECHO_PIPELINE = '''
from pathlib import Path

import echo_schema
from echo_schema import EchoRequest, EchoResponse
from runner.pipeline import OperationError
from tests.support.stub_pipeline import StubPipeline


class EchoPipeline(StubPipeline):
    name = "echo"
    OPERATIONS = echo_schema.OPERATIONS

    def operations(self):
        return {"genEcho": self.echo}

    async def echo(self, request: EchoRequest, context):
        if request.text == "refuse":
            raise OperationError("echo refuses to echo 'refuse'")
        return EchoResponse(echo=request.text * request.times)
'''


@pytest.fixture(scope="module")
def echo_site(tmp_path_factory) -> Path:
    """A folder on PYTHONPATH that holds the echo pipeline as an installed distribution."""
    site = tmp_path_factory.mktemp("echo-site")
    (site / "echo_schema.py").write_text(codegen.generate(ECHO_SPEC, "echo"))
    (site / "echo_pipeline.py").write_text(textwrap.dedent(ECHO_PIPELINE))
    dist_info = site / "echo_pipeline-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-pipeline\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[livepeer_runner.pipelines]\necho = echo_pipeline:EchoPipeline\n")
    return site


def start(tmp_path: Path, name: str, **env: str) -> RunnerProcess:
    runner = RunnerProcess(name, env, tmp_path / f"{name}.log")
    runner.start()
    return runner


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_second_pipeline_is_served_through_its_entry_point(echo_site, tmp_path):
    runner = start(tmp_path, "echo", PIPELINE="echo", MODEL_ID="echo/none", PYTHONPATH=f"{echo_site}{os.pathsep}{ROOT}")
    try:
        assert runner.wait_until({"IDLE", "ERROR"}, timeout=60) == "IDLE", runner.log_tail()
        assert post(f"{runner.url}/echo", {"text": "ab", "times": 3}) == (200, {"echo": "ababab"})
        status, refused = post(f"{runner.url}/echo", {"text": "refuse"})
        assert (status, refused) == (400, {"detail": {"msg": "echo refuses to echo 'refuse'"}})
        status, invalid = post(f"{runner.url}/echo", {"text": "x", "times": 0})
        assert status == 422 and invalid["detail"][0]["loc"] == ["body", "times"]
        assert post_json(f"{runner.url}/llm", {"messages": []}) == 404, "the llm pipeline's operations are not served"
        assert get_json(f"{runner.url}/version")["pipeline"] == "echo"
        metrics = urllib.request.urlopen(f"{runner.url}/metrics", timeout=5).read().decode()
        assert 'livepeer_runner_requests_total{code="200",model="echo/none",operation="genEcho",outcome="ok"} 1.0' in metrics
    finally:
        runner.stop()
    assert runner.process.returncode == 0


def test_the_runner_imports_no_pipeline():
    """runner/ finds pipelines only through their entry points."""
    probe = "import sys, runner.app, runner.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipelines'))"
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    for path in (ROOT / "runner").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.lstrip().startswith(("import pipelines", "from pipelines")), f"{path}: {line}"


def runner_modules_imported(source: str) -> set[str]:
    """The runner's modules a Python source imports, however it spells the import."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "runner":
            found |= {f"runner.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "runner"}


def test_pipelines_reach_the_runner_through_its_contract_only():
    """No module under pipelines/ imports the runner's route layer or its schema: runner.pipeline has what they need."""
    assert runner_modules_imported("from runner import routes\nimport runner.schema as s\nfrom runner.routes import x") \
        == {"runner.routes", "runner.schema"}
    for path in (ROOT / "pipelines").rglob("*.py"):
        reached = runner_modules_imported(path.read_text()) & {"runner.routes", "runner.schema"}
        assert not reached, f"{path.relative_to(ROOT)} imports {sorted(reached)}: import what it needs from runner.pipeline"


def error_reason(runner: RunnerProcess) -> str:
    for line in runner.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "runner.cannot_serve":
            return json.loads(line)["reason"]
    raise AssertionError(f"no runner.cannot_serve in the log:\n{runner.log_tail()}")


@pytest.mark.parametrize(
    ("env", "reason", "llm_status"),
    [
        ({"PIPELINE": "no-such-pipeline"}, "PIPELINE='no-such-pipeline' is not a known pipeline (known: llm", 404),
        ({"REQUEST_TIMEOUT": "-1"}, "REQUEST_TIMEOUT", 404),
        ({"MAX_REQUEST_BYTES": "lots"}, "MAX_REQUEST_BYTES", 404),
        # The pipeline's own settings, read by the runner at start: its routes exist and say why they cannot serve.
        ({"GPU_MEMORY_UTILIZATION": "1.5"}, "invalid llm settings", 503),
    ],
)
def test_settings_the_runner_cannot_serve_with_are_error_with_the_reason(tmp_path, env, reason, llm_status):
    runner = start(tmp_path, "unservable", **env)
    try:
        assert runner.wait_until({"ERROR", "IDLE", "LOADING"}, timeout=60) == "ERROR"
        assert reason in error_reason(runner)
        status, answer = post(f"{runner.url}/llm", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == llm_status
        if llm_status == 503:
            assert "GPU_MEMORY_UTILIZATION" in answer["detail"]["msg"]
        assert runner.process.poll() is None, "the process stays up to report the failure"
    finally:
        runner.stop()
    assert runner.process.returncode == 0


def test_nowhere_to_listen_is_exit_code_2_with_the_reason():
    env = {**os.environ, "PORT": "99999"}
    done = subprocess.run([sys.executable, "-m", "runner"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PORT" in done.stderr and "nowhere to listen" in done.stderr


def test_a_blocking_call_cut_short_does_not_hold_the_exit():
    script = (
        "import asyncio, time\n"
        "from runner.pipeline import run_blocking\n"
        "async def main():\n"
        "    assert await run_blocking(sum, [1, 2, 3]) == 6\n"
        "    try:\n"
        "        await run_blocking(divmod, 1, 0)\n"
        "    except ZeroDivisionError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('the exception was lost')\n"
        "    task = asyncio.create_task(run_blocking(time.sleep, 60))\n"
        "    await asyncio.sleep(0.2)\n"
        "    task.cancel()\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=50)
    assert time.monotonic() - started < 20, "the process waited for the abandoned call"
