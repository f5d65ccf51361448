#!/usr/bin/env python3
"""Generates the smtpgw Grafana dashboards from code (grafanalib).

    python dashboards/generate.py           # writes dashboards/*.json
    python dashboards/generate.py --check   # exits 1 if the checked-in JSON is stale

`smtpgw-overview.json` is the fleet view, `smtpgw-node.json` the drill-down for one
`$instance`. Both take a `$datasource` (Prometheus) variable and use only metrics the
gateway exports; tests/e2e/test_dashboards.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.x
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH = 24  # Grafana's grid is 24 columns wide


# --- queries -----------------------------------------------------------------------


def sel(metric: str, scope: str) -> str:
    """`metric{<scope>}`; `scope` is the `$instance` matcher."""
    return f"{metric}{{{scope}}}"


def rate(metric: str, scope: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({sel(metric, scope)}[{RATE}]))"


def quantile(q: float, histogram: str, scope: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({sel(histogram + '_bucket', scope)}[{RATE}])))"


def reply_class_ratio(scope: str) -> str:
    """The share of each reply class (2xx, 3xx, 4xx, 5xx) in all replies."""
    replies = f'rate({sel("smtpgw_replies_total", scope)}[{RATE}])'
    per_class = f'label_replace({replies}, "class", "${{1}}xx", "code", "(.)..")'
    return f"sum by (class) ({per_class}) / scalar({rate('smtpgw_replies_total', scope)})"


# --- panels ------------------------------------------------------------------------


def target(expr: str, legend: str = "", ref: int = 0, instant: bool = False) -> g.Target:
    return g.Target(
        expr=expr,
        legendFormat=legend,
        refId=chr(ord("A") + ref),
        instant=instant,
        format=g.TABLE_TARGET_FORMAT if instant else g.TIME_SERIES_TARGET_FORMAT,
        datasource=DATASOURCE,
    )


def targets(*queries: tuple[str, str], instant: bool = False) -> list[g.Target]:
    return [target(expr, legend, i, instant) for i, (expr, legend) in enumerate(queries)]


def timeseries(title: str, *queries: tuple[str, str], unit: str = "short", width: int = 12, height: int = 8):
    panel = g.TimeSeries(title=title, dataSource=DATASOURCE, targets=targets(*queries), unit=unit)
    return panel, width, height


def stat(title: str, *queries: tuple[str, str], unit: str = "short", width: int = 4, height: int = 4):
    panel = g.Stat(
        title=title,
        dataSource=DATASOURCE,
        targets=targets(*queries),
        format=unit,
        reduceCalc="lastNotNull",
        graphMode="none",
        textMode="value_and_name",
        thresholds=[{"color": "green", "value": None}],
    )
    return panel, width, height


def table(title: str, *queries: tuple[str, str], width: int = 24, height: int = 8):
    panel = g.Table(
        title=title,
        dataSource=DATASOURCE,
        targets=targets(*queries, instant=True),
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
        ],
    )
    return panel, width, height


def percentiles(title: str, histogram: str, scope: str, unit: str):
    """p50 and p99 of a histogram over the selected instances."""
    return timeseries(title, *((quantile(q, histogram, scope), f"p{round(q * 100)}") for q in (0.5, 0.99)), unit=unit)


def message_rate(title: str, scope: str):
    return timeseries(
        title,
        (rate("smtpgw_messages_accepted_total", scope), "accepted"),
        (rate("smtpgw_messages_rejected_total", scope, by="reason"), "rejected {{reason}}"),
        unit="reqps",
    )


def layout(sized_panels) -> list[g.Panel]:
    """Places (panel, width, height) left to right, wrapping at the grid width."""
    placed, x, y, row_height = [], 0, 0, 0
    for panel_id, (panel, width, height) in enumerate(sized_panels, start=1):
        if x + width > WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panel.id = panel_id
        panel.gridPos = g.GridPos(h=height, w=width, x=x, y=y)
        placed.append(panel)
        x, row_height = x + width, max(row_height, height)
    return placed


# --- dashboards --------------------------------------------------------------------


def templating(multi_instance: bool) -> g.Templating:
    datasource = g.Template(name="datasource", label="Data source", type="datasource", query="prometheus", default="")
    instance = g.Template(
        name="instance",
        label="Instance",
        query="label_values(smtpgw_build_info, instance)",
        dataSource=DATASOURCE,
        includeAll=multi_instance,
        multi=multi_instance,
        allValue=".*" if multi_instance else None,
        refresh=g.REFRESH_ON_TIME_RANGE_CHANGE,
    )
    return g.Templating(list=[datasource, instance])


def dashboard(uid: str, title: str, description: str, panels, multi_instance: bool) -> g.Dashboard:
    return g.Dashboard(
        uid=uid,
        title=title,
        description=description,
        tags=["smtpgw"],
        timezone="browser",
        refresh="30s",
        schemaVersion=SCHEMA_VERSION,
        templating=templating(multi_instance),
        panels=layout(panels),
    )


def overview() -> g.Dashboard:
    fleet = 'instance=~"$instance"'
    smuggling = sel("smtpgw_smuggling_attempts_total", fleet)
    panels = [
        stat("Nodes up", (f"sum(up{{{fleet}}})", "up"), (f"count(up{{{fleet}}})", "scraped")),
        stat("Messages accepted / s", (rate("smtpgw_messages_accepted_total", fleet), "accepted"), unit="reqps"),
        stat("Sink up (nodes)", (f"sum(smtpgw_sink_up{{{fleet}}})", "sink up")),
        stat("Draining (nodes)", (f"sum(smtpgw_draining{{{fleet}}})", "draining")),
        stat("Active connections", (f"sum(smtpgw_connections_active{{{fleet}}})", "active")),
        stat("Smuggling attempts", (f"sum(increase({smuggling}[$__range]))", "in range")),
        message_rate("Message rate", fleet),
        timeseries("Accepted bytes", (rate("smtpgw_message_size_bytes_sum", fleet), "bytes / s"), unit="Bps"),
        timeseries("Reply classes (share of all replies)", (reply_class_ratio(fleet), "{{class}}"), unit="percentunit"),
        percentiles("Publish latency", "smtpgw_publish_duration_seconds", fleet, "s"),
        timeseries(
            "Connections",
            (f"sum(smtpgw_connections_active{{{fleet}}})", "active"),
            (rate("smtpgw_connections_accepted_total", fleet), "accepted / s"),
            (rate("smtpgw_connections_rejected_total", fleet, by="reason"), "rejected {{reason}} / s"),
        ),
        timeseries(
            "Backpressure: publishes in flight",
            (f"sum(smtpgw_publish_inflight_messages{{{fleet}}})", "messages"),
            (f"sum(smtpgw_publish_inflight_bytes{{{fleet}}})", "bytes"),
            (rate("smtpgw_publish_failures_total", fleet, by="reason"), "failures {{reason}} / s"),
        ),
        timeseries("Sink up by node", (f"smtpgw_sink_up{{{fleet}}}", "{{instance}}")),
        timeseries(
            "Spool: size and free space by node",
            (f"smtpgw_spool_bytes{{{fleet}}}", "{{instance}} spool"),
            (f"smtpgw_spool_filesystem_free_bytes{{{fleet}}}", "{{instance}} free"),
            unit="bytes",
        ),
        timeseries(
            "Smuggling attempts / s", (rate("smtpgw_smuggling_attempts_total", fleet, by="instance"), "{{instance}}")
        ),
        table(
            "Nodes",
            (f"max by (instance) (up{{{fleet}}})", "up"),
            (f"max by (instance) (smtpgw_sink_up{{{fleet}}})", "sink up"),
            (f"max by (instance) (smtpgw_draining{{{fleet}}})", "draining"),
            (f"sum by (instance) (smtpgw_connections_active{{{fleet}}})", "connections"),
            (rate("smtpgw_messages_accepted_total", fleet, by="instance"), "messages / s"),
            (f"max by (instance, backend) (smtpgw_io_backend_info{{{fleet}}})", "backend"),
            (f"max by (instance, version) (smtpgw_build_info{{{fleet}}})", "version"),
        ),
    ]
    description = "SMTP gateway fleet: traffic, replies, publish latency, backpressure"
    return dashboard("smtpgw-overview", "smtpgw / Overview", description, panels, multi_instance=True)


def node() -> g.Dashboard:
    one = 'instance="$instance"'
    panels = [
        stat("Up", (f"up{{{one}}}", "up")),
        stat("Sink up", (f"smtpgw_sink_up{{{one}}}", "sink up")),
        stat("Draining", (f"smtpgw_draining{{{one}}}", "draining")),
        stat("I/O backend", (f"smtpgw_io_backend_info{{{one}}}", "{{backend}}")),
        stat("Version", (f"smtpgw_build_info{{{one}}}", "{{version}}")),
        stat("Active connections", (f"smtpgw_connections_active{{{one}}}", "active")),
        timeseries("Commands by verb", (rate("smtpgw_commands_total", one, by="verb"), "{{verb}}"), unit="reqps"),
        timeseries("Replies by code", (rate("smtpgw_replies_total", one, by="code"), "{{code}}"), unit="reqps"),
        timeseries(
            "Reactor busy ratio",
            (rate("smtpgw_reactor_busy_seconds_total", one, by="reactor"), "reactor {{reactor}}"),
            unit="percentunit",
        ),
        message_rate("Messages", one),
        percentiles("DATA duration", "smtpgw_data_duration_seconds", one, "s"),
        percentiles("Publish latency", "smtpgw_publish_duration_seconds", one, "s"),
        percentiles("Message size", "smtpgw_message_size_bytes", one, "bytes"),
        timeseries(
            "Publishes in flight",
            (f"smtpgw_publish_inflight_messages{{{one}}}", "messages"),
            (f"smtpgw_publish_inflight_bytes{{{one}}}", "bytes"),
        ),
        timeseries(
            "Spool size and free space",
            (f"smtpgw_spool_bytes{{{one}}}", "spool"),
            (f"smtpgw_spool_filesystem_free_bytes{{{one}}}", "free on its file system"),
            unit="bytes",
        ),
        stat("Spool segments", (f"smtpgw_spool_segments{{{one}}}", "segments")),
        stat("Oldest spooled message", (f"smtpgw_spool_oldest_record_age_seconds{{{one}}}", "age"), unit="s"),
    ]
    return dashboard("smtpgw-node", "smtpgw / Node", "One smtpgw node in detail", panels, multi_instance=False)


DASHBOARDS = {"smtpgw-overview.json": overview, "smtpgw-node.json": node}


def render(build) -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = argv[1:] == ["--check"]
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = HERE / name, render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
