//! SIGHUP: re-reading the configuration while the gateway runs.
//!
//! Owns the swappable session settings every new connection reads at accept
//! ([`SessionConfigHandle`]) and the reload itself: the flags and environment as given
//! at start-up are resolved again over the re-read `--config` file, validated exactly as
//! at start-up, and only then applied. A configuration that fails is refused with a log
//! line and the running one stays. Connections already open keep the settings they were
//! accepted with, so a reload never drops or changes a conversation under way.
//!
//! The files are read and parsed on a thread of their own, within [`RELOAD_DEADLINE`],
//! so the signal thread stays free to drain on SIGTERM whatever the files are.
//!
//! What changes live: `accept-domain`, `max-message-size`, `max-recipients`, `bare-lf`,
//! `log-level` and `drain-timeout`; and the TLS certificate (`tls-cert`, `tls-key`,
//! `tls-min-version`, re-read from disk on every SIGHUP and whenever the files change, by
//! [`Reloader::read`], and applied by the server: new handshakes use the new one,
//! sessions already encrypted keep theirs); and the SMTP AUTH users file's contents
//! (`--auth-users`, re-read by `crate::auth::Verifier::reload` on every SIGHUP and
//! whenever the file changes). Everything else (listeners, hostname, sink, reactors,
//! connection limits and timeouts) needs a restart; a reload that changes it says so.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::certs::{LoadedCert, TlsConfigError, TlsMinVersion};

use crate::config::{Config, ConfigError, ServerArgs};
use crate::logging::LogHandle;
use crate::sink::record::RECEIVED_HEADROOM;
use crate::sink::Sink;
use crate::smtp::SessionConfig;

/// The session settings new connections start with; SIGHUP replaces them.
///
/// One uncontended read lock and an `Arc` clone per accepted connection; never touched
/// per command.
pub struct SessionConfigHandle {
    /// Our name; fixed for the life of the process (it is in pre-rendered replies).
    pub hostname: String,
    /// The start-up `--max-message-size`: memory budgets are sized from it, so a reload
    /// (or a sink whose limit grew) may lower the limit but not raise it above this.
    pub max_message_size_cap: usize,
    current: RwLock<Arc<SessionConfig>>,
}

impl From<SessionConfig> for SessionConfigHandle {
    fn from(config: SessionConfig) -> Self {
        SessionConfigHandle::new(config)
    }
}

impl SessionConfigHandle {
    pub fn new(config: SessionConfig) -> Self {
        let cap = config.max_message_size;
        SessionConfigHandle::with_cap(config, cap)
    }

    /// As [`SessionConfigHandle::new`], for settings already lowered to what the sink
    /// holds: `cap` is the configured `--max-message-size`, which the advertised size
    /// may climb back to when the sink's limit grows.
    pub fn with_cap(config: SessionConfig, cap: usize) -> Self {
        SessionConfigHandle {
            hostname: config.hostname.clone(),
            max_message_size_cap: cap.max(config.max_message_size),
            current: RwLock::new(Arc::new(config)),
        }
    }

    /// The sink's size limit changed while running (`--max-message-size auto` and a
    /// Kafka topic whose limit was read again): new connections get the size derived
    /// from it, as at start-up; open ones keep theirs. Says so at `warn` and returns the
    /// size new connections advertise.
    pub fn follow_sink(&self, running: &Config, sink: &dyn Sink) -> usize {
        let before = self.current().max_message_size;
        let mut applied = session_config_for(running, sink);
        applied.max_message_size = applied.max_message_size.min(self.max_message_size_cap);
        let after = applied.max_message_size;
        if after != before {
            warn!(
                before,
                after,
                sink = %sink.name(),
                "the sink's size limit changed: new sessions advertise SIZE {after} (was {before})"
            );
            self.replace(applied);
        }
        after
    }

    /// The settings for a connection accepted now.
    pub fn current(&self) -> Arc<SessionConfig> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    #[cfg(any(test, feature = "testing"))]
    /// New connections get `config` from now on, as a reload gives them.
    pub fn set(&self, config: SessionConfig) {
        self.replace(config);
    }

    fn replace(&self, config: SessionConfig) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
    }
}

/// Everything a reload needs besides the running state.
pub struct Reloader {
    /// Flags and environment as parsed at start-up; they still win over the file.
    args: ServerArgs,
    log: Option<LogHandle>,
}

impl Reloader {
    pub fn new(args: ServerArgs, log: Option<LogHandle>) -> Self {
        Reloader { args, log }
    }

