//! The gateway's configuration: one struct per settings group, each deriving clap's
//! `Args` and serde's `Deserialize`, so that a setting (its flag, `SMTPGW_*` variable,
//! file key, help text and default) is declared once, on one field. The layers are
//! merged flag > environment > `--config` file > default with clap's value sources, then
//! validated into one [`Config`] before anything starts, so a bad value fails with one
//! line naming where it came from: the flag, the variable or the file and its key.

use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::certs::TlsMinVersion;
use crate::conn::{Cidr, ProxyMode};
use crate::smtp::BareLfPolicy;

pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 1024 * 1024 * 1024;
pub const MAX_REACTORS: u64 = 1024;
/// Greeting delays beyond this would only make legitimate clients time out.
const MAX_GREETING_DELAY: Duration = Duration::from_secs(60);
/// Without a total memory figure (or below it), the body budget is this.
const FALLBACK_BODY_MEMORY: usize = 256 * 1024 * 1024;
/// Far beyond any sensible setting, and keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// librdkafka takes message.timeout.ms as a 32-bit count of milliseconds.
const MAX_PUBLISH_TIMEOUT: Duration = Duration::from_secs(24 * 24 * 3600);
/// The minimum data rate's window when none is given (the first window is the grace).
const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);

/// What picks a Kafka record's partition (the key is always the message id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionKey {
    /// The message id (the key): mail spreads over all partitions.
    Id,
    /// The sender's domain: all mail from one domain in one partition, in order.
    SenderDomain,
    /// The first recipient's domain.
    RecipientDomain,
}

/// Where accepted messages go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
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

pub use crate::logging::LogFormat;

/// The layout `spool export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One mboxrd file (see `spool_tool`'s module documentation).
    Mbox,
    /// A directory with `ID.eml` (the stored value) and `ID.json` (the envelope) per
    /// message (see `spool_tool::write_eml_message`).
    Eml,
}

// ---- Value types: each parses from a flag's text and from a file value alike. --------

/// A number of bytes. Plain digits are bytes; a single letter `K`, `M`, `G` or `T` is
/// a power of 1024 (as this gateway has always read it); IEC units (`KiB`, `MiB`,
/// `GiB`, `TiB`) are powers of 1024 and SI units (`kB`, `MB`, `GB`, `TB`) powers of
/// 1000, as the `bytesize` crate reads them: `10MB` is 10,000,000 and `10MiB`
/// 10,485,760. Case does not matter; a fraction is allowed with a unit (`1.5G`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let bad = || {
            format!("not a size (got {s:?}); e.g. 10485760, 512K, 10M (= 10MiB), 10MB (= 10000000)")
        };
        let unit_at = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        if unit_at == 0 {
            return Err(bad());
        }
        let unit = s[unit_at..].trim();
        let spelled = if unit.len() == 1 && "kmgtKMGT".contains(unit) {
            format!("{}{unit}iB", &s[..unit_at])
        } else {
            s.to_owned()
        };
        // bytesize saturates instead of failing on overflow.
        match spelled.parse::<bytesize::ByteSize>() {
            Ok(n) if n.as_u64() == u64::MAX => Err(format!("too large (got {s:?})")),
            Ok(n) => Ok(ByteSize(n.as_u64())),
            Err(_) => Err(bad()),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `--max-message-size`: a size, or `auto`. A sink that holds less than a size lowers
/// it (with a warning), except that a Kafka topic too small for a set size stops the
/// start-up; `auto` is the default size (10M) lowered to what the sink and the topic
/// hold, without refusing to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxMessageSize {
    pub bytes: ByteSize,
    pub auto: bool,
}

/// What `auto` starts from before the sink lowers it.
pub const AUTO_MAX_MESSAGE_SIZE: u64 = 10 << 20;

impl MaxMessageSize {
    pub fn as_usize(self) -> usize {
        self.bytes.as_usize()
    }
}

impl FromStr for MaxMessageSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(MaxMessageSize {
                bytes: ByteSize(AUTO_MAX_MESSAGE_SIZE),
                auto: true,
            });
        }
        let bytes = text
            .parse::<ByteSize>()
            .map_err(|e| e.replace("; e.g. ", "; auto, or e.g. "))?;
        Ok(MaxMessageSize { bytes, auto: false })
    }
}

impl fmt::Display for MaxMessageSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.auto {
            f.write_str("auto")
        } else {
            self.bytes.fmt(f)
        }
    }
}

/// A duration: plain seconds (`300`) or humantime units (`5m`, `1h 30m`, `500ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let s = text.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(Dur(Duration::from_secs(secs)));
        }
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|_| format!("not a duration (got {s:?}); e.g. 300, 30s, 5m, 1h"))
    }
}

/// In seconds: humantime would render 400d as "1year 1month 4days 7h 26m 24s".
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// `BYTES[/WINDOW]`: bytes per second averaged over windows of WINDOW (default 30s);
/// `0` turns the rule off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRate(pub Option<(u64, Duration)>);

impl FromStr for DataRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (bytes, window) = match s.split_once('/') {
            Some((b, w)) => {
                let Dur(window) = w.parse()?;
                if window.is_zero() || window > MAX_DURATION {
                    return Err(format!("the window must be between 1s and 366d (got {w})"));
                }
                (b, window)
            }
            None => (s, MIN_DATA_RATE_WINDOW),
        };
        let ByteSize(bytes) = bytes.parse()?;
        Ok(DataRate((bytes > 0).then_some((bytes, window))))
    }
}

/// A Kafka topic name, by Kafka's own rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaTopic(pub String);

impl FromStr for KafkaTopic {
    type Err = String;
    fn from_str(t: &str) -> Result<Self, String> {
        let ok = !t.is_empty()
            && t.len() <= 249
            && t != "."
            && t != ".."
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(format!(
                "not a Kafka topic name (got {t:?}); use letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(KafkaTopic(t.to_owned()))
    }
}

/// One librdkafka setting, `KEY=VALUE`; the ones the gateway owns are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSetting {
    pub key: String,
    pub value: String,
}

impl FromStr for KafkaSetting {
    type Err = String;
    fn from_str(pair: &str) -> Result<Self, String> {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "expected KEY=VALUE (got {pair:?}), e.g. security.protocol=SSL"
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("empty key in {pair:?}"));
        }
        if let Some(why) = reserved_kafka_config(key) {
            return Err(format!("{key}: not allowed, {why}"));
        }
        Ok(KafkaSetting {
            key: key.to_owned(),
            value: value.trim().to_owned(),
        })
    }
}

/// `IP:PORT`, with an example in the error (std's says only "invalid socket address").
fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("not an IP:PORT address (got {s:?}); e.g. 127.0.0.1:2525 or [::1]:2525")
    })
}

/// A file value for a text-parsed type: a string, or a number read as its digits.
struct TextVisitor<T>(PhantomData<T>);

impl<T: FromStr<Err = E>, E: fmt::Display> serde::de::Visitor<'_> for TextVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or a number")
    }
    fn visit_str<Er: serde::de::Error>(self, v: &str) -> Result<T, Er> {
        v.parse().map_err(Er::custom)
    }
    fn visit_i64<Er: serde::de::Error>(self, v: i64) -> Result<T, Er> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<Er: serde::de::Error>(self, v: u64) -> Result<T, Er> {
        self.visit_str(&v.to_string())
    }
}

macro_rules! deserialize_from_text {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(TextVisitor(PhantomData))
            }
        }
    )*};
}
deserialize_from_text!(
    ByteSize,
    MaxMessageSize,
    Dur,
    DataRate,
    KafkaTopic,
    KafkaSetting
);

/// Written as the text its `FromStr` reads back (for `smtpgw print-config`).
macro_rules! serialize_as_text {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_as_text!(
    ByteSize,
    MaxMessageSize,
    Dur,
    DataRate,
    KafkaTopic,
    KafkaSetting,
    Cidr
);

impl fmt::Display for DataRate {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            None => f.write_str("0"),
            Some((bytes, window)) => write!(f, "{bytes}/{}", Dur(window)),
        }
    }
}

impl fmt::Display for KafkaTopic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `KEY=VALUE`, with the value of a credential (a key naming a password, secret or
/// private key) shown as `(redacted)`: this is what `print-config` shows an operator.
impl fmt::Display for KafkaSetting {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let secret = ["password", "secret", "key.pem", "private"]
            .iter()
            .any(|word| self.key.contains(word));
        let value = if secret { "(redacted)" } else { &self.value };
        write!(f, "{}={value}", self.key)
    }
}

/// A list in the file: one value (`"a.example"`) or an array of them.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: FromStr> serde::de::Visitor<'de> for V<T>
    where
        T::Err: fmt::Display,
    {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            v.parse().map(|t| vec![t]).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s.parse().map_err(serde::de::Error::custom)?);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// `accept-domain` in the file: an empty list would accept nothing at all.
fn domains<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v: Vec<String> = one_or_many(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "empty list; leave it out to accept only localhost and --hostname",
        ));
    }
    Ok(v)
}

// ---- The settings groups. ------------------------------------------------------------

