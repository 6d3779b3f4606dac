"""The suite's own plan for its engines (tests/support/runners.py): the module order and the runner pool.

A collection shaped like the suite's own, with modules that use the shared
runners, modules with engines of their own and a module that ends a shared
runner, run through the order and then through a pool whose runners are
stand-ins: each shared runner starts once, never more than MAX_ENGINES
engines are alive, and the module that ends a runner comes after its other users.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.lanes import run_code, summary
from tests.support.engine_slots import FIRST, EngineSlots, alarm_paused
from tests.support.fast_lane import engine_only_folder
from tests.support.runner_process import ROOT
from tests.support.runners import (
    LANES,
    MAX_ENGINES,
    ModuleNeeds,
    RunnerPool,
    by_module,
    lane_of,
    later_runners,
    module_order,
    needs_engine,
    plan,
    upcoming_runners,
)


@dataclass
class Item:
    """What module_order reads of a pytest item."""

    module: str
    fixturenames: tuple[str, ...] = ()
    markers: dict[str, SimpleNamespace] = field(default_factory=dict)

    def get_closest_marker(self, name: str) -> SimpleNamespace | None:
        return self.markers.get(name)


def own(engines: int) -> dict[str, SimpleNamespace]:
    return {"own_engines": SimpleNamespace(args=(engines,))}


def ends(*runners: str) -> dict[str, SimpleNamespace]:
    return {"ends_runners": SimpleNamespace(args=runners)}


def collection() -> list[Item]:
    """Modules in the collection's (alphabetical) order, as the suite's are: the order must not rely on it."""
    return [
        Item("api_fakes"),
        Item("anthropic", ("tiny_runner", "guarded_runner")),
        Item("anthropic", ("default_runner",)),
        Item("faults", ("doomed_runner", "tiny_runner"), ends("doomed")),
        Item("fuzz", ("guarded_runner",)),
        Item("lifecycle", ("drained_runner",), {**own(1), **ends("drained")}),
        Item("livepeer", ("tiny_runner", "doomed_runner", "default_runner")),
        Item("lora", (), own(2)),
        Item("monitoring", ("guarded_runner",)),
        Item("pipeline_parallel", (), own(3)),
        Item("routes_fakes"),
        Item("vllm_extras", ("default_runner", "drained_runner", "tiny_runner")),
    ]


class Engines:
    """The engines alive across the pools of one run (both lanes'), and the most at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive = 0
        self.peak = 0

    def add(self, count: int) -> None:
        with self.lock:
            self.alive += count
            self.peak = max(self.peak, self.alive)


class StandIn:
    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.engines.add(-1)
        self.stopped = True


class CountingPool(RunnerPool):
    """The suite's pool with stand-in runners: what it starts and stops, and the most engines alive."""

    def __init__(self, slots: EngineSlots | None = None, engines: Engines | None = None,
                 hold_while_waiting: bool = True, module_seconds: float = 0.0) -> None:
        super().__init__({}, logs=None, slots=slots, hold_while_waiting=hold_while_waiting)
        self.engines = engines or Engines()
        self.module_seconds = module_seconds

    @property
    def peak(self) -> int:
        return self.engines.peak

    def usable(self, runner: StandIn) -> bool:
        return not runner.stopped

    def start(self, name: str) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        self.engines.add(1)
        self.alive[name] = StandIn(self.engines)

    def run(self, items: list[Item]) -> list[str]:
        """Each module as conftest's module_runners prepares it; the modules in the order they ran."""
        modules = by_module(items)
        self.alive_before = {}  # module -> the runners alive as its first test begins
        for module, module_items in modules.items():
            need = ModuleNeeds.of(module_items)
            upcoming, later = upcoming_runners(items, module), later_runners(items, module)
            own = self.prepare_module(need, upcoming, later) if need.engines or upcoming else []
            assert len(own) == need.own_engines
            self.engines.add(len(own))
            self.alive_before[module] = {name for name, runner in self.alive.items() if not runner.stopped}
            time.sleep(self.module_seconds)
            for name in need.ends:
                self.alive[name].stop()
            self.engines.add(-len(own))
            EngineSlots.release(own)
        self.stop_all()
        return list(modules)


def test_modules_without_engines_come_first_in_the_collections_order():
    order = list(by_module(module_order(collection())))
    assert order[:2] == ["api_fakes", "routes_fakes"]


def test_each_shared_runner_starts_once_within_max_engines():
    items = module_order(collection())
    pool = CountingPool()
    pool.run(items)
    assert pool.starts == {"default": 1, "doomed": 1, "drained": 1, "guarded": 1, "tiny": 1}
    assert pool.peak <= MAX_ENGINES


def test_the_first_engine_modules_runners_start_behind_the_modules_without_engines():
    """The first engine module uses shared runners only, as many as MAX_ENGINES allows; they are started before
    the first module without engines runs, and the engine modules with engines of their own come after it."""
    items = module_order(collection())
    order = list(by_module(items))
    first = order[2]
    assert first == "anthropic"
    pool = CountingPool()
    pool.run(items)
    assert pool.alive_before["api_fakes"] == {"default", "guarded", "tiny"}
    assert not any(pool.alive_before["routes_fakes"] - pool.alive_before["api_fakes"])
    assert all(order.index(module) > 2 for module in ("lifecycle", "lora", "pipeline_parallel"))


def test_a_module_that_ends_a_runner_comes_after_every_other_user_of_it():
    order = list(by_module(module_order(collection())))
    assert order.index("faults") > order.index("livepeer")
    assert order.index("lifecycle") > order.index("vllm_extras")


def test_every_item_is_kept_and_a_modules_items_stay_together_in_their_order():
    items = collection()
    ordered = module_order(items)
    assert sorted(map(id, ordered)) == sorted(map(id, items))
    assert [item for item in ordered if item.module == "anthropic"] == [item for item in items
                                                                          if item.module == "anthropic"]


def test_the_collections_order_alone_starts_shared_runners_again():
    """What the order is for: run as collected, the same modules start shared runners more than once."""
    pool = CountingPool()
    pool.run(collection())
    assert sum(pool.starts.values()) > 5


def test_plan_makes_room_for_a_modules_own_engines_stopping_the_least_recently_used():
    assert plan(["tiny", "guarded"], {"default"}, 0) == ([], ["default"])
    assert plan(["tiny", "guarded", "default"], set(), 2) == (["tiny", "guarded"], [])
    assert plan(["tiny", "guarded", "default"], {"guarded"}, 1) == (["tiny"], [])
    assert plan([], {"tiny", "doomed"}, 1) == ([], ["doomed", "tiny"])


def lane(items: list[Item], name: str) -> list[Item]:
    return [item for item in items if lane_of(ModuleNeeds.of([item])) == name]


def test_the_lanes_split_the_modules_by_their_own_engines_and_the_own_lane_runs_its_widest_first():
    items = collection()
    assert {item.module for item in lane(items, "own")} == {"lifecycle", "lora", "pipeline_parallel"}
    assert len(lane(items, "own")) + len(lane(items, "shared")) == len(items)
    own = list(by_module(module_order(lane(items, "own"))))
    # three engines first, while the other lane runs the modules without any; then those that fit beside its runners
    assert own == ["pipeline_parallel", "lora", "lifecycle"]
    shared = list(by_module(module_order(lane(items, "shared"))))
    assert shared[:3] == ["api_fakes", "routes_fakes", "anthropic"]


def run_lanes(slots: dict[str, EngineSlots], engines: Engines) -> dict[str, CountingPool]:
    """Both lanes of collection() side by side, each in a thread with a pool of its own, as tests/lanes.py runs them."""
    pools = {name: CountingPool(slots[name], engines, hold_while_waiting=name != "own", module_seconds=0.05)
             for name in LANES}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            pools[name].run(module_order(lane(collection(), name)))
        except BaseException as error:  # noqa: BLE001 - said by the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in LANES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a lane never finished: the lanes wait for each other"
    assert not errors, errors
    return pools


def test_two_lanes_side_by_side_keep_max_engines_between_them_and_both_finish(tmp_path):
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    engines = Engines()
    pools = run_lanes({name: slots for name in LANES}, engines)
    assert engines.peak == MAX_ENGINES and engines.alive == 0
    assert set(pools["shared"].starts) == {"default", "doomed", "drained", "guarded", "tiny"}
    assert set(pools["own"].starts) == {"drained"}


def test_lanes_with_slots_of_their_own_would_start_more_than_max_engines():
    """What the shared slots are for: each lane within MAX_ENGINES alone, both together above it."""
    engines = Engines()
    run_lanes({name: EngineSlots.private(MAX_ENGINES) for name in LANES}, engines)
    assert engines.peak > MAX_ENGINES


def test_the_pool_gives_way_to_a_waiting_lane_only_where_that_lets_it_go_on(tmp_path):
    """Stopping the runners its module does not use frees slots for the other lane's waiting module; where they
    are too few for it, stopping them would only cost their starts again."""
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    pool = CountingPool(slots)
    everyone = {"default", "guarded", "tiny"}
    pool.prepare(everyone)
    for wanted, kept in ((3, everyone), (2, {"guarded"})):
        taken: list[list[int]] = []

        def wait(wanted: int = wanted) -> None:
            with contextlib.suppress(AssertionError):  # the wait for three ends unmet
                taken.append(EngineSlots(tmp_path, MAX_ENGINES).take(wanted, first=False, limit=1))

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 10
        while slots.wanted() != wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.prepare({"guarded"}, later=everyone)
        assert set(pool.alive) == kept
        waiter.join(timeout=10)
        assert bool(taken) == (wanted == 2)
        EngineSlots.release(taken[0] if taken else [])
    pool.stop_all()


def test_runners_started_ahead_behind_modules_without_engines_give_way_to_a_waiting_lane(tmp_path):
    """The shared lane starts its first runners behind its modules without engines; the own lane's module of three
    engines, waiting, gets their slots at the next of those modules (in the first whole run it waited 1,062 s)."""
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    pool = CountingPool(slots)
    no_engines = ModuleNeeds(frozenset(), 0, frozenset())
    everyone = {"default", "guarded", "tiny"}
    pool.prepare_module(no_engines, everyone, later=everyone)
    assert set(pool.alive) == everyone
    taken: list[list[int]] = []
    waiter = threading.Thread(target=lambda: taken.append(
        EngineSlots(tmp_path, MAX_ENGINES).take(MAX_ENGINES, first=False, limit=10)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while slots.wanted() != MAX_ENGINES and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.prepare_module(no_engines, everyone, later=everyone)
    assert not pool.alive
    waiter.join(timeout=10)
    assert len(taken) == 1
    EngineSlots.release(taken[0])


HOLDER = """
import sys, time
from pathlib import Path
from tests.support.engine_slots import EngineSlots
held = EngineSlots(Path(sys.argv[1]), int(sys.argv[2])).take(int(sys.argv[3]))
print(len(held), flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding ``count`` of the slots in tmp_path, once it holds them."""
    processes = []

    def start(count: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(MAX_ENGINES), str(count)],
                                   cwd=ROOT, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == str(count)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()
        process.stdout.close()


def test_two_processes_never_hold_more_than_max_engines_slots(tmp_path, holder):
    holder(2)
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    assert slots.try_take(MAX_ENGINES - 1) is None
    mine = slots.try_take(1)
    assert mine is not None
    assert slots.try_take(1) is None
    EngineSlots.release(mine)


def test_a_take_that_cannot_be_met_holds_none_while_it_waits_and_says_it_waits(tmp_path, holder):
    held = holder(2)
    waiter, other = EngineSlots(tmp_path, MAX_ENGINES), EngineSlots(tmp_path, MAX_ENGINES)
    assert waiter.try_take(2) is None
    assert not other.others_wait()
    taken: list[list[int]] = []
    thread = threading.Thread(target=lambda: taken.append(waiter.take(2, limit=30)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not other.others_wait() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.others_wait(), "a waiter says it waits"
    one = other.try_take(1)
    assert one is not None, "the waiter holds none of the slots while it waits for two"
    EngineSlots.release(one)
    held.kill()
    thread.join(timeout=10)
    assert len(taken) == 1 and len(taken[0]) == 2
    assert not other.others_wait()
    EngineSlots.release(taken[0])


def test_the_shared_runners_lane_waits_first(tmp_path):
    """The lane of the shared runners may wait holding its runners' slots; the other lane, which never does, lets
    it go first: else both could wait for the same slot, one of them holding what the other needs."""
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    mine = slots.try_take(MAX_ENGINES)
    taken: list[list[int]] = []
    shared = threading.Thread(target=lambda: taken.append(EngineSlots(tmp_path, MAX_ENGINES).take(2, limit=30)),
                              daemon=True)
    shared.start()
    deadline = time.monotonic() + 10
    while not slots.waiters(FIRST) and time.monotonic() < deadline:
        time.sleep(0.01)
    EngineSlots.release([mine.pop()])  # one free: the shared lane waits for two
    with pytest.raises(AssertionError, match="waited 1 s for 1"):
        EngineSlots(tmp_path, MAX_ENGINES).take(1, first=False, limit=1)
    assert not taken
    EngineSlots.release([mine.pop()])
    shared.join(timeout=10)
    assert len(taken) == 1 and len(taken[0]) == 2
    EngineSlots.release(mine + taken[0])


def test_a_killed_holder_frees_its_slots(tmp_path, holder):
    held = holder(MAX_ENGINES)
    slots = EngineSlots(tmp_path, MAX_ENGINES)
    assert slots.try_take(1) is None
    os.kill(held.pid, signal.SIGKILL)
    held.wait()
    mine = slots.try_take(MAX_ENGINES)
    assert mine is not None
    EngineSlots.release(mine)


def test_a_wait_that_never_ends_fails_saying_so(tmp_path, holder):
    holder(MAX_ENGINES)
    with pytest.raises(AssertionError, match="waited 1 s for 1 of the 3 engine slots"):
        EngineSlots(tmp_path, MAX_ENGINES).take(1, limit=1)


def test_a_wait_for_slots_is_not_the_tests_time():
    """pytest-timeout's alarm stops while a lane waits for the other's slots, and goes on from where it was."""
    signal.setitimer(signal.ITIMER_REAL, 0)  # no alarm of pytest-timeout's in this test: one of our own, never due
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the alarm rang during the wait"))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with alarm_paused():
            assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
            time.sleep(0.7)
        assert 0.3 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_run_fails_if_a_lane_fails_or_engines_passed_the_limit_and_a_lane_without_tests_is_no_failure():
    assert run_code({"own": 0, "shared": 0}, MAX_ENGINES) == 0
    assert run_code({"own": 5, "shared": 0}, 1) == 0
    assert run_code({"own": 0, "shared": 1}, 1) == 1
    assert run_code({"own": 5, "shared": 2}, 1) == 2
    assert run_code({"own": 5, "shared": 5}, 0) == 5
    assert run_code({"own": 0, "shared": 0}, MAX_ENGINES + 1) == 1


def test_a_lanes_summary_starts_at_its_footprint():
    lines = ["tests/a.py ....", "suite footprint: ...", "suite time: ...", "== 4 passed in 1.00s =="]
    assert summary(lines) == lines[1:]
    assert summary(["x"] * 20) == ["x"] * 15


# The fast lane: pytest's own -m selection over a small suite that uses tests/conftest.py's hooks and fixtures, with a
# runner pool that fails the test asking for it. Only the test that needs no engine runs, and no runner is asked for.
LANE_CONFTEST = """
import pytest

from tests.conftest import (
    default_runner,
    module_runners,
    one_process,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    tiny_runner,
)


@pytest.fixture(scope="session")
def runner_pool(one_process):
    pytest.fail("a runner was asked for")
"""
LANE_MODULES = {
    "test_lane_shared": """
import pytest


@pytest.fixture
def sdk(default_runner):
    return default_runner


def test_pure():
    pass


def test_a_shared_runner(tiny_runner):
    pass


def test_a_shared_runner_through_a_fixture(sdk):
    pass
""",
    "test_lane_own": """
import pytest

pytestmark = pytest.mark.own_engines(1)


def test_in_a_module_with_engines_of_its_own():
    pass
""",
}


def lane_suite(pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(LANE_CONFTEST)
    pytester.makepyfile(**LANE_MODULES)


def test_the_fast_lane_runs_every_test_that_needs_no_engine_and_starts_none(pytester):
    lane_suite(pytester)
    fast = pytester.runpytest("-m", "not engine", "-p", "no:cacheprovider")
    # A test that names a shared runner is not even made an item there (tests/support/fast_lane.py); the others are
    # collected and deselected.
    fast.assert_outcomes(passed=1, deselected=2)
    engine = pytester.runpytest("-m", "engine", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert sorted(line.split("::")[-1] for line in engine.outlines if "::" in line) == [
        "test_a_shared_runner", "test_a_shared_runner_through_a_fixture", "test_in_a_module_with_engines_of_its_own"]


def test_each_lane_runs_its_own_modules(pytester):
    lane_suite(pytester)

    def collected(name: str) -> list[str]:
        result = pytester.runpytest("--lane", name, "--collect-only", "-q", "-p", "no:cacheprovider")
        return sorted(line.split("::")[-1] for line in result.outlines if "::" in line)

    assert collected("own") == ["test_in_a_module_with_engines_of_its_own"]
    assert collected("shared") == ["test_a_shared_runner", "test_a_shared_runner_through_a_fixture", "test_pure"]


def test_under_xdist_a_test_that_needs_an_engine_is_refused(pytester, monkeypatch):
    """make test-fast runs on pytest-xdist's workers; each would start a runner pool of its own, so a module with a
    test that needs an engine fails there, before a runner is asked for, saying to run it without -n."""
    lane_suite(pytester)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the workers start in seconds, not tens of seconds
    whole = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "-p", "no:cacheprovider")
    whole.assert_outcomes(errors=4)
    refused = [line for line in whole.outlines if line.startswith("E ") and "Failed: " in line]
    assert len(refused) == 4 and all("Failed: a test that needs an engine runs in one process" in line
                                     for line in refused), whole.outlines


def test_what_the_fast_lane_leaves_uncollected_needs_an_engine(request):
    """The fast lane does not collect a real_engine folder (tests/support/fast_lane.py): every test there needs an
    engine. Checked where they are collected (make test, or a run of that folder)."""
    left_out = [item for item in request.session.items if engine_only_folder(item.path)]
    assert [item.nodeid for item in left_out if not needs_engine(item)] == []
