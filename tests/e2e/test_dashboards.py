"""The Grafana dashboards and alert rules in dashboards/ against a real Prometheus.

A real `prometheus` scrapes a real gateway's --metrics-listen endpoint every second while mail goes through it
(accepted messages, a relay refusal, an over-size message, a smuggling attempt and a
connection over --max-connections). Then every PromQL expression of every dashboard
panel and every alert rule goes through `/api/v1/query`: each must parse, and every
panel target must return data (the gateway exports its labelled counters at 0 for every
known label value, so a target without data means a metric or label the gateway lacks). The rules are also loaded into that Prometheus, checked with
`promtool check rules` and unit-tested with `promtool test rules`.

Needs `prometheus` and `promtool` (Debian package `prometheus`; scripts/test.sh installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from smtpwire import assert_reply, make_message

DASHBOARDS = REPO / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
JOB = "smtpgw"  # the job name alerts.yml expects
SIZE_LIMIT = 10_000
MAX_CONNECTIONS = 2
WAIT_TIMEOUT = 30.0
# Grafana's built-in variables, set as Grafana would for a short range and 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}

pytestmark = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="prometheus/promtool not installed (Debian package `prometheus`; scripts/test.sh installs it)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float = WAIT_TIMEOUT):
    """Polls `check()` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# --- expressions from the dashboards and rules ---------------------------------------


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every panel."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def alert_rules() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def substitute(expr: str, instance: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    expr = expr.replace("$job", JOB)
    # `$instance` is an exact label value (node) or a regex (overview), which Grafana
    # escapes the way PromQL strings want it: a backslash in the regex is `\\` in the string.
    regex = re.escape(instance).replace("\\", "\\\\")
    expr = expr.replace('instance=~"$instance"', f'instance=~"{regex}"')
    return expr.replace("$instance", instance)


def test_dashboards_are_generated_from_generate_py():
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"checked-in dashboards differ from a fresh generation: {result.stderr}"


def test_dashboards_are_current_grafana_json():
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        assert board["schemaVersion"] >= 36, path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", path.name
        assert variables["instance"]["type"] == "query", path.name
        for panel in board["panels"]:
            assert panel["type"] in {"timeseries", "stat", "table"}, (path.name, panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], (path.name, panel["title"])


# --- promtool --------------------------------------------------------------------------


def promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], cwd=DASHBOARDS, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_rules():
    promtool("check", "rules", ALERTS.name)


def test_promtool_test_rules():
    promtool("test", "rules", "alerts_test.yml")


# --- a real Prometheus scraping a real gateway -----------------------------------------


class Prometheus:
    """A `prometheus` process on a free loopback port with its own config and storage."""

    def __init__(self, workdir: Path, metrics_addr: str):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [metrics_addr]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for("prometheus /-/ready", self.ready)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # 400/422 for a bad expression, with a JSON body
            return json.load(error)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:  # our unreaped child: its PID is still ours
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def metrics_addr(gateway) -> str:
    """The `metrics_addr=` the gateway logs (conftest starts it with --metrics-listen 127.0.0.1:0)."""
    return wait_for("the gateway's metrics_addr= log line", lambda: gateway.metrics_addr, timeout=10)


def send_traffic(gateway) -> int:
    """Mail that moves every family of counters; returns the number of accepted messages."""
    accepted = 3
    with gateway.session() as wire:
        for i in range(accepted):
            wire.deliver(make_message(f"dash-{i}"))
        assert_reply(wire.cmd("MAIL FROM:<sender@b.example>"), "250")
        assert_reply(wire.cmd("RCPT TO:<someone@elsewhere.example>"), "550", "relay refusal")
        assert_reply(wire.cmd("RCPT TO:<x@example.com>"), "250")
        assert_reply(wire.data(make_message("big", b"x" * 2 * SIZE_LIMIT + b"\r\n")), "552", "over-size message")
        wire.envelope()
        wire.expect("DATA", "354")
        wire.send(make_message("smuggled")[:-2] + b"\n.\r\nNOOP\r\n.\r\n")
        assert_reply(wire.reply(), "550", "smuggling attempt")
    return accepted


def over_the_limit(gateway) -> None:
    """Holds --max-connections sessions open and has one more refused with 421."""
    sessions = [gateway.session() for _ in range(MAX_CONNECTIONS)]
    try:
        with gateway.wire() as extra:
            assert_reply(extra.reply(), "421", "connection over --max-connections")
    finally:
        for wire in sessions:
            wire.close()


@pytest.fixture
def scraped_gateway(start_gateway, tmp_path):
    """A gateway that has served mail and a Prometheus that has scraped it several times."""
    gateway = start_gateway("--max-message-size", str(SIZE_LIMIT), "--max-connections", str(MAX_CONNECTIONS))
    instance = metrics_addr(gateway)
    prometheus = Prometheus(tmp_path, instance)
    try:
        sent = send_traffic(gateway)
        over_the_limit(gateway)
        wait_for(
            f"{sent} accepted messages and 5 scrapes of {instance} in Prometheus",
            lambda: prometheus.value("sum(smtpgw_messages_accepted_total)") == sent
            and (prometheus.value(f'count_over_time(up{{job="{JOB}"}}[1m])') or 0) >= 5,
        )
        yield prometheus, instance
    finally:
        prometheus.stop()


def test_every_dashboard_and_alert_query_runs_on_real_data(scraped_gateway):
    prometheus, instance = scraped_gateway
    failures = []
    for board, panel, expr in dashboard_targets():
        query = substitute(expr, instance)
        response = prometheus.query(query)
        if response["status"] != "success":
            failures.append(f"{board} / {panel}: {query}: {response.get('error')}")
        elif not response["data"]["result"]:
            failures.append(f"{board} / {panel}: no data: {query}")
    for name, expr in alert_rules():
        response = prometheus.query(expr)
        if response["status"] != "success":
            failures.append(f"alert {name}: {expr}: {response.get('error')}")
    assert not failures, "\n".join(failures)


def test_prometheus_loads_the_alert_rules(scraped_gateway):
    prometheus, _ = scraped_gateway
    groups = prometheus.api("rules", type="alert")["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {name for name, _ in alert_rules()}
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not unhealthy, unhealthy