/// A settings group: clap gives its flags and environment, serde its file keys.
pub trait Group: Args + FromArgMatches + DeserializeOwned + Default + Clone {
    /// Takes `file`'s value for every setting not given as a flag or variable.
    fn layer(&mut self, file: Self, explicit: &dyn Fn(&str) -> bool);

    /// The group's file keys: its long flag names.
    fn keys() -> Vec<String> {
        Self::augment_args(clap::Command::new("keys"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }
}

/// A group's defaults are what clap gives with no flags and no environment.
fn defaults<G: Args + FromArgMatches>() -> G {
    let cmd = G::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.try_get_matches_from(Vec::<OsString>::new());
    // Only a malformed `default_value` gets here: a bug the `defaults` test catches.
    #[allow(clippy::expect_used)]
    matches
        .and_then(|m| G::from_arg_matches(&m))
        .expect("the settings' defaults parse")
}

/// Declares a settings group: the struct (each field one setting, its flag, help and
/// default in clap's attributes; its file key the long flag name) and the layering that
/// picks, per field, the flag or variable if given, else the file's value.
macro_rules! settings_group {
    ($(#[$attr:meta])* pub struct $name:ident {
        $($(#[$fattr:meta])* pub $field:ident: $ty:ty,)*
    }) => {
        #[derive(Clone, Debug, PartialEq, Eq, Args, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
        $(#[$attr])*
        pub struct $name {
            $($(#[$fattr])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                defaults()
            }
        }

        impl Group for $name {
            fn layer(&mut self, file: Self, explicit: &dyn Fn(&str) -> bool) {
                $(if !explicit(stringify!($field)) {
                    self.$field = file.$field;
                })*
            }
        }
    };
}

settings_group! {
    // Listeners, identity and threads; these change only at a restart.
    #[command(next_help_heading = "Listeners")]
    pub struct Server {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr, default_value = "127.0.0.1:2525")]
        pub listen: SocketAddr,
        /// Address of the HTTP endpoint for /metrics, /healthz and /readyz (loopback by
        /// default: it has no authentication).
        #[arg(long, value_name = "ADDR", value_parser = socket_addr, default_value = "127.0.0.1:9025")]
        pub metrics_listen: SocketAddr,
        /// Our name in the greeting and Received: lines [default: the system hostname].
        #[arg(long, value_name = "NAME")]
        pub hostname: Option<String>,
        /// Reactor threads, 1..=1024 [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        pub reactors: Option<u64>,
        /// I/O backend of the reactors.
        #[arg(long, value_enum, default_value = "auto")]
        pub io_backend: IoBackend,
        /// Leave the io_uring reactor threads unpinned (by default each is pinned to one
        /// of the CPUs the process may use). For hosts where other busy processes share
        /// those CPUs: several gateways, or Kubernetes pods without exclusive CPUs.
        #[arg(long)]
        pub no_cpu_pinning: bool,
    }
}

settings_group! {
    // What a session accepts; SIGHUP re-reads these from the file.
    #[command(next_help_heading = "Session (SIGHUP reloads these)")]
    pub struct Session {
        /// Recipient domain to accept mail for; repeatable, or comma-separated
        /// [default: localhost and --hostname].
        #[arg(long, value_name = "DOMAIN", value_delimiter = ',')]
        // Left out when empty, as a file must (an empty list would accept nothing).
        #[serde(deserialize_with = "domains", skip_serializing_if = "Vec::is_empty")]
        pub accept_domain: Vec<String>,
        /// Largest message; see "Sizes" in the README for units. `auto`: 10M, lowered
        /// to what the sink (the Kafka topic's max.message.bytes) holds, with a warning,
        /// where a size that does not fit the topic stops the start-up.
        #[arg(long, value_name = "BYTES|auto", default_value = "10M")]
        pub max_message_size: MaxMessageSize,
        /// Recipients per message.
        #[arg(long, value_name = "N", default_value = "100")]
        pub max_recipients: u64,
        /// Bare CR or LF in a message body.
        #[arg(long, value_enum, default_value = "reject")]
        pub bare_lf: BareLfPolicy,
    }
}

settings_group! {
    // Connections, memory and time.
    #[command(next_help_heading = "Connections and memory")]
    pub struct Limits {
        /// Open connections across all reactors.
        #[arg(long, value_name = "N", default_value = "10000")]
        pub max_connections: u64,
        /// Message bodies held in memory across the gateway (being received or with the
        /// sink); over it bodies stop being read and MAIL gets 451 4.3.1
        /// [default: 25% of the machine's memory].
        #[arg(long, value_name = "BYTES")]
        pub max_body_memory: Option<ByteSize>,
        /// Slowest average rate a message body may arrive at, as BYTES[/WINDOW] (bytes per
        /// second, averaged over windows of WINDOW, the first being the grace), before
        /// 421 4.4.2; 0 turns it off.
        #[arg(long, value_name = "RATE", default_value = "1K/30s")]
        pub min_data_rate: DataRate,
        /// Close a connection silent this long, e.g. 300 or 5m.
        #[arg(long, value_name = "DUR", default_value = "300")]
        pub idle_timeout: Dur,
        /// Close any connection open this long, however active.
        #[arg(long, value_name = "DUR", default_value = "1h")]
        pub max_session_time: Dur,
        /// On SIGTERM/SIGINT, wait this long for sessions to finish (SIGHUP reloads it).
        #[arg(long, value_name = "DUR", default_value = "30s")]
        pub drain_timeout: Dur,
    }
}

settings_group! {
    // TLS, the PROXY protocol and the per-address limits.
    #[command(next_help_heading = "The internet edge")]
    pub struct Edge {
        /// Second address, speaking TLS from the first byte (RFC 8314 submissions/465
        /// style); needs --tls-cert and --tls-key.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
        pub listen_tls: Option<SocketAddr>,
        /// Certificate chain (PEM, leaf first); with --tls-key, STARTTLS is offered.
        #[arg(long, value_name = "FILE")]
        pub tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE")]
        pub tls_key: Option<PathBuf>,
        /// Close a TLS handshake (implicit or after STARTTLS) not done this long after it
        /// began, silent or trickling, e.g. 10 or 10s.
        #[arg(long, value_name = "DUR", default_value = "10s")]
        pub tls_handshake_timeout: Dur,
        /// MAIL before STARTTLS gets 530 5.7.0.
        #[arg(long)]
        pub require_tls: bool,
        /// Oldest TLS version a handshake may use.
        #[arg(long, value_enum, value_name = "VERSION", default_value = "1.2")]
        pub tls_min_version: TlsMinVersion,
        /// PROXY protocol header expected on every listener, or with --proxy-listen only
        /// on that one.
        #[arg(long, value_enum, default_value = "off")]
        pub proxy_protocol: ProxyProtocol,
        /// Another SMTP address, for the load balancers: only it expects the
        /// --proxy-protocol header, while --listen and --listen-tls take clients
        /// directly.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
        pub proxy_listen: Option<SocketAddr>,
        /// Address prefix allowed to send a PROXY header (the load balancers);
        /// repeatable, or comma-separated. Required with --proxy-protocol.
        #[arg(long, value_name = "CIDR", value_delimiter = ',')]
        #[serde(deserialize_with = "one_or_many")]
        pub proxy_trusted_cidr: Vec<Cidr>,
        /// Address prefix exempt from the per-address limits; repeatable, or
        /// comma-separated; giving it replaces the default.
        #[arg(long, value_name = "CIDR", value_delimiter = ',',
              default_values = ["127.0.0.0/8", "::1/128"])]
        #[serde(deserialize_with = "one_or_many")]
        pub trusted_cidr: Vec<Cidr>,
        /// Open connections per client address; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "50")]
        pub max_connections_per_ip: u32,
        /// Open connections per /24 (IPv4) or /64 (IPv6); 0 turns it off.
        #[arg(long, value_name = "N", default_value = "200")]
        pub max_connections_per_prefix: u32,
        /// New connections per client address per minute (bursts of as many); 0 turns
        /// it off.
        #[arg(long, value_name = "N", default_value = "600")]
        pub max_connection_rate_per_ip: u32,
        /// Messages per client address per minute (bursts of as many); 0 turns it off.
        #[arg(long, value_name = "N", default_value = "0")]
        pub max_message_rate_per_ip: u32,
        /// Commands refused with 5xx after which a session gets 421 4.7.0 and is
        /// closed; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "20")]
        pub error_budget: u32,
        /// Wait this long before the greeting; a client that talks first gets 554 5.5.0;
        /// 0 turns it off.
        #[arg(long, value_name = "DUR", default_value = "0")]
        pub greeting_delay: Dur,
        /// Users for SMTP AUTH (PLAIN, LOGIN), one `name:hash[:rate=N]` a line, hashes
        /// made by `smtpgw auth hash`; re-read on SIGHUP and when it changes. AUTH is
        /// offered only over TLS (STARTTLS or --listen-tls).
        #[arg(long, value_name = "FILE")]
        pub auth_users: Option<PathBuf>,
        /// Offer AUTH before TLS as well; only for loopback listeners, and behind a
        /// PROXY header only to a client whose real address is loopback.
        #[arg(long)]
        pub auth_allow_plaintext: bool,
        /// MAIL before a successful AUTH gets 530 5.7.0.
        #[arg(long)]
        pub require_auth: bool,
        /// Authenticated sessions may send to any recipient domain (unauthenticated ones
        /// stay limited to --accept-domain).
        #[arg(long)]
        pub auth_relay: bool,
        /// Failed AUTH attempts per client address, and per user name, per hour before
        /// 421 4.7.0; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "10")]
        pub max_auth_failures_per_ip: u32,
        /// Messages per authenticated user per minute (bursts of as many), unless its
        /// line in the users file says rate=N; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "0")]
        pub max_message_rate_per_user: u32,
    }
}

impl Edge {
    /// Certificate and key, when TLS is on (validation makes them both or neither).
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }
}

settings_group! {
    // Where the spool is; shared by the server and the `spool` tools. No help heading
    // of its own: in the tools it would carry over to their own flags after it; in the
    // server's help it follows the "Sink and spool" group.
    pub struct SpoolDir {
        /// The spool's directory.
        #[arg(long, value_name = "DIR", default_value = "./spool")]
        pub spool_dir: PathBuf,
    }
}

settings_group! {
    // The sink and the spool's limits.
    #[command(next_help_heading = "Sink and spool")]
    pub struct Spool {
        /// Where accepted messages go.
        #[arg(long, value_enum, default_value = "spool")]
        pub sink: SinkKind,
        /// With --sink kafka: store messages Kafka cannot take now in the spool
        /// (--spool-dir) and forward them when it can, instead of answering 451.
        #[arg(long)]
        pub spool_fallback: bool,
        /// Largest total size of the spool's segments; messages beyond it get 452
        /// 4.3.1; 0 for no limit.
        #[arg(long, value_name = "BYTES", default_value = "0")]
        pub spool_max_bytes: ByteSize,
        /// Free space to leave on the spool's file system; messages that would go below
        /// it get 452 4.3.1 before the disk fills; 0 turns it off. The default leaves
        /// room for a full batch and a maximal message.
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        pub spool_min_free_bytes: ByteSize,
        /// Seal the segment being written once it holds this many bytes, so that
        /// `spool prune` and `spool export` can take it while the gateway runs.
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        pub spool_segment_size: ByteSize,
        /// Seal the segment being written once its first record is this old, even
        /// when no more mail comes.
        #[arg(long, value_name = "DUR", default_value = "1h")]
        pub spool_segment_age: Dur,
        /// With --spool-fallback: spooled records in flight to Kafka at once, 1..=2000.
        /// The producer's queue keeps this much room for them beyond live traffic, so a
        /// backlog drains while mail keeps coming.
        #[arg(long, value_name = "N", default_value = "2000")]
        pub forward_window: u64,
    }
}

settings_group! {
    // The Kafka sink's settings, shared by the server and `spool replay`; the sink
    // builds its producer from this group.
    #[command(next_help_heading = "Kafka")]
    pub struct Kafka {
        /// Kafka bootstrap servers, host:port[,host:port...] (required with --sink kafka
        /// and by spool replay).
        #[arg(long, value_name = "LIST")]
        pub kafka_brokers: Option<String>,
        /// Topic for accepted messages.
        #[arg(long, value_name = "TOPIC", default_value = "smtp.inbound")]
        pub kafka_topic: KafkaTopic,
        /// librdkafka setting KEY=VALUE, e.g. security.protocol=SSL; repeatable, or
        /// several separated by ';' (as SMTPGW_KAFKA_CONFIG takes them).
        #[arg(long, value_name = "KEY=VALUE", value_delimiter = ';')]
        #[serde(deserialize_with = "one_or_many")]
        pub kafka_config: Vec<KafkaSetting>,
        /// A message Kafka has not acknowledged by then gets 451.
        #[arg(long, value_name = "DUR", default_value = "30s")]
        pub publish_timeout: Dur,
        /// Unacknowledged messages above which reactors stop reading message bodies.
        #[arg(long, value_name = "N", default_value = "10000")]
        pub max_inflight_messages: u64,
        /// Unacknowledged bytes above which reactors stop reading message bodies.
        #[arg(long, value_name = "BYTES", default_value = "256M")]
        pub max_inflight_bytes: ByteSize,
        /// What picks a record's partition: the message id, or the sender's or first
        /// recipient's domain (CRC-32C of the lower-cased domain modulo the partition
        /// count; see docs/record.md). The key stays the message id.
        #[arg(long, value_enum, default_value = "id")]
        pub kafka_partition_key: PartitionKey,
    }
}

impl Kafka {
    /// The checks the value types cannot make alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.kafka_brokers {
            if b.trim().is_empty() {
                return Err(invalid("--kafka-brokers", "must not be empty"));
            }
        }
        let d = self.publish_timeout.0;
        if d < Duration::from_millis(1) || d > MAX_PUBLISH_TIMEOUT {
            return Err(invalid(
                "--publish-timeout",
                format!("must be between 1ms and 24d (got {})", self.publish_timeout),
            ));
        }
        at_least_one("--max-inflight-messages", self.max_inflight_messages)?;
        at_least_one("--max-inflight-bytes", self.max_inflight_bytes.0)?;
        Ok(())
    }

    /// The brokers, trimmed; empty when none are set (validation requires them with
    /// `--sink kafka`).
    pub fn brokers(&self) -> &str {
        self.kafka_brokers.as_deref().map_or("", str::trim)
    }
}

