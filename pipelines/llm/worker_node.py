"""A worker node (NODE_RANK > 0): this node's share of the engine's ranks, and no requests.

The ranks run in a child process (``python -m pipelines.llm.vllm_backend.worker``), in a
process group of its own: vLLM's headless process ignores SIGTERM for longer
than go-livepeer's 8 s, so stopping means signalling the whole group and
killing what is left of it. That process and its ranks die with this runner
however it dies (``pipelines.llm.lifeline``): a runner killed outright leaves
none. The serving node (NODE_RANK=0) is watched through
its master port (the torch.distributed store its rank 0 holds): while it does
not answer, the node waits, for MASTER_WAIT_TIMEOUT at most; once the ranks
run, a master that stops answering means the serving node went away. The node
also keeps its line to the serving node (``pipelines.llm.nodes``): it tells the
serving node when the ranks have joined and that this node lives; the serving
node closing it means the serving node went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import structlog
from pydantic import SecretStr

from pipelines.llm import lifeline
from pipelines.llm.layout import GPU
from pipelines.llm.nodes import ServingNodeLine
from pipelines.llm.settings import LLMSettings

log = structlog.get_logger(__name__)

WORKER_MODULE = "pipelines.llm.vllm_backend.worker"  # run as a program: this module never imports vLLM
PROBE_INTERVAL = 0.5  # seconds between looks at the master and the ranks
MASTER_GONE_PROBES = 2  # the master fails this many probes in a row once the ranks run: the serving node is gone
STOP_GRACE = 1.0  # seconds the ranks get after SIGTERM before the group is killed
KILLED_GONE_TIMEOUT = 1.0  # seconds the killed group gets to be gone (milliseconds, unless the machine is swamped)


def settings_for_ranks(settings: LLMSettings) -> bytes:
    """The settings as the worker program reads them (JSON on its stdin): secrets in full, not masked."""
    values = settings.model_dump(mode="json", by_alias=True)
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            values[field.alias or name] = value.get_secret_value()
    return json.dumps(values).encode()


def master_answers(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


class WorkerNode:
    def __init__(self, settings: LLMSettings, model_path: Path, served_name: str, environment: dict[str, str],
                 gpu: GPU | None = None) -> None:
        self.settings = settings
        self.model_path = model_path
        self.served_name = served_name
        self.environment = environment  # what the runner adds to the ranks' environment (layout.engine_environment)
        self.gpu = gpu  # this node's least capable GPU: what USE_8BIT's method must run on here
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.error: str | None = None  # why this node can no longer run its ranks
        self.master_lost: asyncio.Event = asyncio.Event()
        self.watcher: asyncio.Task | None = None
        self.line = ServingNodeLine(settings)

    @property
    def master(self) -> str:
        return f"{self.settings.master_addr}:{self.settings.master_port}"

    async def start(self) -> None:
        """Start the ranks and return once they have joined the master; raises ValueError when they cannot."""
        try:
            await self.join()
        except BaseException:  # failed or cancelled: nothing of this node's ranks may outlive the start
            await self.line.close()
            await asyncio.to_thread(self.stop)
            raise

    async def join(self) -> None:
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", WORKER_MODULE, str(self.model_path), self.served_name, str(write_fd),
                   json.dumps(self.environment), json.dumps(dataclasses.asdict(self.gpu) if self.gpu else None)]
        # Started on the thread that lasts as long as this process: the parent-death signal is bound to it.
        self.process = lifeline.run_on_starter(lambda: subprocess.Popen(
            lifeline.bound_command(command), pass_fds=(write_fd,), start_new_session=True, stdin=subprocess.PIPE))
        os.close(write_fd)
        with contextlib.suppress(BrokenPipeError):  # it died at once: the wait below says so
            self.process.stdin.write(settings_for_ranks(self.settings))  # a few KiB: the pipe takes them at once
            self.process.stdin.close()
        self.line.start()
        log.info("worker_node.start", pid=self.process.pid, master=self.master, nnodes=self.settings.nnodes,
                 node_rank=self.settings.node_rank, local_ranks=self.settings.local_world_size)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def on_readable() -> None:
            data = os.read(read_fd, 64)
            loop.remove_reader(read_fd)
            os.close(read_fd)
            if not ready.done():
                ready.set_result(bool(data))

        loop.add_reader(read_fd, on_readable)
        started = time.monotonic()
        master_seen = False
        while not ready.done():
            if self.line.refused is not None:
                raise ValueError(f"{self.line.refused}; give every node of this engine the same NODE_SECRET")
            if self.process.poll() is not None:
                raise ValueError(f"this node's engine ranks exited with code {self.process.returncode} before joining "
                                 f"the master at {self.master}: see the log above")
            if not master_seen:
                master_seen = await asyncio.to_thread(master_answers, self.settings.master_addr,
                                                      self.settings.master_port)
                waited = time.monotonic() - started
                if not master_seen and waited > self.settings.master_wait_timeout:
                    raise ValueError(
                        f"the master at {self.master} did not answer within MASTER_WAIT_TIMEOUT "
                        f"({self.settings.master_wait_timeout:g} s): start the serving node (NODE_RANK=0) "
                        "or set MASTER_ADDR and MASTER_PORT to its address and port")
            await asyncio.wait({ready}, timeout=PROBE_INTERVAL)
        if not ready.result():
            raise ValueError("this node's engine ranks stopped before joining the master")
        self.ready = True
        self.line.mark_joined()
        log.info("worker_node.ranks_running", seconds=round(time.monotonic() - started, 2), master=self.master)
        self.watcher = asyncio.create_task(self.watch(), name="worker-node-watch")

    async def watch(self) -> None:
        """Until the ranks die or the serving node goes away; then say why, and end this runner."""
        failed_probes = 0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            if self.process.poll() is not None:
                self.error = f"this node's engine ranks exited (code {self.process.returncode})"
                break
            if self.line.lost.is_set():
                self.error = self.line.refused or (f"the serving node (master {self.master}) closed this node's line: "
                                                   "it stopped or went away")
                break
            if await asyncio.to_thread(master_answers, self.settings.master_addr, self.settings.master_port):
                failed_probes = 0
                continue
            failed_probes += 1
            if failed_probes >= MASTER_GONE_PROBES:
                self.error = f"the serving node (master {self.master}) went away"
                break
        log.error("worker_node.stopped", reason=self.error)
        self.master_lost.set()
        await asyncio.to_thread(self.stop)
        # A worker node without its serving node has nothing left to do: end the runner as SIGTERM does.
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """End the ranks' process group: SIGTERM, then SIGKILL for what is left after STOP_GRACE; return once gone."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            members = [psutil.Process(group), *psutil.Process(group).children(recursive=True)]
        except psutil.NoSuchProcess:
            members = []
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # a rank blocked in a collective ignores SIGTERM
        except ProcessLookupError:
            pass
        self.process.wait()
        left = lifeline.left_after(members, KILLED_GONE_TIMEOUT)
        if left:
            log.error("worker_node.ranks_left", pids=[process.pid for process in left])

    async def close(self) -> None:
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()
        await self.line.close()
        await asyncio.to_thread(self.stop)
