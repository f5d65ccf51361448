#!/usr/bin/env python3
"""Generates the smtpgw Grafana dashboards from code (grafanalib).

    python dashboards/generate.py           # writes dashboards/*.json and the PrometheusRule
    python dashboards/generate.py --check   # exits 1 if any of them is stale
    python dashboards/generate.py --runbook-base-url https://git.example.net/ops/smtpgw/blob/main/docs/runbooks.md

`smtpgw-overview.json` is the fleet view, `smtpgw-node.json` the drill-down for one
`$instance`. Both take `$datasource` (Prometheus), `$job` (the scrape job, default
`smtpgw`) and `$instance` variables, scope every query to them, and use only metrics the
gateway exports; tests/e2e/test_dashboards.py runs every query against a real Prometheus.

`deploy/kubernetes/operator/prometheusrule.yaml` is `alerts.yml` wrapped as a Prometheus
Operator PrometheusRule: its rules are exactly those of `alerts.yml` but for each
`runbook_url`, which is built from one base URL, RUNBOOK_BASE_URL below (or
`--runbook-base-url`): where your copy of docs/runbooks.md is served, so that the link in
a firing alert opens. `--check` fails when the files drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.x
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH = 24  # Grafana's grid is 24 columns wide
# Where docs/runbooks.md is served; alerts.yml links `docs/runbooks.md#anchor` (the file
# in this repository), the generated PrometheusRule links RUNBOOK_BASE_URL#anchor.
RUNBOOK_BASE_URL = "https://smtpgw.example.com/docs/runbooks.md"
RUNBOOK_IN_REPOSITORY = "docs/runbooks.md"


# --- queries -----------------------------------------------------------------------

# Every query is scoped to the chosen scrape job(s) and instance(s), so other targets in
# the same Prometheus (Prometheus itself, other services) never count.
FLEET = 'job=~"$job", instance=~"$instance"'
ONE = 'job=~"$job", instance="$instance"'


def sel(metric: str, scope: str) -> str:
    """`metric{<scope>}`; `scope` is the `$job`/`$instance` matcher."""
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


def ratio(numerator: str, denominator: str, scope: str, by: str = "instance") -> str:
    """Per-`by` ratio of two gauges (usage against its configured limit)."""
    return f"max by ({by}) ({sel(numerator, scope)} / {sel(denominator, scope)})"


# --- panels ------------------------------------------------------------------------

GREEN_ONLY = [{"color": "green", "value": None}]


def steps(*pairs: tuple[str, float | None]) -> list[dict]:
    return [{"color": color, "value": value} for color, value in pairs]


def value_map(**texts: tuple[str, str]) -> list[dict]:
    """Grafana value mappings: value -> (text, colour)."""
    options = {value: {"text": text, "color": color, "index": i} for i, (value, (text, color)) in enumerate(texts.items())}
    return [{"type": "value", "options": options}]


UP_MAP = value_map(**{"1": ("up", "green"), "0": ("DOWN", "red")})
DRAINING_MAP = value_map(**{"0": ("no", "green"), "1": ("draining", "orange")})


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


def timeseries(
    title: str,
    description: str,
    *queries: tuple[str, str],
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    mappings: list | None = None,
):
    """A time series panel; all its queries share one unit (one axis)."""
    panel = g.TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets(*queries),
        unit=unit,
        mappings=mappings or [],
    )
    return panel, width, height


def stat(
    title: str,
    description: str,
    *queries: tuple[str, str],
    unit: str = "short",
    width: int = 4,
    height: int = 4,
    thresholds: list | None = None,
    mappings: list | None = None,
):
    panel = g.Stat(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets(*queries),
        format=unit,
        reduceCalc="lastNotNull",
        graphMode="none",
        textMode="value_and_name",
        colorMode="background" if thresholds or mappings else "value",
        thresholds=thresholds or GREEN_ONLY,
        mappings=mappings or [],
    )
    return panel, width, height


def table(title: str, description: str, *queries: tuple[str, str], width: int = 24, height: int = 8):
    panel = g.Table(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets(*queries, instant=True),
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
        ],
    )
    return panel, width, height


def percentiles(title: str, description: str, histogram: str, scope: str, unit: str):
    """p50 and p99 of a histogram over the selected instances."""
    return timeseries(
        title, description, *((quantile(q, histogram, scope), f"p{round(q * 100)}") for q in (0.5, 0.99)), unit=unit
    )


def message_rate(title: str, scope: str):
    return timeseries(
        title,
        "Messages stored by the sink and answered 250, and messages refused by reason (too large, "
        "bare CR/LF, sink temporary failure, sink size limit).",
        (rate("smtpgw_messages_accepted_total", scope), "accepted"),
        (rate("smtpgw_messages_rejected_total", scope, by="reason"), "rejected {{reason}}"),
        unit="reqps",
    )


def saturation_panels(scope: str) -> list:
    """Usage against the configured limits, per node: 1.0 is the limit."""
    return [
        timeseries(
            "Connection saturation",
            "Open connections / --max-connections per node. At 100% new connections get 421.",
            (ratio("smtpgw_connections_active", "smtpgw_connections_max", scope), "{{instance}}"),
            unit="percentunit",
        ),
        timeseries(
            "In-flight saturation",
            "Unanswered publishes against --max-inflight-messages and --max-inflight-bytes per node; at 100% "
            "the reactors stop reading message bodies (TCP backpressure). The limits apply to the Kafka sink.",
            (ratio("smtpgw_publish_inflight_messages", "smtpgw_publish_inflight_messages_limit", scope), "{{instance}} messages"),
            (ratio("smtpgw_publish_inflight_bytes", "smtpgw_publish_inflight_bytes_limit", scope), "{{instance}} bytes"),
            unit="percentunit",
        ),
    ]


def kafka_panels(scope: str) -> list:
    return [
        timeseries(
            "Kafka producer queue (messages)",
            "librdkafka's queue: messages waiting for or in flight to a broker, from its statistics every "
            "second. Steady growth means the brokers are not keeping up. 0 for other sinks.",
            (f"sum by (instance) ({sel('smtpgw_kafka_queue_messages', scope)})", "{{instance}}"),
        ),
        timeseries(
            "Kafka producer queue (bytes)",
            "The same queue in bytes. 0 for other sinks.",
            (f"sum by (instance) ({sel('smtpgw_kafka_queue_bytes', scope)})", "{{instance}}"),
            unit="bytes",
        ),
        timeseries(
            "Kafka broker round trip",
            "Average produce request round trip per broker (librdkafka statistics). A single 0 series "
            "when no node uses the Kafka sink.",
            (f"max by (broker) ({sel('smtpgw_kafka_broker_rtt_seconds', scope)}) or on() vector(0)", "{{broker}}"),
            unit="s",
        ),
        timeseries(
            "Advertised SIZE and the topic's limit",
            "The SIZE new sessions advertise, and the topic's max.message.bytes (or the broker's) as read "
            "at start and at each reconnection (0 while unknown or with other sinks). Without "
            "--max-message-size auto, a topic limit below what SIZE needs turns larger messages into 451 "
            "(SmtpgwKafkaTopicTooSmall).",
            (f"max by (instance) ({sel('smtpgw_max_message_size_bytes', scope)})", "{{instance}} SIZE"),
            (f"max by (instance) ({sel('smtpgw_kafka_topic_max_message_bytes', scope)})", "{{instance}} topic"),
            unit="bytes",
        ),
    ]


def forward_panels(scope: str) -> list:
    """Store-and-forward (--spool-fallback): mail Kafka could not take, spooled and forwarded later."""
    return [
        timeseries(
            "Store-and-forward backlog (messages)",
            "Messages stored in the spool because Kafka could not take them (--spool-fallback) and not yet "
            "forwarded. They are safe (answered 250 after fdatasync); a backlog that does not shrink means "
            "Kafka is still down or refusing. 0 without --spool-fallback.",
            (f"sum by (instance) ({sel('smtpgw_forward_awaiting_records', scope)})", "{{instance}}"),
        ),
        timeseries(
            "Store-and-forward backlog (bytes)",
            "The same backlog in spool bytes; it counts against --spool-max-bytes and the file system's "
            "free space until forwarded and pruned. 0 without --spool-fallback.",
            (f"sum by (instance) ({sel('smtpgw_forward_awaiting_bytes', scope)})", "{{instance}}"),
            unit="bytes",
        ),
        timeseries(
            "Forwarded to Kafka / s",
            "Spooled messages the forwarder published to Kafka per second, acknowledged by the brokers. "
            "Non-zero while a backlog drains after an outage.",
            (rate("smtpgw_forwarded_records_total", scope, by="instance"), "{{instance}}"),
            unit="ops",
        ),
        timeseries(
            "Oldest message waiting to be forwarded",
            "Age of the oldest spooled message not yet in Kafka: how late consumers see it. 0 when nothing "
            "waits. The SmtpgwForwardBacklogOld alert fires above 15 minutes.",
            (f"max by (instance) ({sel('smtpgw_forward_oldest_age_seconds', scope)})", "{{instance}}"),
            unit="s",
        ),
    ]


def tls_panels(scope: str) -> list:
    """TLS: handshakes, why they fail, how much of the traffic is encrypted, and the
    certificate's remaining life."""
    return [
        timeseries(
            "TLS handshakes / s",
            "Completed TLS handshakes (STARTTLS and implicit TLS) per second, by protocol version.",
            (rate("smtpgw_tls_handshakes_total", scope, by="version"), "{{version}}"),
            unit="ops",
            width=6,
        ),
        timeseries(
            "TLS handshake failures / s",
            "Handshakes that did not complete, by reason: alert (the client refused us, e.g. our "
            "certificate), incompatible (no common version or cipher), timeout, eof, bad_message.",
            (rate("smtpgw_tls_handshake_failures_total", scope, by="reason"), "{{reason}}"),
            unit="ops",
            width=6,
        ),
        timeseries(
            "Sessions over TLS",
            "Completed handshakes against connections accepted: the share of sessions that were "
            "encrypted (STARTTLS or implicit TLS).",
            (
                f"sum({rate('smtpgw_tls_handshakes_total', scope)}) / sum({rate('smtpgw_connections_accepted_total', scope)})",
                "over TLS",
            ),
            unit="percentunit",
            width=6,
        ),
        stat(
            "Days to certificate expiry",
            "Days until the certificate handshakes present expires, per node and subject "
            "(smtpgw_tls_certificate_expiry_timestamp_seconds). The SmtpgwTlsCertificateExpiring "
            "alert fires below 14 days. No data: TLS is off.",
            (
                f"min by (instance, subject) ({sel('smtpgw_tls_certificate_expiry_timestamp_seconds', scope)} - time()) / 86400",
                "{{instance}} {{subject}}",
            ),
            unit="d",
            width=6,
            height=8,
            thresholds=steps(("red", None), ("orange", 7), ("green", 14)),
        ),
    ]


