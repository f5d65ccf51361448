//! Store-and-forward for `--sink kafka --spool-fallback`, its first half: the sink that
//! keeps taking mail while Kafka cannot.
//!
//! [`FallbackSink`] wraps a [`KafkaSink`] and the local [`SpoolSink`]; the Kafka sink
//! knows nothing of the spool. While the broker is healthy nothing changes: `250` only
//! after `acks=all`. When the producer is unavailable, refuses a message temporarily or
//! lets the publish time out, the Kafka sink hands the message back (its [`Handback`])
//! and this sink stores it in the spool instead, which answers `250` after `fdatasync`
//! (or `451`/`452` if it cannot store it either). The forwarder
//! ([`crate::sink::forward`]) publishes what the spool holds once Kafka takes mail again.

use std::borrow::Cow;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::sink::forward::{Forwarding, WINDOW_BYTES, WINDOW_RECORDS};
use crate::sink::kafka::{Handback, KafkaOptions, KafkaSink, KafkaSinkError};
use crate::sink::record::SealedMessage;
use crate::sink::spool::{SpoolError, SpoolOptions, SpoolSink};
use crate::sink::{Completion, ForwardStats, Sink, SinkStats, SpoolStats};

#[derive(thiserror::Error, Debug)]
pub enum FallbackError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error("cannot start the forwarder thread: {0}")]
    Thread(#[source] io::Error),
}

/// The sink of `--sink kafka --spool-fallback`. See the module documentation.
pub struct FallbackSink {
    kafka: Arc<KafkaSink>,
    spill: Arc<Spill>,
    forwarding: Forwarding,
}

impl FallbackSink {
    /// Opens the spool in `dir` (recovering it as `--sink spool` would), starts the
    /// Kafka sink with the spool to take what it hands back, and the forwarder, which
    /// begins with whatever earlier runs left unforwarded.
    /// At most `window` records (1..=[`WINDOW_RECORDS`]) are in flight from the spool.
    pub fn open(
        dir: &Path,
        spool_options: SpoolOptions,
        kafka_options: &KafkaOptions,
        window: usize,
    ) -> Result<FallbackSink, FallbackError> {
        let window = window.clamp(1, WINDOW_RECORDS);
        let mut kafka_options = kafka_options.clone();
        kafka_options.forward_reserve = (window, WINDOW_BYTES);
        let (commits_tx, commits) = crossbeam_channel::unbounded();
        let mut spool_options = spool_options;
        spool_options.commits = Some(commits_tx);
        // Kafka alone can take mail: a full file system makes the fallback unavailable,
        // not the gateway (it recovers when room returns).
        spool_options.start_when_full = true;
        let spool = Arc::new(SpoolSink::open_with(dir, spool_options)?);
        if let Err(why) = spool.health() {
            tracing::warn!(
                dir = %dir.display(),
                reason = %why,
                "--spool-fallback unavailable: starting with Kafka only; the fallback \
                 becomes available once the spool can store again"
            );
        }
        let spill = Arc::new(Spill {
            spool,
            active: AtomicBool::new(false),
            stored: AtomicU64::new(0),
        });
        let handback: Arc<dyn Handback> = spill.clone();
        let kafka = Arc::new(KafkaSink::with_handback(&kafka_options, Some(handback))?);
        let forwarding = Forwarding::start(
            dir,
            &kafka,
            &spill.spool,
            commits,
            window,
            kafka_options.settings.publish_timeout.0,
        )?;
        Ok(FallbackSink {
            kafka,
            spill,
            forwarding,
        })
    }

    #[cfg(any(test, feature = "testing"))]
    /// The Kafka sink inside (for its size limit and producer generation).
    pub fn kafka(&self) -> &KafkaSink {
        &self.kafka
    }

    /// What the forwarder reports for the metrics.
    pub fn forward_stats(&self) -> ForwardStats {
        self.forwarding
            .stats(self.spill.active.load(Ordering::Relaxed))
    }
}

impl Sink for FallbackSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        self.kafka.submit(msg, done);
    }

    fn shutdown(&self) {
        // The forwarder stops taking new records; the Kafka sink's drain answers the
        // ones in flight (and hands the sessions' leftovers back to the spool, which is
        // still open); then the spool's writer drains.
        self.forwarding.stop();
        self.kafka.shutdown();
        self.forwarding.join();
        self.spill.spool.shutdown();
    }

    fn name(&self) -> &'static str {
        "kafka+spool"
    }

    /// Mail is taken while either can store it.
    fn is_healthy(&self) -> bool {
        self.kafka.is_healthy() || self.spill.spool.is_healthy()
    }

    fn health(&self) -> Result<(), Cow<'static, str>> {
        if self.kafka.is_healthy() {
            return Ok(());
        }
        self.spill.spool.health().map_err(|why| {
            Cow::Owned(format!(
                "kafka unavailable and the fallback spool cannot store: {why}"
            ))
        })
    }

    fn over_inflight_limit(&self) -> bool {
        self.kafka.over_inflight_limit()
    }

    fn degraded(&self) -> Option<String> {
        let why = self.spill.spool.health().err()?;
        Some(format!("spool fallback unavailable: {why}"))
    }

    fn max_message_value(&self) -> Option<usize> {
        self.kafka.max_message_value()
    }

    fn watch_size(&self, on_change: Box<dyn Fn() + Send + Sync>) {
        self.kafka.watch_size(on_change);
    }

    fn stats(&self) -> Option<SinkStats> {
        let mut stats = self.kafka.stats().unwrap_or_default();
        stats.forward = Some(self.forward_stats());
        Some(stats)
    }

    fn spool_stats(&self) -> Option<SpoolStats> {
        self.spill.spool.spool_stats()
    }
}

impl Drop for FallbackSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the Kafka sink hands back goes to the spool: the fallback itself.
struct Spill {
    spool: Arc<SpoolSink>,
    /// Whether the latest session message went to the spool, and how many went there
    /// since it began (for the lines that say when mail starts and stops going there).
    active: AtomicBool,
    stored: AtomicU64,
}

impl Handback for Spill {
    fn take(&self, msg: SealedMessage, why: Cow<'static, str>, done: Completion) {
        tracing::debug!(id = %msg.id, %why, "kafka failed the message; storing it in the fallback spool");
        self.stored.fetch_add(1, Ordering::Relaxed);
        // The first of a run says so.
        if !self.active.load(Ordering::Relaxed) && !self.active.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                why = &*why,
                "store-and-forward: Kafka could not take a message; mail goes to the fallback spool (250 after fdatasync) until it can"
            );
        }
        self.spool.submit(msg, done.into_fallback());
    }

    /// A run of fallback storage ends here.
    fn delivered(&self) {
        // A plain load keeps the common case free of a read-modify-write.
        if self.active.load(Ordering::Relaxed) && self.active.swap(false, Ordering::AcqRel) {
            let stored = self.stored.swap(0, Ordering::AcqRel);
            tracing::info!(
                stored,
                "store-and-forward: mail goes to Kafka again; the messages stored in the fallback spool meanwhile are being forwarded"
            );
        }
    }

    fn place(&self) -> &'static str {
        "the fallback spool"
    }
}
