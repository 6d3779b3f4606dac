"""The suite's own plan for its engines (tests/support/runners.py): the module order and the runner pool.

A collection shaped like the suite's own, with modules that use the shared
runners, modules with engines of their own and a module that ends a shared
runner, run through the order and then through a pool whose runners are
stand-ins: each shared runner starts once, never more than MAX_ENGINES
engines are alive, and the module that ends a runner comes after its other users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from tests.support.fast_lane import engine_only_folder
from tests.support.runner_process import ROOT
from tests.support.runners import (
    MAX_ENGINES,
    ModuleNeeds,
    RunnerPool,
    by_module,
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


class StandIn:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class CountingPool(RunnerPool):
    """The suite's pool with stand-in runners: what it starts and stops, and the most engines alive."""

    def __init__(self) -> None:
        super().__init__({}, logs=None)
        self.peak = 0

    def usable(self, runner: StandIn) -> bool:
        return not runner.stopped

    def start(self, name: str) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        self.alive[name] = StandIn()

    def run(self, items: list[Item]) -> list[str]:
        """Each module as conftest's module_runners prepares it; the modules in the order they ran."""
        modules = by_module(items)
        self.alive_before = {}  # module -> the runners alive as its first test begins
        for module, module_items in modules.items():
            need = ModuleNeeds.of(module_items)
            upcoming = upcoming_runners(items, module)
            if need.engines or upcoming:
                self.prepare_module(need, upcoming)
            self.alive_before[module] = {name for name, runner in self.alive.items() if not runner.stopped}
            self.peak = max(self.peak, len(self.alive) + need.own_engines)
            for name in need.ends:
                self.alive[name].stop()
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


# The fast lane: pytest's own -m selection over a small suite that uses tests/conftest.py's hooks and fixtures, with a
# runner pool that fails the test asking for it. Only the test that needs no engine runs, and no runner is asked for.
LANE_CONFTEST = """
import pytest

from tests.conftest import (
    default_runner,
    module_runners,
    one_process,
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
