//! Prometheus metrics and the HTTP endpoint that serves them with `/healthz` and
//! `/readyz`.
//!
//! The endpoint runs on a thread and tokio runtime of its own, so a slow scraper never
//! takes time from a reactor. Reactors do not touch the shared counters per command:
//! sessions count in plain integers ([`SessionStats`]), each reactor adds those into a
//! [`ReactorMetrics`] of its own and publishes it here every
//! [`FLUSH_INTERVAL`] and when a connection closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::local::LocalHistogram;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use crate::auth::AuthResult;
use crate::conn::edge::{EdgeStats, Rejected, TlsFailure, TlsVersion};
use crate::sink::forward::CursorReset;
use crate::sink::Sink;
use crate::smtp::stats::{Counts, Label, LimitClose, RejectReason, ReplyCode, SessionStats, Verb};
use crate::smtp::Refusal;

/// How often reactors publish their local counts: counters lag by at most 100 ms.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Accepted body sizes: 1 KiB to 64 MiB in powers of 4.
const SIZE_BUCKETS: [f64; 9] = [
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];
/// Sink answer times, 100 µs to 30 s: local disk fsync at the low end, a Kafka
/// cluster in trouble at the top.
const PUBLISH_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// DATA/BDAT transfer times: a small message on loopback up to a slow client.
const DATA_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-listen {addr}: cannot listen: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(io::Error),
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
}

/// One metric's series, one per value of the label set `L`, resolved once at start so
/// every series exists (at 0) from the start and the hot path never hashes a label.
struct Series<L: Label> {
    counters: Vec<IntCounter>,
    label: PhantomData<L>,
}

impl<L: Label> Series<L> {
    fn new(vec: &IntCounterVec) -> Series<L> {
        Series {
            counters: L::ALL
                .iter()
                .map(|l| vec.with_label_values(&[l.as_str()]))
                .collect(),
            label: PhantomData,
        }
    }

    fn of(&self, l: L) -> &IntCounter {
        &self.counters[l.index()]
    }

    /// Adds `counts` to the series and zeroes them.
    fn publish(&self, counts: &mut Counts<L>) {
        counts.drain(|l, n| self.of(l).inc_by(n));
    }
}

