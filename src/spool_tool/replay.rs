//! `smtpgw spool replay --to-kafka`: publishes a spool's records through the Kafka
//! sink's own path ([`KafkaSink`]'s `publish_stored`), with their original keys,
//! headers and timestamps, so a replayed record is identical to a direct publish.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use crate::sink::kafka::{KafkaOptions, KafkaSink, KafkaSinkError, FAILED};
use crate::sink::{Completion, PublishError, PublishResult, Sink};
use crate::smtp::envelope::MessageId;

/// Messages `spool replay` keeps in flight at once: enough to batch well, few enough
/// to bound memory by what librdkafka copies.
const REPLAY_WINDOW: usize = 1000;

#[derive(thiserror::Error, Debug)]
pub enum ReplayError {
    #[error(transparent)]
    Spool(#[from] crate::sink::spool::SpoolError),
    #[error(transparent)]
    Sink(#[from] KafkaSinkError),
    #[error("no Kafka broker answered at {brokers} within {waited:?}")]
    Unreachable { brokers: String, waited: Duration },
}

/// What `spool replay` did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub published: u64,
    /// Messages Kafka did not acknowledge, with why. Replaying again is safe.
    pub failed: Vec<(MessageId, PublishError)>,
}

#[cfg(any(test, feature = "testing"))]
/// Publishes every record of the spool in `dir`, oldest first, with the key, value,
/// headers and timestamp the gateway would have given it, so a message replayed twice
/// (or replayed after it reached Kafka live) has the same key and consumers can drop
/// the copy by `smtp.id`. Waits up to the publish timeout for a broker.
pub fn replay_spool(
    dir: &std::path::Path,
    options: &KafkaOptions,
) -> Result<ReplayReport, ReplayError> {
    // Open the spool first: a wrong directory should not wait for a broker.
    let mut records = crate::sink::spool::read_all(dir)?;
    let mut failed = None;
    let report = replay_records(
        std::iter::from_fn(|| match records.next()? {
            Ok(record) => Some(record),
            Err(e) => {
                failed = Some(e);
                None
            }
        }),
        options,
    )?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// [`replay_spool`] for records the caller reads (`spool replay --skip-corrupt` skips
/// damaged ranges on the way).
pub fn replay_records(
    records: impl IntoIterator<Item = crate::sink::spool::SpoolRecord>,
    options: &KafkaOptions,
) -> Result<ReplayReport, ReplayError> {
    use std::collections::VecDeque;

    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    let sink = KafkaSink::new(options)?;
    let deadline = Instant::now() + options.settings.publish_timeout.0;
    while !sink.is_healthy() {
        if Instant::now() >= deadline {
            return Err(ReplayError::Unreachable {
                brokers: options.settings.brokers().to_owned(),
                waited: options.settings.publish_timeout.0,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut report = ReplayReport::default();
    let mut window: VecDeque<(MessageId, UnboundedReceiver<PublishResult>)> =
        VecDeque::with_capacity(REPLAY_WINDOW);
    let settle = |report: &mut ReplayReport,
                  (id, mut rx): (MessageId, UnboundedReceiver<PublishResult>)| {
        match rx.blocking_recv() {
            Some(Ok(_)) => report.published += 1,
            Some(Err(e)) => report.failed.push((id, e)),
            None => report
                .failed
                .push((id, PublishError::Temporary(Cow::Borrowed(FAILED)))),
        }
    };
    for record in records {
        while window.len() >= REPLAY_WINDOW {
            if let Some(pending) = window.pop_front() {
                settle(&mut report, pending);
            }
        }
        let (tx, rx) = unbounded_channel();
        sink.publish_stored(&record, Completion::new(tx));
        window.push_back((record.id, rx));
    }
    while let Some(pending) = window.pop_front() {
        settle(&mut report, pending);
    }
    sink.shutdown();
    Ok(report)
}