/// The most records the forwarder keeps in flight to Kafka (`--forward-window`).
pub const MAX_FORWARD_WINDOW: u64 = 2000;

/// Settings librdkafka must not take from `--kafka-config`, because the durability
/// promise or the sink's own flags depend on them.
const RESERVED_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --kafka-brokers"),
    ("metadata.broker.list", "use --kafka-brokers"),
    ("acks", "the gateway always uses acks=all"),
    ("request.required.acks", "the gateway always uses acks=all"),
    (
        "enable.idempotence",
        "the gateway always uses the idempotent producer",
    ),
    ("message.timeout.ms", "use --publish-timeout"),
    ("delivery.timeout.ms", "use --publish-timeout"),
    ("transactional.id", "the gateway does not use transactions"),
];

/// Why `--kafka-config KEY=...` is refused, if it is.
pub fn reserved_kafka_config(key: &str) -> Option<&'static str> {
    // librdkafka hands a name the global configuration does not know to the default
    // topic configuration, which strips a `topic.` prefix: `topic.acks=1` is `acks=1`
    // and `topic.message.timeout.ms` overrides `--publish-timeout`.
    let bare = key.strip_prefix("topic.").unwrap_or(key);
    RESERVED_KEYS
        .iter()
        .find(|(k, _)| *k == key || *k == bare)
        .map(|(_, why)| *why)
}

settings_group! {
    // Log lines on stderr.
    #[command(next_help_heading = "Logging")]
    pub struct Logging {
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        pub log_format: LogFormat,
        /// Log filter, e.g. info or warn,smtpgw=debug; SIGHUP re-reads it from the file;
        /// its variable is SMTPGW_LOG [default: RUST_LOG, else info]. The transaction
        /// line is target smtpgw::message, refusals smtpgw::refusal, connection ends
        /// smtpgw::session.
        #[arg(long, value_name = "FILTER")]
        pub log_level: Option<String>,
        /// Recipients on the transaction line: each address, their number only, or a
        /// keyed hash of each (key random per process) to follow an address unread.
        #[arg(long, value_enum, default_value = "full")]
        pub log_recipients: crate::logging::LogRecipients,
    }
}

/// `--config FILE` (or `SMTPGW_CONFIG`), for the server and the `spool` tools alike.
#[derive(Clone, Debug, Default, Args)]
pub struct ConfigFileArg {
    /// TOML file whose keys are the long flag names, e.g. `listen = "[::1]:2525"`;
    /// flags and SMTPGW_* variables win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigFileArg {
    pub fn load(&self) -> Result<Option<ConfigFile>, ConfigError> {
        self.config.as_deref().map(ConfigFile::load).transpose()
    }
}

// ---- The command line. --------------------------------------------------------------

/// smtpgw: an SMTP ingestion gateway that says 250 only once a message is stored durably.
#[derive(Debug, Parser)]
#[command(name = "smtpgw", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub server: ServerArgs,
}