/// Every metric the gateway exports, in one registry.
pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounter,
    pub connections_active: IntGauge,
    pub connections_rejected_max: IntCounter,
    connections_refused: Series<Rejected>,
    limit_closes: Series<LimitClose>,
    tls_handshakes: Series<TlsVersion>,
    tls_failures: Series<TlsFailure>,
    auth: Series<AuthResult>,
    starttls_discarded: IntCounter,
    proxy_headers: IntCounter,
    refusals: Series<Refusal>,
    log_lines_dropped: IntCounter,
    pub peer_table_entries: IntGauge,
    pub peer_table_evictions: IntCounter,
    commands: Series<Verb>,
    replies: Series<ReplyCode>,
    messages_accepted: IntCounter,
    messages_rejected: Series<RejectReason>,
    smuggling_attempts: IntCounter,
    message_size: Histogram,
    data_duration: Histogram,
    publish_duration: Histogram,
    pub publish_inflight_messages: IntGauge,
    pub publish_inflight_bytes: IntGauge,
    /// The configured limits, so dashboards and alerts can show saturation.
    pub connections_max: IntGauge,
    /// The SIZE new sessions advertise: `--max-message-size`, or less when the sink
    /// holds less (`auto`, or a Kafka producer limit set by hand).
    pub max_message_size: IntGauge,
    pub publish_inflight_messages_limit: IntGauge,
    pub publish_inflight_bytes_limit: IntGauge,
    pub publish_failures_temporary: IntCounter,
    pub publish_failures_too_large: IntCounter,
    reactor_busy: CounterVec,
    sink_up: IntGauge,
    kafka_queue_messages: IntGauge,
    kafka_queue_bytes: IntGauge,
    kafka_waiting_messages: IntGauge,
    kafka_waiting_bytes: IntGauge,
    kafka_broker_rtt: GaugeVec,
    kafka_topic_max_message_bytes: IntGauge,
    kafka_topic_too_small: IntGauge,
    forward_awaiting_records: IntGauge,
    forward_awaiting_bytes: IntGauge,
    forwarded_records: IntCounter,
    forwarded_bytes: IntCounter,
    forward_redelivered: IntCounter,
    forward_restarts: IntCounter,
    forward_cursor_resets: Series<CursorReset>,
    forward_oldest_age: Gauge,
    fallback_available: IntGauge,
    fallback_active: IntGauge,
    spool_bytes: IntGauge,
    spool_segments: IntGauge,
    spool_oldest_age: Gauge,
    spool_free_bytes: IntGauge,
    spool_corrupt: IntCounter,
    draining_gauge: IntGauge,
    io_backend_info: IntGaugeVec,
    tls_certificate_expiry: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_last_reload_success: IntGauge,
    listening: AtomicBool,
    draining: AtomicBool,
}

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, MetricsError> {
                let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
                r.register(Box::new(v.clone()))?;
                Ok(v)
            };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, MetricsError> {
                let h =
                    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
                r.register(Box::new(h.clone()))?;
                Ok(h)
            };
        // Labelled counters are `Series`: resolved once here, never hashed per count.
        let rejected = counter_vec(
            "smtpgw_connections_rejected_total",
            "Connections refused before the greeting, by reason.",
            "reason",
        )?;
        let commands = counter_vec(
            "smtpgw_commands_total",
            "Command lines received, by verb (OTHER: unknown, not implemented or unparsable).",
            "verb",
        )?;
        let replies = counter_vec(
            "smtpgw_replies_total",
            "Final SMTP replies sent, greeting included, by 3-digit code.",
            "code",
        )?;
        let messages_rejected = counter_vec(
            "smtpgw_messages_rejected_total",
            "Messages refused at or after the end of data, by reason.",
            "reason",
        )?;
        let failures = counter_vec(
            "smtpgw_publish_failures_total",
            "Sink answers other than success, by reason.",
            "reason",
        )?;
        let reactor_busy = CounterVec::new(
            Opts::new(
                "smtpgw_reactor_busy_seconds_total",
                "Time each reactor thread spent running tasks rather than waiting for I/O.",
            ),
            &["reactor"],
        )?;
        registry.register(Box::new(reactor_busy.clone()))?;
        let backend = IntGaugeVec::new(
            Opts::new(
                "smtpgw_io_backend_info",
                "The I/O backend this process runs (1).",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(backend.clone()))?;
        backend.with_label_values(&["epoll"]).set(1);
        let build = IntGaugeVec::new(
            Opts::new("smtpgw_build_info", "The gateway's version (1)."),
            &["version"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let kafka_broker_rtt = GaugeVec::new(
            Opts::new(
                "smtpgw_kafka_broker_rtt_seconds",
                "Average produce request round trip per broker, from librdkafka's statistics.",
            ),
            &["broker"],
        )?;
        registry.register(Box::new(kafka_broker_rtt.clone()))?;
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "smtpgw_tls_certificate_expiry_timestamp_seconds",
                "When the certificate handshakes present expires (notAfter, Unix time), by subject.",
            ),
            &["subject"],
        )?;
        registry.register(Box::new(tls_certificate_expiry.clone()))?;
        let config_reloads = counter_vec(
            "smtpgw_config_reloads_total",
            "Reloads (SIGHUP, or a changed certificate file) by result: ok, or refused (the running configuration stayed).",
            "result",
        )?;
        for result in ["ok", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        let forward_oldest_age = Gauge::new(
            "smtpgw_forward_oldest_age_seconds",
            "Age of the oldest spooled message not yet forwarded to Kafka (--spool-fallback); 0 when none waits.",
        )?;
        registry.register(Box::new(forward_oldest_age.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_start_time_seconds, ...: the standard names every
        // dashboard knows, read from /proc at scrape time.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            tls_certificate_expiry,
            config_reloads,
            config_last_reload_success: gauge(
                "smtpgw_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded whole (start or reload), Unix time.",
            )?,
            connections_accepted: counter(
                "smtpgw_connections_accepted_total",
                "Connections accepted and greeted.",
            )?,
            connections_active: gauge("smtpgw_connections_active", "Connections open now.")?,
            connections_rejected_max: rejected.with_label_values(&["max_connections"]),
            connections_refused: Series::new(&rejected),
            limit_closes: Series::new(
                &counter_vec(
                    "smtpgw_session_limit_closes_total",
                    "Sessions closed with 421 4.7.0 by a per-session or per-address limit, by limit.",
                    "reason",
                )?,
            ),
            tls_handshakes: Series::new(
                &counter_vec(
                    "smtpgw_tls_handshakes_total",
                    "Completed TLS handshakes (STARTTLS and implicit), by protocol version.",
                    "version",
                )?,
            ),
            tls_failures: Series::new(
                &counter_vec(
                    "smtpgw_tls_handshake_failures_total",
                    "TLS handshakes that did not complete, by reason.",
                    "reason",
                )?,
            ),
            auth: Series::new(
                &counter_vec(
                    "smtpgw_auth_total",
                    "AUTH attempts by result: success, failure (wrong or unknown credentials), \
                     temporary (the verifier's queue was full) and locked (over the failure \
                     limit per address or per user).",
                    "result",
                )?,
            ),
            starttls_discarded: counter(
                "smtpgw_starttls_discarded_bytes_total",
                "Plaintext bytes pipelined after STARTTLS and discarded unread (CVE-2011-0411).",
            )?,
            refusals: {
                let v = counter_vec(
                    "smtpgw_refusals_total",
                    "Replies 4xx/5xx and closes for a reason of the gateway's own, by reason \
                     (the reason word of the refusal's log line).",
                    "reason",
                )?;
                Series::new(&v)
            },
            log_lines_dropped: counter(
                "smtpgw_log_lines_dropped_total",
                "Log lines dropped because the log writer's queue was full.",
            )?,
            proxy_headers: counter(
                "smtpgw_proxy_headers_total",
                "PROXY protocol headers accepted.",
            )?,
            peer_table_entries: gauge(
                "smtpgw_peer_table_entries",
                "Addresses and prefixes the per-address limiter tracks now.",
            )?,
            peer_table_evictions: counter(
                "smtpgw_peer_table_evictions_total",
                "Limiter entries dropped to keep the table bounded while they still held rate state.",
            )?,
            commands: Series::new(&commands),
            replies: Series::new(&replies),
            messages_accepted: counter(
                "smtpgw_messages_accepted_total",
                "Messages the sink stored and the client got 250 for.",
            )?,
            messages_rejected: Series::new(&messages_rejected),
            smuggling_attempts: counter(
                "smtpgw_smuggling_attempts_total",
                "DATA bodies and BDAT messages containing a bare CR or LF, whatever --bare-lf did with them.",
            )?,
            message_size: histogram(
                "smtpgw_message_size_bytes",
                "Sizes of accepted message bodies.",
                &SIZE_BUCKETS,
            )?,
            data_duration: histogram(
                "smtpgw_data_duration_seconds",
                "Time from DATA (or the first BDAT) to the end of the message data.",
                &DATA_BUCKETS,
            )?,
            publish_duration: histogram(
                "smtpgw_publish_duration_seconds",
                "Time from handing a message to the sink to the sink's answer.",
                &PUBLISH_BUCKETS,
            )?,
            publish_inflight_messages: gauge(
                "smtpgw_publish_inflight_messages",
                "Messages handed to the sink and not yet answered.",
            )?,
            publish_inflight_bytes: gauge(
                "smtpgw_publish_inflight_bytes",
                "Bytes of messages handed to the sink and not yet answered.",
            )?,
            connections_max: gauge(
                "smtpgw_connections_max",
                "--max-connections: open connections above which new ones get 421.",
            )?,
            max_message_size: gauge(
                "smtpgw_max_message_size_bytes",
                "The largest message new sessions accept (the SIZE they advertise).",
            )?,
            publish_inflight_messages_limit: gauge(
                "smtpgw_publish_inflight_messages_limit",
                "--max-inflight-messages: unanswered messages above which bodies are not read (Kafka sink).",
            )?,
            publish_inflight_bytes_limit: gauge(
                "smtpgw_publish_inflight_bytes_limit",
                "--max-inflight-bytes: unanswered bytes above which bodies are not read (Kafka sink).",
            )?,
            publish_failures_temporary: failures.with_label_values(&["temporary"]),
            publish_failures_too_large: failures.with_label_values(&["too_large"]),
            reactor_busy,
            sink_up: gauge(
                "smtpgw_sink_up",
                "Whether the sink can take messages (0/1).",
            )?,
            kafka_queue_messages: gauge(
                "smtpgw_kafka_queue_messages",
                "Messages in librdkafka's queue or in flight (0 for other sinks).",
            )?,
            kafka_topic_max_message_bytes: gauge(
                "smtpgw_kafka_topic_max_message_bytes",
                "The Kafka topic's record size limit at its last reading (its max.message.bytes, else the broker's message.max.bytes); 0 while unknown.",
            )?,
            kafka_topic_too_small: gauge(
                "smtpgw_kafka_topic_too_small",
                "1 while the Kafka topic holds less than --max-message-size needs (without auto): larger messages get 451 until the topic is raised.",
            )?,
            kafka_queue_bytes: gauge(
                "smtpgw_kafka_queue_bytes",
                "Bytes in librdkafka's queue or in flight (0 for other sinks).",
            )?,
            kafka_waiting_messages: gauge(
                "smtpgw_kafka_waiting_messages",
                "Messages waiting in the Kafka sink for room in librdkafka's queue (counted in smtpgw_publish_inflight_messages, not in smtpgw_kafka_queue_messages).",
            )?,
            kafka_waiting_bytes: gauge(
                "smtpgw_kafka_waiting_bytes",
                "Bytes of the messages waiting in the Kafka sink for room in librdkafka's queue.",
            )?,
            kafka_broker_rtt,
            forward_awaiting_records: gauge(
                "smtpgw_forward_awaiting_records",
                "Spooled messages waiting to be forwarded to Kafka (--spool-fallback).",
            )?,
            forward_awaiting_bytes: gauge(
                "smtpgw_forward_awaiting_bytes",
                "Spool bytes waiting to be forwarded to Kafka (--spool-fallback).",
            )?,
            forwarded_records: counter(
                "smtpgw_forwarded_records_total",
                "Spooled messages Kafka acknowledged (--spool-fallback).",
            )?,
            forwarded_bytes: counter(
                "smtpgw_forwarded_bytes_total",
                "Bytes of spooled messages Kafka acknowledged (--spool-fallback).",
            )?,
            forward_redelivered: counter(
                "smtpgw_forward_redelivered_total",
                "Spooled messages forwarded again after a restart or a forwarder restart: possible duplicates (at most one --forward-window each time).",
            )?,
            forward_restarts: counter(
                "smtpgw_forward_restarts_total",
                "Times the watchdog restarted a forwarder that made no progress (--spool-fallback).",
            )?,
            forward_oldest_age,
            fallback_active: gauge(
                "smtpgw_sink_fallback_active",
                "--spool-fallback: 1 while mail goes to the fallback spool because Kafka could not take the latest message; 0 otherwise.",
            )?,
            fallback_available: gauge(
                "smtpgw_spool_fallback_available",
                "--spool-fallback: 1 while its spool can store, 0 while Kafka alone is used \
                 (a full file system at start, a failed write); 0 without a fallback.",
            )?,
            forward_cursor_resets: Series::new(
                &counter_vec(
                    "smtpgw_forward_cursor_resets_total",
                    "Starts that found the forward cursor damaged (--spool-fallback), by reason; \
                     records after the position used are forwarded again.",
                    "reason",
                )?,
            ),
            spool_bytes: gauge(
                "smtpgw_spool_bytes",
                "Total size of the spool's segment files (0 without a spool).",
            )?,
            spool_segments: gauge(
                "smtpgw_spool_segments",
                "Segment files in the spool (0 without a spool).",
            )?,
            spool_oldest_age: {
                let g = Gauge::new(
                    "smtpgw_spool_oldest_record_age_seconds",
                    "Age of the oldest record in the spool (0 when empty or without a spool).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            spool_free_bytes: gauge(
                "smtpgw_spool_filesystem_free_bytes",
                "Bytes available on the spool's file system (0 without a spool).",
            )?,
            spool_corrupt: counter(
                "smtpgw_spool_corrupt_records_total",
                "Corrupt ranges in the spool found since start-up (acknowledged records damaged on disk; `smtpgw spool check` lists them).",
            )?,
            draining_gauge: gauge("smtpgw_draining", "Whether the gateway is draining (0/1).")?,
            io_backend_info: backend,
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            registry,
        })
    }

    /// A reply sent outside any session (the `421` for a connection over the limit).
    pub fn count_reply(&self, code: u16) {
        if let Some(c) = ReplyCode::from_code(code) {
            self.replies.of(c).inc();
        }
    }

    /// Which I/O backend (`uring` or `epoll`) serves connections: that series is 1, no
    /// other exists.
    pub fn set_io_backend(&self, backend: &str) {
        self.io_backend_info.reset();
        self.io_backend_info.with_label_values(&[backend]).set(1);
    }

    /// The certificate handshakes now present: its series is the only one.
    pub fn set_certificate(&self, leaf: &crate::certs::LeafInfo) {
        self.tls_certificate_expiry.reset();
        self.tls_certificate_expiry
            .with_label_values(&[leaf.subject.as_str()])
            .set(leaf.not_after);
    }

    /// A start or reload finished: `ok` when everything it read was taken.
    pub fn count_reload(&self, ok: bool, now_unix: i64) {
        let result = if ok { "ok" } else { "refused" };
        self.config_reloads.with_label_values(&[result]).inc();
        if ok {
            self.config_last_reload_success.set(now_unix);
        }
    }

    /// The configuration was loaded at start.
    pub fn set_loaded_at(&self, now_unix: i64) {
        self.config_last_reload_success.set(now_unix);
    }

    /// The SMTP listeners are up; `/readyz` may say yes.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// The gateway began draining; `/readyz` says no from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.draining_gauge.set(1);
    }

    /// The text exposition of every metric, with the sampled gauges brought up to date.
    pub fn render(&self, sink: &dyn Sink) -> Vec<u8> {
        // Counted elsewhere (the log writer, the backends at accept), brought up to date.
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.log_lines_dropped, crate::logging::lines_dropped());
        catch_up(
            self.refusals.of(Refusal::MaxConnections),
            self.connections_rejected_max.get(),
        );
        self.sink_up.set(i64::from(sink.health().is_ok()));
        if let Some(spool) = sink.spool_stats() {
            let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.spool_bytes.set(clamp(spool.bytes));
            self.spool_segments.set(clamp(spool.segments));
            let age = spool.oldest_received_at.map_or(0.0, |at| {
                (chrono::Utc::now() - at)
                    .num_microseconds()
                    .unwrap_or(i64::MAX) as f64
                    / 1e6
            });
            self.spool_oldest_age.set(age.max(0.0));
            self.spool_free_bytes.set(spool.free_bytes.map_or(0, clamp));
            // A running total sampled at each scrape: add what is new since the last.
            let seen = self.spool_corrupt.get();
            if spool.corrupt_ranges > seen {
                self.spool_corrupt.inc_by(spool.corrupt_ranges - seen);
            }
        }
        if let Some(stats) = sink.stats() {
            let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.kafka_queue_messages.set(clamp(stats.queue_messages));
            self.kafka_queue_bytes.set(clamp(stats.queue_bytes));
            self.kafka_waiting_messages
                .set(clamp(stats.waiting_messages));
            self.kafka_waiting_bytes.set(clamp(stats.waiting_bytes));
            self.kafka_topic_max_message_bytes
                .set(stats.topic_max_message_bytes.map_or(0, clamp));
            self.kafka_topic_too_small
                .set(i64::from(stats.topic_too_small));
            // Brokers come and go with the cluster's metadata; show only current ones.
            self.kafka_broker_rtt.reset();
            for (broker, rtt) in &stats.broker_rtt {
                let gauge: Gauge = self.kafka_broker_rtt.with_label_values(&[broker.as_str()]);
                gauge.set(*rtt);
            }
            if let Some(forward) = &stats.forward {
                self.forward_awaiting_records
                    .set(clamp(forward.awaiting_records));
                self.forward_awaiting_bytes
                    .set(clamp(forward.awaiting_bytes));
                // The sink keeps running totals; a counter only moves forward.
                let add = |counter: &IntCounter, total: u64| {
                    counter.inc_by(total.saturating_sub(counter.get()));
                };
                add(&self.forwarded_records, forward.forwarded_records);
                add(&self.forwarded_bytes, forward.forwarded_bytes);
                add(&self.forward_redelivered, forward.redelivered_records);
                add(&self.forward_restarts, forward.restarts);
                self.forward_oldest_age.set(forward.oldest_age_seconds);
                self.fallback_active.set(i64::from(forward.fallback_active));
                self.fallback_available
                    .set(i64::from(sink.degraded().is_none()));
                if let Some(reset) = forward.cursor_reset {
                    add(self.forward_cursor_resets.of(reset), 1);
                }
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on metric families that cannot exist here.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            debug!(error = %e, "encoding metrics");
        }
        out
    }

    /// `Ok` when ready, else the one-line reason.
    pub fn readiness(&self, sink: &dyn Sink) -> Result<(), String> {
        if !self.listening.load(Ordering::Acquire) {
            return Err("not listening yet".into());
        }
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if let Err(why) = sink.health() {
            return Err(if why.is_empty() {
                format!("sink {} unhealthy", sink.name())
            } else {
                format!("sink {} unhealthy: {why}", sink.name())
            });
        }
        Ok(())
    }

    /// A reactor's local accumulator, labelled with its index.
    pub fn reactor(self: &Arc<Self>, index: usize) -> ReactorMetrics {
        ReactorMetrics {
            stats: SessionStats::default(),
            edge: EdgeStats::default(),
            message_size: self.message_size.local(),
            data_duration: self.data_duration.local(),
            publish_duration: self.publish_duration.local(),
            busy: self.reactor_busy.with_label_values(&[&index.to_string()]),
            busy_seen: Duration::ZERO,
            metrics: Arc::clone(self),
        }
    }
}

