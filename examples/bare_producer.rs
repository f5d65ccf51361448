//! The anchor of `loadtest/run.sh --producer-anchor`: publishes the same 1 KiB value
//! as fast as librdkafka takes it, with the gateway's producer settings (idempotent,
//! `acks=all`, lz4, `linger.ms`) and no SMTP, for `--duration` seconds, and prints one
//! JSON line: acknowledged messages per second and this process's CPU per message.
//! What the gateway adds on top of this is the SMTP side and its own Kafka path.
//!
//! ```text
//! cargo run --release --example bare_producer -- --brokers 127.0.0.1:9092 --topic smtp.inbound \
//!     [--duration 5] [--size 1024] [--inflight 10000] [--config k=v]...
//! ```
//!
//! `--inflight` bounds the unacknowledged messages as the gateway's
//! `--max-inflight-messages` does (its default, 10,000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

struct Counter {
    acked: AtomicU64,
    failed: AtomicU64,
}

struct Context_(Arc<Counter>);

impl ClientContext for Context_ {}

impl ProducerContext for Context_ {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let which = if result.is_ok() {
            &self.0.acked
        } else {
            &self.0.failed
        };
        which.fetch_add(1, Ordering::Relaxed);
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> Result<()> {
    let mut brokers = None;
    let mut topic = "smtp.inbound".to_owned();
    let mut duration = 5.0f64;
    let mut size = 1024usize;
    let mut inflight = 10_000u64;
    let mut extra = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => brokers = Some(value()?),
            "--topic" => topic = value()?,
            "--duration" => duration = value()?.parse().context("--duration")?,
            "--size" => size = value()?.parse().context("--size")?,
            "--inflight" => inflight = value()?.parse().context("--inflight")?,
            "--config" => {
                let kv = value()?;
                let (k, v) = kv.split_once('=').context("--config takes key=value")?;
                extra.push((k.to_owned(), v.to_owned()));
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let brokers = brokers.context("--brokers is required")?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "1");
    for (k, v) in &extra {
        config.set(k, v);
    }
    let counter = Arc::new(Counter {
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let producer: BaseProducer<Context_> = config
        .create_with_context(Context_(counter.clone()))
        .context("producer")?;
    // The same value every time, as the load client sends the same body.
    let value = vec![b'x'; size];
    let key = "01JZZZZZZZZZZZZZZZZZZZZZZZ";

    // Warm-up: metadata and the producer id, not measured.
    producer
        .send(BaseRecord::<str, [u8]>::to(&topic).key(key).payload(&value))
        .map_err(|(e, _)| e)
        .context("first send")?;
    producer.flush(Duration::from_secs(30)).context("warm-up")?;
    let base = counter.acked.load(Ordering::Relaxed);

    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    let mut sent = 0u64;
    while Instant::now() < end {
        let acked =
            counter.acked.load(Ordering::Relaxed) - base + counter.failed.load(Ordering::Relaxed);
        if sent - acked >= inflight {
            producer.poll(Duration::from_millis(1));
            continue;
        }
        match producer.send(BaseRecord::<str, [u8]>::to(&topic).key(key).payload(&value)) {
            Ok(()) => sent += 1,
            Err(_) => {
                producer.poll(Duration::from_millis(1));
                continue;
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).context("flush")?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let acked = counter.acked.load(Ordering::Relaxed) - base;
    let failed = counter.failed.load(Ordering::Relaxed);
    println!(
        "{{\"server\": \"bare-producer\", \"size\": {size}, \"sent\": {sent}, \"acked\": {acked}, \
         \"failed\": {failed}, \"elapsed_s\": {elapsed:.3}, \"msgs_per_s\": {:.1}, \
         \"cpu_s\": {cpu:.3}, \"cpu_us_per_msg\": {:.2}}}",
        acked as f64 / elapsed,
        cpu * 1e6 / acked.max(1) as f64
    );
    if failed > 0 {
        bail!("{failed} deliveries failed");
    }
    Ok(())
}