def process_panels(scope: str) -> list:
    return [
        timeseries(
            "Process CPU",
            "CPU time used per second (1.0 = one core), from the standard process metrics.",
            (f"sum by (instance) (rate({sel('process_cpu_seconds_total', scope)}[{RATE}]))", "{{instance}}"),
            unit="percentunit",
            width=8,
        ),
        timeseries(
            "Process memory (RSS)",
            "Resident memory of the gateway process.",
            (f"sum by (instance) ({sel('process_resident_memory_bytes', scope)})", "{{instance}}"),
            unit="bytes",
            width=8,
        ),
        timeseries(
            "Open file descriptors",
            "Descriptors in use / the process limit (RLIMIT_NOFILE). Every connection holds one; near 100% "
            "accepts fail with EMFILE.",
            (ratio("process_open_fds", "process_max_fds", scope), "{{instance}}"),
            unit="percentunit",
            width=8,
        ),
    ]


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
    job = g.Template(
        name="job",
        label="Job",
        query="label_values(smtpgw_build_info, job)",
        dataSource=DATASOURCE,
        default="smtpgw",
        includeAll=False,
        multi=False,
        refresh=g.REFRESH_ON_TIME_RANGE_CHANGE,
    )
    instance = g.Template(
        name="instance",
        label="Instance",
        query='label_values(smtpgw_build_info{job=~"$job"}, instance)',
        dataSource=DATASOURCE,
        includeAll=multi_instance,
        multi=multi_instance,
        allValue=".*" if multi_instance else None,
        refresh=g.REFRESH_ON_TIME_RANGE_CHANGE,
    )
    return g.Templating(list=[datasource, job, instance])


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
    fleet = FLEET
    smuggling = sel("smtpgw_smuggling_attempts_total", fleet)
    panels = [
        stat(
            "Nodes down",
            "Gateways of the selected job that Prometheus cannot scrape (up == 0).",
            (f"count({sel('up', fleet)} == 0) or vector(0)", "down"),
            thresholds=steps(("green", None), ("red", 1)),
        ),
        stat(
            "Messages accepted / s",
            "Messages the sinks stored and answered 250, per second, across the selected nodes.",
            (rate("smtpgw_messages_accepted_total", fleet), "accepted"),
            unit="reqps",
        ),
        stat(
            "Sink down (nodes)",
            "Nodes whose sink is unhealthy: /readyz is 503 and mail gets 4xx there.",
            (f"count({sel('smtpgw_sink_up', fleet)} == 0) or vector(0)", "sink down"),
            thresholds=steps(("green", None), ("red", 1)),
        ),
        stat(
            "Draining (nodes)",
            "Nodes draining after SIGTERM/SIGINT; they take no new connections.",
            (f"sum({sel('smtpgw_draining', fleet)})", "draining"),
            thresholds=steps(("green", None), ("orange", 1)),
        ),
        stat(
            "Connection saturation (max)",
            "The fullest node's open connections against its --max-connections.",
            (f"max({sel('smtpgw_connections_active', fleet)} / {sel('smtpgw_connections_max', fleet)})", "max"),
            unit="percentunit",
            thresholds=steps(("green", None), ("orange", 0.8), ("red", 0.95)),
        ),
        stat(
            "Smuggling attempts",
            "Messages with a bare CR or LF in the time range, whatever --bare-lf did with them.",
            (f"sum(increase({smuggling}[$__range]))", "in range"),
            thresholds=steps(("green", None), ("orange", 1)),
        ),
        message_rate("Message rate", fleet),
        timeseries(
            "Accepted bytes",
            "Bytes of accepted message bodies per second.",
            (rate("smtpgw_message_size_bytes_sum", fleet), "bytes / s"),
            unit="Bps",
        ),
        timeseries(
            "Reply classes (share of all replies)",
            "The share of 2xx, 3xx, 4xx and 5xx among all final replies, the greeting included.",
            (reply_class_ratio(fleet), "{{class}}"),
            unit="percentunit",
        ),
        percentiles(
            "Publish latency",
            "From handing a message to the sink to its answer: what a client waits for its 250.",
            "smtpgw_publish_duration_seconds",
            fleet,
            "s",
        ),
        timeseries(
            "Open connections",
            "Connections open now, per node.",
            (f"sum by (instance) ({sel('smtpgw_connections_active', fleet)})", "{{instance}}"),
        ),
        timeseries(
            "Spool: size and free space by node",
            "Bytes in each node's spool segments, and the free space on the spool's file system. Below "
            "--spool-min-free-bytes free, or above --spool-max-bytes stored, mail gets 452 4.3.1. "
            "Both 0 on nodes without the spool sink.",
            (f"sum by (instance) ({sel('smtpgw_spool_bytes', fleet)})", "{{instance}} spool"),
            (f"min by (instance) ({sel('smtpgw_spool_filesystem_free_bytes', fleet)})", "{{instance}} free"),
            unit="bytes",
        ),
        timeseries(
            "Connections accepted and refused / s",
            "New connections per second, and those refused with 421 at --max-connections.",
            (rate("smtpgw_connections_accepted_total", fleet), "accepted"),
            (rate("smtpgw_connections_rejected_total", fleet, by="reason"), "refused {{reason}}"),
            unit="ops",
        ),
        *saturation_panels(fleet),
        timeseries(
            "Publishes in flight (messages)",
            "Messages handed to the sink and not yet answered.",
            (f"sum by (instance) ({sel('smtpgw_publish_inflight_messages', fleet)})", "{{instance}}"),
        ),
        timeseries(
            "Publishes in flight (bytes)",
            "Their size, Received: line included.",
            (f"sum by (instance) ({sel('smtpgw_publish_inflight_bytes', fleet)})", "{{instance}}"),
            unit="bytes",
        ),
        timeseries(
            "Publish failures / s",
            "Sink answers other than success: temporary (451) and too large (552).",
            (rate("smtpgw_publish_failures_total", fleet, by="reason"), "{{reason}}"),
            unit="ops",
        ),
        *kafka_panels(fleet),
        *forward_panels(fleet),
        *tls_panels(fleet),
        timeseries(
            "Sink up by node",
            "1 while a node's sink is healthy (the readiness condition).",
            (sel("smtpgw_sink_up", fleet), "{{instance}}"),
            mappings=UP_MAP,
        ),
        timeseries(
            "Smuggling attempts / s",
            "Messages with a bare CR or LF per second, per node.",
            (rate("smtpgw_smuggling_attempts_total", fleet, by="instance"), "{{instance}}"),
            unit="ops",
        ),
        *process_panels(fleet),
        table(
            "Nodes",
            "One row per node: scrape state, sink, drain, load, I/O backend and version.",
            (f"max by (instance) ({sel('up', fleet)})", "up"),
            (f"max by (instance) ({sel('smtpgw_sink_up', fleet)})", "sink up"),
            (f"max by (instance) ({sel('smtpgw_draining', fleet)})", "draining"),
            (f"sum by (instance) ({sel('smtpgw_connections_active', fleet)})", "connections"),
            (rate("smtpgw_messages_accepted_total", fleet, by="instance"), "messages / s"),
            (f"max by (instance, backend) ({sel('smtpgw_io_backend_info', fleet)})", "backend"),
            (f"max by (instance, version) ({sel('smtpgw_build_info', fleet)})", "version"),
        ),
    ]
    description = "SMTP gateway fleet: traffic, replies, publish latency, saturation, Kafka, store-and-forward, process"
    return dashboard("smtpgw-overview", "smtpgw / Overview", description, panels, multi_instance=True)


