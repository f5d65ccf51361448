//! The gateway's configuration: command-line flags, `SMTPGW_*` environment variables and
//! an optional TOML file, merged (CLI > env > file > default) and validated into one
//! [`Config`] before anything starts, so a bad value fails with one line naming its flag.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Deserializer};

use crate::conn::{Cidr, ProxyMode};
use crate::smtp::BareLfPolicy;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2525";
/// Loopback only by default: the endpoint has no authentication.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9025";
pub const DEFAULT_SPOOL_DIR: &str = "./spool";
/// Room for a full batch (8 MiB) and a maximal message on top, so the gateway says
/// `452` while the disk can still take the writes already under way.
pub const DEFAULT_SPOOL_MIN_FREE_BYTES: u64 = 64 << 20;
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 1024 * 1024 * 1024;
pub const DEFAULT_MAX_RECIPIENTS: usize = 100;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const MAX_REACTORS: usize = 1024;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_SESSION_TIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MIN_DATA_RATE: u64 = 1024;
/// The minimum data rate is averaged over windows this long (the first is the grace).
pub const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 50;
pub const DEFAULT_MAX_CONNECTIONS_PER_PREFIX: u32 = 200;
pub const DEFAULT_MAX_CONNECTION_RATE_PER_IP: u32 = 600;
pub const DEFAULT_ERROR_BUDGET: u32 = 20;
/// Local clients (a health check, a co-located relay) are exempt from per-address
/// limits unless `--trusted-cidr` says otherwise.
pub const DEFAULT_TRUSTED_CIDRS: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// Greeting delays beyond this would only make legitimate clients time out.
const MAX_GREETING_DELAY: Duration = Duration::from_secs(60);
/// Without a total memory figure (or below it), the body budget is this.
const FALLBACK_BODY_MEMORY: usize = 256 * 1024 * 1024;
/// Far beyond any sensible setting, and keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Where accepted messages go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Durable local append-only log under --spool-dir.
    Spool,
    /// Discard after parsing; for benchmarks only.
    Null,
    /// Publish to a Kafka topic (--kafka-brokers, --kafka-topic).
    Kafka,
}

impl SinkKind {
    /// As logs and metrics name it.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Spool => "spool",
            SinkKind::Null => "null",
            SinkKind::Kafka => "kafka",
        }
    }
}

/// Which I/O backend the reactors use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring where this process may use it, else epoll (one log line says why).
    #[default]
    Auto,
    /// io_uring, or fail at start-up.
    Uring,
    /// epoll (tokio), the portable fallback.
    Epoll,
}

/// Whether listeners expect a PROXY protocol header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
    Any,
}

impl From<ProxyProtocol> for ProxyMode {
    fn from(p: ProxyProtocol) -> ProxyMode {
        match p {
            ProxyProtocol::Off => ProxyMode::Off,
            ProxyProtocol::V1 => ProxyMode::V1,
            ProxyProtocol::V2 => ProxyMode::V2,
            ProxyProtocol::Any => ProxyMode::Any,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// smtpgw: an SMTP ingestion gateway that says 250 only once a message is stored durably.
#[derive(Debug, Parser)]
#[command(name = "smtpgw", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read the local spool: list, print, export, replay to Kafka.
    #[command(subcommand)]
    Spool(SpoolCommand),
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// List the stored messages, oldest first: id, time of receipt, size, sender and
    /// recipient count, one line each.
    Ls {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
    },
    /// Print one stored message (on a terminal, control characters are escaped).
    Cat {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// Print only the message as the client sent it, without envelope or Received: line.
        #[arg(long)]
        body: bool,
        /// Print only the record headers (smtp.client_addr, smtp.tls, ...), one
        /// `name: value` line each.
        #[arg(long, conflicts_with = "body")]
        headers: bool,
        /// The message id (as in `250 ... queued as <id>`).
        id: String,
    },
    /// Write every stored message to an mbox file (mboxrd quoting).
    Export {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// The mbox file to write; it appears complete or not at all.
        #[arg(long, value_name = "FILE")]
        mbox: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Publish every stored message to Kafka, keyed by its id as the gateway would
    /// have, so consumers can drop what they already have.
    Replay {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// Required: the only replay target.
        #[arg(long = "to-kafka", required = true)]
        to_kafka: bool,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Verify every record; print a summary; exit 1 if anything is corrupt.
    Check {
        #[command(flatten)]
        dir: SpoolDirArg,
    },
    /// Delete whole closed segments whose records are all older than a cut-off.
    Prune {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// A message id (ULID) or an RFC 3339 time: segments whose every record was
        /// received (ULID: has an id) before it are deleted.
        #[arg(long, value_name = "ULID|RFC3339")]
        before: String,
        /// Say what would be deleted, delete nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct SkipCorruptArg {
    /// Carry on past corrupt data (still reported on stderr) and exit 0.
    #[arg(long = "skip-corrupt")]
    pub skip_corrupt: bool,
}

// The Kafka settings, shared by the server and `spool replay`. (A `///` comment here
// would become the help text of every command that flattens this.)
#[derive(Clone, Debug, Default, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port...] (required with --sink kafka).
    #[arg(
        long = "kafka-brokers",
        env = "SMTPGW_KAFKA_BROKERS",
        value_name = "LIST"
    )]
    pub kafka_brokers: Option<String>,
    /// Topic for accepted messages [default: smtp.inbound].
    #[arg(long = "kafka-topic", env = "SMTPGW_KAFKA_TOPIC", value_name = "TOPIC")]
    pub kafka_topic: Option<String>,
    /// librdkafka setting KEY=VALUE, e.g. security.protocol=SSL; repeatable, or several
    /// separated by ';' (as SMTPGW_KAFKA_CONFIG takes them).
    #[arg(
        long = "kafka-config",
        env = "SMTPGW_KAFKA_CONFIG",
        value_name = "KEY=VALUE",
        value_delimiter = ';'
    )]
    pub kafka_config: Vec<String>,
    /// A message Kafka has not acknowledged by then gets 451 [default: 30s].
    #[arg(
        long = "publish-timeout",
        env = "SMTPGW_PUBLISH_TIMEOUT",
        value_name = "DUR"
    )]
    pub publish_timeout: Option<String>,
    /// Unacknowledged messages above which reactors stop reading message bodies
    /// [default: 10000].
    #[arg(
        long = "max-inflight-messages",
        env = "SMTPGW_MAX_INFLIGHT_MESSAGES",
        value_name = "N"
    )]
    pub max_inflight_messages: Option<u64>,
    /// Unacknowledged bytes above which reactors stop reading message bodies; K, M, G
    /// suffixes [default: 256M].
    #[arg(
        long = "max-inflight-bytes",
        env = "SMTPGW_MAX_INFLIGHT_BYTES",
        value_name = "BYTES"
    )]
    pub max_inflight_bytes: Option<String>,
}

// Where a spool subcommand finds the spool: --spool-dir, else the gateway's --config
// file's `spool-dir`, else the default, so a tool run next to a gateway reads the same
// spool as the gateway with the same file.
#[derive(Clone, Debug, Default, Args)]
pub struct SpoolDirArg {
    /// The gateway's TOML configuration file; its `spool-dir` (and for replay its Kafka
    /// settings) apply unless given as flags.
    #[arg(long, env = "SMTPGW_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The spool's directory [default: the file's spool-dir, else ./spool].
    #[arg(long = "spool-dir", env = "SMTPGW_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    #[arg(skip)]
    pub sources: Sources,
}

impl SpoolDirArg {
    /// The spool directory and the config file's contents (empty without `--config`).
    pub fn resolve(&self) -> Result<(PathBuf, FileConfig), ConfigError> {
        let mut file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let dir = self
            .spool_dir
            .clone()
            .or(file.spool_dir.take())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
        if dir.as_os_str().is_empty() {
            let e = invalid("--spool-dir", "must not be empty");
            return Err(self.sources.name(e, self.config.as_deref(), &file.keys));
        }
        Ok((dir, file))
    }
}

/// Where each flag's value came from when it was not the command line, so an error
/// names what the user has to fix: `SMTPGW_REACTORS`, or the file and its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `(--flag, SMTPGW_VAR)` for values clap took from the environment.
    pub from_env: Vec<(String, String)>,
    /// Flags given on the command line.
    pub from_cli: Vec<String>,
}

impl Sources {
    /// Records the sources of every argument of `cmd` found in `matches`.
    pub fn of(cmd: &clap::Command, matches: &clap::ArgMatches) -> Sources {
        use clap::parser::ValueSource;
        let mut sources = Sources::default();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let flag = format!("--{long}");
            match matches.value_source(arg.get_id().as_str()) {
                Some(ValueSource::EnvVariable) => {
                    let var = arg
                        .get_env()
                        .map_or_else(String::new, |v| v.to_string_lossy().into_owned());
                    sources.from_env.push((flag, var));
                }
                Some(ValueSource::CommandLine) => sources.from_cli.push(flag),
                _ => {}
            }
        }
        sources
    }

    /// Renames an error's flag after the source its value came from: the environment
    /// variable, or `--config FILE: \`key\``, or the flag itself.
    pub fn name(&self, e: ConfigError, file: Option<&Path>, file_keys: &[String]) -> ConfigError {
        let ConfigError::Invalid { flag, msg } = e else {
            return e;
        };
        if let Some((_, var)) = self.from_env.iter().find(|(f, _)| f == flag) {
            return ConfigError::Source {
                origin: var.clone(),
                msg,
            };
        }
        let key = flag.trim_start_matches('-');
        match file {
            Some(path)
                if !self.from_cli.iter().any(|f| f == flag)
                    && file_keys.iter().any(|k| k == key) =>
            {
                ConfigError::Source {
                    origin: format!("--config {}: `{key}`", path.display()),
                    msg,
                }
            }
            _ => ConfigError::Invalid { flag, msg },
        }
    }
}

