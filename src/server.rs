//! Wiring: turns a [`Config`] into a running gateway (sink, reactors, signals) and owns
//! the graceful drain on SIGTERM/SIGINT and the reload on SIGHUP (see [`crate::reload`]),
//! telling systemd about each step (see [`crate::notify`]).

use std::io;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::certs::TlsConfigError;
use crate::config::{Config, SinkKind};
use crate::conn::{ConnectionSettings, Edge, MinDataRate, PeerLimits, ProxyMode, TlsHandle};
use crate::limits::{PeerLimiter, PeerLimitsConfig, PerMinute};
use crate::metrics::{Metrics, MetricsError, MetricsServer};
use crate::net::{ListenerKind, ListenerSpec, NetError, ReactorParams, Reactors};
use crate::reload::{
    session_config_for, summarise, ReadReload, Reloader, Reread, SessionConfigHandle, TlsFiles,
    RELOAD_DEADLINE,
};
use crate::sink::fallback::{FallbackError, FallbackSink};
use crate::sink::kafka::{KafkaOptions, KafkaSink, KafkaSinkError};
use crate::sink::null::NullSink;
use crate::sink::record::RECEIVED_HEADROOM;
use crate::sink::spool::{SpoolError, SpoolOptions, SpoolSink};
use crate::sink::Sink;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--spool-dir {dir}: {source}")]
    Spool { dir: String, source: SpoolError },
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error("--spool-fallback (--spool-dir {dir}): {source}")]
    Fallback { dir: String, source: FallbackError },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("--auth-users {0}")]
    Auth(#[from] crate::auth::UsersError),
    #[error("cannot start: {0}")]
    Setup(io::Error),
    #[error("second signal during drain: exiting without waiting for sessions or the sink")]
    Interrupted,
}

/// What `smtpgw check-config` checks beyond the configuration's own validation, without
/// starting anything: the TLS certificate chain and key load as a start would load them,
/// and librdkafka accepts every producer setting's name and value (no broker is
/// contacted). Listen addresses are checked for syntax by the configuration; whether
/// they can be bound is only known at start.
pub fn check(config: &Config) -> Result<(), ServerError> {
    if let Some((cert, key)) = config.edge.tls() {
        crate::certs::load(cert, key, config.edge.tls_min_version)?;
    }
    if let Some(users) = &config.edge.auth_users {
        crate::auth::Users::load(users)?;
    }
    if config.spool.sink == SinkKind::Kafka {
        KafkaOptions::new(config.kafka.clone(), config.max_recipients())
            .client_config()?
            .create_native_config()
            .map_err(KafkaSinkError::Producer)?;
    }
    Ok(())
}

fn open_sink(config: &Config) -> Result<Arc<dyn Sink>, ServerError> {
    let spool_dir = &config.store.spool_dir;
    let spool_options = || SpoolOptions {
        max_bytes: Some(config.spool.spool_max_bytes.0).filter(|&n| n > 0),
        min_free_bytes: config.spool.spool_min_free_bytes.0,
        segment_size: config.spool.spool_segment_size.0,
        segment_age: Some(config.spool.spool_segment_age.0),
        ..SpoolOptions::default()
    };
    // The producer's message.max.bytes follows --max-message-size with room for the
    // Received: line, as the session computes it.
    let kafka = || {
        let mut options = KafkaOptions::new(config.kafka.clone(), config.max_recipients());
        options.max_value = Some(
            config
                .max_message_size()
                .saturating_add(RECEIVED_HEADROOM + config.hostname.len()),
        );
        options.fit_topic = config.max_message_size_auto();
        options
    };
    Ok(match config.spool.sink {
        SinkKind::Null => {
            warn!("--sink null: accepted messages are discarded (benchmarks only)");
            Arc::new(NullSink::new())
        }
        SinkKind::Spool => Arc::new(SpoolSink::open_with(spool_dir, spool_options()).map_err(
            |source| ServerError::Spool {
                dir: spool_dir.display().to_string(),
                source,
            },
        )?),
        SinkKind::Kafka if config.spool.spool_fallback => Arc::new(
            FallbackSink::open(
                spool_dir,
                spool_options(),
                &kafka(),
                config.spool.forward_window as usize,
            )
            .map_err(|source| ServerError::Fallback {
                dir: spool_dir.display().to_string(),
                source,
            })?,
        ),
        SinkKind::Kafka => Arc::new(KafkaSink::new(&kafka())?),
    })
}

fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Descriptors the gateway needs beside its connections (listeners, the spool's files,
/// the broker connections, the metrics endpoint, eventfds), at most.
const FD_RESERVE: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the connection limit
/// that fits in it. When `--max-connections` does not fit, it is lowered, with a
/// warning: past the real limit, accept fails with EMFILE and clients would hang with no
/// greeting, whereas below it they get `421 Too many connections`.
fn raise_fd_limit(max_connections: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            return max_connections;
        }
    };
    // A small limit (a test's prlimit) keeps half for the gateway itself, which uses
    // about two dozen descriptors before any client connects.
    let reserve = FD_RESERVE.min(limit / 2);
    let fits = usize::try_from(limit.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(1);
    if max_connections > fits {
        warn!(
            configured = max_connections,
            effective = fits,
            nofile = limit,
            "--max-connections lowered to fit the open-file limit (RLIMIT_NOFILE); raise \
             the hard limit (systemd LimitNOFILE=, ulimit -Hn) to allow more"
        );
        return fits;
    }
    max_connections
}

/// The connection driver's limits from the configuration.
pub fn limits(config: &Config) -> ConnectionSettings {
    ConnectionSettings {
        idle_timeout: config.limits.idle_timeout.0,
        max_session_time: config.limits.max_session_time.0,
        min_data_rate: config
            .limits
            .min_data_rate
            .0
            .map(|(bytes_per_second, window)| MinDataRate {
                bytes_per_second,
                window,
            }),
        output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
        sink: config.spool.sink.name(),
    }
}

/// Entries the per-address limiter keeps at most, beyond those live connections hold.
const PEER_TABLE_ENTRIES: usize = 64 * 1024;

/// The listeners and their edge settings, and the TLS handle a certificate reload
/// replaces (see [`reload_tls`]).
/// The AUTH verifier, when `--auth-users` is given: the file loaded (an error names
/// it and the line) and its threads started.
pub fn auth_verifier(config: &Config) -> Result<Option<Arc<crate::auth::Verifier>>, ServerError> {
    let e = &config.edge;
    let Some(users_file) = &e.auth_users else {
        return Ok(None);
    };
    let on = |n: u32| (n > 0).then_some(n);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    Ok(Some(crate::auth::Verifier::start(
        crate::auth::AuthSettings {
            users_file: users_file.clone(),
            max_failures_per_user: on(e.max_auth_failures_per_ip),
            message_rate: on(e.max_message_rate_per_user),
            threads,
        },
    )?))
}

