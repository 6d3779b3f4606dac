"""What the fast lane (make test-fast: ``-m "not engine"``, pytest-xdist workers) leaves out or keeps together.

Each xdist worker collects every module, so what a module imports or generates
at collection, each worker pays, whether or not it runs a test of it:

- Importing vLLM takes a CPU core 10 to 15 s. A test that imports it (vLLM's own
  parsers, its configuration) carries ``IMPORTS_VLLM`` and imports it itself, in
  the test or its fixture, never at a module's top. Under ``--dist loadgroup``
  these tests go to one worker, which alone pays the import, and every other test
  goes with its module's, as under ``--dist loadfile`` (``FastLane``).
- The tests of a ``real_engine`` folder all need a real engine; in the fast lane
  they are not collected at all (tests/test_suite_plan.py checks, in a run that
  collects them, that each is marked ``engine``).
- A test function that names a shared runner's fixture needs an engine: in the
  fast lane pytest makes no items of it (schemathesis would generate test cases
  for tests/runner/test_fuzz.py's at collection, 6 s).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from _pytest.nodeid import coerce_node_id

from tests.support.runners import RUNNER_FIXTURES

IMPORTS_VLLM = pytest.mark.xdist_group("vllm")
FAST_LANE = "not engine"  # the fast lane's -m
ENGINE_ONLY_FOLDER = "real_engine"


def in_fast_lane(config: pytest.Config) -> bool:
    return config.getoption("markexpr") == FAST_LANE


def engine_only_folder(path: Path) -> bool:
    return ENGINE_ONLY_FOLDER in path.parts


def names_a_runner(function: object) -> bool:
    """A test function with a shared runner's fixture among its own arguments."""
    try:
        return bool(RUNNER_FIXTURES.keys() & inspect.signature(function).parameters.keys())
    except (TypeError, ValueError):
        return False


class FastLane:
    """The fast lane's collection and scheduling (tests/conftest.py registers it)."""

    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        return True if in_fast_lane(config) and engine_only_folder(collection_path) else None

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # around schemathesis's, which makes a collector of its own tests
    def pytest_pycollect_makeitem(self, collector, name: str, obj: object):
        made = yield
        return [] if in_fast_lane(collector.config) and collector.funcnamefilter(name) and names_a_runner(obj) else made

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """A grouped test's id ends in ``@group``, as pytest-xdist's loadgroup means it to: xdist 3.8 sets the id's
        old attribute, which pytest 9.2 no longer reads, so it does nothing."""
        if not getattr(config.option, "loadgroup", False):  # set on a worker of a --dist loadgroup run
            return
        for item in items:
            if (mark := item.get_closest_marker("xdist_group")) and "@" not in item.nodeid:
                item._id = coerce_node_id(f"{item.nodeid}@{mark.args[0]}")

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        """loadgroup: a grouped test runs with its group, every other one with its module's (not one by one)."""
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling

        class GroupOrFile(LoadGroupScheduling):
            def _split_scope(self, nodeid: str) -> str:
                grouped = nodeid.rfind("@") > nodeid.rfind("]")
                return nodeid.rsplit("@", 1)[-1] if grouped else nodeid.split("::", 1)[0]

        return GroupOrFile(config, log)