/// Parses the command line like `Cli::try_parse`, and records where each value came
/// from (see [`Sources`]).
pub fn parse_cli() -> Result<Cli, clap::Error> {
    parse_cli_from(std::env::args_os())
}

pub fn parse_cli_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.server.sources = Sources::of(&cmd, &matches);
    if let (Some(Command::Spool(spool)), Some(("spool", m))) =
        (cli.command.as_mut(), matches.subcommand())
    {
        if let (Some((name, m)), Some(spool_cmd)) = (m.subcommand(), cmd.find_subcommand("spool")) {
            if let Some(sub) = spool_cmd.find_subcommand(name) {
                spool.dir_mut().sources = Sources::of(sub, m);
            }
        }
    }
    Ok(cli)
}

impl SpoolCommand {
    fn dir_mut(&mut self) -> &mut SpoolDirArg {
        match self {
            SpoolCommand::Ls { dir, .. }
            | SpoolCommand::Cat { dir, .. }
            | SpoolCommand::Export { dir, .. }
            | SpoolCommand::Replay { dir, .. }
            | SpoolCommand::Check { dir }
            | SpoolCommand::Prune { dir, .. } => dir,
        }
    }
}

// The server's flags as given. Every field is an `Option` without a clap default, so
// that "not given" can fall through to the config file and then to the default.
#[derive(Clone, Debug, Default, Args)]
pub struct ServerArgs {
    /// TOML file whose keys are the long flag names, e.g. `listen = "[::1]:2525"`.
    #[arg(long, env = "SMTPGW_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:2525].
    #[arg(long, env = "SMTPGW_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the HTTP endpoint for /metrics, /healthz and /readyz
    /// [default: 127.0.0.1:9025].
    #[arg(
        long = "metrics-listen",
        env = "SMTPGW_METRICS_LISTEN",
        value_name = "ADDR"
    )]
    pub metrics_listen: Option<String>,
    /// Our name in the greeting and Received: lines [default: the system hostname].
    #[arg(long, env = "SMTPGW_HOSTNAME", value_name = "NAME")]
    pub hostname: Option<String>,
    /// Recipient domain to accept mail for; repeatable, or comma-separated
    /// [default: localhost and --hostname].
    #[arg(
        long = "accept-domain",
        env = "SMTPGW_ACCEPT_DOMAIN",
        value_name = "DOMAIN",
        value_delimiter = ','
    )]
    pub accept_domain: Vec<String>,
    /// Where accepted messages go [default: spool].
    #[arg(long, env = "SMTPGW_SINK", value_enum)]
    pub sink: Option<SinkKind>,
    /// Directory of the spool sink [default: ./spool].
    #[arg(long = "spool-dir", env = "SMTPGW_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// With --sink kafka: store messages Kafka cannot take now in the spool
    /// (--spool-dir) and forward them when it can, instead of answering 451.
    #[arg(long = "spool-fallback", env = "SMTPGW_SPOOL_FALLBACK")]
    pub spool_fallback: bool,
    /// Largest total size of the spool's segments; messages beyond it get 452 4.3.1;
    /// K, M, G suffixes; 0 for no limit [default: 0].
    #[arg(
        long = "spool-max-bytes",
        env = "SMTPGW_SPOOL_MAX_BYTES",
        value_name = "BYTES"
    )]
    pub spool_max_bytes: Option<String>,
    /// Free space to leave on the spool's file system; messages that would go below it
    /// get 452 4.3.1 before the disk fills; 0 turns it off [default: 64M].
    #[arg(
        long = "spool-min-free-bytes",
        env = "SMTPGW_SPOOL_MIN_FREE_BYTES",
        value_name = "BYTES"
    )]
    pub spool_min_free_bytes: Option<String>,
    /// Reactor threads, 1..=1024 [default: the number of CPUs].
    #[arg(long, env = "SMTPGW_REACTORS", value_name = "N")]
    pub reactors: Option<u64>,
    /// I/O backend of the reactors [default: auto].
    #[arg(long = "io-backend", env = "SMTPGW_IO_BACKEND", value_enum)]
    pub io_backend: Option<IoBackend>,
    /// Message bodies held in memory across the gateway (being received or with the
    /// sink); over it bodies stop being read and MAIL gets 451 4.3.1; K, M, G suffixes
    /// [default: 25% of the machine's memory].
    #[arg(
        long = "max-body-memory",
        env = "SMTPGW_MAX_BODY_MEMORY",
        value_name = "BYTES"
    )]
    pub max_body_memory: Option<String>,
    /// Slowest average rate a message body may arrive at, as BYTES[/WINDOW] (bytes per
    /// second, averaged over windows of WINDOW, the first being the grace), before
    /// 421 4.4.2; 0 turns it off; K, M suffixes [default: 1K/30s].
    #[arg(
        long = "min-data-rate",
        env = "SMTPGW_MIN_DATA_RATE",
        value_name = "RATE"
    )]
    pub min_data_rate: Option<String>,
    /// Largest message in bytes; K, M, G suffixes (powers of 1024) [default: 10M].
    #[arg(
        long = "max-message-size",
        env = "SMTPGW_MAX_MESSAGE_SIZE",
        value_name = "BYTES"
    )]
    pub max_message_size: Option<String>,
    /// Recipients per message [default: 100].
    #[arg(
        long = "max-recipients",
        env = "SMTPGW_MAX_RECIPIENTS",
        value_name = "N"
    )]
    pub max_recipients: Option<u64>,
    /// Open connections across all reactors [default: 10000].
    #[arg(
        long = "max-connections",
        env = "SMTPGW_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub max_connections: Option<u64>,
    /// Close a connection silent this long, e.g. 300 or 5m [default: 300s].
    #[arg(long = "idle-timeout", env = "SMTPGW_IDLE_TIMEOUT", value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// Close any connection open this long, however active [default: 1h].
    #[arg(
        long = "max-session-time",
        env = "SMTPGW_MAX_SESSION_TIME",
        value_name = "DUR"
    )]
    pub max_session_time: Option<String>,
    /// On SIGTERM/SIGINT, wait this long for sessions to finish [default: 30s].
    #[arg(
        long = "drain-timeout",
        env = "SMTPGW_DRAIN_TIMEOUT",
        value_name = "DUR"
    )]
    pub drain_timeout: Option<String>,
    /// Bare CR or LF in a message body [default: reject].
    #[arg(long = "bare-lf", env = "SMTPGW_BARE_LF", value_enum)]
    pub bare_lf: Option<BareLfPolicy>,
    /// Log line format on stderr [default: text].
    #[arg(long = "log-format", env = "SMTPGW_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Second address, speaking TLS from the first byte (RFC 8314 submissions/465 style);
    /// needs --tls-cert and --tls-key.
    #[arg(long = "listen-tls", env = "SMTPGW_LISTEN_TLS", value_name = "ADDR")]
    pub listen_tls: Option<String>,
    /// Certificate chain (PEM, leaf first); with --tls-key, STARTTLS is offered.
    #[arg(long = "tls-cert", env = "SMTPGW_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", env = "SMTPGW_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// MAIL before STARTTLS gets 530 5.7.0.
    #[arg(long = "require-tls", env = "SMTPGW_REQUIRE_TLS")]
    pub require_tls: bool,
    /// PROXY protocol header expected on every listener [default: off].
    #[arg(long = "proxy-protocol", env = "SMTPGW_PROXY_PROTOCOL", value_enum)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Address prefix allowed to send a PROXY header (the load balancers); repeatable,
    /// or comma-separated. Required with --proxy-protocol.
    #[arg(
        long = "proxy-trusted-cidr",
        env = "SMTPGW_PROXY_TRUSTED_CIDR",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub proxy_trusted_cidr: Vec<String>,
    /// Address prefix exempt from the per-address limits; repeatable, or
    /// comma-separated [default: 127.0.0.0/8,::1/128].
    #[arg(
        long = "trusted-cidr",
        env = "SMTPGW_TRUSTED_CIDR",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub trusted_cidr: Vec<String>,
    /// Open connections per client address; 0 turns it off [default: 50].
    #[arg(
        long = "max-connections-per-ip",
        env = "SMTPGW_MAX_CONNECTIONS_PER_IP",
        value_name = "N"
    )]
    pub max_connections_per_ip: Option<u32>,
    /// Open connections per /24 (IPv4) or /64 (IPv6); 0 turns it off [default: 200].
    #[arg(
        long = "max-connections-per-prefix",
        env = "SMTPGW_MAX_CONNECTIONS_PER_PREFIX",
        value_name = "N"
    )]
    pub max_connections_per_prefix: Option<u32>,
    /// New connections per client address per minute (bursts of as many); 0 turns it
    /// off [default: 600].
    #[arg(
        long = "max-connection-rate-per-ip",
        env = "SMTPGW_MAX_CONNECTION_RATE_PER_IP",
        value_name = "N"
    )]
    pub max_connection_rate_per_ip: Option<u32>,
    /// Messages per client address per minute (bursts of as many); 0 turns it off
    /// [default: 0].
    #[arg(
        long = "max-message-rate-per-ip",
        env = "SMTPGW_MAX_MESSAGE_RATE_PER_IP",
        value_name = "N"
    )]
    pub max_message_rate_per_ip: Option<u32>,
    /// Commands refused with 5xx after which a session gets 421 4.7.0 and is closed; 0
    /// turns it off [default: 20].
    #[arg(long = "error-budget", env = "SMTPGW_ERROR_BUDGET", value_name = "N")]
    pub error_budget: Option<u32>,
    /// Wait this long before the greeting; a client that talks first gets 554 5.5.0
    /// [default: 0, off].
    #[arg(
        long = "greeting-delay",
        env = "SMTPGW_GREETING_DELAY",
        value_name = "DUR"
    )]
    pub greeting_delay: Option<String>,
    /// Log filter, e.g. info or warn,smtpgw=debug; SIGHUP re-reads it from the file
    /// [default: RUST_LOG, else info].
    #[arg(long = "log-level", env = "SMTPGW_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(skip)]
    pub sources: Sources,
}

