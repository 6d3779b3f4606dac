"""docker/monitoring: the Grafana dashboard asks only for what a live runner exposes.

Every query of docker/monitoring/dashboard.json is read for the series it selects and the
labels it matches, and each is looked up in the guarded runner's /metrics after traffic that
fills every panel (a served request and a 503 from the admission bound). Where Debian's
Prometheus is installed (.ci/run installs it), a real Prometheus scrapes that runner with
docker/monitoring/prometheus.yml and evaluates every query: each must parse and return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import (
    QUESTION,
    UNFINISHED,
    hold_stream,
    metric,
    wait_for_metric,
)
from tests.support.runner_process import ROOT, RunnerProcess, free_port, get_json
from tests.support.runners import GUARDED_AUTH_TOKEN, GUARDED_MAX_IN_FLIGHT

MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
COMPOSE = ROOT / "docker" / "compose.monitoring.yaml"
# Labels Prometheus adds to every series it scrapes: never on /metrics itself.
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
# What the dashboard must show (issue #15): requests and outcomes, 503s, latency quantiles,
# in-flight and waiting, tokens per second, KV-cache use, prefix-cache hit rate.
REQUIRED_SERIES = {
    "livepeer_runner_requests_total",
    "livepeer_runner_time_to_first_token_seconds_bucket",
    "livepeer_runner_time_per_output_token_seconds_bucket",
    "livepeer_runner_requests_in_flight",
    "livepeer_runner_engine_requests_waiting",
    "livepeer_runner_completion_tokens_total",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
}


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and of the query variables."""
    found = [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The series a PromQL expression selects: (metric name, [(label, operator, value)])."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # label lists, not series
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range durations
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())  # Grafana's variable query
    found = []
    for match in re.finditer(r'(?<![\w:])([A-Za-z_:][\w:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()', expr):
        name, braces = match.group(1), match.group(2) or ""
        if name in PROMQL_WORDS:
            continue
        matchers = re.findall(r'([A-Za-z_]\w*)\s*(=~|!=|!~|=)\s*"([^"]*)"', braces)
        found.append((name, matchers))
    return found


def prometheus_query(expr: str) -> str:
    """The query as Grafana sends it with every runner chosen."""
    return expr.replace("$__rate_interval", "1m").replace('=~"$instance"', '=~".*"')


def test_selectors_are_read_as_prometheus_reads_them():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{instance=~"$instance", code="503"}[$__rate_interval])))'
            ' / sum(b:c_total) or on (job) max(d)')
    assert selectors(expr) == [("a_bucket", [("instance", "=~", "$instance"), ("code", "=", "503")]),
                               ("b:c_total", []), ("d", [])]
    assert selectors("label_values(livepeer_runner_info, instance)") == [("livepeer_runner_info", [])]


def test_the_dashboard_covers_what_operators_watch():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${datasource}", "panels use the dashboard's data source variable"
    named = {name for _, expr in queries(dashboard) for name, _ in selectors(expr)}
    assert REQUIRED_SERIES <= named, f"missing: {sorted(REQUIRED_SERIES - named)}"
    admission = [expr for title, expr in queries(dashboard) if "503" in title]
    assert admission and all('code="503"' in expr for expr in admission)


def test_the_scrape_example_and_compose_file_fit_together():
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["runner:8000"]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose["services"]) == {"runner", "prometheus", "grafana"}
    mounted = [volume.split(":")[0] for service in compose["services"].values() for volume in service.get("volumes", [])]
    for source in mounted:
        assert (COMPOSE.parent / source).exists(), f"compose mounts {source}, which is not in the repository"
    assert "./monitoring/dashboard.json" in mounted


@pytest.fixture(scope="module")
async def exposed(guarded_runner: RunnerProcess) -> dict[str, list[dict[str, str]]]:
    """The guarded runner's /metrics after a served request and a 503: sample name -> label sets."""
    headers = {"Authorization": f"Bearer {GUARDED_AUTH_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as http:
        await wait_for_metric(http, guarded_runner, "livepeer_runner_requests_in_flight", 0, within=15)
        async with http.post(f"{guarded_runner.url}/llm", json={"messages": QUESTION, "max_tokens": 4}) as response:
            assert response.status == 200
        holders = [asyncio.create_task(hold_stream(http, guarded_runner)) for _ in range(GUARDED_MAX_IN_FLIGHT)]
        try:
            await wait_for_metric(http, guarded_runner, UNFINISHED, GUARDED_MAX_IN_FLIGHT, within=3)
            async with http.post(f"{guarded_runner.url}/llm", json={"messages": QUESTION, "max_tokens": 2}) as response:
                assert response.status == 503
        finally:
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        await wait_for_metric(http, guarded_runner, UNFINISHED, 0, within=5)
        assert await metric(http, guarded_runner, "livepeer_runner_requests_in_flight") == 0
        async with http.get(f"{guarded_runner.url}/metrics") as response:
            text = await response.text()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def test_every_query_names_series_and_labels_a_live_runner_exposes(exposed):
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in queries(dashboard):
        for name, matchers in selectors(expr):
            assert name in exposed, f"{title!r}: {name} is not on /metrics"
            for label, operator, value in matchers:
                if label in TARGET_LABELS:
                    continue
                values = {labels.get(label) for labels in exposed[name]} - {None}
                assert values, f"{title!r}: {name} has no label {label!r}"
                if operator == "=":
                    assert value in values, f"{title!r}: {name}{{{label}={value!r}}} matches nothing ({sorted(values)})"


def wait_for(condition, within: float, what: str):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} within {within} s")


@pytest.fixture
def prometheus(guarded_runner: RunnerProcess, exposed, tmp_path: Path):
    """Debian's Prometheus on loopback, scraping the guarded runner every second with the repository's scrape config."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed: apt-get install prometheus (.ci/run does)")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [guarded_runner.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def query(expr: str) -> dict:
        return get_json(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")

    def scraped() -> bool:
        try:
            result = query('count_over_time(up{job="livepeer-llm-runner"}[1m])')["data"]["result"]
        except OSError:
            return False
        return bool(result) and float(result[0]["value"][1]) >= 4

    try:
        wait_for(scraped, 60, "Prometheus did not scrape the runner four times")
        yield query
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_prometheus_evaluates_every_query_with_data(prometheus):
    assert prometheus('up{job="livepeer-llm-runner"}')["data"]["result"][0]["value"][1] == "1", "the scrape works"
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in queries(dashboard):
        if title.startswith("$"):  # label_values() is Grafana's, not PromQL: ask for the series it reads
            expr = " or ".join(name for name, _ in selectors(expr))
        answer = prometheus(prometheus_query(expr))
        assert answer["status"] == "success", f"{title!r}: {answer}"
        assert answer["data"]["result"], f"{title!r}: {expr} returns nothing"
