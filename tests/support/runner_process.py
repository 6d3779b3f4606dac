"""A runner process, launched and watched the way go-livepeer launches and watches one.

``python -m runner``, the container's own entry point, on a loopback port of its
own; tests, ``make stress`` and ``make bench`` all start runners through it.
"""

from __future__ import annotations

import contextlib
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

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
START_TIMEOUT = 420  # seconds; engines start slower when several share two cores
# Seconds a runner's processes get to be gone once it has exited: they end with it (the kernel kills them, and
# multiprocessing's resource tracker ends once they are gone), in milliseconds; the rest is a loaded machine's slack.
ORPHAN_GRACE = 3.0


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
    # Every process the runner started, seen while it ran (its engine, a worker node's ranks, ...), by pid
    descendants: dict[int, psutil.Process] = field(default_factory=dict)
    orphans_checked: bool = False

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
        RUNNERS.append(self)
        threading.Thread(target=self.watch_health, daemon=True).start()

    def since_launch(self) -> float:
        return time.monotonic() - self.launched_at

    def send_loading_request(self, sent_at: float) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        self.loading_request = (sent_at, post_json(f"{self.url}/llm", body, 600))

    def record_descendants(self) -> list[psutil.Process]:
        """Note every process the runner has started that runs now; returns them (its own process first)."""
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for process in found[1:]:
            self.descendants.setdefault(process.pid, process)
        return found

    def left_behind(self, timeout: float = 0.0) -> list[psutil.Process]:
        """The processes the runner started that still run after ``timeout`` seconds (its own process excluded).

        A zombie is gone (only its adopter has not reaped it yet); a pid taken by
        another process since is not this runner's (psutil compares creation times).
        """
        return left_after(list(self.descendants.values()), timeout)

    def watch_health(self) -> None:
        while self.process.poll() is None:
            self.record_descendants()
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
        engine = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.name().startswith("VLLM") or "VLLM::" in " ".join(child.cmdline()):
                    engine.append(child)
            except psutil.Error:  # a short-lived child that ended while it was looked at
                continue
        return engine

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.record_descendants()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.record_descendants()
                for child in self.descendants.values():
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                self.process.kill()
                self.process.wait()
        self.log.close()


@contextlib.contextmanager
def started_ahead(request, runner: RunnerProcess, test: str) -> Iterator[RunnerProcess]:
    """``runner``, launched now (a module fixture's setup) if the module's test named ``test`` is selected.

    Its engine then starts while the module's tests before ``test`` run,
    instead of after them; it is stopped at the module's end. A selection
    without ``test`` (``-k``) starts no engine for it.
    """
    if any(item.module is request.module and getattr(item, "originalname", item.name) == test
           for item in request.session.items):
        runner.start()
    try:
        yield runner
    finally:
        if runner.process is not None:
            runner.stop()


def still_running(process: psutil.Process) -> bool:
    """Alive, not a zombie (gone, only not reaped yet by whoever adopted it), and not a new process on a reused pid."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def left_after(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after at most ``timeout`` seconds, polled.

    Not ``psutil.wait_procs``: it waits out the whole timeout on a zombie.
    """
    deadline = time.monotonic() + timeout
    while (alive := [process for process in processes if still_running(process)]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return alive


RUNNERS: list[RunnerProcess] = []  # every runner started in this process, in order


def orphans_of_ended_runners(grace: float = ORPHAN_GRACE) -> list[str]:
    """The processes left running by runners that have exited since the last look: each killed, and described.

    A runner's processes must end with it however it ends (SIGTERM, SIGKILL, a
    crash); the suite calls this after every test and fails on any.
    """
    found = []
    for runner in RUNNERS:
        if runner.orphans_checked or runner.process.poll() is None:
            continue
        runner.orphans_checked = True
        for process in runner.left_behind(grace):
            with contextlib.suppress(psutil.Error):
                found.append(f"runner {runner.name} (pid {runner.process.pid}, exit code {runner.process.returncode}) "
                             f"left pid {process.pid} {process.name()!r} ({' '.join(process.cmdline())[:120]}), "
                             f"parent {process.ppid()}")
                process.kill()
    return found
