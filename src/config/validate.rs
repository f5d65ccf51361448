//! The validated configuration: layering, `print-config`, and the checks a start
//! makes before anything runs.

use super::*;

/// A configuration the gateway can run with: layered, defaulted and validated. The
/// groups are as given; the fields after them are what their defaults resolve to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub server: ServerSettings,
    pub session: SessionSettings,
    pub limits: LimitSettings,
    pub edge: EdgeSettings,
    pub store: SpoolDirSettings,
    pub spool: SpoolSettings,
    pub kafka: KafkaSettings,
    pub log: LogSettings,
    /// `--hostname`, else the system's, else `localhost`.
    pub hostname: String,
    /// Normalised (UTS #46 A-labels in lower case), deduplicated, never empty.
    pub accept_domains: Vec<String>,
    /// No --accept-domain was given; start-up says what that means.
    pub accept_domains_defaulted: bool,
    pub reactors: usize,
    /// Across all reactors; each gets an equal share.
    pub max_body_memory: usize,
    /// Tracing filter directives, already checked.
    pub log_level: String,
}

impl Config {
    pub fn max_message_size(&self) -> usize {
        self.session.max_message_size.as_usize()
    }

    /// `--max-message-size auto`: fit the sink rather than refuse to start.
    pub fn max_message_size_auto(&self) -> bool {
        self.session.max_message_size.auto
    }

    pub fn max_recipients(&self) -> usize {
        usize::try_from(self.session.max_recipients).unwrap_or(usize::MAX)
    }
}

/// A configuration that cannot run. Its Display is one line that names the flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag}: {msg}")]
    Invalid { flag: &'static str, msg: String },
    #[error("--config {path}: {msg}")]
    File { path: String, msg: String },
    /// A bad value from the environment or the file, named after where it came from.
    #[error("{origin}: {msg}")]
    Source { origin: String, msg: String },
}

pub(super) fn invalid(flag: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        msg: msg.into(),
    }
}

impl ServerArgs {
    /// Reads the config file if one is named, then layers and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = self.file.load()?;
        resolve(self, file.as_ref(), system_hostname)
    }

    /// Every group with the file's values under the flags and variables.
    fn layered(self, file: Option<&ConfigFile>) -> Result<ServerArgs, ConfigError> {
        let s = &self.sources;
        Ok(ServerArgs {
            server: layer(self.server, file, s)?,
            session: layer(self.session, file, s)?,
            limits: layer(self.limits, file, s)?,
            edge: layer(self.edge, file, s)?,
            store: layer(self.store, file, s)?,
            spool: layer(self.spool, file, s)?,
            kafka: layer(self.kafka, file, s)?,
            log: layer(self.log, file, s)?,
            file: self.file,
            sources: self.sources,
        })
    }
}

/// Where a setting's effective value came from, as `print-config` says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Environment(String),
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File => f.write_str("file"),
            Origin::Environment(var) => write!(f, "environment {var}"),
            Origin::Flag => f.write_str("flag"),
        }
    }
}

impl ServerArgs {
    /// The effective configuration in the file's syntax, one `key = value  # origin`
    /// a line, group by group, like `postconf`: what a start with the same flags,
    /// variables and file would run with (settings without a value and no default are
    /// `# key (unset)` lines). Validates first, so a configuration a start would refuse
    /// is refused here with the same error.
    pub fn print_config(self) -> Result<String, ConfigError> {
        let file = self.file.load()?;
        resolve(self.clone(), file.as_ref(), system_hostname)?;
        let sources = self.sources.clone();
        let args = self.layered(file.as_ref())?;
        let origin = |key: &str| match sources.explicit.iter().find(|(f, _)| f == key) {
            Some((_, Some(var))) => Origin::Environment(var.clone()),
            Some((_, None)) => Origin::Flag,
            None if file.as_ref().is_some_and(|f| f.table.contains_key(key)) => Origin::File,
            None => Origin::Default,
        };
        let mut out = String::new();
        if let Some(file) = &file {
            out.push_str(&format!("# --config {}\n", file.path.display()));
        }
        print_group(&mut out, &args.server, &origin)?;
        print_group(&mut out, &args.session, &origin)?;
        print_group(&mut out, &args.limits, &origin)?;
        print_group(&mut out, &args.edge, &origin)?;
        print_group(&mut out, &args.store, &origin)?;
        print_group(&mut out, &args.spool, &origin)?;
        print_group(&mut out, &args.kafka, &origin)?;
        print_group(&mut out, &args.log, &origin)?;
        Ok(out)
    }
}

