//! The producer side of a message: what waits for its delivery report ([`Answer`],
//! [`PendingDelivery`]), the producer's callbacks ([`GatewayContext`]), how a delivery error maps to
//! an answer ([`classify`]) and bears on the producer's liveness ([`liveness`]), and how a
//! record's headers and partition are built.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use crossbeam_channel::Sender;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use super::supervisor::Notice;
use super::{
    KafkaShared, ABORTED, FAILED, PRODUCER_FAILED, QUEUE_FULL, TIMED_OUT, TOPIC_TOO_SMALL,
    UNAVAILABLE, UNKNOWN_TOPIC,
};
use crate::sink::record::SealedMessage;
use crate::sink::{Completion, PublishError, PublishResult, SinkStats};
use crate::smtp::envelope::MessageId;

/// What the delivery callback needs to answer one message.
pub(super) struct PendingDelivery {
    pub(super) answer: Answer,
    pub(super) id: MessageId,
    pub(super) bytes: usize,
    /// Holds a place at the waiting room's gate (a session's record; see `room`).
    pub(super) gated: bool,
}

/// Who waits for a delivery report.
// The session variant holds the sealed message (which grew with the edge's record
// headers); the whole `InFlight` is already boxed once per message as the delivery
// opaque, so boxing the variant too would only add a second allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Answer {
    /// A session: `Ok` is its `250`. With a [`Handback`](super::Handback), the message
    /// is kept until the broker answers so that a temporary failure can go there.
    Session {
        done: Completion,
        keep: Option<SealedMessage>,
    },
    /// The store-and-forward thread, which tags its records with a sequence number;
    /// never handed back (the record is already stored).
    Forward {
        seq: u64,
        tx: Sender<(u64, PublishResult)>,
    },
}

impl Answer {
    /// Answers without the handback: for a failure that storing the message elsewhere
    /// cannot cure (the topic is too small for it), the sender retrying later is.
    pub(super) fn refuse(self, result: PublishResult) {
        match self {
            Answer::Session { done, .. } => done.complete(result),
            Answer::Forward { seq, tx } => {
                let _ = tx.send((seq, result));
            }
        }
    }

    /// `at`: the partition and offset of a delivered record.
    pub(super) fn answer(
        self,
        shared: &KafkaShared,
        result: PublishResult,
        at: Option<(i32, i64)>,
    ) {
        match self {
            Answer::Session { done, keep } => match (result, keep, &shared.handback) {
                (Err(PublishError::Temporary(why)), Some(msg), Some(handback)) => {
                    handback.take(msg, why, done);
                }
                (result, _, handback) => {
                    if let (Ok(_), Some(handback)) = (&result, handback) {
                        handback.delivered();
                    }
                    match at {
                        Some((partition, offset)) => done.at_kafka(partition, offset),
                        None => done,
                    }
                    .complete(result)
                }
            },
            Answer::Forward { seq, tx } => {
                let _ = tx.send((seq, result));
            }
        }
    }
}

/// How a failed delivery bears on whether the producer itself still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Liveness {
    /// The broker answered, but refuses this producer's state (fenced, bad epoch,
    /// unknown producer id, sequence out of order): librdkafka surfaces these only
    /// when it cannot recover by itself, so only a new producer gets out of it.
    Rejected,
    /// Nothing acknowledged the message within the publish timeout. If a broker
    /// answers metadata meanwhile, the producer is stuck; if none does, it is an
    /// outage, and the producer is replaced once a broker answers again.
    NoAck,
}

pub(super) fn liveness(error: &KafkaError) -> Option<Liveness> {
    match error.rdkafka_error_code()? {
        RDKafkaErrorCode::ProducerFenced
        | RDKafkaErrorCode::InvalidProducerEpoch
        | RDKafkaErrorCode::UnknownProducerId
        | RDKafkaErrorCode::OutOfOrderSequenceNumber
        | RDKafkaErrorCode::InvalidProducerIdMapping
        | RDKafkaErrorCode::Fatal => Some(Liveness::Rejected),
        RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut => {
            Some(Liveness::NoAck)
        }
        _ => None,
    }
}

/// The producer's callbacks. One per producer, tagged with its generation.
pub(super) struct GatewayContext {
    pub(super) shared: Arc<KafkaShared>,
    pub(super) generation: u64,
}

impl ClientContext for GatewayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    // rdkafka calls this twice for each error event on a producer (once while polling
    // the queue, once in the producer's poll), so everything here is idempotent. A
    // fatal error arrives with the code of its cause (e.g. OUT_OF_ORDER_SEQUENCE_NUMBER),
    // not as `Fatal`, so the supervisor checks the client itself after any error.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.keep_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.shared
                    .set_healthy(self.generation, false, "all brokers down")
            }
            Some(RDKafkaErrorCode::Authentication) => {
                self.shared
                    .set_healthy(self.generation, false, "authentication failed")
            }
            _ => tracing::debug!(target: "librdkafka", %error, reason, "kafka client error"),
        }
        let _ = self.shared.notices.send(Notice::Check);
    }
}

