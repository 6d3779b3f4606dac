"""Real runner processes for the end-to-end tests.

Each runner is `python -m runner`, the container's own entry point, with a real
vLLM engine (CPU backend) behind it, reached over loopback HTTP. Engines take
tens of seconds to start, so every runner the session needs is launched at once
when the first is asked for, and each is shared by the tests that use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.tiny_model import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
START_TIMEOUT = 420  # seconds; engines start slower when several share two cores
TINY_MAX_MODEL_LEN = 4096
# The guarded runner: a bearer token, a small batch with a small queue behind it, a short request timeout.
GUARDED_AUTH_TOKEN = "guarded-runner-token"
GUARDED_MAX_NUM_SEQS = 2
GUARDED_MAX_WAITING_REQUESTS = 2
GUARDED_REQUEST_TIMEOUT = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


RUNNER_COMMAND = [sys.executable, "-m", "runner"]


def post_json(url: str, body: dict, timeout: float = 60) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@dataclass
class RunnerProcess:
    """A runner process, watched from launch the way go-livepeer watches one."""

    name: str
    env: dict[str, str]
    log_path: Path
    request_while_loading: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    offline: bool = True  # HF_HUB_OFFLINE=1: the model store is all there is; download tests turn it off
    launched_at: float = 0.0
    # (seconds since launch, /health status or None for no answer), polled every 0.5 s
    timeline: list[tuple[float, str | None]] = field(default_factory=list)
    # (seconds since launch when sent, status) of a /llm call sent on the first LOADING
    loading_request: tuple[float, int] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        offline = {"HF_HUB_OFFLINE": "1"} if self.offline else {}
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **offline, **self.env}
        if not self.offline:
            env.pop("HF_HUB_OFFLINE", None)
        self.log = self.log_path.open("wb")
        self.launched_at = time.monotonic()
        self.process = subprocess.Popen(RUNNER_COMMAND, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        threading.Thread(target=self.watch_health, daemon=True).start()

    def since_launch(self) -> float:
        return time.monotonic() - self.launched_at

    def send_loading_request(self, sent_at: float) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        self.loading_request = (sent_at, post_json(f"{self.url}/llm", body, 600))

    def watch_health(self) -> None:
        while self.process.poll() is None:
            try:
                status = get_json(f"{self.url}/health", timeout=5)["status"]
            except OSError:
                status = None
            self.timeline.append((self.since_launch(), status))
            if status == "LOADING" and self.request_while_loading and self.loading_request is None:
                sent_at = self.since_launch()
                self.loading_request = (sent_at, 0)  # sent; the thread fills in the status
                threading.Thread(target=self.send_loading_request, args=(sent_at,), daemon=True).start()
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def health(self) -> str:
        return get_json(f"{self.url}/health")["status"]

    def wait_until(self, statuses: set[str], timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"runner {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status = self.health()
            except OSError:
                status = None
            if status in statuses:
                return status
            time.sleep(0.25)
        raise AssertionError(f"runner {self.name} never reached {statuses}:\n{self.log_tail()}")

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM's EngineCore and worker processes (not multiprocessing's resource tracker)."""
        return [
            child for child in psutil.Process(self.process.pid).children(recursive=True)
            if child.name().startswith("VLLM") or "VLLM::" in " ".join(child.cmdline())
        ]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for child in self.engine_processes():
                    child.kill()
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The store `make models` fills; the default model must be there already."""
    store = Path(os.environ.get("MODEL_DIR", ROOT / "models"))
    if not (store / ("models--" + DEFAULT_MODEL_ID.replace("/", "--"))).is_dir():
        pytest.fail(f"{DEFAULT_MODEL_ID} is not in {store}: run `make models` (make test does)")
    return store


@pytest.fixture(scope="session")
def runners(tiny_model_dir, model_store, tmp_path_factory) -> Iterator[dict[str, RunnerProcess]]:
    logs = tmp_path_factory.mktemp("runner-logs")
    tiny_env = {
        "MODEL_ID": str(tiny_model_dir),
        "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN),
        "KV_CACHE_GIB": "0.25",
    }
    launched = {
        # Its request sent while loading waits for the load, however slow six engines start.
        "tiny": RunnerProcess(
            "tiny", {**tiny_env, "LOAD_WAIT_TIMEOUT": str(START_TIMEOUT)}, logs / "tiny.log",
            request_while_loading=True,
        ),
        # Runners of their own, because their tests stop them.
        "drained": RunnerProcess("drained", tiny_env, logs / "drained.log"),
        "doomed": RunnerProcess("doomed", tiny_env, logs / "doomed.log"),
        # Another one whose engine gets killed, with 32 streams running.
        "doomed_under_load": RunnerProcess("doomed_under_load", tiny_env, logs / "doomed_under_load.log"),
        "guarded": RunnerProcess(
            "guarded",
            {
                **tiny_env,
                "AUTH_TOKEN": GUARDED_AUTH_TOKEN,
                "MAX_NUM_SEQS": str(GUARDED_MAX_NUM_SEQS),
                "MAX_WAITING_REQUESTS": str(GUARDED_MAX_WAITING_REQUESTS),
                "REQUEST_TIMEOUT": str(GUARDED_REQUEST_TIMEOUT),
            },
            logs / "guarded.log",
        ),
        "default": RunnerProcess(
            "default", {"MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": str(model_store)},
            logs / "default.log",
        ),
    }
    for runner in launched.values():
        runner.start()
    yield launched
    for runner in launched.values():
        runner.stop()


def ready(runner: RunnerProcess) -> RunnerProcess:
    status = runner.wait_until({"IDLE", "ERROR"})
    assert status == "IDLE", f"runner {runner.name} failed to load:\n{runner.log_tail()}"
    # Tests may keep the runner busy from the start: let its health watcher see it
    # IDLE first, so the timeline's first ready state is IDLE, not a test's OK.
    deadline = time.monotonic() + 10
    while "IDLE" not in (status for _, status in runner.timeline) and time.monotonic() < deadline:
        time.sleep(0.05)
    return runner


@pytest.fixture(scope="session")
def tiny_runner(runners) -> RunnerProcess:
    return ready(runners["tiny"])


@pytest.fixture(scope="session")
def doomed_runner(runners) -> RunnerProcess:
    return ready(runners["doomed"])


@pytest.fixture(scope="session")
def default_runner(runners) -> RunnerProcess:
    return ready(runners["default"])


@pytest.fixture(scope="session")
def doomed_under_load_runner(runners) -> RunnerProcess:
    return ready(runners["doomed_under_load"])


@pytest.fixture(scope="session")
def guarded_runner(runners) -> RunnerProcess:
    return ready(runners["guarded"])


@pytest.fixture(scope="session")
def drained_runner(runners) -> RunnerProcess:
    return ready(runners["drained"])
