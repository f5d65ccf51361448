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
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, wait_for
from edge_support import make_certificate
from smtpwire import assert_reply, make_message

DASHBOARDS = REPO / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
JOB = "smtpgw"  # the job name alerts.yml expects
SIZE_LIMIT = 10_000
MAX_CONNECTIONS = 2
# Grafana's built-in variables, set as Grafana would for a short range and 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}

pytestmark = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="prometheus/promtool not installed (Debian package `prometheus`; scripts/test.sh installs it)",
)


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


LISTENING_ON = re.compile(r'msg="Listening on" address=(127\.0\.0\.1:\d+)')


class Prometheus:
    """A `prometheus` process on loopback port 0 (the port is read back from its log)
    with its own config and storage."""

    def __init__(self, workdir: Path, metrics_addr: str):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [metrics_addr]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = "http://" + wait_for("prometheus's 'Listening on' log line", self.listening)
        wait_for("prometheus /-/ready", self.ready)

    def listening(self) -> str | None:
        assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()}"
        match = LISTENING_ON.search(self.log_path.read_text(errors="replace"))
        return match.group(1) if match else None

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

    def query(self, expr: str, at: float | None = None) -> dict:
        if at is None:
            return self.api("query", query=expr)
        return self.api("query", query=expr, time=repr(at))

    def vector(self, expr: str, at: float) -> dict[tuple, float]:
        """The result at time `at` as {sorted label pairs without instance/job: value}."""
        response = self.query(expr, at)
        assert response["status"] == "success", f"{expr}: {response.get('error')}"
        result = response["data"]["result"]
        if response["data"]["resultType"] == "scalar":
            return {(): float(result[1])}
        return {
            tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("instance", "job", "__name__"))): float(
                r["value"][1]
            )
            for r in result
        }

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
    # A certificate, so the TLS panels' expiry has its series (the handshake counters
    # exist at 0 from the start).
    cert, key = make_certificate(tmp_path)
    gateway = start_gateway(
        "--max-message-size", str(SIZE_LIMIT), "--max-connections", str(MAX_CONNECTIONS),
        "--hostname", "mx.test", "--tls-cert", str(cert), "--tls-key", str(key),
    )
    instance = metrics_addr(gateway)
    prometheus = Prometheus(tmp_path, instance)
    try:
        # A first scrape before any traffic, so every counter's series starts at 0 and
        # increases over the test's range are exact.
        wait_for(
            f"a first scrape of {instance}",
            lambda: prometheus.value(f'sum(smtpgw_replies_total{{job="{JOB}"}})') == 0,
        )
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


# --- values, not only shapes ---------------------------------------------------------
#
# send_traffic() and over_the_limit() say exactly what happened, so the key panels and
# the alert expressions must show exactly that. Every counter is exported at 0 before the
# traffic and the first scrape precedes it (see scraped_gateway), so an increase over a
# range that covers the whole test, evaluated at the time of a scrape taken after all
# counters settled, is exact: Prometheus extrapolates neither end then. A query on the
# wrong series or label gives 0 or nothing, and fails here.

# Replies: a session (220, EHLO 250), 3 messages delivered (MAIL, RCPT, 250 each, a
# 354), MAIL 250, RCPT 550 (relay), RCPT 250, 354, 552 (over size), MAIL 250, RCPT 250,
# 354, 550 (smuggling); 2 held sessions (220, EHLO 250 each) and one refused (421).
REPLIES = {"220": 3, "250": 16, "354": 5, "550": 2, "552": 1, "421": 1}
COMMANDS = {"EHLO": 3, "MAIL": 5, "RCPT": 6, "DATA": 5}
TOTAL_REPLIES = sum(REPLIES.values())
RANGE = "5m"


def exact(expr: str) -> str:
    """A panel's expression with its rate over the Grafana interval turned into the
    increase over the whole test."""
    return expr.replace("rate(", "increase(").replace("$__rate_interval", RANGE).replace("$__range", RANGE)