/// Appends one group's settings in flag order.
pub(super) fn print_group<G: Group + Serialize>(
    out: &mut String,
    group: &G,
    origin: &dyn Fn(&str) -> Origin,
) -> Result<(), ConfigError> {
    use fmt::Write;
    let values = toml::Table::try_from(group).map_err(|e| ConfigError::File {
        path: "(print-config)".to_owned(),
        msg: e.to_string(),
    })?;
    for key in G::keys() {
        let _ = match values.get(&key) {
            Some(value) => {
                let one = toml::Table::from_iter([(key.clone(), value.clone())]);
                let line = toml::to_string(&one).unwrap_or_default();
                writeln!(out, "{}  # {}", line.trim_end(), origin(&key))
            }
            None => writeln!(out, "# {key} (unset)  # {}", origin(&key)),
        };
    }
    Ok(())
}

/// The system's hostname, if it has a usable one.
pub fn system_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    validate_hostname(name).ok()?;
    Some(name.to_owned())
}

/// Layers `file` under the flags and environment of `args`, and validates; errors name
/// the source of the bad value. `default_hostname` is only consulted when no hostname is
/// configured.
pub fn resolve(
    args: ServerArgs,
    file: Option<&ConfigFile>,
    default_hostname: impl FnOnce() -> Option<String>,
) -> Result<Config, ConfigError> {
    let sources = args.sources.clone();
    let args = args.layered(file)?;
    validate(args, default_hostname).map_err(|e| sources.name(e, file))
}