    /// Starts reading the configuration file and the certificate files on a thread of
    /// their own, so the thread that handles signals never waits on a file system or a
    /// long parse: it awaits the answer with [`RELOAD_DEADLINE`] beside SIGTERM. `tls`
    /// is the running certificate and key paths (`None` when TLS is off); when the
    /// re-read file keeps TLS on, its paths are the ones read.
    ///
    /// `what` says whether the configuration file is re-read too (a signal), or only
    /// the certificate (its files changed on disk).
    pub fn read(&self, tls: Option<TlsFiles>, what: Reread) -> oneshot::Receiver<ReadReload> {
        let (tx, rx) = oneshot::channel();
        let args = self.args.clone();
        let work = move || {
            let config =
                (what == Reread::Everything && args.file.config.is_some()).then(|| args.resolve());
            let tls = tls.map(|running| {
                let files = match &config {
                    Some(Ok(new)) => new.edge.tls().map_or(running, |(cert, key)| TlsFiles {
                        cert: cert.to_owned(),
                        key: key.to_owned(),
                        min: new.edge.tls_min_version,
                    }),
                    _ => running,
                };
                crate::certs::load(&files.cert, &files.key, files.min)
            });
            // The receiver is gone only when the deadline passed or the gateway stops.
            let _ = tx.send(ReadReload { config, tls });
        };
        if let Err(e) = std::thread::Builder::new()
            .name("smtpgw-reload".into())
            .spawn(work)
        {
            // Without a thread the receiver reports a closed channel: a refused reload.
            error!(error = %e, "SIGHUP: cannot start the thread that reads the configuration");
        }
        rx
    }

    /// Applies the configuration [`Reloader::read`] read (the certificate is the
    /// server's to apply). On error nothing changed; the error is also logged.
    pub fn apply(
        &self,
        read: Option<Result<Config, ConfigError>>,
        running: &mut Config,
        sink: &dyn Sink,
        session: &SessionConfigHandle,
    ) -> Result<(), ConfigError> {
        let (Some(path), Some(read)) = (&self.args.file.config, read) else {
            info!(
                "SIGHUP: no --config file; flags and environment cannot change, nothing to reload"
            );
            return Ok(());
        };
        let new = match read {
            Ok(new) => new,
            Err(e) => {
                error!(
                    config = %path.display(),
                    error = %e,
                    "SIGHUP: configuration refused; the running configuration stays"
                );
                return Err(e);
            }
        };
        if let Some(log) = &self.log {
            if new.log_level != running.log_level {
                if let Err(e) = log.set_filter(&new.log_level) {
                    // Checked during resolve; only a broken subscriber gets here.
                    warn!(error = %e, "SIGHUP: log filter not changed");
                }
            }
        }
        let restart_only = restart_only_changes(running, &new);
        if !restart_only.is_empty() {
            warn!(
                settings = %restart_only.join(","),
                "SIGHUP: these settings only change at a restart; they keep their running values"
            );
        }
        // The certificate paths follow the file while TLS stays on; the server re-reads
        // the files themselves (`Reloader::read`), config file or not.
        if running.edge.tls().is_some() && new.edge.tls().is_some() {
            running.edge.tls_cert = new.edge.tls_cert.clone();
            running.edge.tls_key = new.edge.tls_key.clone();
            running.edge.tls_min_version = new.edge.tls_min_version;
        }
        // What new connections use now, to say what the reload changes.
        let before = session.current();
        let (log_level_before, drain_before) =
            (running.log_level.clone(), running.limits.drain_timeout);
        let domains_before = running.accept_domains.clone();
        // The session group is what changes live, with the domains it resolves to.
        running.session = new.session;
        running.accept_domains = new.accept_domains;
        running.accept_domains_defaulted = new.accept_domains_defaulted;
        running.log.log_level = new.log.log_level;
        running.log_level = new.log_level;
        running.limits.drain_timeout = new.limits.drain_timeout;
        let mut applied = session_config_for(running, sink);
        if applied.max_message_size > session.max_message_size_cap {
            warn!(
                requested = applied.max_message_size,
                effective = session.max_message_size_cap,
                "SIGHUP: max-message-size cannot grow beyond its start-up value without a restart"
            );
            applied.max_message_size = session.max_message_size_cap;
        }
        // One line naming what changed, old and new, so that a reload of an unchanged
        // (or large) file says so in a few words.
        let mut changed = Vec::new();
        if domains_before != running.accept_domains {
            changed.push(format!(
                "accept-domain: {} -> {}",
                summarise(&domains_before),
                summarise(&running.accept_domains)
            ));
        }
        let mut differs = |name: &str, old: String, new: String| {
            if old != new {
                changed.push(format!("{name}: {old} -> {new}"));
            }
        };
        differs(
            "max-message-size",
            before.max_message_size.to_string(),
            applied.max_message_size.to_string(),
        );
        differs(
            "max-recipients",
            before.max_recipients.to_string(),
            applied.max_recipients.to_string(),
        );
        differs(
            "bare-lf",
            format!("{:?}", before.bare_lf),
            format!("{:?}", applied.bare_lf),
        );
        differs("log-level", log_level_before, running.log_level.clone());
        differs(
            "drain-timeout",
            drain_before.to_string(),
            running.limits.drain_timeout.to_string(),
        );
        if changed.is_empty() {
            info!("SIGHUP: configuration reloaded; no setting changed");
        } else {
            info!(
                changed = %changed.join("; "),
                "SIGHUP: configuration reloaded; new connections use it"
            );
        }
        session.replace(applied);
        Ok(())
    }
}

