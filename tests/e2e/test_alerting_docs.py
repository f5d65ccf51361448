"""Static checks of the dashboards and alert rules that need no Prometheus: every query
is scoped by `$job`, every panel is described and has the right kind of stat panels, and
every alert links to a runbook section that exists in the repository."""

from __future__ import annotations

import json
import re

import yaml

from conftest import REPO

DASHBOARDS = REPO / "dashboards"
RUNBOOKS = REPO / "docs" / "runbooks.md"
# A vector selector: a metric name followed by `{...}` (functions and keywords are
# followed by `(`, so they never match).
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def panels():
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            yield path.name, panel


def test_every_selector_is_scoped_to_the_job_variable():
    unscoped = []
    for board, panel in panels():
        for target in panel["targets"]:
            selectors = SELECTOR.findall(target["expr"])
            assert selectors, (board, panel["title"], target["expr"])
            for metric, matchers in selectors:
                if 'job=~"$job"' not in matchers:
                    unscoped.append(f"{board} / {panel['title']}: {metric}{{{matchers}}}")
    assert not unscoped, "\n".join(unscoped)


def test_job_variable_feeds_the_instance_variable():
    for path in sorted(DASHBOARDS.glob("*.json")):
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        assert variables["job"]["type"] == "query", path.name
        assert "smtpgw_build_info" in json.dumps(variables["job"]["query"]), path.name
        assert 'job=~\\"$job\\"' in json.dumps(variables["instance"]["query"]), path.name


def test_every_panel_has_a_description_and_state_stats_are_coloured():
    for board, panel in panels():
        assert panel.get("description"), (board, panel["title"])
        if panel["type"] == "stat" and re.search(r"(?i)\b(up|down|draining|saturation)\b", panel["title"]):
            defaults = panel["fieldConfig"]["defaults"]
            coloured = len(defaults["thresholds"]["steps"]) > 1 or defaults["mappings"]
            assert coloured, (board, panel["title"], "a state must not show green whatever its value")


def test_kafka_process_and_saturation_panels_exist():
    for path in sorted(DASHBOARDS.glob("*.json")):
        exprs = " ".join(t["expr"] for p in json.loads(path.read_text())["panels"] for t in p["targets"])
        for metric in (
            "smtpgw_kafka_queue_messages",
            "smtpgw_kafka_broker_rtt_seconds",
            "smtpgw_connections_max",
            "smtpgw_publish_inflight_bytes_limit",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ):
            assert metric in exprs, (path.name, metric)


def test_store_and_forward_has_panels_and_an_alert():
    for path in sorted(DASHBOARDS.glob("*.json")):
        shown = {
            t["expr"]: p for p in json.loads(path.read_text())["panels"] for t in p["targets"]
        }
        for metric, unit in (
            ("smtpgw_forward_awaiting_records", "short"),
            ("smtpgw_forward_awaiting_bytes", "bytes"),
            ("smtpgw_forwarded_records_total", "ops"),
            ("smtpgw_forward_oldest_age_seconds", "s"),
        ):
            panels_of = [p for expr, p in shown.items() if metric in expr]
            assert panels_of, (path.name, metric)
            assert all(p["fieldConfig"]["defaults"]["unit"] == unit for p in panels_of), (path.name, metric)
    rules = {r["alert"]: r for g in yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert "smtpgw_forward_oldest_age_seconds" in rules["SmtpgwForwardBacklogOld"]["expr"]


def runbook_anchors() -> set[str]:
    """GitHub's anchors for the `## ` headings of docs/runbooks.md."""
    headings = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_runbook_in_the_repository():
    anchors = runbook_anchors()
    rules = yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"].get("runbook_url", "")
            path, _, anchor = url.partition("#")
            assert path == "docs/runbooks.md", (rule["alert"], url)
            assert anchor in anchors, (rule["alert"], url, sorted(anchors))


def test_4xx_alert_counts_transactions_not_replies():
    rules = {r["alert"]: r for g in yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    expr = rules["SmtpgwHigh4xxRatio"]["expr"]
    assert "smtpgw_replies_total" not in expr and 'reason="sink_temporary"' in expr, expr
    smuggling = rules["SmtpgwSmugglingSpike"]["annotations"]
    assert "end-of-data" not in smuggling["description"] and "bare CR or LF" in smuggling["summary"]