/// The config file: the same settings as the flags, keyed by the long flag names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub hostname: Option<String>,
    pub accept_domain: Option<OneOrMany>,
    pub sink: Option<SinkKind>,
    pub spool_dir: Option<PathBuf>,
    pub spool_fallback: Option<bool>,
    pub spool_max_bytes: Option<IntOrStr>,
    pub spool_min_free_bytes: Option<IntOrStr>,
    pub reactors: Option<u64>,
    pub io_backend: Option<IoBackend>,
    pub max_body_memory: Option<IntOrStr>,
    pub min_data_rate: Option<IntOrStr>,
    pub max_message_size: Option<IntOrStr>,
    pub max_recipients: Option<u64>,
    pub max_connections: Option<u64>,
    pub idle_timeout: Option<IntOrStr>,
    pub max_session_time: Option<IntOrStr>,
    pub drain_timeout: Option<IntOrStr>,
    pub bare_lf: Option<BareLfPolicy>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub kafka_brokers: Option<String>,
    pub kafka_topic: Option<String>,
    pub kafka_config: Option<OneOrMany>,
    pub publish_timeout: Option<IntOrStr>,
    pub max_inflight_messages: Option<u64>,
    pub max_inflight_bytes: Option<IntOrStr>,
    pub listen_tls: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub require_tls: Option<bool>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub proxy_trusted_cidr: Option<OneOrMany>,
    pub trusted_cidr: Option<OneOrMany>,
    pub max_connections_per_ip: Option<u32>,
    pub max_connections_per_prefix: Option<u32>,
    pub max_connection_rate_per_ip: Option<u32>,
    pub max_message_rate_per_ip: Option<u32>,
    pub error_budget: Option<u32>,
    pub greeting_delay: Option<IntOrStr>,
    /// The keys present in the file, so errors can name the file as their source.
    #[serde(skip)]
    pub keys: Vec<String>,
}

const FILE_KEYS: &[&str] = &[
    "listen-tls",
    "tls-cert",
    "tls-key",
    "require-tls",
    "proxy-protocol",
    "proxy-trusted-cidr",
    "trusted-cidr",
    "max-connections-per-ip",
    "max-connections-per-prefix",
    "max-connection-rate-per-ip",
    "max-message-rate-per-ip",
    "error-budget",
    "greeting-delay",
    "listen",
    "metrics-listen",
    "hostname",
    "accept-domain",
    "sink",
    "spool-dir",
    "spool-fallback",
    "spool-max-bytes",
    "spool-min-free-bytes",
    "reactors",
    "io-backend",
    "max-body-memory",
    "min-data-rate",
    "max-message-size",
    "max-recipients",
    "max-connections",
    "idle-timeout",
    "max-session-time",
    "drain-timeout",
    "bare-lf",
    "log-format",
    "log-level",
    "kafka-brokers",
    "kafka-topic",
    "kafka-config",
    "publish-timeout",
    "max-inflight-messages",
    "max-inflight-bytes",
];

/// `accept-domain = "a.example"` or `accept-domain = ["a.example", "b.example"]`.
#[derive(Debug)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a domain or a list of domains")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(OneOrMany(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Sizes and durations: `10485760` or `"10M"`, `300` or `"5m"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrStr {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrStr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a string such as \"10M\" or \"5m\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrStr, E> {
                i64::try_from(v)
                    .map(IntOrStr::Int)
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for IntOrStr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            IntOrStr::Int(i) => write!(f, "{i}"),
            IntOrStr::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A configuration the gateway can run with: merged, defaulted and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub hostname: String,
    /// Lower-case, deduplicated, never empty.
    pub accept_domains: Vec<String>,
    /// No --accept-domain was given; start-up says what that means.
    pub accept_domains_defaulted: bool,
    pub sink: SinkKind,
    pub spool_dir: PathBuf,
    /// `--sink kafka` only: messages Kafka cannot take go to the spool and are
    /// forwarded later.
    pub spool_fallback: bool,
    /// `None`: no size limit.
    pub spool_max_bytes: Option<u64>,
    /// 0: no free-space floor.
    pub spool_min_free_bytes: u64,
    pub reactors: usize,
    pub io_backend: IoBackend,
    /// Across all reactors; each gets an equal share.
    pub max_body_memory: usize,
    /// Bytes per second, and the window they are averaged over; `None` when off.
    pub min_data_rate: Option<(u64, Duration)>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_session_time: Duration,
    pub drain_timeout: Duration,
    pub bare_lf: BareLfPolicy,
    pub log_format: LogFormat,
    /// Tracing filter directives, already checked.
    pub log_level: String,
    pub kafka: KafkaConfig,
    pub edge: EdgeConfig,
}

/// TLS, PROXY protocol and the per-address limits. Limits are `None` when off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeConfig {
    pub listen_tls: Option<SocketAddr>,
    /// Certificate and key, both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub proxy_protocol: ProxyProtocol,
    pub proxy_trusted: Vec<Cidr>,
    pub trusted: Vec<Cidr>,
    pub max_connections_per_ip: Option<u32>,
    pub max_connections_per_prefix: Option<u32>,
    pub max_connection_rate_per_ip: Option<u32>,
    pub max_message_rate_per_ip: Option<u32>,
    pub error_budget: Option<u32>,
    pub greeting_delay: Duration,
}

/// The Kafka sink's settings; `brokers` is `Some` whenever `sink` is `Kafka`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: Option<String>,
    pub topic: String,
    /// `--kafka-config` pairs in the order given; later ones win in librdkafka.
    pub extra: Vec<(String, String)>,
    pub publish_timeout: Duration,
    pub max_inflight_messages: usize,
    pub max_inflight_bytes: usize,
}

impl KafkaConfig {
    /// The sink's options; `brokers` must be set (it is whenever `--sink kafka`).
    pub fn options(&self, max_recipients: usize) -> crate::sink::kafka::KafkaOptions {
        let mut o = crate::sink::kafka::KafkaOptions::new(self.brokers.clone().unwrap_or_default());
        o.topic = self.topic.clone();
        o.extra = self.extra.clone();
        o.publish_timeout = self.publish_timeout;
        o.max_inflight_messages = self.max_inflight_messages;
        o.max_inflight_bytes = self.max_inflight_bytes;
        o.max_recipients = max_recipients;
        o
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

fn invalid(flag: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        msg: msg.into(),
    }
}

impl ServerArgs {
    /// Reads the config file if one is named, then merges and validates.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let (sources, path, keys) = (self.sources.clone(), self.config.clone(), file.keys.clone());
        resolve(self, file, system_hostname).map_err(|e| sources.name(e, path.as_deref(), &keys))
    }
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        msg: format!("cannot read: {e}"),
    })?;
    parse_file(&text, &path.display().to_string())
}

/// Parses the file's text. Errors name the offending key: unknown keys are checked first
/// so a typo is reported as such rather than as a confusing type error.
pub fn parse_file(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    let file_err = |msg: String| ConfigError::File {
        path: path.to_owned(),
        msg,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| file_err(describe(&e, text)))?;
    if let Some(key) = table.keys().find(|k| !FILE_KEYS.contains(&k.as_str())) {
        return Err(file_err(format!(
            "unknown key `{key}` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
        )));
    }
    let mut file: FileConfig = toml::from_str(text).map_err(|e| file_err(describe(&e, text)))?;
    file.keys = table.keys().cloned().collect();
    Ok(file)
}

/// toml's own rendering spans several lines with a source excerpt; this keeps one line,
/// with the key and line number so the user can find the spot.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim().starts_with('[') => {
            format!("line {line_no}: `{}`: {msg}", key.trim())
        }
        _ => format!("line {line_no}: {msg}"),
    }
}

/// The system's hostname, if it has a usable one.
pub fn system_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    validate_hostname(name).ok()?;
    Some(name.to_owned())
}