def node() -> g.Dashboard:
    one = ONE
    panels = [
        stat("Up", "Whether Prometheus can scrape this node.", (sel("up", one), "up"), mappings=UP_MAP),
        stat(
            "Sink up",
            "The sink's health; when down, /readyz is 503 and mail gets 4xx.",
            (sel("smtpgw_sink_up", one), "sink"),
            mappings=UP_MAP,
        ),
        stat(
            "Draining",
            "Draining after SIGTERM/SIGINT: no new connections.",
            (sel("smtpgw_draining", one), "draining"),
            mappings=DRAINING_MAP,
        ),
        stat("I/O backend", "The I/O backend this process runs.", (sel("smtpgw_io_backend_info", one), "{{backend}}")),
        stat("Version", "The gateway's version.", (sel("smtpgw_build_info", one), "{{version}}")),
        stat(
            "Connection saturation",
            "Open connections against --max-connections; at 100% new connections get 421.",
            (f"{sel('smtpgw_connections_active', one)} / {sel('smtpgw_connections_max', one)}", "used"),
            unit="percentunit",
            thresholds=steps(("green", None), ("orange", 0.8), ("red", 0.95)),
        ),
        timeseries(
            "Commands by verb",
            "Command lines per second; OTHER is unknown, not implemented or unparsable.",
            (rate("smtpgw_commands_total", one, by="verb"), "{{verb}}"),
            unit="reqps",
        ),
        timeseries(
            "Replies by code",
            "Final replies per second by code, the greeting included.",
            (rate("smtpgw_replies_total", one, by="code"), "{{code}}"),
            unit="reqps",
        ),
        timeseries(
            "Reactor busy ratio",
            "Share of time each reactor's runtime spent running tasks; near 1.0 the node is CPU-bound.",
            (rate("smtpgw_reactor_busy_seconds_total", one, by="reactor"), "reactor {{reactor}}"),
            unit="percentunit",
        ),
        message_rate("Messages", one),
        percentiles(
            "DATA duration",
            "From the read that brought DATA (or the first BDAT chunk) to the end of the data.",
            "smtpgw_data_duration_seconds",
            one,
            "s",
        ),
        percentiles(
            "Publish latency",
            "From handing a message to the sink to its answer.",
            "smtpgw_publish_duration_seconds",
            one,
            "s",
        ),
        percentiles("Message size", "Sizes of accepted message bodies.", "smtpgw_message_size_bytes", one, "bytes"),
        timeseries(
            "Open connections",
            "Connections open now, and the --max-connections limit.",
            (sel("smtpgw_connections_active", one), "open"),
            (sel("smtpgw_connections_max", one), "limit"),
        ),
        *saturation_panels(one),
        timeseries(
            "Publishes in flight (messages)",
            "Messages with the sink, unanswered, and the --max-inflight-messages limit.",
            (sel("smtpgw_publish_inflight_messages", one), "in flight"),
            (sel("smtpgw_publish_inflight_messages_limit", one), "limit"),
        ),
        timeseries(
            "Publishes in flight (bytes)",
            "Their size, and the --max-inflight-bytes limit.",
            (sel("smtpgw_publish_inflight_bytes", one), "in flight"),
            (sel("smtpgw_publish_inflight_bytes_limit", one), "limit"),
            unit="bytes",
        ),
        timeseries(
            "Spool size and free space",
            "Bytes in the spool's segments, and the free space on its file system. Below "
            "--spool-min-free-bytes free, or above --spool-max-bytes stored, mail gets 452 4.3.1. "
            "Both 0 without the spool sink.",
            (sel("smtpgw_spool_bytes", one), "spool"),
            (sel("smtpgw_spool_filesystem_free_bytes", one), "free on its file system"),
            unit="bytes",
        ),
        stat(
            "Spool segments",
            "Segment files in the spool; `smtpgw spool prune` deletes the old ones.",
            (sel("smtpgw_spool_segments", one), "segments"),
        ),
        stat(
            "Oldest spooled message",
            "Age of the oldest record still in the spool: how far pruning lags behind.",
            (sel("smtpgw_spool_oldest_record_age_seconds", one), "age"),
            unit="s",
            thresholds=steps(("green", None), ("orange", 2 * 86400)),
        ),
        *kafka_panels(one),
        *forward_panels(one),
        *tls_panels(one),
        *process_panels(one),
    ]
    return dashboard("smtpgw-node", "smtpgw / Node", "One smtpgw node in detail", panels, multi_instance=False)


