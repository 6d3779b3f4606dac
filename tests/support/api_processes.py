"""Helpers for tests of API_PROCESSES (runner/processes.py) on runner processes: which process answered, when
every process serves, a /metrics sample."""

from __future__ import annotations

import http.client
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.support.runner_process import RunnerProcess


def samples(text: bytes) -> dict[tuple, float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


def answered_by(runner: RunnerProcess, path: str = "/llm", count: int = 40) -> dict[str, int]:
    """Which process answered each of ``count`` calls, each on a connection of its own."""
    seen: dict[str, int] = {}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=10)
        if path == "/llm":
            connection.request("POST", path, body, {"Content-Type": "application/json"})
        else:
            connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200, (path, answer.status)
        process = answer.getheader("X-API-Process")
        seen[process] = seen.get(process, 0) + 1
        connection.close()
    return seen


def wait_serving(runner: RunnerProcess, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner.log_path.read_text().count('"event": "api_process.serving"') >= count - 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"not every API process serves:\n{runner.log_tail()}")


def metric(runner: RunnerProcess, name: str, **labels: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read()
    connection.close()
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)