// Parsed once per process and matched by value all over the tests: boxing the spool
// commands would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read the local spool: list, print, export, replay to Kafka.
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// Check the configuration (flags, SMTPGW_* variables, --config file) exactly as a
    /// start would, the TLS certificate and key and the librdkafka setting names
    /// included, without starting: exit 0, or 2 with the error a start would give.
    CheckConfig(Box<ServerArgs>),
    /// Print the effective configuration, one `key = value` a line in the file's
    /// syntax, each with where it came from (default, file, environment or flag).
    PrintConfig(Box<ServerArgs>),
    /// SMTP AUTH users (`--auth-users`).
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print the argon2 hash of a password for the users file: the password is read from
    /// standard input (its first line), or prompted for without echo on a terminal;
    /// never from the command line. Add the output as `name:HASH` to the file.
    Hash,
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
        /// Also the state (pending, forwarded, held, deleted; stored without a
        /// forwarder), the client address and every recipient.
        #[arg(long)]
        long: bool,
        /// Only the messages the Kafka forwarder (`--spool-fallback`) has not
        /// forwarded yet.
        #[arg(long)]
        pending: bool,
    },
    /// Keep a message from forwarding, replay and export until `release` (appends a
    /// tombstone; safe while the gateway runs). Exit 2 if the id is not in the spool.
    Hold {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Undo `hold`: the message is forwarded (if the spool has a forwarder) and
    /// replayed and exported again.
    Release {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Never forward, replay or export a message again (final; its bytes stay in its
    /// segment until `prune` deletes the segment).
    Delete {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Counts and bytes by state and by age, the oldest pending message and the
    /// forwarder's lag.
    Stat {
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
    /// Write every stored message to an mbox file (mboxrd quoting, the envelope in
    /// added headers), or with `--format eml` to a directory: ID.eml and ID.json (the
    /// whole envelope) per message.
    Export {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// The mbox file to write (same as `--format mbox FILE`); it appears complete
        /// or not at all.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["format", "out"])]
        mbox: Option<PathBuf>,
        /// What to write: `mbox` (OUT is a file) or `eml` (OUT is a directory).
        #[arg(long, value_enum, requires = "out")]
        format: Option<ExportFormat>,
        /// The mbox file, or the eml directory (created if missing).
        #[arg(value_name = "OUT", required_unless_present = "mbox")]
        out: Option<PathBuf>,
        /// Only the messages stored after this one (the last id an earlier export
        /// wrote): incremental exports. An id not in the spool is an error.
        #[arg(long, value_name = "ID", conflicts_with = "after_cursor")]
        since: Option<String>,
        /// Incremental and restartable: start after the position in FILE (from the
        /// oldest message if FILE does not exist), and once the output is durable,
        /// move FILE (atomically) past what was exported.
        #[arg(long = "after-cursor", value_name = "FILE")]
        after_cursor: Option<PathBuf>,
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
        /// Incremental and restartable: start after the position in FILE (from the
        /// oldest message if FILE does not exist), and once Kafka acknowledged them,
        /// move FILE (atomically) past the messages published.
        #[arg(long = "after-cursor", value_name = "FILE")]
        after_cursor: Option<PathBuf>,
        #[command(flatten)]
        kafka: Kafka,
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
        #[arg(
            long,
            value_name = "ULID|RFC3339",
            required_unless_present = "before_cursor"
        )]
        before: Option<String>,
        /// Segments whose every record lies before the position in this export or
        /// replay cursor (`--after-cursor FILE`) are deleted: exactly what the
        /// incremental runs have handed on.
        #[arg(long = "before-cursor", value_name = "FILE", conflicts_with = "before")]
        before_cursor: Option<PathBuf>,
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

// Where a spool subcommand finds the spool: --spool-dir, else the --config file's
// `spool-dir`, else the default, so a tool run next to a gateway reads the same spool
// as the gateway with the same file.
#[derive(Clone, Debug, Default, Args)]
pub struct SpoolDirArg {
    #[command(flatten)]
    pub file: ConfigFileArg,
    #[command(flatten)]
    pub store: SpoolDir,
    #[arg(skip)]
    pub sources: Sources,
}

impl SpoolDirArg {
    /// The spool directory, and the config file if one is named.
    pub fn resolve(&self) -> Result<(PathBuf, Option<ConfigFile>), ConfigError> {
        let file = self.file.load()?;
        let store = layer(self.store.clone(), file.as_ref(), &self.sources)?;
        if store.spool_dir.as_os_str().is_empty() {
            let e = invalid("--spool-dir", "must not be empty");
            return Err(self.sources.name(e, file.as_ref()));
        }
        Ok((store.spool_dir, file))
    }

    /// `spool replay`'s Kafka settings over the file's, validated.
    pub fn kafka(&self, kafka: Kafka, file: Option<&ConfigFile>) -> Result<Kafka, ConfigError> {
        let kafka = layer(kafka, file, &self.sources)?;
        kafka.validate().map_err(|e| self.sources.name(e, file))?;
        Ok(kafka)
    }
}

/// The server's settings as given by flags and environment, before the file.
#[derive(Clone, Debug, Default, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub file: ConfigFileArg,
    #[command(flatten)]
    pub server: Server,
    #[command(flatten)]
    pub session: Session,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub edge: Edge,
    #[command(flatten)]
    pub spool: Spool,
    #[command(flatten)]
    pub store: SpoolDir,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub log: Logging,
    #[arg(skip)]
    pub sources: Sources,
}

/// Checks one file value against its group's type, so an error names the key; `None`
/// for a key no group has.
fn check_file_value(key: &str, value: &toml::Value) -> Option<Result<(), String>> {
    fn check<G: Group>(key: &str, value: &toml::Value) -> Option<Result<(), String>> {
        if !G::keys().iter().any(|k| k == key) {
            return None;
        }
        let one = toml::Table::from_iter([(key.to_owned(), value.clone())]);
        Some(
            toml::Value::Table(one)
                .try_into::<G>()
                .map(drop)
                .map_err(|e| e.message().trim().replace('\n', " ")),
        )
    }
    check::<Server>(key, value)
        .or_else(|| check::<Session>(key, value))
        .or_else(|| check::<Limits>(key, value))
        .or_else(|| check::<Edge>(key, value))
        .or_else(|| check::<SpoolDir>(key, value))
        .or_else(|| check::<Spool>(key, value))
        .or_else(|| check::<Kafka>(key, value))
        .or_else(|| check::<Logging>(key, value))
}

/// The env variable of a setting: `SMTPGW_` and its long flag name in upper case.
fn env_var(long: &str) -> String {
    match long {
        "log-level" => "SMTPGW_LOG".to_owned(),
        _ => format!("SMTPGW_{}", long.to_ascii_uppercase().replace('-', "_")),
    }
}

/// Gives every setting (and `--config`) its `SMTPGW_*` variable, in every subcommand.
fn with_env(cmd: clap::Command, settings: &[String]) -> clap::Command {
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut cmd = cmd.mut_args(|a| match a.get_long() {
        Some(long) if long == "config" || settings.iter().any(|s| s == long) => {
            let var = env_var(long);
            a.env(var)
        }
        _ => a,
    });
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| with_env(s, settings));
    }
    cmd
}

/// The whole command line as the binary parses it.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let settings = ServerArgs::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect::<Vec<_>>();
    with_env(Cli::command(), &settings)
}

/// Which settings were given as a flag or an environment variable (and which
/// variable), so the file does not override them and an error names what the user has
/// to fix: the flag, `SMTPGW_REACTORS`, or the file and its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `(long flag name, Some(variable) when from the environment)`.
    explicit: Vec<(String, Option<String>)>,
}

impl Sources {
    /// Records the sources of every argument of `cmd` found in `matches`.
    pub fn of(cmd: &clap::Command, matches: &clap::ArgMatches) -> Sources {
        use clap::parser::ValueSource;
        let mut explicit = Vec::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            match matches.value_source(arg.get_id().as_str()) {
                Some(ValueSource::EnvVariable) => explicit.push((
                    long.to_owned(),
                    arg.get_env().map(|v| v.to_string_lossy().into_owned()),
                )),
                Some(ValueSource::CommandLine) => explicit.push((long.to_owned(), None)),
                _ => {}
            }
        }
        Sources { explicit }
    }

    /// The setting (a field name) was given as a flag or variable.
    fn is_explicit(&self, field: &str) -> bool {
        let long = field.replace('_', "-");
        self.explicit.iter().any(|(f, _)| *f == long)
    }

    /// Renames an error's flag after the source its value came from: the environment
    /// variable, or `--config FILE: \`key\``, or the flag itself.
    pub fn name(&self, e: ConfigError, file: Option<&ConfigFile>) -> ConfigError {
        let ConfigError::Invalid { flag, msg } = e else {
            return e;
        };
        let key = flag.trim_start_matches('-');
        match self.explicit.iter().find(|(f, _)| f == key) {
            Some((_, Some(var))) => ConfigError::Source {
                origin: var.clone(),
                msg,
            },
            Some((_, None)) => ConfigError::Invalid { flag, msg },
            None => match file {
                Some(file) if file.table.contains_key(key) => ConfigError::Source {
                    origin: format!("--config {}: `{key}`", file.path.display()),
                    msg,
                },
                _ => ConfigError::Invalid { flag, msg },
            },
        }
    }
}

/// Parses the process's command line; see [`parse_cli_from`].
pub fn parse_cli() -> Result<Cli, clap::Error> {
    parse_cli_from(std::env::args_os())
}

/// Parses like `Cli::try_parse_from`, gives every setting its `SMTPGW_*` variable, and
/// records where each value came from (see [`Sources`]). A bad value from a variable is
/// named after the variable.
pub fn parse_cli_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .map_err(|e| name_the_variable(&cmd, &args, e))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.server.sources = Sources::of(&cmd, &matches);
    if let (Some(Command::CheckConfig(args) | Command::PrintConfig(args)), Some((name, m))) =
        (cli.command.as_mut(), matches.subcommand())
    {
        if let Some(sub) = cmd.find_subcommand(name) {
            args.sources = Sources::of(sub, m);
        }
    }
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

