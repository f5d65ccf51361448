//! SIGHUP: re-reading the configuration while the gateway runs.
//!
//! Owns the swappable session settings every new connection reads at accept
//! ([`SessionConfigHandle`]) and the reload itself: the flags and environment as given
//! at start-up are resolved again over the re-read `--config` file, validated exactly as
//! at start-up, and only then applied. A configuration that fails is refused with a log
//! line and the running one stays. Connections already open keep the settings they were
//! accepted with, so a reload never drops or changes a conversation under way.
//!
//! What changes live: `accept-domain`, `max-message-size`, `max-recipients`, `bare-lf`,
//! `log-level` and `drain-timeout`; and the TLS certificate (`tls-cert`, `tls-key`, re-read
//! from disk on every SIGHUP by `server::reload_tls`: new handshakes use the new one,
//! sessions already encrypted keep theirs). Everything else (listeners, hostname, sink, reactors,
//! connection limits and timeouts) needs a restart; a reload that changes it says so.

use std::sync::{Arc, RwLock};

use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, ServerArgs};
use crate::logging::LogHandle;
use crate::sink::Sink;
use crate::smtp::SessionConfig;

/// The session settings new connections start with; SIGHUP replaces them.
///
/// One uncontended read lock and an `Arc` clone per accepted connection; never touched
/// per command.
pub struct SessionConfigHandle {
    /// Our name; fixed for the life of the process (it is in pre-rendered replies).
    pub hostname: String,
    /// The start-up `max_message_size`: memory budgets are sized from it, so a reload
    /// may lower the limit but not raise it above this.
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
        SessionConfigHandle {
            hostname: config.hostname.clone(),
            max_message_size_cap: config.max_message_size,
            current: RwLock::new(Arc::new(config)),
        }
    }

    /// The settings for a connection accepted now.
    pub fn current(&self) -> Arc<SessionConfig> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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

    /// Re-reads and applies the configuration. On error nothing changed; the error is
    /// also logged.
    pub fn reload(
        &self,
        running: &mut Config,
        sink: &dyn Sink,
        session: &SessionConfigHandle,
    ) -> Result<(), ConfigError> {
        let Some(path) = &self.args.file.config else {
            info!(
                "SIGHUP: no --config file; flags and environment cannot change, nothing to reload"
            );
            return Ok(());
        };
        let new = match self.args.clone().resolve() {
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
        // the files themselves after this (`server::reload_tls`), config file or not.
        if running.edge.tls().is_some() && new.edge.tls().is_some() {
            running.edge.tls_cert = new.edge.tls_cert.clone();
            running.edge.tls_key = new.edge.tls_key.clone();
        }
        // The session group is what changes live, with the domains it resolves to.
        running.session = new.session;
        running.accept_domains = new.accept_domains;
        running.accept_domains_defaulted = new.accept_domains_defaulted;
        running.log.log_level = new.log.log_level;
        running.log_level = new.log_level;
        running.limits.drain_timeout = new.limits.drain_timeout;
        let mut applied = crate::server::session_config_for(running, sink);
        if applied.max_message_size > session.max_message_size_cap {
            warn!(
                requested = applied.max_message_size,
                effective = session.max_message_size_cap,
                "SIGHUP: max-message-size cannot grow beyond its start-up value without a restart"
            );
            applied.max_message_size = session.max_message_size_cap;
        }
        info!(
            accept_domains = %applied.accept_domains.join(","),
            max_message_size = applied.max_message_size,
            max_recipients = applied.max_recipients,
            bare_lf = ?applied.bare_lf,
            log_level = %running.log_level,
            drain_timeout = ?running.limits.drain_timeout.0,
            "SIGHUP: configuration reloaded; new connections use it"
        );
        session.replace(applied);
        Ok(())
    }
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
    let but_drain = crate::config::Limits {
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
    let without_tls = |c: &Config| crate::config::Edge {
        tls_cert: None,
        tls_key: None,
        ..c.edge.clone()
    };
    check(
        "listen-tls,require-tls,proxy-*,trusted-cidr,max-*-per-ip,error-budget,greeting-delay",
        without_tls(running) != without_tls(new),
    );
    changed
}