/// How long a SIGHUP's reading and parsing may take before it is abandoned (the
/// running configuration stays). Only a hung file system or a pathological file gets
/// near it: a 300,000-domain file takes well under a second.
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

/// What a reload read, off the signal thread: the configuration (`None` without
/// `--config`, or when only the certificate was re-read) and the certificate (`None`
/// with TLS off).
pub struct ReadReload {
    pub config: Option<Result<Config, ConfigError>>,
    pub tls: Option<Result<LoadedCert, TlsConfigError>>,
}

/// The running certificate's files and the TLS versions it allows.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min: TlsMinVersion,
}

/// What a reload re-reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reread {
    /// SIGHUP: the configuration file and the certificate.
    Everything,
    /// The certificate or key file changed on disk.
    Certificate,
}

/// Lists in log lines are cut to their first few entries and their count: a log line
/// stays readable (and small) with an accept list of hundreds of thousands of domains.
pub fn summarise(list: &[String]) -> String {
    const SHOWN: usize = 8;
    if list.len() <= SHOWN {
        return list.join(",");
    }
    format!("{},... ({} in all)", list[..SHOWN].join(","), list.len())
}

/// The settings that differ between `running` and `new` but cannot change live, by
/// group (the session group and the log level always change live).
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check(
        "listen,metrics-listen,hostname,reactors,io-backend",
        running.server != new.server,
    );
    let but_drain = crate::config::LimitSettings {
        drain_timeout: new.limits.drain_timeout,
        ..running.limits.clone()
    };
    check(
        "max-connections,max-body-memory,min-data-rate,idle-timeout,max-session-time",
        but_drain != new.limits,
    );
    check("spool-dir", running.store != new.store);
    check("sink,spool-*", running.spool != new.spool);
    check(
        "kafka-*,publish-timeout,max-inflight-*",
        running.kafka != new.kafka,
    );
    check(
        "log-format,log-recipients",
        running.log.log_format != new.log.log_format
            || running.log.log_recipients != new.log.log_recipients,
    );
    check(
        "tls-cert,tls-key (turning TLS on or off)",
        running.edge.tls().is_some() != new.edge.tls().is_some(),
    );
    let without_tls = |c: &Config| crate::config::EdgeSettings {
        tls_cert: None,
        tls_key: None,
        tls_min_version: TlsMinVersion::default(),
        ..c.edge.clone()
    };
    check(
        "listen-tls,require-tls,proxy-*,trusted-cidr,max-*-per-ip,error-budget,greeting-delay,\
         auth-users,auth-allow-plaintext,require-auth,auth-relay,max-message-rate-per-user \
         (the users file's contents reload)",
        without_tls(running) != without_tls(new),
    );
    changed
}

/// The session settings a configuration gives, before the sink has a say.
pub fn session_config(config: &Config) -> SessionConfig {
    SessionConfig {
        hostname: config.hostname.clone(),
        accept_domains: config.accept_domains.iter().cloned().collect(),
        max_message_size: config.max_message_size(),
        max_recipients: config.max_recipients(),
        bare_lf: config.session.bare_lf,
        headroom: RECEIVED_HEADROOM + config.hostname.len(),
    }
}

/// The session settings, with `max_message_size` (and so the advertised SIZE) lowered
/// to what the sink can store once the `Received:` line is in front of the body.
pub fn session_config_for(config: &Config, sink: &dyn Sink) -> SessionConfig {
    let mut session = session_config(config);
    if let Some(max_value) = sink.max_message_value() {
        let room = session.headroom;
        let cap = max_value.saturating_sub(room).max(1);
        if cap < session.max_message_size {
            if config.max_message_size_auto() {
                warn!(
                    effective = cap,
                    sink = %sink.name(),
                    "--max-message-size auto: advertising SIZE {cap}, what the sink accepts"
                );
            } else {
                warn!(
                    configured = session.max_message_size,
                    effective = cap,
                    sink = %sink.name(),
                    "--max-message-size lowered to what the sink accepts"
                );
            }
            session.max_message_size = cap;
        }
    }
    session
}