pub fn listeners(
    config: &Config,
    metrics: &Arc<Metrics>,
    verifier: Option<&Arc<crate::auth::Verifier>>,
) -> Result<(Vec<ListenerSpec>, Option<TlsHandle>), ServerError> {
    let e = &config.edge;
    let tls = match e.tls() {
        Some((cert, key)) => {
            let loaded = crate::certs::load(cert, key, e.tls_min_version)?;
            report_certificate(&loaded.leaf, metrics, "TLS certificate loaded");
            Some(TlsHandle::new(loaded.config))
        }
        None => None,
    };
    // 0 turns a per-address limit off.
    let on = |n: u32| (n > 0).then_some(n);
    let peers: Arc<dyn PeerLimits> = PeerLimiter::new(
        PeerLimitsConfig {
            per_ip: on(e.max_connections_per_ip),
            per_prefix: on(e.max_connections_per_prefix),
            connection_rate: on(e.max_connection_rate_per_ip).map(PerMinute),
            message_rate: on(e.max_message_rate_per_ip).map(PerMinute),
            auth_failures: on(e.max_auth_failures_per_ip),
            trusted: e.trusted_cidr.clone(),
            max_entries: PEER_TABLE_ENTRIES,
        },
        std::time::Instant::now(),
        metrics.clone(),
    );
    // With --proxy-listen only that listener expects the header; without it, all do.
    let proxy = e.proxy_protocol.into();
    let edge = Edge {
        proxy: if e.proxy_listen.is_some() {
            ProxyMode::Off
        } else {
            proxy
        },
        proxy_trusted: e.proxy_trusted_cidr.clone(),
        tls: tls.clone(),
        implicit_tls: false,
        tls_handshake_timeout: Some(e.tls_handshake_timeout.0),
        require_tls: e.require_tls,
        greeting_delay: e.greeting_delay.0,
        error_budget: on(e.error_budget),
        peers: Some(peers),
        auth: verifier.map(|v| crate::conn::EdgeAuth {
            policy: crate::smtp::session::AuthPolicy {
                // Validation allows it only when the plaintext listeners are loopback.
                plaintext: e.auth_allow_plaintext,
                required: e.require_auth,
                relay: e.auth_relay,
            },
            verifier: v.clone(),
        }),
    };
    let mut specs = vec![ListenerSpec {
        addr: config.server.listen,
        kind: ListenerKind::Smtp,
        edge: Arc::new(edge.clone()),
    }];
    if let Some(addr) = e.proxy_listen {
        specs.push(ListenerSpec {
            addr,
            kind: ListenerKind::ProxiedSmtp,
            edge: Arc::new(Edge {
                proxy,
                ..edge.clone()
            }),
        });
    }
    if let Some(addr) = e.listen_tls {
        specs.push(ListenerSpec {
            addr,
            kind: ListenerKind::ImplicitTls,
            edge: Arc::new(Edge {
                implicit_tls: true,
                ..edge
            }),
        });
    }
    Ok((specs, tls))
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Certificates expiring within this many days are logged at `warn` (the alert
/// `SmtpgwTlsCertificateExpiring` uses the same 14 days).
const EXPIRY_WARNING_DAYS: i64 = 14;

/// Logs the subject and expiry of the certificate handshakes now present, and exports
/// its expiry.
fn report_certificate(leaf: &crate::certs::LeafInfo, metrics: &Metrics, what: &str) {
    metrics.set_certificate(leaf);
    let days_left = leaf.days_left(unix_now());
    let not_after = chrono::DateTime::from_timestamp(leaf.not_after, 0)
        .map_or_else(|| leaf.not_after.to_string(), |t| t.to_rfc3339());
    if days_left < EXPIRY_WARNING_DAYS {
        warn!(subject = %leaf.subject, %not_after, days_left, "{what}; it expires soon");
    } else {
        info!(subject = %leaf.subject, %not_after, days_left, "{what}");
    }
}

/// The running certificate's files, when TLS is on, for a reload to re-read.
fn tls_files(config: &Config, tls: Option<&TlsHandle>) -> Option<TlsFiles> {
    tls?;
    config.edge.tls().map(|(cert, key)| TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        min: config.edge.tls_min_version,
    })
}

/// Applies what a SIGHUP read: the configuration (see [`Reloader::apply`]) and the
/// certificate, which is re-read even when the configuration did not change (or there
/// is no --config): renewing a certificate in place is the usual reason for a SIGHUP.
/// Open sessions keep theirs. True when something was refused.
#[allow(clippy::too_many_arguments)]
fn apply_reload(
    reloader: &Reloader,
    read: ReadReload,
    what: Reread,
    config: &mut Config,
    sink: &dyn Sink,
    session: &SessionConfigHandle,
    tls: Option<&TlsHandle>,
    metrics: &Metrics,
) -> bool {
    // Refusals are logged by the reloader; the gateway runs on as it was.
    let mut refused =
        what == Reread::Everything && reloader.apply(read.config, config, sink, session).is_err();
    metrics
        .max_message_size
        .set(gauge_value(session.current().max_message_size));
    let cause = match what {
        Reread::Everything => "SIGHUP",
        Reread::Certificate => "certificate files changed",
    };
    match (tls, read.tls) {
        (Some(handle), Some(Ok(loaded))) => {
            handle.replace(loaded.config);
            report_certificate(
                &loaded.leaf,
                metrics,
                &format!("{cause}: TLS certificate reloaded; new handshakes use it"),
            );
        }
        (Some(_), Some(Err(e))) => {
            refused = true;
            error!(error = %e, "{cause}: TLS certificate refused; the running one stays");
        }
        _ => {}
    }
    metrics.count_reload(!refused, unix_now());
    refused
}

/// How long the certificate files must be quiet after a change before they are
/// re-read: a renewal writes the certificate and the key (or swaps a Secret volume's
/// links) in several steps, and the pair is only consistent after the last one.
const CERT_CHANGE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the gateway until a signal has drained it. `Ok` means a clean drain (exit 0).
pub fn run(mut config: Config, reloader: Reloader) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Setup)?;
    // Listen for signals before the first connection can arrive, so an early SIGTERM
    // drains instead of killing the process.
    // SIGHUP likewise: its default action would kill the process.
    let (mut term, mut int, mut hup) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate()).map_err(ServerError::Setup)?,
            signal(SignalKind::interrupt()).map_err(ServerError::Setup)?,
            signal(SignalKind::hangup()).map_err(ServerError::Setup)?,
        )
    };

    if config.accept_domains_defaulted {
        info!(
            "no --accept-domain given: accepting mail only for {}; add domains with \
             --accept-domain DOMAIN (repeatable) or SMTPGW_ACCEPT_DOMAIN=a.example,b.example",
            config.accept_domains.join(" and ")
        );
    }
    let max_connections =
        raise_fd_limit(usize::try_from(config.limits.max_connections).unwrap_or(usize::MAX));
    let sink = open_sink(&config)?;
    let metrics = Arc::new(Metrics::new()?);
    // The configuration in force was read and checked before anything started.
    metrics.set_loaded_at(unix_now());
    metrics.connections_max.set(gauge_value(max_connections));
    metrics
        .publish_inflight_messages_limit
        .set(gauge_value(config.kafka.max_inflight_messages));
    metrics
        .publish_inflight_bytes_limit
        .set(gauge_value(config.kafka.max_inflight_bytes.0));
    // Up before the SMTP listeners, so /healthz answers (and /readyz says "not
    // listening yet") while the reactors start.
    let _metrics_server =
        MetricsServer::start(config.server.metrics_listen, metrics.clone(), sink.clone())?;
    let session = Arc::new(SessionConfigHandle::with_cap(
        session_config_for(&config, &*sink),
        config.max_message_size(),
    ));
    // With `--max-message-size auto`, SIZE follows a Kafka topic whose limit changes
    // while running (read again when the sink reconnects); the sink's thread says so
    // here, and the loop below re-derives the session settings.
    let (size_changed_tx, mut size_changed) = tokio::sync::mpsc::unbounded_channel();
    sink.watch_size(Box::new(move || {
        let _ = size_changed_tx.send(());
    }));
    let max_message_size = session.current().max_message_size;
    metrics.max_message_size.set(gauge_value(max_message_size));
    // What a certificate reload on SIGHUP replaces (`reload_tls`).
    let verifier = auth_verifier(&config)?;
    let (specs, tls) = listeners(&config, &metrics, verifier.as_ref())?;
    let reactors = Reactors::start(
        config.server.io_backend,
        ReactorParams {
            listeners: specs,
            reactors: config.reactors,
            pin_cpus: !config.server.no_cpu_pinning,
            session: session.clone(),
            sink: sink.clone(),
            metrics: metrics.clone(),
            max_connections,
            limits: limits(&config),
            max_body_memory: config.max_body_memory,
        },
    )?;
    metrics.set_listening();
    info!(
        hostname = %config.hostname,
        sink = %sink.name(),
        accept_domains = %summarise(&config.accept_domains),
        max_message_size,
        max_connections,
        "ready"
    );
    // Every listener is bound and its reactors run: only now may systemd start what
    // depends on us (and count the start as done).
    let status = format!(
        "accepting on {} ({} backend, sink {})",
        reactors.local_addr(),
        reactors.backend(),
        sink.name()
    );
    crate::notify::ready(&status);
    let watchdog = match crate::notify::watchdog_interval() {
        Some(interval) => Some(
            crate::notify::Watchdog::start(interval, reactors.liveness())
                .map_err(ServerError::Setup)?,
        ),
        None => None,
    };

    rt.block_on(async move {
        // A SIGHUP's files are read on a thread of their own (`Reloader::read`); this
        // loop only waits for the result, beside SIGTERM, so a file that is slow to read
        // never delays a drain. One read at a time: a SIGHUP during one asks for another
        // after it, since the files may have changed since it began.
        let mut pending: Option<(oneshot::Receiver<ReadReload>, Reread)> = None;
        // What the next read re-reads, once none is under way.
        let mut again: Option<Reread> = None;
        let deadline = tokio::time::sleep(RELOAD_DEADLINE);
        tokio::pin!(deadline);
        // A renewed certificate is picked up without a signal: the watcher's thread
        // says that the files changed, and the read starts once they are quiet.
        let (cert_changed_tx, mut cert_changed) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = match tls_files(&config, tls.as_ref()) {
            Some(files) => match crate::certs::watch(&[&files.cert, &files.key], move || {
                let _ = cert_changed_tx.send(());
            }) {
                Ok(watcher) => Some(watcher),
                Err(e) => {
                    warn!(error = %e, "cannot watch the certificate files; a renewal needs a SIGHUP");
                    None
                }
            },
            None => None,
        };
        let settle = tokio::time::sleep(CERT_CHANGE_SETTLE);
        tokio::pin!(settle);
        let mut settling = false;
        // The AUTH users file likewise: re-read (on a thread of its own) on SIGHUP and
        // once its changes are quiet.
        let (users_changed_tx, mut users_changed) = tokio::sync::mpsc::unbounded_channel();
        let _users_watcher = verifier.as_ref().and_then(|v| {
            match crate::certs::watch(&[v.users_file()], move || {
                let _ = users_changed_tx.send(());
            }) {
                Ok(watcher) => Some(watcher),
                Err(e) => {
                    warn!(error = %e, "cannot watch the AUTH users file; a change needs a SIGHUP");
                    None
                }
            }
        });
        let reload_users = |why: &'static str| {
            if let Some(v) = verifier.clone() {
                let spawned = std::thread::Builder::new()
                    .name("smtpgw-auth-reload".into())
                    .spawn(move || {
                        info!(trigger = why, "re-reading the AUTH users file");
                        v.reload();
                    });
                if let Err(e) = spawned {
                    error!(error = %e, "cannot start the thread that re-reads the AUTH users file");
                }
            }
        };
        let users_settle = tokio::time::sleep(CERT_CHANGE_SETTLE);
        tokio::pin!(users_settle);
        let mut users_settling = false;
        let which = loop {
            if pending.is_none() {
                if let Some(what) = again.take() {
                    pending = Some((reloader.read(tls_files(&config, tls.as_ref()), what), what));
                    deadline.as_mut().reset(tokio::time::Instant::now() + RELOAD_DEADLINE);
                }
            }
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    if pending.is_none() {
                        crate::notify::reloading();
                    }
                    again = Some(Reread::Everything);
                    reload_users("SIGHUP");
                }
                Some(()) = users_changed.recv() => {
                    users_settle.as_mut().reset(tokio::time::Instant::now() + CERT_CHANGE_SETTLE);
                    users_settling = true;
                }
                _ = &mut users_settle, if users_settling => {
                    users_settling = false;
                    reload_users("file changed");
                }
                Some(()) = size_changed.recv() => {
                    let size = session.follow_sink(&config, &*sink);
                    metrics.max_message_size.set(gauge_value(size));
                }
                Some(()) = cert_changed.recv() => {
                    settle.as_mut().reset(tokio::time::Instant::now() + CERT_CHANGE_SETTLE);
                    settling = true;
                }
                _ = &mut settle, if settling => {
                    settling = false;
                    // A signal's reload re-reads the certificate too.
                    again.get_or_insert(Reread::Certificate);
                }
                read = async {
                    match pending.as_mut() {
                        Some((rx, _)) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if pending.is_some() => {
                    let what = pending.take().map_or(Reread::Everything, |(_, what)| what);
                    let refused = match read {
                        Ok(read) => apply_reload(
                            &reloader, read, what, &mut config, &*sink, &session, tls.as_ref(), &metrics,
                        ),
                        Err(_) => {
                            error!("SIGHUP: the configuration could not be read; the running one stays");
                            metrics.count_reload(false, unix_now());
                            true
                        }
                    };
                    // Serving either way: a refused configuration leaves the old one.
                    crate::notify::reloaded(if refused {
                        "configuration reload refused (see the log); serving with the previous one"
                    } else {
                        &status
                    });
                }
                _ = &mut deadline, if pending.is_some() => {
                    // Dropping the receiver abandons the read; its thread ends on its own.
                    pending = None;
                    metrics.count_reload(false, unix_now());
                    error!(
                        deadline = ?RELOAD_DEADLINE,
                        "SIGHUP: reading the configuration and certificate took too long; \
                         abandoned, the running configuration stays"
                    );
                    crate::notify::reloaded(
                        "configuration reload timed out (see the log); serving with the previous one",
                    );
                }
            }
        };
        crate::notify::stopping();
        info!(
            signal = %which,
            open = reactors.open_connections(),
            drain_timeout = ?config.limits.drain_timeout.0,
            "draining: no new connections; sessions finish their message in flight"
        );
        metrics.set_draining();
        reactors.begin_drain();

        let deadline = tokio::time::sleep(config.limits.drain_timeout.0);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = reactors.all_closed() => {
                    info!("all sessions finished");
                    break;
                }
                _ = &mut deadline => {
                    let open = reactors.open_connections();
                    warn!(open, "drain timeout: closing the remaining connections");
                    break;
                }
                _ = term.recv() => return Err(ServerError::Interrupted),
                _ = int.recv() => return Err(ServerError::Interrupted),
                _ = hup.recv() => info!("SIGHUP during the drain: ignored"),
            }
        }

        // Joining threads and flushing the sink block, so they run off this thread and a
        // further signal can still cut them short.
        if let Some(w) = &watchdog {
            w.reactors_stopped();
        }
        let finish = tokio::task::spawn_blocking(move || {
            reactors.stop();
            sink.shutdown();
        });
        tokio::select! {
            joined = finish => {
                if joined.is_err() {
                    warn!("shutdown panicked");
                }
            }
            _ = term.recv() => return Err(ServerError::Interrupted),
            _ = int.recv() => return Err(ServerError::Interrupted),
        }
        info!("stopped");
        Ok(())
    })
}
