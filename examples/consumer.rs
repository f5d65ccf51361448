//! A consumer of smtpgw's Kafka records (docs/record.md, schema 1) that writes each
//! message as received to OUT/<id>.eml and its envelope to OUT/<id>.json, once per id;
//! the Rust twin of examples/consumer.py, with rdkafka's `StreamConsumer`.
//!
//! ```text
//! cargo run --release --example consumer -- --brokers 127.0.0.1:9092 --topic smtp.inbound --out DIR [--idle SECONDS]
//! ```
//!
//! It reads every partition from the beginning with `assign()` (no consumer group
//! needed; tansu gives `subscribe()` its partitions only after ~23 s) and stops after
//! `--idle` seconds without a record (0: runs until interrupted). Deduplication is by
//! key, the message id: a key whose .eml exists is skipped and counted. Files appear
//! atomically, the .eml last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// The trace line ends with its date's zone and CRLF; client text in it is escaped,
/// so this never occurs earlier in the line (docs/record.md, "Value").
const TRACE_END: &[u8] = b" +0000\r\n";

struct Args {
    brokers: String,
    topic: String,
    out: PathBuf,
    idle: Option<Duration>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        brokers: String::new(),
        topic: "smtp.inbound".into(),
        out: PathBuf::new(),
        idle: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => a.brokers = value()?,
            "--topic" => a.topic = value()?,
            "--out" => a.out = value()?.into(),
            "--idle" => {
                let secs: f64 = value()?.parse().context("--idle: seconds")?;
                a.idle = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            }
            _ => bail!("unknown argument {flag}; see the example's documentation"),
        }
    }
    if a.brokers.is_empty() || a.out.as_os_str().is_empty() {
        bail!("--brokers and --out are required");
    }
    Ok(a)
}

/// (trace line, message as received).
fn split(value: &[u8]) -> Result<(&[u8], &[u8])> {
    let at = memchr::memmem::find(value, TRACE_END);
    match at {
        Some(at) if value.starts_with(b"Received: ") => Ok(value.split_at(at + TRACE_END.len())),
        _ => bail!("value does not start with smtpgw's Received: line"),
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// The record's headers as JSON: each once, `rcpt_to` a list. Values are UTF-8 by the
/// contract; one that is not is an error, not a guess.
fn envelope(m: &impl Message, trace: &[u8]) -> Result<serde_json::Value> {
    let mut env = serde_json::Map::new();
    let mut rcpts = Vec::new();
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            let text = std::str::from_utf8(h.value.unwrap_or_default())
                .with_context(|| format!("header {} is not UTF-8", h.key))?;
            let field = h.key.strip_prefix("smtp.").unwrap_or(h.key);
            if field == "rcpt_to" {
                rcpts.push(serde_json::Value::from(text));
            } else {
                env.insert(field.to_owned(), text.into());
            }
        }
    }
    env.insert("rcpt_to".into(), rcpts.into());
    env.insert("partition".into(), m.partition().into());
    env.insert("offset".into(), m.offset().into());
    env.insert(
        "trace".into(),
        std::str::from_utf8(trace).context("trace line")?.into(),
    );
    Ok(env.into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = args()?;
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "smtpgw-example")
        .set("enable.auto.commit", "false")
        .create()
        .context("consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
        .context("topic metadata")?;
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == args.topic) else {
        bail!("topic {} not found", args.topic);
    };
    let mut tpl = TopicPartitionList::new();
    for p in topic.partitions() {
        tpl.add_partition_offset(&args.topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;

    let (mut written, mut duplicates) = (0u64, 0u64);
    loop {
        let m = match args.idle {
            Some(idle) => match tokio::time::timeout(idle, consumer.recv()).await {
                Ok(m) => m?,
                Err(_) => break,
            },
            None => consumer.recv().await?,
        };
        let key = m.key().unwrap_or_default();
        if key.len() != 26 || !key.iter().all(u8::is_ascii_alphanumeric) {
            eprintln!("consumer: skipping a record whose key is not a message id");
            continue;
        }
        let id = std::str::from_utf8(key)?;
        let eml = args.out.join(format!("{id}.eml"));
        if eml.exists() {
            duplicates += 1;
            continue;
        }
        let (trace, message) =
            split(m.payload().unwrap_or_default()).with_context(|| format!("record {id}"))?;
        let env = envelope(&m, trace)?;
        write_atomic(
            &args.out.join(format!("{id}.json")),
            &serde_json::to_vec_pretty(&env)?,
        )?;
        write_atomic(&eml, message)?;
        written += 1;
    }
    eprintln!("consumer: {written} messages written, {duplicates} duplicates skipped");
    Ok(())
}
