"""Real runner processes for the end-to-end tests.

Each runner is `python -m runner`, the container's own entry point, with a real
vLLM engine (CPU backend) behind it, reached over loopback HTTP. Engines take
tens of seconds to start, so each shared runner is started before the first
module that uses it and kept for the modules after it, with never more than
MAX_ENGINES engines alive at once (RunnerPool).
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
DOOMED_STREAM_INTERVAL = 4


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
    cpus: set[int] | None = None  # the cores the runner (and its engine) may use; None: all

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
        pinned = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.process = subprocess.Popen(RUNNER_COMMAND, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=pinned)
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

    def pace(self) -> float:
        """This machine's pace as this runner sees it now: the median seconds of a two-token call.

        Timing bounds are multiples of it (with a floor), so that they hold on a
        loaded two-core box as on a GPU machine, and still catch a stall.
        """
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        times = []
        for _ in range(3):
            started = time.monotonic()
            assert post_json(f"{self.url}/llm", body) == 200
            times.append(time.monotonic() - started)
        return sorted(times)[1]

    def engine_died(self) -> bool:
        """A test killed this runner's engine: it says ERROR for good."""
        try:
            return self.health() == "ERROR"
        except OSError:
            return False

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


MAX_ENGINES = 3  # vLLM engines alive at once, whatever the suite does
RUNNER_FIXTURES = {  # fixture name -> runner name in RUNNER_SPECS
    "tiny_runner": "tiny",
    "doomed_runner": "doomed",
    "default_runner": "default",
    "doomed_under_load_runner": "doomed_under_load",
    "guarded_runner": "guarded",
    "drained_runner": "drained",
}