def settled_scrape_time(prometheus, instance: str) -> float:
    """The time of a scrape that saw every count of the scripted traffic."""
    sel = f'{{job="{JOB}", instance="{instance}"}}'

    def settled():
        replies = prometheus.value(f"sum(smtpgw_replies_total{sel})")
        active = prometheus.value(f"sum(smtpgw_connections_active{sel})")
        rejected = prometheus.value(f"sum(smtpgw_connections_rejected_total{sel})")
        if (replies, active, rejected) == (TOTAL_REPLIES, 0, 1):
            return prometheus.value(f"timestamp(smtpgw_connections_active{sel})")
        return None

    return wait_for(f"{TOTAL_REPLIES} replies, no active and 1 refused connection in a scrape", settled)


def panel(board: str, title: str, metric: str) -> str:
    """The expression of the target of `title` on `board` that reads `metric`."""
    matches = [e for b, t, e in dashboard_targets() if b == board and t == title and metric in e]
    assert len(matches) == 1, f"{board} / {title} / {metric}: {matches}"
    return matches[0]


def by(label: str, vector: dict[tuple, float]) -> dict[str, float]:
    """{label value: value} for the entries with a non-zero value."""
    return {dict(k)[label]: v for k, v in vector.items() if v != 0}


def only(vector: dict[tuple, float]) -> float:
    assert len(vector) == 1, vector
    return next(iter(vector.values()))


def test_key_panels_show_the_values_of_the_traffic(scraped_gateway, io_backend):
    prometheus, instance = scraped_gateway
    at = settled_scrape_time(prometheus, instance)

    def value_of(board: str, title: str, metric: str) -> dict[tuple, float]:
        return prometheus.vector(exact(substitute(panel(board, title, metric), instance)), at)

    node, overview = "smtpgw-node.json", "smtpgw-overview.json"
    assert only(value_of(node, "Up", "up{")) == 1
    assert only(value_of(node, "Sink up", "smtpgw_sink_up")) == 1
    assert only(value_of(node, "Draining", "smtpgw_draining")) == 0
    assert only(value_of(node, "Open connections", "smtpgw_connections_active")) == 0
    assert by("backend", value_of(node, "I/O backend", "smtpgw_io_backend_info")) == {io_backend: 1}
    assert by("code", value_of(node, "Replies by code", "smtpgw_replies_total")) == REPLIES
    commands = by("verb", value_of(node, "Commands by verb", "smtpgw_commands_total"))
    assert {verb: commands.get(verb) for verb in COMMANDS} == COMMANDS
    assert only(value_of(node, "Messages", "smtpgw_messages_accepted_total")) == 3
    assert by("reason", value_of(node, "Messages", "smtpgw_messages_rejected_total")) == {
        "too_large": 1,
        "bare_line_ending": 1,
    }

    # The overview counts nodes down (0 here) and lists each node's `up` (1).
    assert only(value_of(overview, "Nodes down", "count(up")) == 0
    assert only(value_of(overview, "Nodes", "max by (instance) (up")) == 1
    assert only(value_of(overview, "Messages accepted / s", "smtpgw_messages_accepted_total")) == 3
    assert only(value_of(overview, "Smuggling attempts", "smtpgw_smuggling_attempts_total")) == 1
    assert only(value_of(overview, "Sink down (nodes)", "smtpgw_sink_up")) == 0
    assert only(value_of(overview, "Sink up by node", "smtpgw_sink_up")) == 1
    assert only(value_of(overview, "Draining (nodes)", "smtpgw_draining")) == 0
    shares = by("class", value_of(overview, "Reply classes (share of all replies)", "smtpgw_replies_total"))
    assert shares == pytest.approx({"2xx": 19 / 28, "3xx": 5 / 28, "4xx": 1 / 28, "5xx": 3 / 28}), shares
    connections = "Connections accepted and refused / s"
    assert only(value_of(overview, connections, "smtpgw_connections_accepted_total")) == 3
    assert by("reason", value_of(overview, connections, "smtpgw_connections_rejected_total")) == {
        "max_connections": 1
    }
    accepted_bytes = sum(len(make_message(f"dash-{i}")) for i in range(3))
    assert only(value_of(overview, "Accepted bytes", "smtpgw_message_size_bytes_sum")) == accepted_bytes
    p99 = only(value_of(overview, "Publish latency", "histogram_quantile(0.99"))
    assert 0 < p99 < 1, f"publish p99 {p99}s for 3 spool writes"