/// Merges CLI/env (already combined by clap) over the file over the defaults, and
/// validates. `default_hostname` is only consulted when no hostname is configured.
pub fn resolve(
    cli: ServerArgs,
    mut file: FileConfig,
    default_hostname: impl FnOnce() -> Option<String>,
) -> Result<Config, ConfigError> {
    let file_kafka = KafkaFile::from(&mut file);
    // The edge keys, apart, so that they can be resolved after the rest moved out.
    let mut file_edge = FileConfig {
        listen_tls: file.listen_tls.take(),
        tls_cert: file.tls_cert.take(),
        tls_key: file.tls_key.take(),
        require_tls: file.require_tls.take(),
        proxy_protocol: file.proxy_protocol.take(),
        proxy_trusted_cidr: file.proxy_trusted_cidr.take(),
        trusted_cidr: file.trusted_cidr.take(),
        max_connections_per_ip: file.max_connections_per_ip.take(),
        max_connections_per_prefix: file.max_connections_per_prefix.take(),
        max_connection_rate_per_ip: file.max_connection_rate_per_ip.take(),
        max_message_rate_per_ip: file.max_message_rate_per_ip.take(),
        error_budget: file.error_budget.take(),
        greeting_delay: file.greeting_delay.take(),
        ..FileConfig::default()
    };
    let listen_s = cli
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen: SocketAddr = listen_s.trim().parse().map_err(|_| {
        invalid(
            "--listen",
            format!("not an IP:PORT address (got {listen_s:?}); e.g. 127.0.0.1:2525 or [::1]:2525"),
        )
    })?;
    let metrics_s = cli
        .metrics_listen
        .or(file.metrics_listen)
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned());
    let metrics_listen: SocketAddr = metrics_s.trim().parse().map_err(|_| {
        invalid(
            "--metrics-listen",
            format!("not an IP:PORT address (got {metrics_s:?}); e.g. 127.0.0.1:9025"),
        )
    })?;

    let hostname = match cli.hostname.or(file.hostname) {
        Some(h) => {
            validate_hostname(&h).map_err(|m| invalid("--hostname", m))?;
            h
        }
        None => default_hostname().unwrap_or_else(|| "localhost".to_owned()),
    };

    let domains: Vec<String> = if !cli.accept_domain.is_empty() {
        cli.accept_domain
    } else {
        match file.accept_domain {
            Some(OneOrMany(v)) if v.is_empty() => {
                return Err(invalid(
                    "--accept-domain",
                    "empty list; leave it out to accept only localhost and --hostname",
                ))
            }
            Some(OneOrMany(v)) => v,
            None => Vec::new(),
        }
    };
    let accept_domains_defaulted = domains.is_empty();
    let mut accept_domains = Vec::new();
    let defaults = ["localhost".to_owned(), hostname.clone()];
    let given = if accept_domains_defaulted {
        &defaults[..]
    } else {
        &domains[..]
    };
    for d in given {
        let d = normalize_domain(d).map_err(|m| invalid("--accept-domain", m))?;
        if !accept_domains.contains(&d) {
            accept_domains.push(d);
        }
    }

    let reactors = match cli.reactors.or(file.reactors) {
        Some(n) => ranged("--reactors", n, 1, MAX_REACTORS as u64)? as usize,
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_REACTORS),
    };

    let max_message_size = match cli
        .max_message_size
        .map(IntOrStr::Str)
        .or(file.max_message_size)
    {
        Some(v) => {
            let n = parse_size(&v).map_err(|m| invalid("--max-message-size", m))?;
            ranged("--max-message-size", n, 1, MAX_MESSAGE_SIZE_LIMIT as u64).map_err(|_| {
                invalid(
                    "--max-message-size",
                    format!("must be between 1 and 1G (got {v})"),
                )
            })? as usize
        }
        None => DEFAULT_MAX_MESSAGE_SIZE,
    };

    let max_body_memory = match cli
        .max_body_memory
        .map(IntOrStr::Str)
        .or(file.max_body_memory)
    {
        Some(v) => {
            let n = parse_size(&v).map_err(|m| invalid("--max-body-memory", m))?;
            // One message of the largest size must fit, or it could never be received.
            ranged("--max-body-memory", n, max_message_size as u64, u64::MAX).map_err(|_| {
                invalid(
                    "--max-body-memory",
                    format!("must be at least --max-message-size ({max_message_size}) (got {v})"),
                )
            })? as usize
        }
        None => default_body_memory().max(max_message_size.saturating_mul(2)),
    };
    let min_data_rate = match cli.min_data_rate.map(IntOrStr::Str).or(file.min_data_rate) {
        Some(v) => parse_rate(&v).map_err(|m| invalid("--min-data-rate", m))?,
        None => Some((DEFAULT_MIN_DATA_RATE, MIN_DATA_RATE_WINDOW)),
    };

    let max_recipients = match cli.max_recipients.or(file.max_recipients) {
        Some(n) => at_least_one("--max-recipients", n)?,
        None => DEFAULT_MAX_RECIPIENTS,
    };
    let max_connections = match cli.max_connections.or(file.max_connections) {
        Some(n) => at_least_one("--max-connections", n)?,
        None => DEFAULT_MAX_CONNECTIONS,
    };

    let duration = |flag: &'static str,
                    cli: Option<String>,
                    file: Option<IntOrStr>,
                    default: Duration,
                    allow_zero: bool|
     -> Result<Duration, ConfigError> {
        let Some(v) = cli.map(IntOrStr::Str).or(file) else {
            return Ok(default);
        };
        let d = parse_duration(&v).map_err(|m| invalid(flag, m))?;
        if (d.is_zero() && !allow_zero) || d > MAX_DURATION {
            let low = if allow_zero { "0" } else { "1s" };
            return Err(invalid(
                flag,
                format!("must be between {low} and 366d (got {v})"),
            ));
        }
        Ok(d)
    };
    let idle_timeout = duration(
        "--idle-timeout",
        cli.idle_timeout,
        file.idle_timeout,
        DEFAULT_IDLE_TIMEOUT,
        false,
    )?;
    let max_session_time = duration(
        "--max-session-time",
        cli.max_session_time,
        file.max_session_time,
        DEFAULT_MAX_SESSION_TIME,
        false,
    )?;
    let drain_timeout = duration(
        "--drain-timeout",
        cli.drain_timeout,
        file.drain_timeout,
        DEFAULT_DRAIN_TIMEOUT,
        true,
    )?;

    let spool_dir = cli
        .spool_dir
        .or(file.spool_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
    if spool_dir.as_os_str().is_empty() {
        return Err(invalid("--spool-dir", "must not be empty"));
    }

    let greeting_delay = duration(
        "--greeting-delay",
        cli.greeting_delay,
        file_edge.greeting_delay.take(),
        Duration::ZERO,
        true,
    )?;
    if greeting_delay > MAX_GREETING_DELAY {
        return Err(invalid(
            "--greeting-delay",
            format!("must be at most 60s (got {greeting_delay:?})"),
        ));
    }
    let edge = resolve_edge(
        EdgeCli {
            listen_tls: cli.listen_tls,
            tls_cert: cli.tls_cert,
            tls_key: cli.tls_key,
            require_tls: cli.require_tls,
            proxy_protocol: cli.proxy_protocol,
            proxy_trusted_cidr: cli.proxy_trusted_cidr,
            trusted_cidr: cli.trusted_cidr,
            max_connections_per_ip: cli.max_connections_per_ip,
            max_connections_per_prefix: cli.max_connections_per_prefix,
            max_connection_rate_per_ip: cli.max_connection_rate_per_ip,
            max_message_rate_per_ip: cli.max_message_rate_per_ip,
            error_budget: cli.error_budget,
        },
        &mut file_edge,
        greeting_delay,
        listen,
    )?;
    let log_level = cli
        .log_level
        .or(file.log_level)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| crate::logging::DEFAULT_FILTER.to_owned());
    crate::logging::parse_filter(&log_level).map_err(|m| invalid("--log-level", m))?;

    let size = |flag: &'static str, cli: Option<String>, file: Option<IntOrStr>| {
        cli.map(IntOrStr::Str)
            .or(file)
            .map(|v| parse_size(&v).map_err(|m| invalid(flag, m)))
            .transpose()
    };
    let spool_max_bytes = size(
        "--spool-max-bytes",
        cli.spool_max_bytes,
        file.spool_max_bytes,
    )?
    .filter(|&n| n > 0);
    let spool_min_free_bytes = size(
        "--spool-min-free-bytes",
        cli.spool_min_free_bytes,
        file.spool_min_free_bytes,
    )?
    .unwrap_or(DEFAULT_SPOOL_MIN_FREE_BYTES);

    let sink = cli.sink.or(file.sink).unwrap_or(SinkKind::Spool);
    let kafka = resolve_kafka(cli.kafka, file_kafka)?;
    if sink == SinkKind::Kafka && kafka.brokers.is_none() {
        return Err(invalid(
            "--kafka-brokers",
            "required with --sink kafka (e.g. --kafka-brokers 127.0.0.1:9092)",
        ));
    }
    let spool_fallback = cli.spool_fallback || file.spool_fallback.unwrap_or(false);
    if spool_fallback && sink != SinkKind::Kafka {
        return Err(invalid(
            "--spool-fallback",
            "only with --sink kafka (the spool is the fallback for Kafka)",
        ));
    }

    Ok(Config {
        listen,
        metrics_listen,
        hostname,
        accept_domains,
        accept_domains_defaulted,
        sink,
        spool_dir,
        spool_fallback,
        spool_max_bytes,
        spool_min_free_bytes,
        reactors,
        io_backend: cli.io_backend.or(file.io_backend).unwrap_or_default(),
        max_body_memory,
        min_data_rate,
        max_message_size,
        max_recipients,
        max_connections,
        idle_timeout,
        max_session_time,
        drain_timeout,
        bare_lf: cli.bare_lf.or(file.bare_lf).unwrap_or_default(),
        log_format: cli
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
        log_level,
        kafka,
        edge,
    })
}