pub(super) fn validate(
    a: ServerArgs,
    default_hostname: impl FnOnce() -> Option<String>,
) -> Result<Config, ConfigError> {
    let hostname = match &a.server.hostname {
        Some(h) => {
            validate_hostname(h).map_err(|m| invalid("--hostname", m))?;
            h.clone()
        }
        None => default_hostname().unwrap_or_else(|| "localhost".to_owned()),
    };
    let accept_domains_defaulted = a.session.accept_domain.is_empty();
    let defaults = ["localhost".to_owned(), hostname.clone()];
    let given = if accept_domains_defaulted {
        &defaults[..]
    } else {
        &a.session.accept_domain[..]
    };
    // Order kept (it is what the log shows), duplicates dropped in O(n): a list of
    // hundreds of thousands of domains must not cost quadratic time on reload.
    let mut seen = std::collections::HashSet::with_capacity(given.len());
    let mut accept_domains = Vec::with_capacity(given.len());
    for d in given {
        let d = normalize_domain(d).map_err(|m| invalid("--accept-domain", m))?;
        if seen.insert(d.clone()) {
            accept_domains.push(d);
        }
    }

    let reactors = match a.server.reactors {
        Some(n) => ranged("--reactors", n, 1, MAX_REACTORS)? as usize,
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_REACTORS as usize),
    };
    let max_message_size = a.session.max_message_size.bytes.0;
    if !(1..=MAX_MESSAGE_SIZE_LIMIT).contains(&max_message_size) {
        return Err(invalid(
            "--max-message-size",
            format!("must be between 1 and 1G (got {max_message_size})"),
        ));
    }
    let max_body_memory = match a.limits.max_body_memory {
        // One message of the largest size must fit, or it could never be received.
        Some(ByteSize(n)) if n < max_message_size => {
            return Err(invalid(
                "--max-body-memory",
                format!("must be at least --max-message-size ({max_message_size}) (got {n})"),
            ))
        }
        Some(n) => n.as_usize(),
        None => default_body_memory().max(a.session.max_message_size.as_usize().saturating_mul(2)),
    };
    at_least_one("--max-recipients", a.session.max_recipients)?;
    at_least_one("--max-connections", a.limits.max_connections)?;
    for (flag, Dur(d), allow_zero) in [
        ("--idle-timeout", a.limits.idle_timeout, false),
        ("--max-session-time", a.limits.max_session_time, false),
        ("--drain-timeout", a.limits.drain_timeout, true),
    ] {
        if (d.is_zero() && !allow_zero) || d > MAX_DURATION {
            let low = if allow_zero { "0" } else { "1s" };
            return Err(invalid(
                flag,
                format!("must be between {low} and 366d (got {})", Dur(d)),
            ));
        }
    }
    if a.spool.spool_segment_size.0 == 0 {
        return Err(invalid(
            "--spool-segment-size",
            "must be at least 1 (got 0)",
        ));
    }
    let Dur(age) = a.spool.spool_segment_age;
    if age < Duration::from_secs(1) || age > MAX_DURATION {
        return Err(invalid(
            "--spool-segment-age",
            format!("must be between 1s and 366d (got {})", Dur(age)),
        ));
    }
    if a.store.spool_dir.as_os_str().is_empty() {
        return Err(invalid("--spool-dir", "must not be empty"));
    }
    validate_edge(&a.edge, a.server.listen)?;

    let log_level = a
        .log
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| crate::logging::DEFAULT_FILTER.to_owned());
    crate::logging::parse_filter(&log_level).map_err(|m| invalid("--log-level", m))?;

    a.kafka.validate()?;
    if a.spool.sink == SinkKind::Kafka && a.kafka.kafka_brokers.is_none() {
        return Err(invalid(
            "--kafka-brokers",
            "required with --sink kafka (e.g. --kafka-brokers 127.0.0.1:9092)",
        ));
    }
    let window = a.spool.forward_window;
    if !(1..=MAX_FORWARD_WINDOW).contains(&window) {
        return Err(invalid(
            "--forward-window",
            format!(
                "must be between 1 and {} (got {window})",
                MAX_FORWARD_WINDOW
            ),
        ));
    }
    if a.spool.spool_fallback && a.spool.sink != SinkKind::Kafka {
        return Err(invalid(
            "--spool-fallback",
            "only with --sink kafka (the spool is the fallback for Kafka)",
        ));
    }

    Ok(Config {
        server: a.server,
        session: a.session,
        limits: a.limits,
        edge: a.edge,
        store: a.store,
        spool: a.spool,
        kafka: a.kafka,
        log: a.log,
        hostname,
        accept_domains,
        accept_domains_defaulted,
        reactors,
        max_body_memory,
        log_level,
    })
}

