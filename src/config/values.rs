//! Value types: each parses from a flag's text and from a file value alike, and
//! the small enums the settings choose between.

use super::*;

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
pub(super) fn socket_addr(s: &str) -> Result<SocketAddr, String> {
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
pub(super) fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
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
pub(super) fn domains<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v: Vec<String> = one_or_many(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "empty list; leave it out to accept only localhost and --hostname",
        ));
    }
    Ok(v)
}