/// clap names the flag when a variable's value does not parse; say the variable.
fn name_the_variable(cmd: &clap::Command, args: &[OsString], e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return e;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let long = arg.trim_start_matches('-');
    let long = long.split([' ', '=']).next().unwrap_or(long).to_owned();
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .and_then(|a| a.strip_prefix(long.as_str()))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    let var = env_var(&long);
    let from_env = std::env::var_os(&var).is_some() && has_arg(cmd, &long);
    if on_command_line || !from_env {
        return e;
    }
    let reason = match std::error::Error::source(&e) {
        Some(source) => source.to_string(),
        None => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!(
                    "invalid value {value:?}; possible values: {}",
                    valid.join(", ")
                ),
                _ => format!("invalid value {value:?}"),
            }
        }
    };
    clap::Error::raw(e.kind(), format!("{var}: {reason}\n"))
}

fn has_arg(cmd: &clap::Command, long: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_long() == Some(long))
        || cmd.get_subcommands().any(|s| has_arg(s, long))
}

impl SpoolCommand {
    fn dir_mut(&mut self) -> &mut SpoolDirArg {
        match self {
            SpoolCommand::Ls { dir, .. }
            | SpoolCommand::Hold { dir, .. }
            | SpoolCommand::Release { dir, .. }
            | SpoolCommand::Delete { dir, .. }
            | SpoolCommand::Stat { dir, .. }
            | SpoolCommand::Cat { dir, .. }
            | SpoolCommand::Export { dir, .. }
            | SpoolCommand::Replay { dir, .. }
            | SpoolCommand::Check { dir }
            | SpoolCommand::Prune { dir, .. } => dir,
        }
    }
}

// ---- The file. ----------------------------------------------------------------------

/// A `--config` file, read and checked: every key known, every value of its type.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    table: toml::Table,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.display().to_string(),
            msg,
        };
        let bytes = crate::files::read_regular_file(path, crate::files::CONFIG_CAP)
            .map_err(|e| file_err(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| file_err(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
        ConfigFile::parse(&text, path)
    }

    /// Parses the file's text. Errors are one line and name the offending key.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.display().to_string(),
            msg,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| file_err(describe(&e, text)))?;
        for (key, value) in &table {
            match check_file_value(key, value) {
                None => {
                    return Err(file_err(format!(
                        "unknown key `{key}` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
                    )))
                }
                Some(Err(msg)) => {
                    return Err(ConfigError::Source {
                        origin: format!("--config {}: `{key}`", path.display()),
                        msg,
                    })
                }
                Some(Ok(())) => {}
            }
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            table,
        })
    }

    /// The group's values from the file, its defaults for keys the file does not have.
    fn group<G: Group>(&self) -> Result<G, ConfigError> {
        let keys = G::keys();
        let sub: toml::Table = self
            .table
            .iter()
            .filter(|(k, _)| keys.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Each value was checked on loading; this only fails on a bug.
        toml::Value::Table(sub)
            .try_into()
            .map_err(|e| ConfigError::File {
                path: self.path.display().to_string(),
                msg: e.message().trim().replace('\n', " "),
            })
    }
}

/// The group as given, with the file's value for every setting not given as a flag or
/// variable.
fn layer<G: Group>(
    mut given: G,
    file: Option<&ConfigFile>,
    sources: &Sources,
) -> Result<G, ConfigError> {
    if let Some(file) = file {
        given.layer(file.group()?, &|field| sources.is_explicit(field));
    }
    Ok(given)
}

/// toml's own rendering spans several lines with a source excerpt; this keeps one line,
/// with the line number (and key) so the user can find the spot.
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

// ---- The validated configuration. ---------------------------------------------------

/// A configuration the gateway can run with: layered, defaulted and validated. The
/// groups are as given; the fields after them are what their defaults resolve to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub server: Server,
    pub session: Session,
    pub limits: Limits,
    pub edge: Edge,
    pub store: SpoolDir,
    pub spool: Spool,
    pub kafka: Kafka,
    pub log: Logging,
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