pub(super) fn validate_edge(e: &EdgeSettings, listen: SocketAddr) -> Result<(), ConfigError> {
    if let Some(addr) = e.listen_tls {
        if addr == listen && addr.port() != 0 {
            return Err(invalid("--listen-tls", "must differ from --listen"));
        }
    }
    match (&e.tls_cert, &e.tls_key) {
        (Some(_), None) => return Err(invalid("--tls-key", "required with --tls-cert")),
        (None, Some(_)) => return Err(invalid("--tls-cert", "required with --tls-key")),
        _ => {}
    }
    if e.tls().is_none() {
        if e.listen_tls.is_some() {
            return Err(invalid("--listen-tls", "needs --tls-cert and --tls-key"));
        }
        if e.require_tls {
            return Err(invalid("--require-tls", "needs --tls-cert and --tls-key"));
        }
    }
    if let Some(addr) = e.proxy_listen {
        if e.proxy_protocol == ProxyProtocol::Off {
            return Err(invalid(
                "--proxy-listen",
                "needs --proxy-protocol v1, v2 or any (the header that listener expects)",
            ));
        }
        if addr.port() != 0 && (addr == listen || Some(addr) == e.listen_tls) {
            return Err(invalid(
                "--proxy-listen",
                "must differ from --listen and --listen-tls",
            ));
        }
    }
    if e.proxy_protocol != ProxyProtocol::Off && e.proxy_trusted_cidr.is_empty() {
        return Err(invalid(
            "--proxy-trusted-cidr",
            "required with --proxy-protocol: the load balancers' addresses, e.g. 10.0.0.0/8",
        ));
    }
    match &e.auth_users {
        None => {
            for (flag, on) in [
                ("--auth-allow-plaintext", e.auth_allow_plaintext),
                ("--require-auth", e.require_auth),
                ("--auth-relay", e.auth_relay),
            ] {
                if on {
                    return Err(invalid(flag, "needs --auth-users FILE"));
                }
            }
        }
        Some(_) if e.auth_allow_plaintext => {
            // Credentials in the clear only where they never leave the host.
            for (flag, addr) in [
                ("--listen", Some(listen)),
                ("--proxy-listen", e.proxy_listen),
            ] {
                if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                    return Err(invalid(
                        "--auth-allow-plaintext",
                        format!("only for loopback listeners ({flag} is {addr}); elsewhere AUTH needs TLS"),
                    ));
                }
            }
        }
        Some(_) if e.tls().is_none() => {
            return Err(invalid(
                "--auth-users",
                "AUTH is offered only over TLS: needs --tls-cert and --tls-key \
                 (or --auth-allow-plaintext on a loopback --listen)",
            ));
        }
        Some(_) => {}
    }
    if e.tls_handshake_timeout.0.is_zero() {
        return Err(invalid(
            "--tls-handshake-timeout",
            "must be more than 0 (a handshake needs a round trip), e.g. 10s",
        ));
    }
    if e.greeting_delay.0 > MAX_GREETING_DELAY {
        return Err(invalid(
            "--greeting-delay",
            format!("must be at most 60s (got {})", e.greeting_delay),
        ));
    }
    Ok(())
}

/// A quarter of the machine's memory (`MemTotal` of /proc/meminfo): bodies in flight
/// must never be what takes a node down.
pub(super) fn default_body_memory() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let kib = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
            kib.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        });
    match total {
        Some(kib) => (kib.saturating_mul(1024) / 4).max(FALLBACK_BODY_MEMORY),
        None => FALLBACK_BODY_MEMORY,
    }
}

pub(super) fn ranged(flag: &'static str, n: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(invalid(
            flag,
            format!("must be between {lo} and {hi} (got {n})"),
        ))
    }
}

pub(super) fn at_least_one(flag: &'static str, n: u64) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(invalid(flag, "must be at least 1 (got 0)"));
    }
    Ok(())
}

/// The hostname goes verbatim into every greeting and `Received:` line, so anything
/// that could break a reply line (spaces, CR, LF) is refused here.
pub(super) fn validate_hostname(h: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if h.is_empty() || h.len() > 253 || !h.chars().all(ok_char) {
        return Err(format!(
            "not a valid host name (got {h:?}); use letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

/// Accepted domains are stored in the one form the session compares with (UTS #46
/// A-labels in lower case, or a canonical address literal such as `[192.0.2.1]`), so a
/// U-label and its A-label in any case are one domain on both sides. There is
/// deliberately no wildcard: the gateway must never be an open relay.
pub(super) fn normalize_domain(d: &str) -> Result<String, String> {
    let d = d.trim();
    if d.is_empty() {
        return Err("empty domain; there is no way to accept every domain".to_owned());
    }
    if d.contains('*') {
        return Err(format!(
            "wildcards are not supported (got {d:?}); list each domain, the gateway is never an open relay"
        ));
    }
    crate::smtp::address::normalize_accept_domain(d).map_err(|e| e.to_string())
}