/// The edge flags as given on the command line (or environment).
struct EdgeCli {
    listen_tls: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    require_tls: bool,
    proxy_protocol: Option<ProxyProtocol>,
    proxy_trusted_cidr: Vec<String>,
    trusted_cidr: Vec<String>,
    max_connections_per_ip: Option<u32>,
    max_connections_per_prefix: Option<u32>,
    max_connection_rate_per_ip: Option<u32>,
    max_message_rate_per_ip: Option<u32>,
    error_budget: Option<u32>,
}

fn cidrs(
    flag: &'static str,
    cli: Vec<String>,
    file: Option<OneOrMany>,
    default: &[&str],
) -> Result<Vec<Cidr>, ConfigError> {
    let given: Vec<String> = if !cli.is_empty() {
        cli
    } else {
        match file {
            Some(OneOrMany(v)) => v,
            None => default.iter().map(|s| (*s).to_owned()).collect(),
        }
    };
    given
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Cidr::parse(s).map_err(|e| invalid(flag, e.to_string())))
        .collect()
}

fn resolve_edge(
    cli: EdgeCli,
    file: &mut FileConfig,
    greeting_delay: Duration,
    listen: SocketAddr,
) -> Result<EdgeConfig, ConfigError> {
    let listen_tls = match cli.listen_tls.or(file.listen_tls.take()) {
        Some(s) => {
            let addr: SocketAddr = s.trim().parse().map_err(|_| {
                invalid(
                    "--listen-tls",
                    format!("not an IP:PORT address (got {s:?}); e.g. 0.0.0.0:465"),
                )
            })?;
            if addr == listen && addr.port() != 0 {
                return Err(invalid("--listen-tls", "must differ from --listen"));
            }
            Some(addr)
        }
        None => None,
    };
    let cert = cli.tls_cert.or(file.tls_cert.take());
    let key = cli.tls_key.or(file.tls_key.take());
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("--tls-key", "required with --tls-cert")),
        (None, Some(_)) => return Err(invalid("--tls-cert", "required with --tls-key")),
    };
    let require_tls = cli.require_tls || file.require_tls.unwrap_or(false);
    if tls.is_none() {
        if listen_tls.is_some() {
            return Err(invalid("--listen-tls", "needs --tls-cert and --tls-key"));
        }
        if require_tls {
            return Err(invalid("--require-tls", "needs --tls-cert and --tls-key"));
        }
    }
    let proxy_protocol = cli
        .proxy_protocol
        .or(file.proxy_protocol)
        .unwrap_or_default();
    let proxy_trusted = cidrs(
        "--proxy-trusted-cidr",
        cli.proxy_trusted_cidr,
        file.proxy_trusted_cidr.take(),
        &[],
    )?;
    if proxy_protocol != ProxyProtocol::Off && proxy_trusted.is_empty() {
        return Err(invalid(
            "--proxy-trusted-cidr",
            "required with --proxy-protocol: the load balancers' addresses, e.g. 10.0.0.0/8",
        ));
    }
    let trusted = cidrs(
        "--trusted-cidr",
        cli.trusted_cidr,
        file.trusted_cidr.take(),
        &DEFAULT_TRUSTED_CIDRS,
    )?;
    let limit = |n: Option<u32>, default: u32| {
        let n = n.unwrap_or(default);
        (n > 0).then_some(n)
    };
    Ok(EdgeConfig {
        listen_tls,
        tls,
        require_tls,
        proxy_protocol,
        proxy_trusted,
        trusted,
        max_connections_per_ip: limit(
            cli.max_connections_per_ip.or(file.max_connections_per_ip),
            DEFAULT_MAX_CONNECTIONS_PER_IP,
        ),
        max_connections_per_prefix: limit(
            cli.max_connections_per_prefix
                .or(file.max_connections_per_prefix),
            DEFAULT_MAX_CONNECTIONS_PER_PREFIX,
        ),
        max_connection_rate_per_ip: limit(
            cli.max_connection_rate_per_ip
                .or(file.max_connection_rate_per_ip),
            DEFAULT_MAX_CONNECTION_RATE_PER_IP,
        ),
        max_message_rate_per_ip: limit(
            cli.max_message_rate_per_ip.or(file.max_message_rate_per_ip),
            0,
        ),
        error_budget: limit(cli.error_budget.or(file.error_budget), DEFAULT_ERROR_BUDGET),
        greeting_delay,
    })
}

/// A quarter of the machine's memory (`MemTotal` of /proc/meminfo): bodies in flight
/// must never be what takes a node down.
fn default_body_memory() -> usize {
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

/// The config file's Kafka keys, taken out of [`FileConfig`] so that `spool replay`
/// can share the resolution with the server.
#[derive(Debug, Default)]
pub struct KafkaFile {
    pub kafka_brokers: Option<String>,
    pub kafka_topic: Option<String>,
    pub kafka_config: Option<OneOrMany>,
    pub publish_timeout: Option<IntOrStr>,
    pub max_inflight_messages: Option<u64>,
    pub max_inflight_bytes: Option<IntOrStr>,
}

impl From<&mut FileConfig> for KafkaFile {
    fn from(f: &mut FileConfig) -> Self {
        KafkaFile {
            kafka_brokers: f.kafka_brokers.take(),
            kafka_topic: f.kafka_topic.take(),
            kafka_config: f.kafka_config.take(),
            publish_timeout: f.publish_timeout.take(),
            max_inflight_messages: f.max_inflight_messages.take(),
            max_inflight_bytes: f.max_inflight_bytes.take(),
        }
    }
}

/// librdkafka takes message.timeout.ms as a 32-bit count of milliseconds.
const MAX_PUBLISH_TIMEOUT: Duration = Duration::from_secs(24 * 24 * 3600);

/// Merges and validates the Kafka settings (CLI/env over file over default).
pub fn resolve_kafka(cli: KafkaArgs, file: KafkaFile) -> Result<KafkaConfig, ConfigError> {
    use crate::sink::kafka;

    let brokers = match cli.kafka_brokers.or(file.kafka_brokers) {
        Some(b) if b.trim().is_empty() => {
            return Err(invalid("--kafka-brokers", "must not be empty"))
        }
        Some(b) => Some(b.trim().to_owned()),
        None => None,
    };
    let topic = cli
        .kafka_topic
        .or(file.kafka_topic)
        .unwrap_or_else(|| kafka::DEFAULT_TOPIC.to_owned());
    // Kafka's own rule for topic names.
    let topic_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 249
            && t != "."
            && t != ".."
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if !topic_ok(&topic) {
        return Err(invalid(
            "--kafka-topic",
            format!(
                "not a Kafka topic name (got {topic:?}); use letters, digits, '.', '_' and '-'"
            ),
        ));
    }

    let pairs = if !cli.kafka_config.is_empty() {
        cli.kafka_config
    } else {
        file.kafka_config.map(|OneOrMany(v)| v).unwrap_or_default()
    };
    let mut extra = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(invalid(
                "--kafka-config",
                format!("expected KEY=VALUE (got {pair:?}), e.g. security.protocol=SSL"),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(invalid("--kafka-config", format!("empty key in {pair:?}")));
        }
        if let Some(why) = kafka::reserved_config(key) {
            return Err(invalid(
                "--kafka-config",
                format!("{key}: not allowed, {why}"),
            ));
        }
        extra.push((key.to_owned(), value.trim().to_owned()));
    }

    let publish_timeout = match cli
        .publish_timeout
        .map(IntOrStr::Str)
        .or(file.publish_timeout)
    {
        Some(v) => {
            let d = parse_duration(&v).map_err(|m| invalid("--publish-timeout", m))?;
            if d < Duration::from_millis(1) || d > MAX_PUBLISH_TIMEOUT {
                return Err(invalid(
                    "--publish-timeout",
                    format!("must be between 1ms and 24d (got {v})"),
                ));
            }
            d
        }
        None => kafka::DEFAULT_PUBLISH_TIMEOUT,
    };
    let max_inflight_messages = match cli.max_inflight_messages.or(file.max_inflight_messages) {
        Some(n) => at_least_one("--max-inflight-messages", n)?,
        None => kafka::DEFAULT_MAX_INFLIGHT_MESSAGES,
    };
    let max_inflight_bytes = match cli
        .max_inflight_bytes
        .map(IntOrStr::Str)
        .or(file.max_inflight_bytes)
    {
        Some(v) => {
            let n = parse_size(&v).map_err(|m| invalid("--max-inflight-bytes", m))?;
            at_least_one("--max-inflight-bytes", n)?
        }
        None => kafka::DEFAULT_MAX_INFLIGHT_BYTES,
    };
    Ok(KafkaConfig {
        brokers,
        topic,
        extra,
        publish_timeout,
        max_inflight_messages,
        max_inflight_bytes,
    })
}

/// `BYTES[/WINDOW]`: `1K`, `512/10s`; `0` turns the rule off.
fn parse_rate(v: &IntOrStr) -> Result<Option<(u64, Duration)>, String> {
    let text = match v {
        IntOrStr::Int(n) => n.to_string(),
        IntOrStr::Str(s) => s.clone(),
    };
    let (bytes, window) = match text.split_once('/') {
        Some((b, w)) => {
            let window = parse_duration(&IntOrStr::Str(w.to_owned()))?;
            if window.is_zero() || window > MAX_DURATION {
                return Err(format!("the window must be between 1s and 366d (got {w})"));
            }
            (b, window)
        }
        None => (text.as_str(), MIN_DATA_RATE_WINDOW),
    };
    let bytes = parse_size(&IntOrStr::Str(bytes.to_owned()))?;
    Ok((bytes > 0).then_some((bytes, window)))
}

fn ranged(flag: &'static str, n: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(invalid(
            flag,
            format!("must be between {lo} and {hi} (got {n})"),
        ))
    }
}