/// One reactor's counts since its last flush; owned by that reactor's thread only.
pub struct ReactorMetrics {
    metrics: Arc<Metrics>,
    stats: SessionStats,
    edge: EdgeStats,
    message_size: LocalHistogram,
    data_duration: LocalHistogram,
    publish_duration: LocalHistogram,
    busy: Counter,
    busy_seen: Duration,
}

impl ReactorMetrics {
    /// Takes a session's counts (leaving it zeroed).
    pub fn absorb(&mut self, session: &mut SessionStats) {
        self.stats.absorb(session);
    }

    pub fn observe_message_size(&mut self, bytes: usize) {
        self.message_size.observe(bytes as f64);
    }

    pub fn observe_data(&mut self, took: Duration) {
        self.data_duration.observe(took.as_secs_f64());
    }

    pub fn observe_publish(&mut self, took: Duration) {
        self.publish_duration.observe(took.as_secs_f64());
    }

    /// The runtime's own busy time so far; the counter moves by the difference.
    pub fn set_busy(&mut self, total: Duration) {
        if let Some(delta) = total.checked_sub(self.busy_seen) {
            self.busy.inc_by(delta.as_secs_f64());
            self.busy_seen = total;
        }
    }

    /// Publishes everything counted since the last flush.
    pub fn flush(&mut self) {
        let m = &*self.metrics;
        let s = &mut self.stats;
        m.commands.publish(&mut s.commands);
        m.replies.publish(&mut s.replies);
        // A code outside the set has no series (a unit test keeps it from happening).
        s.replies_unlisted = 0;
        m.messages_rejected.publish(&mut s.messages_rejected);
        m.limit_closes.publish(&mut s.limit_closes);
        let e = &mut self.edge;
        m.connections_refused.publish(&mut e.refused);
        m.refusals.publish(&mut e.refusals);
        m.refusals.publish(&mut s.refusals);
        m.tls_handshakes.publish(&mut e.tls_handshakes);
        m.tls_failures.publish(&mut e.tls_failures);
        m.auth.publish(&mut e.auth);
        m.starttls_discarded
            .inc_by(std::mem::take(&mut e.starttls_discarded_bytes));
        m.proxy_headers.inc_by(std::mem::take(&mut e.proxy_headers));
        m.messages_accepted
            .inc_by(std::mem::take(&mut s.messages_accepted));
        m.smuggling_attempts
            .inc_by(std::mem::take(&mut s.smuggling_attempts));
        self.message_size.flush();
        self.data_duration.flush();
        self.publish_duration.flush();
    }
}

