"""The suite's shared runners: what each one is, and a pool that keeps at most MAX_ENGINES alive.

Each runner is ``python -m runner``, the container's own entry point, with a real
vLLM engine (CPU backend) behind it, reached over loopback HTTP. Engines take
tens of seconds to start, so each shared runner is started before the first
module that uses it and kept for the modules after it, with never more than
MAX_ENGINES engines alive at once (RunnerPool).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from tests.support.runner_process import DEFAULT_MODEL_ID, START_TIMEOUT, RunnerProcess

TINY_MAX_MODEL_LEN = 4096
# The guarded runner: a bearer token, a small batch with a small queue behind it, a short request timeout.
GUARDED_AUTH_TOKEN = "guarded-runner-token"
GUARDED_MAX_NUM_SEQS = 2
GUARDED_MAX_WAITING_REQUESTS = 2
GUARDED_REQUEST_TIMEOUT = 4
GUARDED_MAX_IN_FLIGHT = GUARDED_MAX_NUM_SEQS + GUARDED_MAX_WAITING_REQUESTS
DOOMED_STREAM_INTERVAL = 4
TINY_RESPONSES_STORE_SIZE = 2  # the tiny runner keeps its last two Responses only
REASONING_PARSER = "deepseek_r1"  # the drained runner's: all it generates is thinking until a </think>


MAX_ENGINES = 3  # vLLM engines alive at once, whatever the suite does
RUNNER_FIXTURES = {  # fixture name -> runner name in RUNNER_SPECS
    "tiny_runner": "tiny",
    "doomed_runner": "doomed",
    "default_runner": "default",
    "guarded_runner": "guarded",
    "drained_runner": "drained",
}


def runner_specs(tiny_model_dir: Path, model_store: Path) -> dict[str, tuple[dict[str, str], bool]]:
    """Each shared runner's environment, and whether it is sent a request while it loads."""
    tiny_env = {"MODEL_ID": str(tiny_model_dir), "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN), "KV_CACHE_GIB": "0.25"}
    return {
        # Its request sent while loading waits for the load, however slowly engines start beside it.
        "tiny": ({**tiny_env, "LOAD_WAIT_TIMEOUT": str(START_TIMEOUT),
                  "RESPONSES_STORE_SIZE": str(TINY_RESPONSES_STORE_SIZE)}, True),
        # Runners of their own, because their tests stop them or kill their engines. The drained runner's one
        # test reads only statuses, so it also runs a reasoning parser (the tiny model has <think> markers):
        # tests/pipelines/llm/real_engine/test_vllm_extras.py reads its answers.
        "drained": ({**tiny_env, "REASONING_PARSER": REASONING_PARSER}, False),
        # Its stream settings are not the defaults: real_engine/test_livepeer.py checks that they reach the engine,
        # before real_engine/test_faults.py kills its engine under load.
        "doomed": ({**tiny_env, "STREAM_INTERVAL": str(DOOMED_STREAM_INTERVAL), "ENABLE_PREFIX_CACHING": "false"},
                   False),
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


def ready(runner: RunnerProcess) -> RunnerProcess:
    status = runner.wait_until({"IDLE", "ERROR"})
    assert status == "IDLE", f"runner {runner.name} failed to load:\n{runner.log_tail()}"
    # Tests may keep the runner busy from the start: let its health watcher see it
    # IDLE first, so the timeline's first ready state is IDLE, not a test's OK.
    deadline = time.monotonic() + 10
    while "IDLE" not in (status for _, status in runner.timeline) and time.monotonic() < deadline:
        time.sleep(0.05)
    return runner


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


def module_order(items: list) -> list:
    """The suite's items, module by module in the order that starts the fewest engines.

    Modules that need no shared runner come first; then those that use the
    guarded runner (which no later module needs, so the pool may drop it);
    then the rest; then modules that end a shared runner (``ends_runners``),
    after every module that needs that runner alive; modules with engines of
    their own come last. Within a module, and between equals, the order is
    the collection's.
    """
    modules: dict[object, list] = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)

    def key(module_items: list) -> tuple:
        runners = {RUNNER_FIXTURES[name] for item in module_items for name in item.fixturenames if name in RUNNER_FIXTURES}
        ends = module_items[0].get_closest_marker("ends_runners")
        own = module_items[0].get_closest_marker("own_engines")
        return (bool(own), bool(ends), bool(runners) and "guarded" not in runners, bool(runners))

    ordered = sorted(modules.values(), key=key)  # stable: equals keep the collection's order
    return [item for module_items in ordered for item in module_items]