fn at_least_one(flag: &'static str, n: u64) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(flag, "must be at least 1 (got 0)"));
    }
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The hostname goes verbatim into every greeting and `Received:` line, so anything
/// that could break a reply line (spaces, CR, LF) is refused here.
fn validate_hostname(h: &str) -> Result<(), String> {
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
fn normalize_domain(d: &str) -> Result<String, String> {
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

/// `10485760`, `512K`, `10M`, `1G` (powers of 1024; `KiB`/`KB` spellings too).
pub fn parse_size(v: &IntOrStr) -> Result<u64, String> {
    let s = match v {
        IntOrStr::Int(i) => {
            return u64::try_from(*i).map_err(|_| format!("must be positive (got {i})"));
        }
        IntOrStr::Str(s) => s.trim(),
    };
    let bad = || format!("not a size (got {s:?}); e.g. 10485760, 512K, 10M, 1G");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("too large (got {s:?})"))
}

/// Plain seconds (`300`) or humantime (`5m`, `1h 30m`, `500ms`).
pub fn parse_duration(v: &IntOrStr) -> Result<Duration, String> {
    match v {
        IntOrStr::Int(i) => u64::try_from(*i)
            .map(Duration::from_secs)
            .map_err(|_| format!("must not be negative (got {i})")),
        IntOrStr::Str(s) => {
            let s = s.trim();
            if let Ok(secs) = s.parse::<u64>() {
                return Ok(Duration::from_secs(secs));
            }
            humantime::parse_duration(s)
                .map_err(|_| format!("not a duration (got {s:?}); e.g. 300, 30s, 5m, 1h"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap reads `SMTPGW_*` while parsing; `parse_with_env` sets them under this lock,
    /// and every parse here takes it. (Still a set_var in a multi-threaded test binary:
    /// see tests/binary.rs for the way through the binary with an env map.)
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        Cli::try_parse_from(std::iter::once("smtpgw").chain(args.iter().copied()))
    }

    fn cli(args: &[&str]) -> ServerArgs {
        let c = parse(args).expect("parses");
        assert!(c.command.is_none());
        c.server
    }

    fn host() -> Option<String> {
        Some("mx.test".to_owned())
    }

    fn run(args: &[&str], file: &str) -> Result<Config, ConfigError> {
        resolve(cli(args), parse_file(file, "f.toml")?, host)
    }

    fn err(args: &[&str], file: &str) -> String {
        run(args, file).expect_err("must fail").to_string()
    }

    #[test]
    fn edge_settings() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.edge.max_connections_per_ip, Some(50));
        assert_eq!(c.edge.max_connections_per_prefix, Some(200));
        assert_eq!(c.edge.max_connection_rate_per_ip, Some(600));
        assert_eq!(c.edge.max_message_rate_per_ip, None);
        assert_eq!(c.edge.error_budget, Some(20));
        assert_eq!(c.edge.greeting_delay, Duration::ZERO);
        assert_eq!(c.edge.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(c.edge.trusted.len(), 2);
        assert!(c.edge.tls.is_none());

        let c = run(
            &[
                "--max-connections-per-ip",
                "0",
                "--trusted-cidr",
                "10.0.0.0/8,192.0.2.1",
            ],
            "proxy-protocol = \"v2\"\nproxy-trusted-cidr = [\"10.1.0.0/16\"]\n\
             greeting-delay = \"2s\"\nmax-message-rate-per-ip = 30\n\
             tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\nlisten-tls = \"127.0.0.1:465\"\n",
        )
        .unwrap();
        assert_eq!(c.edge.max_connections_per_ip, None);
        assert_eq!(c.edge.trusted.len(), 2);
        assert_eq!(c.edge.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(
            c.edge.proxy_trusted,
            vec![Cidr::parse("10.1.0.0/16").unwrap()]
        );
        assert_eq!(c.edge.greeting_delay, Duration::from_secs(2));
        assert_eq!(c.edge.max_message_rate_per_ip, Some(30));
        assert_eq!(c.edge.listen_tls, Some("127.0.0.1:465".parse().unwrap()));
        assert!(c.edge.tls.is_some());

        for (args, flag) in [
            (&["--proxy-protocol", "v1"][..], "--proxy-trusted-cidr:"),
            (
                &[
                    "--proxy-protocol",
                    "any",
                    "--proxy-trusted-cidr",
                    "10.0.0.0/33",
                ][..],
                "--proxy-trusted-cidr:",
            ),
            (&["--trusted-cidr", "nope"][..], "--trusted-cidr:"),
            (&["--listen-tls", "127.0.0.1:465"][..], "--listen-tls:"),
            (&["--require-tls"][..], "--require-tls:"),
            (&["--tls-cert", "c.pem"][..], "--tls-key:"),
            (&["--tls-key", "k.pem"][..], "--tls-cert:"),
            (&["--greeting-delay", "2m"][..], "--greeting-delay:"),
            (
                &["--tls-cert", "c", "--tls-key", "k", "--listen-tls", "x"][..],
                "--listen-tls:",
            ),
        ] {
            let e = err(args, "");
            assert!(e.starts_with(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.listen, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.hostname, "mx.test");
        assert_eq!(c.accept_domains, ["localhost", "mx.test"]);
        assert!(c.accept_domains_defaulted);
        assert_eq!(c.sink, SinkKind::Spool);
        assert_eq!(c.spool_dir, PathBuf::from("./spool"));
        assert!(c.reactors >= 1);
        assert_eq!(c.max_message_size, 10 * 1024 * 1024);
        assert_eq!(c.max_recipients, 100);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.max_session_time, Duration::from_secs(3600));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.bare_lf, BareLfPolicy::Reject);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn hostname_falls_back_to_localhost() {
        let c = resolve(cli(&[]), FileConfig::default(), || None).unwrap();
        assert_eq!(c.hostname, "localhost");
        assert_eq!(c.accept_domains, ["localhost"]);
    }

    #[test]
    fn cli_beats_file_beats_default() {
        let file = r#"
            listen = "[::1]:0"
            hostname = "file.example"
            accept-domain = ["A.example", "b.example"]
            reactors = 3
            max-message-size = "2M"
            idle-timeout = "5m"
            drain-timeout = 0
            sink = "null"
            bare-lf = "normalize"
        "#;
        let c = run(&["--reactors", "2", "--accept-domain", "c.EXAMPLE"], file).unwrap();
        assert_eq!(c.listen, "[::1]:0".parse().unwrap());
        assert_eq!(c.hostname, "file.example");
        assert_eq!(c.accept_domains, ["c.example"]);
        assert!(!c.accept_domains_defaulted);
        assert_eq!(c.reactors, 2);
        assert_eq!(c.max_message_size, 2 << 20);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.drain_timeout, Duration::ZERO);
        assert_eq!(c.sink, SinkKind::Null);
        assert_eq!(c.bare_lf, BareLfPolicy::Normalize);

        let c = run(&[], file).unwrap();
        assert_eq!(c.reactors, 3);
        assert_eq!(c.accept_domains, ["a.example", "b.example"]);
    }

    // Flag over environment over file is tested through the binary (tests/binary.rs,
    // `config_precedence_is_flag_then_environment_then_file`), with the environment
    // passed to the child process: setting variables in this multi-threaded test
    // binary would race with every other test that parses.

    #[test]
    fn accept_domain_repeats_and_commas() {
        let c = run(
            &[
                "--accept-domain",
                "a.example,B.example",
                "--accept-domain",
                "a.example",
            ],
            "",
        )
        .unwrap();
        assert_eq!(c.accept_domains, ["a.example", "b.example"]);
        let c = run(&[], "accept-domain = \"x.example\"").unwrap();
        assert_eq!(c.accept_domains, ["x.example"]);
    }

    #[test]
    fn accept_domains_are_normalised_with_uts46_and_literals_are_taken() {
        let c = run(
            &[
                "--accept-domain",
                "Bücher.example,xn--BCHER-kva.example,[192.0.2.1],[IPv6:2001:DB8:0::1]",
            ],
            "",
        )
        .unwrap();
        assert_eq!(
            c.accept_domains,
            ["xn--bcher-kva.example", "[192.0.2.1]", "[IPv6:2001:db8::1]"]
        );
        for bad in ["[300.1.1.1]", "[x-tag:abc]", "[192.0.2.1", "a/b.example"] {
            let e = err(&["--accept-domain", bad], "");
            assert!(e.starts_with("--accept-domain: not a valid"), "{bad}: {e}");
        }
    }

    #[test]
    fn no_open_relay() {
        assert!(err(&["--accept-domain", "*"], "").starts_with("--accept-domain: wildcards"));
        assert!(err(&["--accept-domain", "*.example"], "").starts_with("--accept-domain:"));
        assert!(err(&[], "accept-domain = [\"\"]").starts_with("--accept-domain: empty"));
        assert!(err(&["--accept-domain", "a b"], "").starts_with("--accept-domain:"));
        assert!(err(&["--accept-domain", "a..b"], "").starts_with("--accept-domain:"));
        assert!(err(&["--accept-domain", ""], "").starts_with("--accept-domain: empty"));
        assert!(err(&[], "accept-domain = []").starts_with("--accept-domain: empty list"));
    }

    #[test]
    fn one_line_errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--reactors", "0"],
                "--reactors: must be between 1 and 1024 (got 0)",
            ),
            (
                &["--reactors", "1025"],
                "--reactors: must be between 1 and 1024 (got 1025)",
            ),
            (
                &["--max-recipients", "0"],
                "--max-recipients: must be at least 1 (got 0)",
            ),
            (
                &["--max-connections", "0"],
                "--max-connections: must be at least 1 (got 0)",
            ),
            (
                &["--max-message-size", "0"],
                "--max-message-size: must be between 1 and 1G (got \"0\")",
            ),
            (
                &["--max-message-size", "2G"],
                "--max-message-size: must be between 1 and 1G (got \"2G\")",
            ),
            (
                &["--max-message-size", "10X"],
                "--max-message-size: not a size (got \"10X\"); e.g. 10485760, 512K, 10M, 1G",
            ),
            (
                &["--idle-timeout", "0"],
                "--idle-timeout: must be between 1s and 366d (got \"0\")",
            ),
            (
                &["--idle-timeout", "soon"],
                "--idle-timeout: not a duration (got \"soon\"); e.g. 300, 30s, 5m, 1h",
            ),
            (
                &["--max-session-time", "400d"],
                "--max-session-time: must be between 1s and 366d (got \"400d\")",
            ),
            (
                &["--listen", "localhost"],
                "--listen: not an IP:PORT address (got \"localhost\"); e.g. 127.0.0.1:2525 or [::1]:2525",
            ),
            (
                &["--metrics-listen", "localhost:9025"],
                "--metrics-listen: not an IP:PORT address (got \"localhost:9025\"); e.g. 127.0.0.1:9025",
            ),
            (
                &["--hostname", "bad\r\nname"],
                "--hostname: not a valid host name (got \"bad\\r\\nname\"); use letters, digits, '-' and '.'",
            ),
        ];
        for (args, want) in cases {
            let got = err(args, "");
            assert_eq!(&got, want, "for {args:?}");
            assert!(!got.contains('\n'));
        }
    }

    #[test]
    fn sizes_and_durations() {
        let s = |x: &str| parse_size(&IntOrStr::Str(x.into()));
        assert_eq!(s("10485760"), Ok(10485760));
        assert_eq!(s("512K"), Ok(512 * 1024));
        assert_eq!(s("10m"), Ok(10 << 20));
        assert_eq!(s("1GiB"), Ok(1 << 30));
        assert!(s("").is_err());
        assert!(s("-1").is_err());
        assert!(s("99999999999999999999G").is_err());
        assert_eq!(parse_size(&IntOrStr::Int(42)), Ok(42));
        assert!(parse_size(&IntOrStr::Int(-1)).is_err());
        let d = |x: &str| parse_duration(&IntOrStr::Str(x.into()));
        assert_eq!(d("300"), Ok(Duration::from_secs(300)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_duration(&IntOrStr::Int(7)),
            Ok(Duration::from_secs(7))
        );
    }

    #[test]
    fn file_errors_are_one_line_and_name_the_key() {
        let e = err(&[], "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert_eq!(
            e,
            "--config f.toml: unknown key `lisen` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
        );
        let e = err(&[], "sink = \"null\"\nreactors = \"many\"\n");
        assert!(e.starts_with("--config f.toml: line 2: `reactors`:"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(&[], "reactors = \n");
        assert!(e.starts_with("--config f.toml: line 1"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(&[], "sink = \"s3\"\n");
        assert!(e.contains("`sink`"), "{e}");
        let e = err(&[], "accept-domain = 1\n");
        assert!(e.contains("expected a domain or a list of domains"), "{e}");
        let e = err(&[], "accept-domain = [1]\n");
        assert!(e.contains("`accept-domain`"), "{e}");
        let e = err(&[], "[server]\nlisten = \"x\"\n");
        assert!(e.contains("unknown key `server`"), "{e}");
        // Values from the file are validated like flags.
        assert_eq!(
            err(&[], "max-recipients = 0"),
            "--max-recipients: must be at least 1 (got 0)"
        );
        assert_eq!(
            err(&[], "max-message-size = 0"),
            "--max-message-size: must be between 1 and 1G (got 0)"
        );
        let missing = ServerArgs {
            config: Some(PathBuf::from("/nonexistent/smtpgw.toml")),
            ..Default::default()
        };
        let e = missing.resolve().unwrap_err().to_string();
        assert!(e.starts_with("--config /nonexistent/smtpgw.toml: cannot read:"));
    }

    #[test]
    fn clap_errors_name_the_flag_on_their_first_line() {
        let e = parse(&["--reactors", "abc"]).unwrap_err();
        let first = e.render().to_string();
        let first = first.lines().next().unwrap();
        assert!(
            first.starts_with("error:") && first.contains("--reactors"),
            "{first}"
        );
        let e = parse(&["--sink", "s3"]).unwrap_err();
        assert!(e
            .render()
            .to_string()
            .lines()
            .next()
            .unwrap()
            .contains("--sink"));
    }

    #[test]
    fn kafka_settings() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.kafka.brokers, None);
        assert_eq!(c.kafka.topic, "smtp.inbound");
        assert_eq!(c.kafka.publish_timeout, Duration::from_secs(30));
        assert_eq!(c.kafka.max_inflight_messages, 10_000);
        assert_eq!(c.kafka.max_inflight_bytes, 256 << 20);

        let c = run(
            &[
                "--sink",
                "kafka",
                "--kafka-brokers",
                "127.0.0.1:9092,127.0.0.1:9093",
                "--kafka-config",
                "security.protocol=SSL",
                "--kafka-config",
                "ssl.ca.location = /etc/ca.pem",
                "--publish-timeout",
                "5s",
                "--max-inflight-bytes",
                "64M",
            ],
            "kafka-topic = \"mail.in\"\nmax-inflight-messages = 7\nkafka-config = [\"linger.ms=5\"]",
        )
        .unwrap();
        assert_eq!(c.sink, SinkKind::Kafka);
        assert_eq!(
            c.kafka.brokers.as_deref(),
            Some("127.0.0.1:9092,127.0.0.1:9093")
        );
        assert_eq!(c.kafka.topic, "mail.in");
        // Flags replace the file's list rather than adding to it, like --accept-domain.
        assert_eq!(
            c.kafka.extra,
            vec![
                ("security.protocol".to_owned(), "SSL".to_owned()),
                ("ssl.ca.location".to_owned(), "/etc/ca.pem".to_owned()),
            ]
        );
        assert_eq!(c.kafka.publish_timeout, Duration::from_secs(5));
        assert_eq!(c.kafka.max_inflight_messages, 7);
        assert_eq!(c.kafka.max_inflight_bytes, 64 << 20);
        let o = c.kafka.options(c.max_recipients);
        assert_eq!(o.topic, "mail.in");
        assert_eq!(o.publish_timeout, Duration::from_secs(5));
    }

    #[test]
    fn kafka_errors_name_the_flag() {
        assert_eq!(
            err(&["--sink", "kafka"], ""),
            "--kafka-brokers: required with --sink kafka (e.g. --kafka-brokers 127.0.0.1:9092)"
        );
        let k = |extra: &[&str]| {
            let mut args = vec!["--sink", "kafka", "--kafka-brokers", "h:1"];
            args.extend_from_slice(extra);
            err(&args, "")
        };
        assert!(
            k(&["--kafka-config", "linger.ms"]).starts_with("--kafka-config: expected KEY=VALUE")
        );
        assert!(k(&["--kafka-config", "=1"]).starts_with("--kafka-config: empty key"));
        assert_eq!(
            k(&["--kafka-config", "acks=1"]),
            "--kafka-config: acks: not allowed, the gateway always uses acks=all"
        );
        assert!(k(&["--kafka-config", "enable.idempotence=false"]).starts_with("--kafka-config:"));
        assert!(k(&["--kafka-config", "message.timeout.ms=1"]).contains("--publish-timeout"));
        assert!(k(&["--kafka-topic", "a b"]).starts_with("--kafka-topic: not a Kafka topic name"));
        assert!(k(&["--publish-timeout", "0"]).starts_with("--publish-timeout: must be between"));
        assert!(k(&["--publish-timeout", "30d"]).starts_with("--publish-timeout: must be between"));
        assert!(k(&["--max-inflight-messages", "0"]).starts_with("--max-inflight-messages:"));
        assert!(
            k(&["--max-inflight-bytes", "lots"]).starts_with("--max-inflight-bytes: not a size")
        );
        assert!(err(&["--sink", "kafka", "--kafka-brokers", " "], "")
            .starts_with("--kafka-brokers: must not be empty"));
    }

    #[test]
    fn spool_replay_parses() {
        let c = parse(&[
            "spool",
            "replay",
            "--spool-dir",
            "/s",
            "--to-kafka",
            "--kafka-brokers",
            "h:1",
            "--kafka-topic",
            "t",
        ])
        .unwrap();
        match c.command {
            Some(Command::Spool(SpoolCommand::Replay { dir, kafka, .. })) => {
                assert_eq!(dir.spool_dir, Some(PathBuf::from("/s")));
                let k = resolve_kafka(kafka, KafkaFile::default()).unwrap();
                assert_eq!(k.brokers.as_deref(), Some("h:1"));
                assert_eq!(k.topic, "t");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["spool", "replay", "--kafka-brokers", "h:1"]).is_err());
    }

    #[test]
    fn spool_subcommands() {
        let c = Cli::try_parse_from([
            "smtpgw",
            "spool",
            "cat",
            "--body",
            "--spool-dir",
            "/s",
            "ID",
        ])
        .unwrap();
        match c.command {
            Some(Command::Spool(SpoolCommand::Cat { dir, body, id, .. })) => {
                assert_eq!(dir.spool_dir, Some(PathBuf::from("/s")));
                assert!(body);
                assert_eq!(id, "ID");
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&["spool", "export", "--mbox", "out.mbox"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Spool(SpoolCommand::Export { .. }))
        ));
        assert!(parse(&["spool", "export"]).is_err());
    }

    /// Parses like the binary does, with sources recorded, under the ENV lock with the
    /// given variables set for the duration.
    fn parse_with_env(args: &[&str], env: &[(&str, &str)]) -> Cli {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let parsed = parse_cli_from(std::iter::once("smtpgw").chain(args.iter().copied()));
        for (k, _) in env {
            std::env::remove_var(k);
        }
        parsed.expect("parses")
    }

    #[test]
    fn errors_name_the_source_of_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "reactors = 0\nmax-recipients = 5\nkafka-topic = \"a b\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let resolve_err = |args: &[&str], env: &[(&str, &str)]| {
            parse_with_env(args, env)
                .server
                .resolve()
                .unwrap_err()
                .to_string()
        };
        // From the file: the file and its key.
        assert_eq!(
            resolve_err(&["--config", p], &[]),
            format!("--config {p}: `reactors`: must be between 1 and 1024 (got 0)")
        );
        // From the environment: the variable.
        assert_eq!(
            resolve_err(&["--config", p], &[("SMTPGW_REACTORS", "2000")]),
            "SMTPGW_REACTORS: must be between 1 and 1024 (got 2000)"
        );
        // From the command line: the flag.
        assert_eq!(
            resolve_err(
                &["--config", p, "--reactors", "0"],
                &[("SMTPGW_REACTORS", "2")]
            ),
            "--reactors: must be between 1 and 1024 (got 0)"
        );
        assert_eq!(
            resolve_err(&["--config", p, "--reactors", "1"], &[]),
            format!("--config {p}: `kafka-topic`: not a Kafka topic name (got \"a b\"); use letters, digits, '.', '_' and '-'")
        );
        assert!(resolve_err(&[], &[("SMTPGW_MAX_MESSAGE_SIZE", "10X")])
            .starts_with("SMTPGW_MAX_MESSAGE_SIZE: not a size"));
        assert!(resolve_err(&[], &[("SMTPGW_LOG", "smtpgw=loud")])
            .starts_with("SMTPGW_LOG: invalid log filter"));
        assert!(resolve_err(&["--kafka-config", "acks=0"], &[])
            .starts_with("--kafka-config: acks: not allowed"));
        assert!(
            resolve_err(&[], &[("SMTPGW_KAFKA_CONFIG", "linger.ms=5;acks=0")])
                .starts_with("SMTPGW_KAFKA_CONFIG: acks: not allowed")
        );
    }

    #[test]
    fn kafka_config_from_the_environment_takes_several_settings() {
        let cli = parse_with_env(
            &["--sink", "kafka", "--kafka-brokers", "h:1"],
            &[(
                "SMTPGW_KAFKA_CONFIG",
                "security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;ssl.cipher.suites=A,B",
            )],
        );
        let c = resolve(cli.server, FileConfig::default(), host).unwrap();
        assert_eq!(
            c.kafka.extra,
            [
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("sasl.mechanism".to_owned(), "SCRAM-SHA-512".to_owned()),
                ("ssl.cipher.suites".to_owned(), "A,B".to_owned()),
            ]
        );
    }

    #[test]
    fn spool_subcommands_read_the_spool_dir_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "spool-dir = \"/var/spool/gw\"\nkafka-topic = \"t.file\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let spool_dir = |args: &[&str]| match parse_with_env(args, &[]).command {
            Some(Command::Spool(SpoolCommand::Ls { dir, .. })) => dir.resolve().map(|(d, _)| d),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            spool_dir(&["spool", "ls", "--config", p]).unwrap(),
            PathBuf::from("/var/spool/gw")
        );
        assert_eq!(
            spool_dir(&["spool", "ls", "--config", p, "--spool-dir", "/x"]).unwrap(),
            PathBuf::from("/x")
        );
        assert_eq!(
            spool_dir(&["spool", "ls"]).unwrap(),
            PathBuf::from("./spool")
        );
        // Each spool subcommand has its own help, not the server's.
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let spool = cmd.find_subcommand_mut("spool").unwrap();
        for (name, words) in [
            ("ls", "List the stored messages"),
            ("cat", "Print one stored message"),
            ("export", "mbox"),
            ("replay", "Publish every stored message to Kafka"),
            ("check", "Verify every record"),
            ("prune", "Delete whole closed segments"),
        ] {
            let help = spool
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains(words), "{name}: {help}");
            assert!(help.contains("--config"), "{name}: {help}");
            assert!(!help.contains("--max-recipients"), "{name}: {help}");
        }
    }

    #[test]
    fn spool_fallback_needs_the_kafka_sink() {
        let k = ["--sink", "kafka", "--kafka-brokers", "h:1"];
        assert!(!run(&k, "").unwrap().spool_fallback);
        let mut args = k.to_vec();
        args.push("--spool-fallback");
        assert!(run(&args, "").unwrap().spool_fallback);
        assert!(run(&k, "spool-fallback = true").unwrap().spool_fallback);
        assert_eq!(
            err(&["--spool-fallback"], ""),
            "--spool-fallback: only with --sink kafka (the spool is the fallback for Kafka)"
        );
    }

    #[test]
    fn topic_prefixed_aliases_of_reserved_settings_are_refused() {
        let k = |pair: &str| {
            err(
                &[
                    "--sink",
                    "kafka",
                    "--kafka-brokers",
                    "h:1",
                    "--kafka-config",
                    pair,
                ],
                "",
            )
        };
        assert!(k("topic.message.timeout.ms=1").contains("--publish-timeout"));
        assert!(k("topic.delivery.timeout.ms=1").contains("--publish-timeout"));
        assert!(k("topic.acks=1").contains("acks=all"));
        assert!(k("topic.request.required.acks=0").contains("acks=all"));
        // A global setting whose own name starts with `topic.` stays allowed.
        let ok = run(
            &[
                "--sink",
                "kafka",
                "--kafka-brokers",
                "h:1",
                "--kafka-config",
                "topic.metadata.refresh.interval.ms=1000",
            ],
            "",
        )
        .unwrap();
        assert_eq!(ok.kafka.extra.len(), 1);
    }

    #[test]
    fn spool_check_prune_and_skip_corrupt_parse() {
        let c = parse(&["spool", "ls", "--skip-corrupt"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Spool(SpoolCommand::Ls {
                corrupt: SkipCorruptArg { skip_corrupt: true },
                ..
            }))
        ));
        let c = parse(&["spool", "export", "--mbox", "m", "--force"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Spool(SpoolCommand::Export { force: true, .. }))
        ));
        assert!(parse(&["spool", "check"]).is_ok());
        let c = parse(&["spool", "prune", "--before", "2026-01-01T00:00:00Z"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Spool(SpoolCommand::Prune { dry_run: false, .. }))
        ));
        assert!(parse(&["spool", "prune"]).is_err(), "--before is required");
    }

    #[test]
    fn spool_limits_parse_and_name_their_flag() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.spool_max_bytes, None);
        assert_eq!(c.spool_min_free_bytes, DEFAULT_SPOOL_MIN_FREE_BYTES);
        let c = run(&["--spool-max-bytes", "2G"], "spool-min-free-bytes = 0").unwrap();
        assert_eq!(c.spool_max_bytes, Some(2 << 30));
        assert_eq!(c.spool_min_free_bytes, 0);
        assert!(
            err(&["--spool-max-bytes", "lots"], "").starts_with("--spool-max-bytes: not a size")
        );
        assert!(err(&["--spool-min-free-bytes=-1"], "")
            .starts_with("--spool-min-free-bytes: not a size"));
        // Like every setting, a bad value names the variable or the file key it came from.
        let e = parse_with_env(&[], &[("SMTPGW_SPOOL_MAX_BYTES", "lots")])
            .server
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("SMTPGW_SPOOL_MAX_BYTES: not a size"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "spool-min-free-bytes = \"-1\"\n").unwrap();
        let p = path.to_str().unwrap();
        let e = parse_with_env(&["--config", p], &[])
            .server
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--config {p}: `spool-min-free-bytes`: not a size")),
            "{e}"
        );
    }
}