def runner_specs(tiny_model_dir: Path, model_store: Path) -> dict[str, tuple[dict[str, str], bool]]:
    """Each shared runner's environment, and whether it is sent a request while it loads."""
    tiny_env = {"MODEL_ID": str(tiny_model_dir), "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN), "KV_CACHE_GIB": "0.25"}
    return {
        # Its request sent while loading waits for the load, however slowly engines start beside it.
        "tiny": ({**tiny_env, "LOAD_WAIT_TIMEOUT": str(START_TIMEOUT)}, True),
        # Runners of their own, because their tests stop them or kill their engines.
        "drained": (tiny_env, False),
        # Its stream settings are not the defaults: tests/pipelines/test_llm.py checks that they reach the engine
        # (on a runner that module starts anyway: it may use no more than MAX_ENGINES).
        "doomed": ({**tiny_env, "STREAM_INTERVAL": str(DOOMED_STREAM_INTERVAL), "ENABLE_PREFIX_CACHING": "false"},
                   False),
        "doomed_under_load": (tiny_env, False),
        "guarded": (
            {
                **tiny_env,
                "AUTH_TOKEN": GUARDED_AUTH_TOKEN,
                "MAX_NUM_SEQS": str(GUARDED_MAX_NUM_SEQS),
                "MAX_WAITING_REQUESTS": str(GUARDED_MAX_WAITING_REQUESTS),
                "REQUEST_TIMEOUT": str(GUARDED_REQUEST_TIMEOUT),
                "TOOL_CALL_PARSER": "hermes",  # tool_choice "auto" on a model whose template knows no tools
            },
            False,
        ),
        "default": ({"MODEL_ID": DEFAULT_MODEL_ID, "MODEL_DIR": str(model_store)}, False),
    }


class RunnerPool:
    """The shared runners, started when a test module first needs them, at most MAX_ENGINES alive.

    Before each module, the runners its tests use are started together (their
    engines start side by side); a runner another module left alive is kept
    while there is room and stopped, least recently used first, when there is not.
    A runner whose test stopped it or killed its engine is started anew if needed again.
    """

    def __init__(self, specs: dict[str, tuple[dict[str, str], bool]], logs: Path) -> None:
        self.specs = specs
        self.logs = logs
        self.alive: dict[str, RunnerProcess] = {}  # in order of last use
        self.starts: dict[str, int] = {}

    def usable(self, runner: RunnerProcess) -> bool:
        return runner.process.poll() is None and not runner.engine_died()

    def prepare(self, names: set[str], own_engines: int = 0) -> None:
        if len(names) + own_engines > MAX_ENGINES:
            raise AssertionError(f"a module needs {sorted(names)} and {own_engines} engines of its own: more than {MAX_ENGINES}")
        for name, runner in list(self.alive.items()):
            if not self.usable(runner):
                runner.stop()
                del self.alive[name]
        for name in [name for name in self.alive if name in names]:
            self.alive[name] = self.alive.pop(name)  # most recently used last
        missing = [name for name in sorted(names) if name not in self.alive]
        room = MAX_ENGINES - own_engines - len(missing)
        for name in [name for name in self.alive if name not in names][: max(0, len(self.alive) - room)]:
            self.alive.pop(name).stop()
        for name in missing:
            env, request_while_loading = self.specs[name]
            self.starts[name] = self.starts.get(name, 0) + 1
            log_path = self.logs / f"{name}-{self.starts[name]}.log"
            runner = RunnerProcess(name, env, log_path, request_while_loading=request_while_loading)
            runner.start()
            self.alive[name] = runner

    def get(self, name: str) -> RunnerProcess:
        if name not in self.alive:
            self.prepare({name, *self.alive})
        return self.alive[name]

    def stop_all(self) -> None:
        for runner in self.alive.values():
            runner.stop()
        self.alive.clear()


@pytest.fixture(scope="session")
def runner_pool(tiny_model_dir, model_store, tmp_path_factory) -> Iterator[RunnerPool]:
    pool = RunnerPool(runner_specs(tiny_model_dir, model_store), tmp_path_factory.mktemp("runner-logs"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module", autouse=True)
def module_runners(request) -> None:
    """Start the shared runners this module's tests use, before its first test, within MAX_ENGINES."""
    items = [item for item in request.session.items if item.module is request.module]
    names = {RUNNER_FIXTURES[name] for item in items for name in item.fixturenames if name in RUNNER_FIXTURES}
    marker = request.node.get_closest_marker("own_engines")
    own = marker.args[0] if marker else 0
    if names or own:
        request.getfixturevalue("runner_pool").prepare(names, own)


def ready(runner: RunnerProcess) -> RunnerProcess:
    status = runner.wait_until({"IDLE", "ERROR"})
    assert status == "IDLE", f"runner {runner.name} failed to load:\n{runner.log_tail()}"
    # Tests may keep the runner busy from the start: let its health watcher see it
    # IDLE first, so the timeline's first ready state is IDLE, not a test's OK.
    deadline = time.monotonic() + 10
    while "IDLE" not in (status for _, status in runner.timeline) and time.monotonic() < deadline:
        time.sleep(0.05)
    return runner


@pytest.fixture(scope="module")
def tiny_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("tiny"))


@pytest.fixture(scope="module")
def doomed_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("doomed"))


@pytest.fixture(scope="module")
def default_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("default"))


@pytest.fixture(scope="module")
def doomed_under_load_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("doomed_under_load"))


@pytest.fixture(scope="module")
def guarded_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("guarded"))


@pytest.fixture(scope="module")
def drained_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("drained"))


class SuiteFootprint:
    """Samples the suite's process tree once a second: its peak RSS and the most engines alive at once."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_engines = 0
        self.stopped = threading.Event()
        threading.Thread(target=self.sample, daemon=True, name="suite-footprint").start()

    def sample(self) -> None:
        me = psutil.Process()
        while not self.stopped.wait(1.0):
            rss, engines = me.memory_info().rss, 0
            for child in me.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                    engines += "EngineCore" in child.name()
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_engines = max(self.peak_engines, engines)


FOOTPRINT = SuiteFootprint()


def pytest_terminal_summary(terminalreporter) -> None:
    FOOTPRINT.stopped.set()
    terminalreporter.write_line(
        f"suite footprint: peak RSS of the process tree {FOOTPRINT.peak_rss / 1024**3:.2f} GiB, "
        f"at most {FOOTPRINT.peak_engines} vLLM engines alive at once (limit {MAX_ENGINES})"
    )