DASHBOARDS = {"smtpgw-overview.json": overview, "smtpgw-node.json": node}
PROMETHEUS_RULE = HERE.parent / "deploy" / "kubernetes" / "operator" / "prometheusrule.yaml"


def render(build) -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


def with_runbook_base(groups: list[dict], base: str) -> list[dict]:
    """The groups with each `docs/runbooks.md#anchor` runbook_url pointing at base#anchor."""
    for group in groups:
        for rule in group["rules"]:
            annotations = rule.get("annotations", {})
            path, hash_, anchor = annotations.get("runbook_url", "").partition("#")
            if path == RUNBOOK_IN_REPOSITORY:
                annotations["runbook_url"] = f"{base}{hash_}{anchor}"
    return groups


def prometheus_rule(runbook_base: str = RUNBOOK_BASE_URL) -> str:
    """alerts.yml's groups as the spec of a PrometheusRule, runbook links made absolute."""
    groups = with_runbook_base(yaml.safe_load((HERE / "alerts.yml").read_text())["groups"], runbook_base)
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "smtpgw",
            # kube-prometheus-stack selects rules by its release label by default; set
            # it to what your Prometheus' ruleSelector matches.
            "labels": {"app.kubernetes.io/name": "smtpgw", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }
    header = (
        "# Generated by dashboards/generate.py from dashboards/alerts.yml: edit alerts.yml and\n"
        "# run `python dashboards/generate.py` (`--runbook-base-url URL` for your runbooks'\n"
        "# address). The rules expect the scrape job `smtpgw` (podmonitor.yaml sets it).\n"
    )
    return header + yaml.safe_dump(rule, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    parser.add_argument(
        "--runbook-base-url", default=RUNBOOK_BASE_URL, metavar="URL",
        help=f"where docs/runbooks.md is served, for the PrometheusRule's runbook links (default {RUNBOOK_BASE_URL})",
    )
    args = parser.parse_args(argv[1:])
    check = args.check
    stale = []
    outputs = {name: (HERE / name, lambda build=build: render(build)) for name, build in DASHBOARDS.items()}
    outputs["deploy/kubernetes/operator/prometheusrule.yaml"] = (
        PROMETHEUS_RULE, lambda: prometheus_rule(args.runbook_base_url))
    for name, (path, make) in outputs.items():
        text = make()
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