fn invalid(flag: &'static str, msg: impl Into<String>) -> ConfigError {
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
fn print_group<G: Group + Serialize>(
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

fn validate(
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

fn validate_edge(e: &Edge, listen: SocketAddr) -> Result<(), ConfigError> {
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

fn at_least_one(flag: &'static str, n: u64) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(invalid(flag, "must be at least 1 (got 0)"));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap reads `SMTPGW_*` while parsing; `parse_with_env` sets them under this lock,
    /// and every parse here takes it. (Still a set_var in a multi-threaded test binary:
    /// see tests/binary.rs for the way through the binary with an env map.)
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Parses like the binary does, with sources recorded, under the ENV lock with the
    /// given variables set for the duration.
    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Cli, clap::Error> {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let parsed = parse_cli_from(std::iter::once("smtpgw").chain(args.iter().copied()));
        for (k, _) in env {
            std::env::remove_var(k);
        }
        parsed
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        parse_env(args, &[])
    }

    fn parse_with_env(args: &[&str], env: &[(&str, &str)]) -> Cli {
        parse_env(args, env).expect("parses")
    }

    fn cli(args: &[&str]) -> ServerArgs {
        let c = parse(args).expect("parses");
        assert!(c.command.is_none());
        c.server
    }

    /// The whole message of a command line clap refuses.
    fn clap_err(args: &[&str], env: &[(&str, &str)]) -> String {
        parse_env(args, env)
            .expect_err("must not parse")
            .render()
            .to_string()
    }

    fn host() -> Option<String> {
        Some("mx.test".to_owned())
    }

    fn pairs(kafka: &Kafka) -> Vec<(&str, &str)> {
        kafka
            .kafka_config
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str()))
            .collect()
    }

    fn file(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(text, Path::new("f.toml"))
    }

    fn run(args: &[&str], text: &str) -> Result<Config, ConfigError> {
        let f = file(text)?;
        resolve(cli(args), Some(&f), host)
    }

    fn err(args: &[&str], text: &str) -> String {
        run(args, text).expect_err("must fail").to_string()
    }

    #[test]
    fn every_group_has_defaults_that_parse() {
        // `Default` is clap's parse of no arguments: a bad default_value panics here.
        assert_eq!(Server::default().listen, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(
            Session::default().max_message_size,
            MaxMessageSize {
                bytes: ByteSize(10 << 20),
                auto: false
            }
        );
        assert_eq!(
            Limits::default().idle_timeout,
            Dur(Duration::from_secs(300))
        );
        assert_eq!(Edge::default().trusted_cidr.len(), 2);
        assert_eq!(SpoolDir::default().spool_dir, PathBuf::from("./spool"));
        assert_eq!(Spool::default().spool_min_free_bytes, ByteSize(64 << 20));
        assert_eq!(Kafka::default().kafka_topic.0, "smtp.inbound");
        assert_eq!(Logging::default().log_format, LogFormat::Text);
    }

    /// `print-config` writes each value as text its parser reads back to the same value.
    fn round_trips<G: Group + Serialize + PartialEq + std::fmt::Debug>(group: G) {
        let text = toml::to_string(&group).unwrap();
        let back: G = toml::from_str(&text).unwrap();
        assert_eq!(back, group, "{text}");
    }

    #[test]
    fn printed_settings_read_back_as_the_same_values() {
        let a = cli(&[
            "--min-data-rate",
            "3K/7s",
            "--idle-timeout",
            "1500ms",
            "--max-message-size",
            "1.5M",
            "--proxy-trusted-cidr",
            "10.1.0.0/16,2001:db8::/32",
            "--bare-lf",
            "normalize",
            "--reactors",
            "3",
            "--max-body-memory",
            "1G",
            "--kafka-topic",
            "t.x",
            "--kafka-config",
            "linger.ms=5;compression.type=zstd",
            "--sink",
            "kafka",
            "--io-backend",
            "epoll",
            "--proxy-protocol",
            "v2",
            "--log-format",
            "json",
        ]);
        round_trips(a.server);
        round_trips(a.session);
        round_trips(a.limits);
        round_trips(a.edge);
        round_trips(a.store);
        round_trips(a.spool);
        round_trips(a.kafka);
        round_trips(a.log);
        round_trips(Limits {
            min_data_rate: DataRate(None),
            ..Limits::default()
        });
    }

    #[test]
    fn printed_kafka_credentials_are_redacted() {
        let shown = |pair: &str| pair.parse::<KafkaSetting>().unwrap().to_string();
        assert_eq!(shown("sasl.password=hunter2"), "sasl.password=(redacted)");
        assert_eq!(shown("ssl.key.pem=-----BEGIN"), "ssl.key.pem=(redacted)");
        assert_eq!(
            shown("sasl.oauthbearer.client.secret=s"),
            "sasl.oauthbearer.client.secret=(redacted)"
        );
        assert_eq!(shown("linger.ms=5"), "linger.ms=5");
    }

    #[test]
    fn every_setting_has_one_variable_and_one_file_key() {
        let cmd = command();
        let mut n = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            n += 1;
            let var = arg.get_env().map(|v| v.to_string_lossy().into_owned());
            assert_eq!(var, Some(env_var(long)), "{long}");
            if long != "config" {
                assert!(
                    check_file_value(long, &toml::Value::String(String::new())).is_some(),
                    "{long} is not a file key"
                );
            }
        }
        assert!(n > 40, "{n} settings");
        assert_eq!(env_var("log-level"), "SMTPGW_LOG");
        // The tools' own flags are not settings.
        let spool = cmd.find_subcommand("spool").unwrap();
        let replay = spool.find_subcommand("replay").unwrap();
        for arg in replay.get_arguments() {
            let long = arg.get_long().unwrap_or_default();
            let has_env = arg.get_env().is_some();
            let setting = matches!(long, "config" | "spool-dir")
                || long.contains("kafka") && long != "to-kafka"
                || long.contains("inflight")
                || long == "publish-timeout";
            assert_eq!(has_env, setting, "{long}");
        }
    }

    #[test]
    fn edge_settings() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.edge.max_connections_per_ip, 50);
        assert_eq!(c.edge.max_connections_per_prefix, 200);
        assert_eq!(c.edge.max_connection_rate_per_ip, 600);
        assert_eq!(c.edge.max_message_rate_per_ip, 0);
        assert_eq!(c.edge.error_budget, 20);
        assert_eq!(c.edge.greeting_delay, Dur(Duration::ZERO));
        assert_eq!(c.edge.tls_handshake_timeout, Dur(Duration::from_secs(10)));
        assert_eq!(c.edge.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(c.edge.trusted_cidr.len(), 2);
        assert!(c.edge.tls().is_none());

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
        assert_eq!(c.edge.max_connections_per_ip, 0);
        assert_eq!(c.edge.trusted_cidr.len(), 2);
        assert_eq!(c.edge.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(
            c.edge.proxy_trusted_cidr,
            vec![Cidr::parse("10.1.0.0/16").unwrap()]
        );
        assert_eq!(c.edge.greeting_delay, Dur(Duration::from_secs(2)));
        assert_eq!(c.edge.max_message_rate_per_ip, 30);
        assert_eq!(c.edge.listen_tls, Some("127.0.0.1:465".parse().unwrap()));
        assert!(c.edge.tls().is_some());
        assert_eq!(c.edge.proxy_listen, None);
        let c = run(
            &["--proxy-listen", "127.0.0.1:2526"],
            "proxy-protocol = \"v1\"\nproxy-trusted-cidr = \"10.0.0.0/8\"\n",
        )
        .unwrap();
        assert_eq!(c.edge.proxy_listen, Some("127.0.0.1:2526".parse().unwrap()));

        for (args, flag) in [
            (&["--proxy-protocol", "v1"][..], "--proxy-trusted-cidr:"),
            (&["--listen-tls", "127.0.0.1:465"][..], "--listen-tls:"),
            (&["--require-tls"][..], "--require-tls:"),
            (&["--tls-cert", "c.pem"][..], "--tls-key:"),
            (&["--tls-key", "k.pem"][..], "--tls-cert:"),
            (&["--greeting-delay", "2m"][..], "--greeting-delay:"),
            (
                &["--tls-handshake-timeout", "0"][..],
                "--tls-handshake-timeout:",
            ),
            (
                &["--proxy-listen", "127.0.0.1:2526"][..],
                "--proxy-listen: needs",
            ),
            (
                &[
                    "--proxy-protocol",
                    "v2",
                    "--proxy-trusted-cidr",
                    "10.0.0.0/8",
                    "--proxy-listen",
                    "127.0.0.1:2525",
                ][..],
                "--proxy-listen: must differ",
            ),
        ] {
            let e = err(args, "");
            assert!(e.starts_with(flag), "{args:?}: {e}");
        }
        // Values that do not parse are clap's to report, whole, naming the flag.
        for (args, flag) in [
            (
                &["--proxy-trusted-cidr", "10.0.0.0/33"][..],
                "--proxy-trusted-cidr",
            ),
            (&["--trusted-cidr", "nope"][..], "--trusted-cidr"),
            (&["--listen-tls", "x"][..], "--listen-tls"),
        ] {
            let e = clap_err(args, &[]);
            let first = e.lines().next().unwrap();
            assert!(first.starts_with("error:") && first.contains(flag), "{e}");
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.hostname, "mx.test");
        assert_eq!(c.accept_domains, ["localhost", "mx.test"]);
        assert!(c.accept_domains_defaulted);
        assert_eq!(c.spool.sink, SinkKind::Spool);
        assert_eq!(c.store.spool_dir, PathBuf::from("./spool"));
        assert!(c.reactors >= 1);
        assert_eq!(c.max_message_size(), 10 * 1024 * 1024);
        assert_eq!(c.max_recipients(), 100);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(300));
        assert_eq!(c.limits.max_session_time.0, Duration::from_secs(3600));
        assert_eq!(c.limits.drain_timeout.0, Duration::from_secs(30));
        assert_eq!(
            c.limits.min_data_rate,
            DataRate(Some((1024, Duration::from_secs(30))))
        );
        assert_eq!(c.session.bare_lf, BareLfPolicy::Reject);
        assert_eq!(c.log.log_format, LogFormat::Text);
        assert_eq!(c.spool.spool_max_bytes, ByteSize(0));
        // The help shows each default once, from the field that declares it.
        let help = command().render_long_help().to_string();
        assert!(help.contains("[default: 10M]"), "{help}");
        assert!(help.contains("[env: SMTPGW_MAX_MESSAGE_SIZE=]"), "{help}");
    }

    #[test]
    fn hostname_falls_back_to_localhost() {
        let c = resolve(cli(&[]), None, || None).unwrap();
        assert_eq!(c.hostname, "localhost");
        assert_eq!(c.accept_domains, ["localhost"]);
    }

    #[test]
    fn cli_beats_file_beats_default() {
        let text = r#"
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
        let c = run(&["--reactors", "2", "--accept-domain", "c.EXAMPLE"], text).unwrap();
        assert_eq!(c.server.listen, "[::1]:0".parse().unwrap());
        assert_eq!(c.hostname, "file.example");
        assert_eq!(c.accept_domains, ["c.example"]);
        assert!(!c.accept_domains_defaulted);
        assert_eq!(c.reactors, 2);
        assert_eq!(c.max_message_size(), 2 << 20);
        assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(300));
        assert_eq!(c.limits.drain_timeout.0, Duration::ZERO);
        assert_eq!(c.spool.sink, SinkKind::Null);
        assert_eq!(c.session.bare_lf, BareLfPolicy::Normalize);
        // A flag given with the default's value still beats the file.
        let c = run(&["--sink", "spool", "--drain-timeout", "30s"], text).unwrap();
        assert_eq!(c.spool.sink, SinkKind::Spool);
        assert_eq!(c.limits.drain_timeout.0, Duration::from_secs(30));

        let c = run(&[], text).unwrap();
        assert_eq!(c.reactors, 3);
        assert_eq!(c.accept_domains, ["a.example", "b.example"]);
    }

    #[test]
    fn flag_beats_environment_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "max-recipients = 7\nidle-timeout = \"7s\"\n").unwrap();
        let p = path.to_str().unwrap();
        let resolved = |args: &[&str], env: &[(&str, &str)]| {
            let mut all = vec!["--config", p];
            all.extend_from_slice(args);
            parse_with_env(&all, env).server.resolve().unwrap()
        };
        let c = resolved(&[], &[]);
        assert_eq!(
            (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
            (7, 7)
        );
        assert_eq!(c.limits.max_connections, 10_000, "default");
        let env = [
            ("SMTPGW_MAX_RECIPIENTS", "8"),
            ("SMTPGW_MAX_CONNECTIONS", "9"),
        ];
        let c = resolved(&[], &env);
        assert_eq!(
            (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
            (8, 7)
        );
        assert_eq!(c.limits.max_connections, 9);
        let c = resolved(&["--max-recipients", "10", "--idle-timeout", "10"], &env);
        assert_eq!(
            (c.max_recipients(), c.limits.idle_timeout.0.as_secs()),
            (10, 10)
        );
        // The file named by the environment counts like --config.
        let c = parse_with_env(&[], &[("SMTPGW_CONFIG", p)])
            .server
            .resolve()
            .unwrap();
        assert_eq!(c.max_recipients(), 7);
    }

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
        assert!(err(&["--accept-domain", "a b"], "").starts_with("--accept-domain:"));
        assert!(err(&["--accept-domain", "a..b"], "").starts_with("--accept-domain:"));
        assert!(err(&["--accept-domain", ""], "").starts_with("--accept-domain: empty"));
        assert_eq!(
            err(&[], "accept-domain = [\"\"]"),
            "--config f.toml: `accept-domain`: empty domain; there is no way to accept every domain"
        );
        assert_eq!(
            err(&[], "accept-domain = []"),
            "--config f.toml: `accept-domain`: empty list; leave it out to accept only localhost and --hostname"
        );
    }

    #[test]
    fn one_line_errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--spool-segment-size", "0"],
                "--spool-segment-size: must be at least 1 (got 0)",
            ),
            (
                &["--spool-segment-age", "0"],
                "--spool-segment-age: must be between 1s and 366d (got 0s)",
            ),
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
                "--max-message-size: must be between 1 and 1G (got 0)",
            ),
            (
                &["--max-message-size", "2G"],
                "--max-message-size: must be between 1 and 1G (got 2147483648)",
            ),
            (
                &["--max-body-memory", "1M"],
                "--max-body-memory: must be at least --max-message-size (10485760) (got 1048576)",
            ),
            (
                &["--idle-timeout", "0"],
                "--idle-timeout: must be between 1s and 366d (got 0s)",
            ),
            (
                &["--max-session-time", "400d"],
                "--max-session-time: must be between 1s and 366d (got 34560000s)",
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
        // What does not parse at all is clap's whole message, naming the flag first.
        for (args, words) in [
            (
                &["--max-message-size", "10X"][..],
                "not a size (got \"10X\")",
            ),
            (
                &["--idle-timeout", "soon"][..],
                "not a duration (got \"soon\")",
            ),
            (
                &["--listen", "localhost"][..],
                "not an IP:PORT address (got \"localhost\")",
            ),
            (
                &["--metrics-listen", "localhost:9025"][..],
                "not an IP:PORT address",
            ),
        ] {
            let e = clap_err(args, &[]);
            let first = e.lines().next().unwrap();
            assert!(
                first.starts_with("error:") && first.contains(args[0]),
                "{e}"
            );
            assert!(first.contains(words), "{e}");
            assert!(e.contains("--help"), "{e}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        let s = |x: &str| x.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(s("10485760"), Ok(10485760));
        // A single letter is a power of 1024, as the gateway always read it.
        assert_eq!(s("512K"), Ok(512 * 1024));
        assert_eq!(s("10m"), Ok(10 << 20));
        assert_eq!(s("10M"), Ok(10 << 20));
        assert_eq!(s("1G"), Ok(1 << 30));
        // IEC units are powers of 1024, SI units powers of 1000: never the same.
        assert_eq!(s("10MiB"), Ok(10 << 20));
        assert_eq!(s("10 MiB"), Ok(10 << 20));
        assert_eq!(s("10MB"), Ok(10_000_000));
        assert_eq!(s("10mb"), Ok(10_000_000));
        assert_eq!(s("1GiB"), Ok(1 << 30));
        assert_eq!(s("1GB"), Ok(1_000_000_000));
        assert_eq!(s("64kB"), Ok(64_000));
        assert_eq!(s("64KiB"), Ok(65_536));
        assert_eq!(s("1.5K"), Ok(1536));
        assert_eq!(s("7b"), Ok(7));
        for bad in [
            "",
            "-1",
            "10X",
            "M",
            "10 MiBs",
            "1.5",
            "99999999999999999999G",
        ] {
            assert!(s(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            s("10X"),
            Err(
                "not a size (got \"10X\"); e.g. 10485760, 512K, 10M (= 10MiB), 10MB (= 10000000)"
                    .into()
            )
        );
        let d = |x: &str| x.parse::<Dur>().map(|d| d.0);
        assert_eq!(d("300"), Ok(Duration::from_secs(300)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert!(d("-1").is_err() && d("soon").is_err() && d("").is_err());
        let r = |x: &str| x.parse::<DataRate>().map(|r| r.0);
        assert_eq!(r("0"), Ok(None));
        assert_eq!(r("1K"), Ok(Some((1024, Duration::from_secs(30)))));
        assert_eq!(r("512/10s"), Ok(Some((512, Duration::from_secs(10)))));
        assert!(r("1K/0").is_err() && r("x/1s").is_err());
    }

    #[test]
    fn sizes_mean_the_same_from_every_source() {
        // 10MB and 10MiB differ, from a flag and from the file alike; the file also
        // takes plain integers (bytes) and, for durations, seconds.
        assert_eq!(
            run(&["--max-message-size", "10MB"], "")
                .unwrap()
                .max_message_size(),
            10_000_000
        );
        assert_eq!(
            run(&["--max-message-size", "10MiB"], "")
                .unwrap()
                .max_message_size(),
            10 << 20
        );
        assert_eq!(
            run(&[], "max-message-size = \"10MB\"")
                .unwrap()
                .max_message_size(),
            10_000_000
        );
        assert_eq!(
            run(&[], "max-message-size = \"10MiB\"")
                .unwrap()
                .max_message_size(),
            10 << 20
        );
        assert_eq!(
            run(&[], "max-message-size = 1234")
                .unwrap()
                .max_message_size(),
            1234
        );
        for (args, file) in [
            (&["--max-message-size", "auto"][..], ""),
            (&[][..], "max-message-size = \"Auto\""),
        ] {
            let c = run(args, file).unwrap();
            assert!(c.max_message_size_auto());
            assert_eq!(c.max_message_size(), AUTO_MAX_MESSAGE_SIZE as usize);
            assert_eq!(c.session.max_message_size.to_string(), "auto");
        }
        assert!(!run(&[], "").unwrap().max_message_size_auto());
        let c = run(&[], "idle-timeout = 7\nmax-session-time = \"2h\"").unwrap();
        assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(7));
        assert_eq!(c.limits.max_session_time.0, Duration::from_secs(7200));
        assert_eq!(
            err(&[], "idle-timeout = -1"),
            "--config f.toml: `idle-timeout`: not a duration (got \"-1\"); e.g. 300, 30s, 5m, 1h"
        );
    }

    #[test]
    fn file_errors_are_one_line_and_name_the_file_and_key() {
        let e = err(&[], "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert_eq!(
            e,
            "--config f.toml: unknown key `lisen` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
        );
        // Not even a flag that overrides it makes a bad file value acceptable.
        let e = err(
            &["--reactors", "2"],
            "sink = \"null\"\nreactors = \"many\"\n",
        );
        assert!(
            e.starts_with("--config f.toml: `reactors`: invalid type"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = err(&[], "reactors = \n");
        assert!(e.starts_with("--config f.toml: line 1"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(&[], "sink = \"s3\"\n");
        assert!(
            e.starts_with("--config f.toml: `sink`: unknown variant `s3`"),
            "{e}"
        );
        let e = err(&[], "accept-domain = 1\n");
        assert!(e.contains("expected a string or a list of strings"), "{e}");
        let e = err(&[], "accept-domain = [1]\n");
        assert!(e.starts_with("--config f.toml: `accept-domain`:"), "{e}");
        let e = err(&[], "[server]\nlisten = \"x\"\n");
        assert!(e.contains("unknown key `server`"), "{e}");
        let e = err(&[], "config = \"other.toml\"\n");
        assert!(e.contains("unknown key `config`"), "{e}");
        // Values from the file are validated like flags, and named after the file.
        assert_eq!(
            err(&[], "max-recipients = 0"),
            "--config f.toml: `max-recipients`: must be at least 1 (got 0)"
        );
        assert_eq!(
            err(&[], "max-message-size = 0"),
            "--config f.toml: `max-message-size`: must be between 1 and 1G (got 0)"
        );
        let missing = ServerArgs {
            file: ConfigFileArg {
                config: Some(PathBuf::from("/nonexistent/smtpgw.toml")),
            },
            ..Default::default()
        };
        let e = missing.resolve().unwrap_err().to_string();
        assert!(e.starts_with("--config /nonexistent/smtpgw.toml: cannot read:"));
    }

    #[test]
    fn clap_errors_name_the_flag_on_their_first_line() {
        let e = clap_err(&["--reactors", "abc"], &[]);
        let first = e.lines().next().unwrap();
        assert!(
            first.starts_with("error:") && first.contains("--reactors"),
            "{first}"
        );
        let e = clap_err(&["--sink", "s3"], &[]);
        assert!(e.lines().next().unwrap().contains("--sink"), "{e}");
        assert!(e.contains("possible values: spool, null, kafka"), "{e}");
    }

    #[test]
    fn kafka_settings() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.kafka.kafka_brokers, None);
        assert_eq!(c.kafka.kafka_topic.0, "smtp.inbound");
        assert_eq!(c.kafka.publish_timeout.0, Duration::from_secs(30));
        assert_eq!(c.kafka.max_inflight_messages, 10_000);
        assert_eq!(c.kafka.max_inflight_bytes, ByteSize(256 << 20));

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
        assert_eq!(c.spool.sink, SinkKind::Kafka);
        assert_eq!(c.kafka.brokers(), "127.0.0.1:9092,127.0.0.1:9093");
        assert_eq!(c.kafka.kafka_topic.0, "mail.in");
        // Flags replace the file's list rather than adding to it, like --accept-domain.
        let pairs = pairs(&c.kafka);
        assert_eq!(
            pairs,
            [
                ("security.protocol", "SSL"),
                ("ssl.ca.location", "/etc/ca.pem")
            ]
        );
        assert_eq!(c.kafka.publish_timeout.0, Duration::from_secs(5));
        assert_eq!(c.kafka.max_inflight_messages, 7);
        assert_eq!(c.kafka.max_inflight_bytes, ByteSize(64 << 20));
        // The sink's options are this group, not a copy of its fields.
        let o = crate::sink::kafka::KafkaOptions::new(c.kafka.clone(), c.max_recipients());
        assert_eq!(o.settings, c.kafka);
        assert_eq!(o.max_recipients, 100);
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
        let bad_value = |extra: &[&str], words: &str| {
            let e = clap_err(extra, &[]);
            let first = e.lines().next().unwrap();
            assert!(first.contains(extra[0]) && first.contains(words), "{e}");
        };
        bad_value(&["--kafka-config", "linger.ms"], "expected KEY=VALUE");
        bad_value(&["--kafka-config", "=1"], "empty key");
        bad_value(
            &["--kafka-config", "acks=1"],
            "acks: not allowed, the gateway always uses acks=all",
        );
        bad_value(
            &["--kafka-config", "enable.idempotence=false"],
            "not allowed",
        );
        bad_value(
            &["--kafka-config", "message.timeout.ms=1"],
            "--publish-timeout",
        );
        bad_value(&["--kafka-topic", "a b"], "not a Kafka topic name");
        bad_value(&["--max-inflight-bytes", "lots"], "not a size");
        assert!(k(&["--publish-timeout", "0"]).starts_with("--publish-timeout: must be between"));
        assert!(k(&["--publish-timeout", "30d"]).starts_with("--publish-timeout: must be between"));
        assert!(k(&["--max-inflight-messages", "0"]).starts_with("--max-inflight-messages:"));
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
                let (spool, file) = dir.resolve().unwrap();
                assert_eq!(spool, PathBuf::from("/s"));
                let k = dir.kafka(kafka, file.as_ref()).unwrap();
                assert_eq!(k.brokers(), "h:1");
                assert_eq!(k.kafka_topic.0, "t");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["spool", "replay", "--kafka-brokers", "h:1"]).is_err());
    }

    #[test]
    fn spool_subcommands() {
        let c = parse(&["spool", "cat", "--body", "--spool-dir", "/s", "ID"]).unwrap();
        match c.command {
            Some(Command::Spool(SpoolCommand::Cat { dir, body, id, .. })) => {
                assert_eq!(dir.store.spool_dir, PathBuf::from("/s"));
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

    #[test]
    fn errors_name_the_source_of_the_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "reactors = 0\nmax-recipients = 5\n").unwrap();
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
        assert!(resolve_err(&[], &[("SMTPGW_LOG", "smtpgw=loud")])
            .starts_with("SMTPGW_LOG: invalid log filter"));

        // A value of the wrong type, from each source: the file's is refused on
        // loading, the variable's and the flag's by clap, named after their source.
        std::fs::write(&path, "kafka-topic = \"a b\"\n").unwrap();
        assert_eq!(
            resolve_err(&["--config", p], &[]),
            format!("--config {p}: `kafka-topic`: not a Kafka topic name (got \"a b\"); use letters, digits, '.', '_' and '-'")
        );
        let e = clap_err(&[], &[("SMTPGW_MAX_MESSAGE_SIZE", "10X")]);
        assert_eq!(
            e,
            "error: SMTPGW_MAX_MESSAGE_SIZE: not a size (got \"10X\"); auto, or e.g. 10485760, 512K, 10M (= 10MiB), 10MB (= 10000000)\n"
        );
        let e = clap_err(&[], &[("SMTPGW_SINK", "tape")]);
        assert_eq!(
            e,
            "error: SMTPGW_SINK: invalid value \"tape\"; possible values: spool, null, kafka\n"
        );
        let e = clap_err(
            &["--max-message-size", "10X"],
            &[("SMTPGW_MAX_MESSAGE_SIZE", "1M")],
        );
        assert!(
            e.starts_with("error: invalid value '10X' for '--max-message-size"),
            "{e}"
        );
        let e = clap_err(&[], &[("SMTPGW_KAFKA_CONFIG", "linger.ms=5;acks=0")]);
        assert!(
            e.starts_with("error: SMTPGW_KAFKA_CONFIG: acks: not allowed"),
            "{e}"
        );
        // A spool tool's variables are named too.
        let e = clap_err(
            &["spool", "replay", "--to-kafka"],
            &[("SMTPGW_PUBLISH_TIMEOUT", "soon")],
        );
        assert!(
            e.starts_with("error: SMTPGW_PUBLISH_TIMEOUT: not a duration"),
            "{e}"
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
        let c = resolve(cli.server, None, host).unwrap();
        let pairs = pairs(&c.kafka);
        assert_eq!(
            pairs,
            [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("ssl.cipher.suites", "A,B"),
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
        // Replay takes the file's Kafka settings under its flags.
        match parse_with_env(&["spool", "replay", "--to-kafka", "--config", p], &[]).command {
            Some(Command::Spool(SpoolCommand::Replay { dir, kafka, .. })) => {
                let (_, file) = dir.resolve().unwrap();
                assert_eq!(
                    dir.kafka(kafka, file.as_ref()).unwrap().kafka_topic.0,
                    "t.file"
                );
            }
            other => panic!("{other:?}"),
        }
        // Each spool subcommand has its own help (its about text, --config), not the
        // server's; tests/e2e/test_cli.py checks the words through the binary.
        let mut cmd = command();
        let spool = cmd.find_subcommand_mut("spool").unwrap();
        let names: Vec<String> = spool
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        assert_eq!(names.len(), 10, "{names:?}");
        for name in names {
            let sub = spool.find_subcommand_mut(&name).unwrap();
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            let help = sub.render_long_help().to_string();
            assert!(!about.is_empty() && help.contains(&about), "{name}: {help}");
            assert!(help.contains("--config"), "{name}: {help}");
            assert!(!help.contains("--max-recipients"), "{name}: {help}");
        }
    }

    #[test]
    fn spool_fallback_needs_the_kafka_sink() {
        let k = ["--sink", "kafka", "--kafka-brokers", "h:1"];
        assert!(!run(&k, "").unwrap().spool.spool_fallback);
        let mut args = k.to_vec();
        args.push("--spool-fallback");
        assert!(run(&args, "").unwrap().spool.spool_fallback);
        assert!(
            run(&k, "spool-fallback = true")
                .unwrap()
                .spool
                .spool_fallback
        );
        assert_eq!(
            err(&["--spool-fallback"], ""),
            "--spool-fallback: only with --sink kafka (the spool is the fallback for Kafka)"
        );
    }

    #[test]
    fn the_partition_key_takes_three_values() {
        assert_eq!(
            run(&[], "").unwrap().kafka.kafka_partition_key,
            PartitionKey::Id
        );
        assert_eq!(
            run(&["--kafka-partition-key", "sender-domain"], "")
                .unwrap()
                .kafka
                .kafka_partition_key,
            PartitionKey::SenderDomain
        );
        assert_eq!(
            run(&[], "kafka-partition-key = \"recipient-domain\"")
                .unwrap()
                .kafka
                .kafka_partition_key,
            PartitionKey::RecipientDomain
        );
        assert!(err(&[], "kafka-partition-key = \"subject\"").contains("kafka-partition-key"));
    }

    #[test]
    fn the_forward_window_is_bounded() {
        assert_eq!(run(&[], "").unwrap().spool.forward_window, 2000);
        assert_eq!(
            run(&["--forward-window", "1"], "")
                .unwrap()
                .spool
                .forward_window,
            1
        );
        assert_eq!(
            run(&[], "forward-window = 7").unwrap().spool.forward_window,
            7
        );
        assert_eq!(
            err(&["--forward-window", "0"], ""),
            "--forward-window: must be between 1 and 2000 (got 0)"
        );
        assert_eq!(
            err(&[], "forward-window = 2001"),
            "--config f.toml: `forward-window`: must be between 1 and 2000 (got 2001)"
        );
    }

    #[test]
    fn topic_prefixed_aliases_of_reserved_settings_are_refused() {
        let k = |pair: &str| clap_err(&["--kafka-config", pair], &[]);
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
        assert_eq!(ok.kafka.kafka_config.len(), 1);
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
        assert!(
            parse(&["spool", "prune"]).is_err(),
            "--before or --before-cursor is required"
        );
        assert!(parse(&["spool", "prune", "--before-cursor", "c"]).is_ok());
        assert!(
            parse(&["spool", "prune", "--before", "x", "--before-cursor", "c"]).is_err(),
            "one cut-off"
        );
    }

    #[test]
    fn spool_limits_parse_and_name_their_source() {
        let c = run(&[], "").unwrap();
        assert_eq!(c.spool.spool_max_bytes, ByteSize(0));
        assert_eq!(c.spool.spool_min_free_bytes, ByteSize(64 << 20));
        let c = run(&["--spool-max-bytes", "2G"], "spool-min-free-bytes = 0").unwrap();
        assert_eq!(c.spool.spool_max_bytes, ByteSize(2 << 30));
        assert_eq!(c.spool.spool_min_free_bytes, ByteSize(0));
        let e = clap_err(&["--spool-max-bytes", "lots"], &[]);
        assert!(
            e.contains("--spool-max-bytes") && e.contains("not a size"),
            "{e}"
        );
        let e = clap_err(&["--spool-min-free-bytes=-1"], &[]);
        assert!(
            e.contains("--spool-min-free-bytes") && e.contains("not a size"),
            "{e}"
        );
        let e = clap_err(&[], &[("SMTPGW_SPOOL_MAX_BYTES", "lots")]);
        assert!(
            e.starts_with("error: SMTPGW_SPOOL_MAX_BYTES: not a size"),
            "{e}"
        );
        let e = err(&[], "spool-min-free-bytes = \"-1\"\n");
        assert!(
            e.starts_with("--config f.toml: `spool-min-free-bytes`: not a size"),
            "{e}"
        );
    }
}
