"""``make test``: the whole suite, in one pytest process, or with TEST_LANES=2 in two side by side, within one
budget of MAX_ENGINES engines.

    TEST_LANES=2 python -m tests.lanes [pytest arguments]

Lane "own" runs the modules that start engines of their own; lane "shared" the
others: the modules that need no engine first, then those of the shared
runners (tests/support/runners.py, ``lane_of``). Both get the same arguments,
so ``-k`` and file arguments select in each. One pytest process leaves about
a third of two cores idle (many tests wait on timeouts); two are meant to use
it. Together they keep at most MAX_ENGINES engines alive: each takes a slot of the run's
(tests/support/engine_slots.py, ENGINE_SLOTS_DIR set here) before it starts one.

Each lane's lines stream as they come, prefixed with its name; at the end, each
lane's summary, then the footprint of both lanes together: the peak RSS of their
process trees and the most vLLM engines alive at once, which fails the run above
MAX_ENGINES. The run fails if either lane fails; a lane whose tests were all
deselected (exit code 5) fails it only if the other ran none either.

One process is the default: measured once on the 2-core machine while other
work kept it busy, the two lanes took longer than one process, and a quiet
machine's figure is still to take. With three engines in all and most modules
of the shared runners using three, a module of three engines of its own runs
only beside the modules that need no engine or after the shared lane's last
module, and the own lane's later modules wait behind it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.engine_slots import SLOTS_DIR_VARIABLE
from tests.support.runners import LANES, MAX_ENGINES, SuiteFootprint

LANES_VARIABLE = "TEST_LANES"
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED, without importing pytest here
SUMMARY_START = "suite footprint:"  # the first line of a lane's own summary (tests/conftest.py)


def run_code(codes: dict[str, int], peak_engines: int) -> int:
    """The run's exit code from each lane's: the first failure's; 5 only if no lane ran a test."""
    if peak_engines > MAX_ENGINES:
        return 1
    failed = [code for code in codes.values() if code not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(code == NO_TESTS for code in codes.values()) else 0


def summary(lines: list[str]) -> list[str]:
    """A lane's summary: its lines from its footprint on (timings, short test summary, counts), else its last ones."""
    starts = [index for index, line in enumerate(lines) if line.startswith(SUMMARY_START)]
    return lines[starts[-1]:] if starts else lines[-15:]


class Lane:
    """One pytest process of the run, its output streamed with its name before each line."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], basetemp: Path | None, width: int) -> None:
        self.name = name
        self.prefix = f"{name:<{width}} | "
        self.lines: list[str] = []
        command = [sys.executable, "-m", "pytest", "--lane", name, *args]
        if basetemp is not None:  # each lane its own: pytest clears a basetemp as it starts
            command.append(f"--basetemp={basetemp / name}")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace", bufsize=1)
        self.reader = threading.Thread(target=self.read, daemon=True, name=f"lane-{name}")
        self.reader.start()
        self.seconds = 0.0

    def read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            print(self.prefix + line, flush=True)
        self.seconds = time.monotonic() - self.started  # its output ends as it exits, whichever lane is waited first

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join()
        return code


def main(args: list[str]) -> int:
    if os.environ.get(LANES_VARIABLE, "1") != "2":
        return subprocess.call([sys.executable, "-m", "pytest", *args])
    if sys.stdout.isatty() and not any(arg.startswith("--color") for arg in args):
        args = ["--color=yes", *args]
    with tempfile.TemporaryDirectory(prefix="test-lanes-") as work:
        env = {**os.environ, SLOTS_DIR_VARIABLE: str(Path(work) / "engine-slots")}
        basetemp = None if any(arg.startswith("--basetemp") for arg in args) else Path(work)
        footprint = SuiteFootprint()  # this process's tree: both lanes
        width = max(map(len, LANES))
        lanes = [Lane(name, args, env, basetemp, width) for name in LANES]
        try:
            codes = {lane.name: lane.wait() for lane in lanes}
        except KeyboardInterrupt:  # the lanes got the same SIGINT: let them end and say what they ran
            codes = {lane.name: lane.wait() for lane in lanes}
        footprint.stopped.set()
    for lane in lanes:
        print(f"\n===== lane {lane.name}: exit code {codes[lane.name]}, {lane.seconds:.0f} s =====")
        for line in summary(lane.lines):
            print(lane.prefix + line)
    print(f"\nlanes footprint: peak RSS of both lanes' process trees {footprint.peak_rss / 1024**3:.2f} GiB, at most "
          f"{footprint.peak_engines} vLLM engines alive at once (limit {MAX_ENGINES}); "
          + ", ".join(f"lane {lane.name} {lane.seconds:.0f} s" for lane in lanes))
    if footprint.peak_engines > MAX_ENGINES:
        print(f"more than {MAX_ENGINES} vLLM engines were alive at once: the lanes' engine slots did not hold "
              f"(tests/support/engine_slots.py)")
    return run_code(codes, footprint.peak_engines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