impl crate::conn::Observer for ReactorMetrics {
    fn absorb(&mut self, stats: &mut SessionStats) {
        ReactorMetrics::absorb(self, stats);
    }
    fn observe_data(&mut self, took: Duration) {
        ReactorMetrics::observe_data(self, took);
    }
    fn observe_publish(&mut self, took: Duration) {
        ReactorMetrics::observe_publish(self, took);
    }
    fn observe_message_size(&mut self, bytes: usize) {
        ReactorMetrics::observe_message_size(self, bytes);
    }
    fn absorb_edge(&mut self, stats: &mut EdgeStats) {
        self.edge.absorb(stats);
    }
}

/// The running HTTP endpoint; dropping it stops the server thread.
pub struct MetricsServer {
    #[cfg(any(test, feature = "testing"))]
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds on the caller's thread, so a bad `--metrics-listen` fails start-up, then
    /// serves on a thread of its own.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        sink: Arc<dyn Sink>,
    ) -> Result<MetricsServer, MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr, source };
        let std_listener = bind(addr).map_err(bind_err)?;
        let local_addr = std_listener.local_addr().map_err(bind_err)?;
        // Timers are needed: the accept back-off and the per-connection deadlines.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(MetricsError::Thread)?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("smtpgw-metrics".into())
            .spawn(move || rt.block_on(serve(listener, metrics, sink, stopped)))
            .map_err(MetricsError::Thread)?;
        info!(metrics_addr = %local_addr, "metrics endpoint");
        Ok(MetricsServer {
            #[cfg(any(test, feature = "testing"))]
            local_addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Connections waiting to be accepted; the kernel drops SYNs beyond it. Waiting in this
/// queue is how a probe gets its turn when the endpoint is full (see
/// [`MAX_METRICS_CONNECTIONS`]), so it is well above std's 128.
const LISTEN_BACKLOG: i32 = 1024;

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections the endpoint holds at once. A connection past it (or past
/// [`MAX_METRICS_CONNECTIONS_PER_ADDR`]) closes the least recently active one instead of
/// being refused, once that one has had [`EVICTION_GRACE`] to send its request; until
/// then accepting waits, and new connections queue in the kernel's backlog, first come
/// first served. So clients that open connections and never finish a request can
/// neither use up the process's descriptors nor keep a probe out: a probe waits its
/// turn in the backlog, and once accepted it has the grace to be answered. Far above
/// what scrapers and probes need.
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// Connections one client address holds before a new one from it closes its own least
/// recently active one (past its grace) rather than another address's.
pub const MAX_METRICS_CONNECTIONS_PER_ADDR: usize = 16;
/// How long a connection, once accepted or after its last request, cannot be closed to
/// make room for another.
pub const EVICTION_GRACE: Duration = Duration::from_millis(250);
/// A request's headers must arrive within this long (slow or half-sent requests, and
/// an idle keep-alive connection waiting for its next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer, however it behaves; scrapers simply reconnect.
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(120);
/// After a failed accept (out of descriptors), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One open endpoint connection, as the caps see it.
struct Held {
    addr: IpAddr,
    /// When it was accepted or last had a request.
    active: Instant,
    evict: Arc<Notify>,
}

/// The open connections, for the caps. Touched at accept, per request and at close
/// (on the endpoint's own thread); a scan of at most [`MAX_METRICS_CONNECTIONS`].
#[derive(Default)]
struct Holders {
    next_id: u64,
    held: HashMap<u64, Held>,
}

/// What a new connection from an address needs before it is served.
#[derive(Debug, PartialEq)]
enum Room {
    /// Under both caps.
    Free,
    /// Close this connection first.
    Evict(u64),
    /// The total cap is reached and every connection is within its grace until then.
    WaitUntil(Instant),
}

impl Holders {
    fn room(&self, addr: IpAddr, now: Instant) -> Room {
        let past_grace =
            |(id, active): (u64, Instant)| (now >= active + EVICTION_GRACE).then_some(id);
        let same = self.held.values().filter(|h| h.addr == addr).count();
        if same >= MAX_METRICS_CONNECTIONS_PER_ADDR {
            if let Some(id) = self.oldest(|h| h.addr == addr).and_then(past_grace) {
                return Room::Evict(id);
            }
            // All its own are within their grace: the total cap decides.
        }
        if self.held.len() < MAX_METRICS_CONNECTIONS {
            return Room::Free;
        }
        match self.oldest(|_| true) {
            Some(oldest) if past_grace(oldest).is_some() => Room::Evict(oldest.0),
            Some((_, active)) => Room::WaitUntil(active + EVICTION_GRACE),
            None => Room::Free,
        }
    }

    fn oldest(&self, which: impl Fn(&Held) -> bool) -> Option<(u64, Instant)> {
        self.held
            .iter()
            .filter(|(_, h)| which(h))
            .min_by_key(|(_, h)| h.active)
            .map(|(&id, h)| (id, h.active))
    }

    fn evict(&mut self, id: u64) {
        if let Some(h) = self.held.remove(&id) {
            h.evict.notify_one();
        }
    }

    fn admit(&mut self, addr: IpAddr, now: Instant, evict: Arc<Notify>) -> u64 {
        self.next_id += 1;
        let held = Held {
            addr,
            active: now,
            evict,
        };
        self.held.insert(self.next_id, held);
        self.next_id
    }

    fn touch(&mut self, id: u64, now: Instant) {
        if let Some(h) = self.held.get_mut(&id) {
            h.active = now;
        }
    }
}

/// Removes its connection from the table when the connection's task ends, however.
struct Release {
    holders: Arc<Mutex<Holders>>,
    id: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        lock(&self.holders).held.remove(&self.id);
    }
}

fn lock(holders: &Mutex<Holders>) -> std::sync::MutexGuard<'_, Holders> {
    holders
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    sink: Arc<dyn Sink>,
    mut stopped: oneshot::Receiver<()>,
) {
    let holders = Arc::new(Mutex::new(Holders::default()));
    let mut failing = false;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    if std::mem::take(&mut failing) {
                        info!("metrics endpoint: accepting again");
                    }
                    accepted
                }
                Err(e) => {
                    // Once per streak of failures, not every back-off.
                    if !std::mem::replace(&mut failing, true) {
                        warn!(error = %e, "metrics endpoint: accept failed; backing off");
                    }
                    // Out of descriptors: do not spin, and keep serving once they are back.
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Make room: close the least recently active connection once its grace is
        // over. Waiting here holds the next connections in the backlog, in order.
        let evict = Arc::new(Notify::new());
        let id = loop {
            let now = Instant::now();
            let room = {
                let mut table = lock(&holders);
                match table.room(peer.ip(), now) {
                    Room::Free => Ok(table.admit(peer.ip(), now, evict.clone())),
                    Room::Evict(old) => {
                        debug!("metrics endpoint: connection cap reached; closing the least recently active");
                        table.evict(old);
                        Ok(table.admit(peer.ip(), now, evict.clone()))
                    }
                    Room::WaitUntil(until) => Err(until),
                }
            };
            match room {
                Ok(id) => break id,
                Err(until) => tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep_until(until.into()) => {}
                },
            }
        };
        let release = Release {
            holders: holders.clone(),
            id,
        };
        let (metrics, sink) = (metrics.clone(), sink.clone());
        tokio::spawn(async move {
            let service = service_fn(|req| {
                lock(&release.holders).touch(release.id, Instant::now());
                let reply = respond(&req, &metrics, &*sink);
                async move { Ok::<_, Infallible>(reply) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                done = tokio::time::timeout(MAX_CONNECTION_TIME, conn) => match done {
                    Ok(Err(e)) => debug!(error = %e, "metrics connection"),
                    Err(_) => debug!("metrics connection open too long; closed"),
                    Ok(Ok(())) => {}
                },
                // Dropping the connection closes it.
                _ = evict.notified() => {}
            }
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics, sink: &dyn Sink) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match path {
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(metrics.render(sink))));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        _ => match metrics.readiness(sink) {
            Ok(()) => match sink.degraded() {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(why) => text(StatusCode::OK, format!("ready; degraded: {why}\n")),
            },
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn the_least_recently_active_goes_first_and_only_after_its_grace() {
        let t0 = Instant::now();
        let mut table = Holders::default();
        let ids: Vec<u64> = (0..MAX_METRICS_CONNECTIONS)
            .map(|i| {
                let at = t0 + Duration::from_millis(i as u64);
                table.admit(addr((i % 4) as u8), at, Arc::new(Notify::new()))
            })
            .collect();
        // Full: the oldest is within its grace, so the newcomer waits for it.
        assert_eq!(
            table.room(addr(9), t0),
            Room::WaitUntil(t0 + EVICTION_GRACE)
        );
        // A request makes the first one the most recently active.
        let later = t0 + EVICTION_GRACE + Duration::from_secs(1);
        table.touch(ids[0], later);
        assert_eq!(table.room(addr(9), later), Room::Evict(ids[1]));
        table.evict(ids[1]);
        assert_eq!(table.room(addr(9), later), Room::Free);
    }

    #[test]
    fn one_address_is_capped_on_its_own_connections() {
        let t0 = Instant::now();
        let mut table = Holders::default();
        let other = table.admit(addr(1), t0, Arc::new(Notify::new()));
        let first = table.admit(
            addr(2),
            t0 + Duration::from_millis(1),
            Arc::new(Notify::new()),
        );
        for i in 1..MAX_METRICS_CONNECTIONS_PER_ADDR {
            let at = t0 + Duration::from_millis(1 + i as u64);
            table.admit(addr(2), at, Arc::new(Notify::new()));
        }
        let later = t0 + EVICTION_GRACE + Duration::from_secs(1);
        // Within the grace, address 2's next connection fits under the total cap...
        assert_eq!(table.room(addr(2), t0), Room::Free);
        // ...after it, address 2 loses its own oldest, not address 1's older one...
        assert_eq!(table.room(addr(2), later), Room::Evict(first));
        // ...and another address is under both caps.
        assert_eq!(table.room(addr(3), later), Room::Free);
        assert!(table.held.contains_key(&other));
    }
}