def without_threshold(expr: str) -> str:
    """An alert expression less its final comparison (`... > 0.05`, `... == 0`)."""
    stripped = re.sub(r"\s*(>|==|<|!=|>=|<=)\s*[0-9.]+\s*$", "", expr.strip())
    assert stripped != expr.strip(), f"no threshold found in {expr!r}"
    return stripped


def test_alert_expressions_have_the_values_of_the_traffic(scraped_gateway):
    prometheus, instance = scraped_gateway
    at = settled_scrape_time(prometheus, instance)
    rules = dict(alert_rules())
    want = {
        "SmtpgwDown": 1,  # up
        "SmtpgwSinkDown": 1,  # smtpgw_sink_up
        "SmtpgwDrainStuck": 0,  # smtpgw_draining
        "SmtpgwHigh5xxRatio": 3 / TOTAL_REPLIES,  # 550 relay, 552 size, 550 smuggling
        "SmtpgwSmugglingSpike": 1,
        # Exported at 0 by a gateway without --spool-fallback: nothing waits to be forwarded.
        "SmtpgwForwardBacklogOld": 0,
        # Likewise: a spool sink has no fallback in use.
        "SmtpgwFallbackActive": 0,
        # Likewise: exported at 0 without a Kafka sink.
        "SmtpgwKafkaTopicTooSmall": 0,
    }
    # Not checked for a value here (their promtool unit tests in alerts_test.yml are):
    # the absence/no-traffic/saturation/queue rules came with the ops branch after this
    # test was written.
    otherwise = {
        "SmtpgwPublishLatencyHigh",
        "SmtpgwSpoolDiskLow",
        "SmtpgwSpoolBacklogOld",
        "SmtpgwAbsent",
        "SmtpgwNoTraffic",
        "SmtpgwConnectionSaturation",
        "SmtpgwKafkaQueueGrowing",
        # Now the share of transactions refused with 451 above a traffic floor: three
        # messages are below the floor, so it has no value on this traffic.
        "SmtpgwHigh4xxRatio",
        # Checked below: the fixture's certificate is valid for two days, so it fires.
        "SmtpgwTlsCertificateExpiring",
    }
    assert set(want) | otherwise == set(rules), "an alert without a value check"
    expiring = rules["SmtpgwTlsCertificateExpiring"]
    left = only(prometheus.vector(without_threshold(expiring), at))
    assert 1.9 * 86400 < left <= 2 * 86400, left
    assert prometheus.vector(expiring, at) != {}, "a two-day certificate is within the 14 days"
    for name, value in want.items():
        got = prometheus.vector(without_threshold(rules[name]), at)
        assert len(got) == 1, f"{name}: {without_threshold(rules[name])} gave {got}"
        assert only(got) == pytest.approx(value), f"{name}: {got}"
        # None of them fires on this traffic.
        assert prometheus.vector(rules[name], at) == {}, f"{name} fires on ordinary traffic"
    p99 = only(prometheus.vector(without_threshold(rules["SmtpgwPublishLatencyHigh"]), at))
    assert 0 < p99 < 1, p99
    assert prometheus.vector(rules["SmtpgwPublishLatencyHigh"], at) == {}
    # The spool alerts' inputs: the 3 accepted messages are in a segment, stored
    # within this test, on a file system with room.
    sel = f'{{job="{JOB}"}}'
    assert only(prometheus.vector(f"smtpgw_spool_segments{sel}", at)) >= 1
    free = only(prometheus.vector(f"smtpgw_spool_filesystem_free_bytes{sel}", at))
    assert free > 0
    age = only(prometheus.vector(f"smtpgw_spool_oldest_record_age_seconds{sel}", at))
    assert 0 <= age < 300, age
    assert prometheus.vector(rules["SmtpgwSpoolBacklogOld"], at) == {}
    # The disk alert fires exactly when the spool's file system has under 2 GiB free.
    disk_low = prometheus.vector(rules["SmtpgwSpoolDiskLow"], at)
    assert (disk_low != {}) == (free < 2 * 1024**3), (free, disk_low)