/// How often librdkafka reports its statistics: cheap, and fresh enough for a scrape.
pub(super) const STATISTICS_INTERVAL_MS: &str = "1000";

impl GatewayContext {
    fn keep_stats(&self, statistics: &rdkafka::Statistics) {
        if self.generation != self.shared.generation.load(Ordering::Acquire) {
            return;
        }
        let mut broker_rtt: Vec<(String, f64)> = statistics
            .brokers
            .values()
            // Negative ids are bootstrap and coordinator pseudo-brokers.
            .filter(|b| b.nodeid >= 0)
            .filter_map(|b| Some((b.name.clone(), b.rtt.as_ref()?.avg as f64 / 1e6)))
            .collect();
        broker_rtt.sort_by(|a, b| a.0.cmp(&b.0));
        let stats = SinkStats {
            queue_messages: statistics.msg_cnt,
            queue_bytes: statistics.msg_size,
            broker_rtt,
            ..SinkStats::default()
        };
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stats);
    }
}

impl ProducerContext for GatewayContext {
    type DeliveryOpaque = Box<PendingDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, inflight: Box<PendingDelivery>) {
        self.shared.sub_inflight(inflight.bytes);
        if inflight.gated {
            self.shared.room.release(inflight.bytes);
        }
        let PendingDelivery {
            answer, id, bytes, ..
        } = *inflight;
        match result {
            Ok(record) => {
                self.shared.delivered(self.generation);
                let at = (
                    rdkafka::Message::partition(record),
                    rdkafka::Message::offset(record),
                );
                answer.answer(&self.shared, Ok(id), Some(at));
            }
            Err((error, _)) => {
                tracing::debug!(%id, %error, "kafka delivery failed");
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
                    && matches!(answer, Answer::Session { .. })
                    && bytes <= self.shared.max_record_value.load(Ordering::Relaxed)
                {
                    // The session took it within the SIZE we advertised, so the topic's
                    // limit dropped since it was read: the operator's to fix, not the
                    // sender's. 451 (not handed back: it would not fit later either),
                    // and read the limit again (SIZE follows it with `auto`).
                    let _ = self.shared.reread.try_send(());
                    answer.refuse(Err(PublishError::Temporary(Cow::Borrowed(TOPIC_TOO_SMALL))));
                    return;
                }
                if let Some(kind) = liveness(error) {
                    self.shared.liveness_failure(self.generation, kind, error);
                }
                answer.answer(&self.shared, Err(classify(error)), None);
            }
        }
    }
}

/// The answer for a message librdkafka refused or could not deliver. Only a size
/// refusal is permanent; everything else is the gateway's trouble, so `451`.
pub(super) fn classify(error: &KafkaError) -> PublishError {
    let reason = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => return PublishError::TooLarge,
        Some(RDKafkaErrorCode::QueueFull) => QUEUE_FULL,
        Some(RDKafkaErrorCode::MessageTimedOut) | Some(RDKafkaErrorCode::RequestTimedOut) => {
            TIMED_OUT
        }
        Some(RDKafkaErrorCode::Fatal)
        | Some(RDKafkaErrorCode::ProducerFenced)
        | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        | Some(RDKafkaErrorCode::OutOfOrderSequenceNumber) => PRODUCER_FAILED,
        Some(RDKafkaErrorCode::PurgeQueue) | Some(RDKafkaErrorCode::PurgeInflight) => ABORTED,
        Some(RDKafkaErrorCode::UnknownTopic) | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            UNKNOWN_TOPIC
        }
        Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::Authentication) => UNAVAILABLE,
        _ => FAILED,
    };
    PublishError::Temporary(Cow::Borrowed(reason))
}

/// Builds librdkafka headers from name/value pairs, in order.
pub(super) fn owned_headers(
    capacity: usize,
    pairs: impl FnOnce(&mut dyn FnMut(&str, &[u8])),
) -> Option<OwnedHeaders> {
    // `insert` consumes and returns the list, hence the Option dance.
    let mut headers = Some(OwnedHeaders::new_with_capacity(capacity));
    pairs(&mut |key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    headers
}

/// CRC-32C of the address's domain (after its last `@`; the whole address without
/// one, empty for the null sender), lower-cased, modulo `partitions`. docs/record.md
/// states it so that consumers can compute it too.
pub fn domain_partition(address: &[u8], partitions: usize) -> Option<i32> {
    if partitions == 0 {
        return None;
    }
    let domain = address
        .iter()
        .rposition(|&b| b == b'@')
        .map_or(address, |at| &address[at + 1..]);
    let crc = domain.iter().fold(0u32, |crc, b| {
        crc32c::crc32c_append(crc, &[b.to_ascii_lowercase()])
    });
    i32::try_from(crc as usize % partitions).ok()
}
