"""The suite's shared runners: what each one is, and a pool that keeps at most MAX_ENGINES alive.

Each runner is ``python -m runner``, the container's own entry point, with a real
vLLM engine (CPU backend) behind it, reached over loopback HTTP. Engines take
tens of seconds to start, so each shared runner is started before the first
module that uses it and kept for the modules after it, with never more than
MAX_ENGINES engines alive at once (RunnerPool).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.engine_slots import FIRST, EngineSlots
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
TINY_RESPONSES_STORE_BYTES = 16_000  # and 16 kB of them: two small ones, or one with metadata of 8 kB
TINY_WRITE_STALL_TIMEOUT = 3  # its streams are cut 3 s into a stall (nothing else it serves fills a socket's buffers)
REASONING_PARSER = "deepseek_r1"  # the drained runner's: all it generates is thinking until a </think>


MAX_ENGINES = 3  # vLLM engines alive at once, whatever the suite does
RUNNER_FIXTURES = {  # fixture name -> runner name in RUNNER_SPECS
    "tiny_runner": "tiny",
    "doomed_runner": "doomed",
    "default_runner": "default",
    "guarded_runner": "guarded",
    "drained_runner": "drained",
}


def tiny_engine_env(tiny_model_dir: Path, core: int | None) -> dict[str, str]:
    """A runner's variables for the tiny model: a small context and KV cache; its worker's threads on ``core``.

    ``core`` counts in the cores this process may use; None leaves the threads
    where the runner puts them. The tiny model's steps are too small to share
    out between cores: a worker spread over all of them competes with vLLM's
    scheduler process, which polls for the worker's answer while it computes.
    On one core it generates faster, with less CPU (bench/findings.md), and
    leaves the other cores to the engines beside it.
    """
    env = {"MODEL_ID": str(tiny_model_dir), "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN), "KV_CACHE_GIB": "0.25"}
    if core is not None:
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[core % len(cores)])
    return env


def runner_specs(tiny_model_dir: Path, model_store: Path) -> dict[str, tuple[dict[str, str], bool]]:
    """Each shared runner's environment, and whether it is sent a request while it loads."""
    # tiny on the first core, the runners that share modules with it on the next.
    tiny_env, other_tiny_env = tiny_engine_env(tiny_model_dir, core=0), tiny_engine_env(tiny_model_dir, core=1)
    return {
        # Its request sent while loading waits for the load, however slowly engines start beside it.
        "tiny": ({**tiny_env, "LOAD_WAIT_TIMEOUT": str(START_TIMEOUT),
                  "RESPONSES_STORE_SIZE": str(TINY_RESPONSES_STORE_SIZE),
                  "RESPONSES_STORE_BYTES": str(TINY_RESPONSES_STORE_BYTES),
                  "WRITE_STALL_TIMEOUT": str(TINY_WRITE_STALL_TIMEOUT)}, True),
        # Runners of their own, because their tests stop them or kill their engines. The drained runner's one
        # test reads only statuses, so it also runs a reasoning parser (the tiny model has <think> markers):
        # tests/pipelines/llm/real_engine/test_vllm_extras.py reads its answers.
        "drained": ({**other_tiny_env, "REASONING_PARSER": REASONING_PARSER}, False),
        # Its stream settings are not the defaults: real_engine/test_livepeer.py checks that they reach the engine,
        # before real_engine/test_faults.py kills its engine under load.
        "doomed": ({**other_tiny_env, "STREAM_INTERVAL": str(DOOMED_STREAM_INTERVAL), "ENABLE_PREFIX_CACHING": "false"},
                   False),
        "guarded": (
            {
                **other_tiny_env,
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


def plan(alive: list[str], names: set[str], own_engines: int) -> tuple[list[str], list[str]]:
    """What a module needing the shared runners ``names`` and ``own_engines`` of its own makes the pool do.

    ``alive`` lists the runners alive, least recently used first. Returns the
    runners to stop (unneeded ones, least recently used first, only as many as
    the module's engines need room for) and the runners to start.
    """
    missing = [name for name in sorted(names) if name not in alive]
    room = MAX_ENGINES - own_engines - len(missing)
    idle = [name for name in alive if name not in names]
    return idle[: max(0, len(alive) - room)], missing


class RunnerPool:
    """The shared runners, started when a test module first needs them, within the run's MAX_ENGINES slots.

    Before each module, the runners its tests use are started together (their
    engines start side by side); a runner another module left alive is kept
    while there is room and a later module needs it, and stopped, least recently
    used first, when there is not (``plan``). Where room is left, the runners
    the next module needs start now, behind this module's tests. A runner whose
    test stopped it or killed its engine is started anew if needed again.

    Each engine takes one of the run's ``slots`` (tests/support/engine_slots.py), which
    ``make test``'s two lanes share: a runner's while it is alive, a module's own
    engines' from before its first test to after its last (``prepare`` returns
    them). While another lane waits for slots, the pool starts none ahead, and
    stops the runners its module does not use where that frees enough for it. A pool that must not wait while it
    holds slots (``hold_while_waiting`` false: the lane of the modules with engines
    of their own) stops all its runners before it waits, so two lanes can never
    each hold slots while waiting for the other's.
    """

    def __init__(self, specs: dict[str, tuple[dict[str, str], bool]], logs: Path, slots: EngineSlots | None = None,
                 hold_while_waiting: bool = True) -> None:
        self.specs = specs
        self.logs = logs
        self.slots = slots or EngineSlots.private(MAX_ENGINES)
        self.hold_while_waiting = hold_while_waiting
        self.alive: dict[str, RunnerProcess] = {}  # in order of last use
        self.held: dict[str, int] = {}  # runner name -> its slot
        self.waits: list[float] = []  # seconds of each wait for slots the other lane held
        self.starts: dict[str, int] = {}

    def usable(self, runner: RunnerProcess) -> bool:
        return runner.process.poll() is None and not runner.engine_died()

    def prepare(self, names: set[str], own_engines: int = 0, upcoming: set[str] = frozenset(),
                later: set[str] | None = None) -> list[int]:
        """Make ``names`` alive for a module with ``own_engines`` of its own; start ``upcoming`` where room is left.

        ``later``: the runners a later module may use (None: any); the others are stopped once idle. Returns the
        slots of the module's own engines, to ``release`` after its last test.
        """
        if len(names) + own_engines > MAX_ENGINES:
            raise AssertionError(f"a module needs {sorted(names)} and {own_engines} engines of its own: more than {MAX_ENGINES}")
        for name, runner in list(self.alive.items()):
            if not self.usable(runner):
                self.stop(name)
        self.alive = {name: self.alive[name] for name in used(list(self.alive), frozenset(names))}
        stop, missing = plan(list(self.alive), names, own_engines)
        wanted = self.slots.wanted()  # by the other lane, waiting
        idle = [name for name in self.alive if name not in names]
        # Give way to it with the runners this module does not use, where that lets it go on: else it would only
        # cost their starts again.
        give_way = wanted is not None and self.slots.free() + len(idle) - len(missing) >= wanted
        for name in idle:
            if name in stop or give_way or (later is not None and name not in later):
                self.stop(name)
        first = self.hold_while_waiting or not self.slots.waiters(FIRST)  # else the other lane's waiter goes first
        held = self.slots.try_take(len(missing) + own_engines) if first else None
        if held is None:
            if not self.hold_while_waiting:
                for name in list(self.alive):
                    self.stop(name)
                missing = sorted(names)
            held = self.slots.take(len(missing) + own_engines, first=self.hold_while_waiting, waits=self.waits)
        for name in missing:
            self.start(name)
            self.held[name] = held.pop(0)
        ahead = [name for name in sorted(upcoming) if name not in self.alive]
        for name in ahead[: max(0, MAX_ENGINES - own_engines - len(self.alive))]:
            if wanted is not None or (slot := self.slots.try_take(1)) is None:
                break
            self.start(name)
            self.held[name] = slot[0]
        return held

    def prepare_module(self, need: ModuleNeeds, upcoming: set[str], later: set[str] | None = None) -> list[int]:
        """Before a module's first test: what it ``need``s, and ``upcoming`` if it has no engine of its own.

        A module that needs no engine at all only starts what is ``upcoming`` and not alive yet: the first
        engine module's runners start behind the modules that need none (``module_order``).
        """
        if not need.engines and set(upcoming) <= self.alive.keys() and not self.slots.others_wait():
            return []  # (while the other lane waits, ``prepare`` may give way with the runners started ahead)
        return self.prepare(set(need.runners), need.own_engines, upcoming if not need.own_engines else set(), later)

    def start(self, name: str) -> None:
        env, request_while_loading = self.specs[name]
        self.starts[name] = self.starts.get(name, 0) + 1
        log_path = self.logs / f"{name}-{self.starts[name]}.log"
        runner = RunnerProcess(name, env, log_path, request_while_loading=request_while_loading)
        runner.start()
        self.alive[name] = runner

    def stop(self, name: str) -> None:
        """Stop the runner ``name`` and give back its slot."""
        self.alive.pop(name).stop()
        self.slots.release([self.held.pop(name)] if name in self.held else [])

    def get(self, name: str) -> RunnerProcess:
        if name not in self.alive:
            self.prepare({name, *self.alive})
        return self.alive[name]

    def stop_all(self) -> None:
        for name in list(self.alive):
            self.stop(name)


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
        self.unexpected_engines = 0  # engines seen in a session whose tests need none (tests/conftest.py)
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


class SuiteTimes:
    """Where the suite's time goes: each test module's seconds (setup, call and teardown), the tests that need an
    engine apart from the others, and each runner's seconds from launch to ready."""

    def __init__(self) -> None:
        self.modules: dict[str, float] = {}
        self.by_lane = {True: 0.0, False: 0.0}  # needs an engine -> seconds

    def add(self, report) -> None:
        module = report.nodeid.split("::")[0]
        self.modules[module] = self.modules.get(module, 0.0) + report.duration
        self.by_lane[ENGINE_MARKER in report.keywords] += report.duration

    def lines(self, runners: list[RunnerProcess], most: int = 10) -> list[str]:
        if not self.modules:
            return []
        longest = sorted(self.modules.items(), key=lambda pair: -pair[1])[:most]
        lines = [f"suite time: {self.by_lane[True]:.0f} s in tests that need an engine, {self.by_lane[False]:.0f} s "
                 f"in the others; the longest modules: " + ", ".join(f"{module} {seconds:.0f} s"
                                                                   for module, seconds in longest)]
        ready = [(runner.name, seconds) for runner in runners if (seconds := ready_after(runner)) is not None]
        if runners:
            lines.append(f"runners started: {len(runners)}, {len(runners) - len(ready)} never ready (most of them by "
                         f"design); launch to ready: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in ready))
        return lines


def ready_after(runner: RunnerProcess) -> float | None:
    """Seconds from the runner's launch to its first ready /health (IDLE, or OK while it serves), None if never."""
    return next((at for at, status in list(runner.timeline) if status in {"IDLE", "OK"}), None)


@dataclass(frozen=True)
class ModuleNeeds:
    """The engines one test module needs: shared runners, engines of its own, shared runners it ends."""

    runners: frozenset[str]
    own_engines: int
    ends: frozenset[str]

    @classmethod
    def of(cls, module_items: list) -> ModuleNeeds:
        runners = {RUNNER_FIXTURES[name] for item in module_items for name in item.fixturenames if name in RUNNER_FIXTURES}
        own = module_items[0].get_closest_marker("own_engines")
        ends = module_items[0].get_closest_marker("ends_runners")
        return cls(frozenset(runners), own.args[0] if own else 0, frozenset(ends.args if ends else ()))

    @property
    def engines(self) -> bool:
        return bool(self.runners or self.own_engines)


ENGINE_MARKER = "engine"  # added at collection to every test that needs a real engine; `-m "not engine"` is the fast lane


def needs_engine(item) -> bool:
    """The test uses a shared runner (through any fixture) or is in a module that starts engines of its own."""
    return ModuleNeeds.of([item]).engines


def by_module(items: list) -> dict[object, list]:
    """The items, module by module, in their order."""
    modules: dict[object, list] = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)
    return modules


def used(alive: list[str], names: frozenset[str]) -> list[str]:
    """``alive`` (least recently used first) once a module has used ``names``."""
    return [name for name in alive if name not in names] + [name for name in alive if name in names]


def opening(rest: list, needs: dict) -> object | None:
    """The engine module to run first: one that uses shared runners only, as many as it can (up to MAX_ENGINES).

    Its runners start behind the modules that need no engine, which leave the
    cores half idle (conftest's module_runners): on two cores those engines are
    ready when the first engine test comes, and no module of engines of its own
    waits for a start of its own first. Between equals, the one whose runners
    the most other modules use, then the collection's order. None where every
    module has engines of its own or ends a runner another one needs.
    """
    def ends_a_needed_runner(module) -> bool:
        return any(needs[other].runners & needs[module].ends for other in rest if other is not module)

    candidates = [module for module in rest if needs[module].runners and not needs[module].own_engines
                  and not ends_a_needed_runner(module)]
    if not candidates:
        return None

    def rank(module) -> tuple:
        users = sum(bool(needs[other].runners & needs[module].runners) for other in rest if other is not module)
        return -len(needs[module].runners), -users, rest.index(module)

    return min(candidates, key=rank)


def module_order(items: list) -> list:
    """The suite's items, module by module in the order that starts the fewest engines, the first ones early.

    Modules that need no engine come first, in the collection's order, then
    the ``opening`` engine module, whose runners start behind them. Then,
    one at a time, the module that costs the pool (``plan``) the fewest starts
    now plus stops of runners a later module still needs; a module that ends
    a shared runner (``ends_runners``) only once no other module left needs
    that runner. Between equals, modules with no engine of their own, then
    the collection's order. Where no module can open (every one has engines
    of its own), the modules of the most engines come first.
    """
    modules = by_module(items)
    needs = {module: ModuleNeeds.of(module_items) for module, module_items in modules.items()}
    order = [module for module in modules if not needs[module].engines]
    rest = [module for module in modules if needs[module].engines]
    alive: list[str] = []
    # No module of shared runners only (tests/lanes.py's "own" lane): the modules of the most engines first, while
    # the other lane runs the modules that need no engine; those of fewer then fit beside its runners.
    widest_first = opening(rest, needs) is None
    if (first := opening(rest, needs)) is not None:
        order.append(first)
        rest.remove(first)
        alive = sorted(needs[first].runners)
    while rest:
        def cost(module, alive=alive) -> tuple:
            need = needs[module]
            stop, start = plan(used(alive, need.runners), set(need.runners), need.own_engines)
            later = set().union(*(needs[other].runners for other in rest if other is not module))
            return (-(need.own_engines + len(need.runners)) if widest_first else 0, len(start) + len(set(stop) & later),
                    need.own_engines > 0, rest.index(module))

        def may_go(module) -> bool:
            return not any(needs[other].runners & needs[module].ends for other in rest if other is not module)

        module = min(filter(may_go, rest), key=cost)
        need = needs[module]
        alive = used(alive, need.runners)
        stop, start = plan(alive, set(need.runners), need.own_engines)
        alive = [name for name in alive + start if name not in stop and name not in need.ends]
        order.append(module)
        rest.remove(module)
    return [item for module in order for item in modules[module]]


def later_runners(items: list, module) -> set[str]:
    """The shared runners the modules after ``module`` in ``items`` use."""
    modules = list(by_module(items).items())
    at = next(index for index, (other, _) in enumerate(modules) if other is module)
    return set().union(*(ModuleNeeds.of(module_items).runners for _, module_items in modules[at + 1:]))


LANES = ("own", "shared")


def lane_of(need: ModuleNeeds) -> str:
    """A module's lane under tests/lanes.py: "own" for a module with engines of its own, "shared" for the others
    (the modules that need no engine run first there, while the other lane starts its first engines)."""
    return "own" if need.own_engines else "shared"


def upcoming_runners(items: list, module) -> set[str]:
    """The shared runners of the next module with engines after ``module`` in ``items``, if it has none of its own."""
    seen = False
    for other, module_items in by_module(items).items():
        if seen:
            need = ModuleNeeds.of(module_items)
            if need.engines:
                return set(need.runners) if not need.own_engines else set()
        seen = seen or other is module
    return set()
