"""The suite's fixtures: the shared runners (tests/support/runners.py), the models, the footprint."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.engine_slots import EngineSlots
from tests.support.fast_lane import FastLane
from tests.support.runner_process import DEFAULT_MODEL_ID, ROOT, RUNNERS, RunnerProcess, orphans_of_ended_runners
from tests.support.runners import (
    ENGINE_MARKER,
    MAX_ENGINES,
    ModuleNeeds,
    LANES,
    RunnerPool,
    SuiteFootprint,
    by_module,
    SuiteTimes,
    later_runners,
    lane_of,
    module_order,
    needs_engine,
    ready,
    runner_specs,
    upcoming_runners,
)
from tests.support.tiny_model import build_tiny_llama

pytest_plugins = ("pytester",)  # tests/test_suite_plan.py runs the fast lane's selection on a suite of its own


def pytest_addoption(parser) -> None:
    parser.addoption("--lane", choices=LANES, help="run only this lane's modules (tests/lanes.py runs both side by side: "
                                                   "'own', the modules with engines of their own; 'shared', the others)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "ends_runners(*names): the module stops or kills these shared runners")
    config.addinivalue_line("markers", f"{ENGINE_MARKER}: the test needs a real vLLM engine (set at collection from "
                                       "its runner fixtures and its module's own_engines; -m 'not engine' skips them)")
    config.pluginmanager.register(FastLane(), "fast-lane")  # make test-fast's collection and xdist groups


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection, which reads the engine marker set here
def pytest_collection_modifyitems(session, config, items) -> None:
    """This lane's modules (``--lane``, tests/lanes.py), in the order that starts the fewest engines
    (tests/support/runners.py, module_order); each test that needs a real engine marked so."""
    if lane := config.getoption("lane", None):
        modules = by_module(items)
        mine = {module for module, module_items in modules.items() if lane_of(ModuleNeeds.of(module_items)) == lane}
        if others := [item for item in items if item.module not in mine]:
            config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item.module in mine]
    items[:] = module_order(items)
    for item in items:
        if needs_engine(item):
            item.add_marker(ENGINE_MARKER)


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


XDIST_ENGINES = ("a test that needs an engine runs in one process, whose runner pool keeps MAX_ENGINES for the machine "
                 "(tests/support/runners.py): run it without -n; pytest-xdist is for the fast lane (-m 'not engine')")


@pytest.fixture(scope="session")
def one_process(request) -> None:
    """Not a pytest-xdist worker: each would start a runner pool of its own."""
    if hasattr(request.config, "workerinput"):
        pytest.fail(XDIST_ENGINES)


@pytest.fixture(scope="session")
def engine_slots() -> EngineSlots:
    """The run's MAX_ENGINES engine slots: shared with the other lane under tests/lanes.py, this process's own else."""
    return EngineSlots.for_run(MAX_ENGINES)


@pytest.fixture(scope="session")
def runner_pool(one_process, tiny_model_dir, model_store, tmp_path_factory, engine_slots, request) -> Iterator[RunnerPool]:
    # The lane of the modules with engines of their own never waits for slots while it holds some: the other may.
    pool = RunnerPool(runner_specs(tiny_model_dir, model_store), tmp_path_factory.mktemp("runner-logs"), engine_slots,
                      hold_while_waiting=request.config.getoption("lane", None) != "own")
    POOLS.append(pool)
    yield pool
    pool.stop_all()
    orphans = orphans_of_ended_runners()
    assert not orphans, "the shared runners left processes behind:\n" + "\n".join(orphans)


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    """After every test: no runner that has exited (stopped, killed, crashed) left a process of its own running."""
    yield
    orphans = orphans_of_ended_runners()
    assert not orphans, "processes outlived their runner:\n" + "\n".join(orphans)


@pytest.fixture(scope="module", autouse=True)
def module_runners(request) -> Iterator[None]:
    """Start the shared runners this module's tests use, and take the slots of its own engines, before its first
    test, within MAX_ENGINES; give those slots back after its last.

    A module with no engine of its own also has the next module's runners started behind its tests; so the
    modules that need no engine (they run first) have the first engine module's runners start behind theirs.
    """
    items = request.session.items
    need = ModuleNeeds.of([item for item in items if item.module is request.module])
    if hasattr(request.config, "workerinput"):  # a pytest-xdist worker: no runner pool
        if need.engines:
            request.getfixturevalue("one_process")
        yield
        return
    upcoming, later = upcoming_runners(items, request.module), later_runners(items, request.module)
    own: list[int] = []
    if need.engines:
        own = request.getfixturevalue("runner_pool").prepare_module(need, upcoming, later)
    elif upcoming:
        with contextlib.suppress(pytest.fail.Exception):  # no model store: the engine tests say so, not these
            request.getfixturevalue("runner_pool").prepare_module(need, upcoming, later)
    yield
    EngineSlots.release(own)


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
def guarded_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("guarded"))


@pytest.fixture(scope="module")
def drained_runner(runner_pool) -> RunnerProcess:
    return ready(runner_pool.get("drained"))


POOLS: list[RunnerPool] = []  # the session's runner pool, once started
FOOTPRINT = SuiteFootprint()
TIMES = SuiteTimes()
UNMARKED_ENGINES = ("{} vLLM engine(s) started in a session whose tests need none (-m 'not engine', make test-fast): "
                    "a test starts one without a runner fixture or an own_engines marker (tests/support/runners.py)")


def pytest_runtest_logreport(report) -> None:
    TIMES.add(report)


def pytest_sessionfinish(session) -> None:
    """A session of tests that need no engine fails if an engine started anyway: the fast lane stays fast."""
    FOOTPRINT.stopped.set()
    if FOOTPRINT.peak_engines and not any(map(needs_engine, getattr(session, "items", []))):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        FOOTPRINT.unexpected_engines = FOOTPRINT.peak_engines


def pytest_terminal_summary(terminalreporter) -> None:
    FOOTPRINT.stopped.set()
    terminalreporter.write_line(
        f"suite footprint: peak RSS of the process tree {FOOTPRINT.peak_rss / 1024**3:.2f} GiB, "
        f"at most {FOOTPRINT.peak_engines} vLLM engines alive at once (limit {MAX_ENGINES})"
    )
    for line in TIMES.lines(RUNNERS):
        terminalreporter.write_line(line)
    if waits := [seconds for pool in POOLS for seconds in pool.waits]:  # for slots the other lane held (tests/lanes.py)
        terminalreporter.write_line(f"engine slots: waited {len(waits)} times, {sum(waits):.0f} s in all, the longest "
                                    f"{max(waits):.0f} s")
    if FOOTPRINT.unexpected_engines:
        terminalreporter.write_line(UNMARKED_ENGINES.format(FOOTPRINT.unexpected_engines), red=True)
