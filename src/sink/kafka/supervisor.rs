//! The sink's background threads that keep a producer working: the supervisor (probes
//! while not ready, replaces a fatal or stuck producer with backoff, see "Fatal errors and
//! stuck producers" in the module above), the low-load flusher ("Latency at low load"),
//! and the draining of a retired producer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{Producer, PurgeConfig};

use super::delivery::Liveness;
use super::{new_producer, GatewayProducer, Inner, KafkaShared};

/// The longest one low-load flush waits for the messages in flight (see "Latency at low
/// load"); at low load it ends sooner, when they are acknowledged.
const FLUSH_WAIT: Duration = Duration::from_millis(2);
/// After a flush during which more than [`FLUSH_LOAD`] messages were in flight at once
/// (so the load is not low after all), no flush for this long: batching under load stays undisturbed but for one
/// short window per holdoff. (100 ms still cost about a quarter of the pipelined
/// throughput and quadrupled its p99: the windows come right after each holdoff.)
const FLUSH_HOLDOFF: Duration = Duration::from_millis(1000);
/// Messages in flight at once during one flush above which the load is not low: a
/// lock-step client has one at most per connection. (Counting arrivals instead was
/// wrong on a busy machine: the flusher, woken late, saw a new lock-step message in
/// flight each time it looked and flushed on to its timeout.)
const FLUSH_LOAD: usize = 4;

/// How often the supervisor asks the cluster for metadata while no broker is known up.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Short, because a metadata request makes librdkafka retry a dead broker every 50 ms
/// for as long as it waits. A slow handshake still completes in the background, and
/// the next probe finds the connection up.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// After a purge, delivery reports come back at once; this only bounds a bug.
const AFTER_PURGE_FLUSH: Duration = Duration::from_secs(5);

pub(super) enum Notice {
    /// A producer reported an error: is the current one failed for good?
    Check,
    /// The current producer's requests keep failing (see [`Liveness`]).
    Stuck,
    Stop,
}

/// A run of liveness failures of the current producer with no delivery in between.
#[derive(Debug, Default)]
pub(super) struct Streak {
    pub(super) started: Option<Instant>,
    pub(super) failures: u64,
    pub(super) last_warning: Option<Instant>,
    /// What the supervisor should act on; cleared when it replaces the producer.
    pub(super) suspect: Option<Liveness>,
    pub(super) replacements: u32,
    /// No replacement before this, so a cluster that rejects every new producer
    /// does not make the gateway build one after another.
    pub(super) next_replacement: Option<Instant>,
}

/// A streak's warning is repeated at most this often, with the count so far.
pub(super) const STREAK_WARNING_INTERVAL: Duration = Duration::from_secs(10);
const FIRST_REPLACEMENT_BACKOFF: Duration = Duration::from_secs(1);
const MAX_REPLACEMENT_BACKOFF: Duration = Duration::from_secs(30);

/// Asks the cluster for the topic's metadata; an answer proves a broker is up. Notes
/// the topic's partition count for `--kafka-partition-key`.
pub(super) fn probe(
    producer: &GatewayProducer,
    topic: &str,
    timeout: Duration,
    shared: &KafkaShared,
) -> bool {
    match producer.client().fetch_metadata(Some(topic), timeout) {
        Ok(metadata) => {
            if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
                if let Some(error) = t.error() {
                    tracing::warn!(topic, error = ?RDKafkaErrorCode::from(error), "kafka topic not usable; messages will get 451");
                } else {
                    shared
                        .partitions
                        .store(t.partitions().len(), Ordering::Relaxed);
                }
            }
            true
        }
        Err(error) => {
            tracing::debug!(%error, "kafka probe failed");
            false
        }
    }
}

/// The supervisor: replaces a producer after a fatal error or when it is stuck (see
/// [`Liveness`]), and probes the cluster while no broker is known to be up. It sleeps
/// on its channel: errors, stuck deliveries and shutdown wake it; the clock only paces
/// the probes and the replacement backoff.
pub(super) fn supervise(inner: &Arc<Inner>, notices: &Receiver<Notice>) {
    // Probes are paced by the clock, not by notices: every failed connection attempt
    // raises an error (and a notice), and probing on each would make librdkafka
    // reconnect to a dead broker many times a second.
    let mut last_probe: Option<Instant> = None;
    loop {
        // Right after a replacement (no probe yet) a not-ready sink probes at once.
        let wait = if last_probe.is_none() && !inner.shared.healthy.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            PROBE_INTERVAL
        };
        match notices.recv_timeout(wait) {
            Ok(Notice::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            // A notice from a retired producer needs no action; checking the current
            // one costs an atomic load.
            Ok(Notice::Check | Notice::Stuck) | Err(RecvTimeoutError::Timeout) => {}
        }
        let shared = &inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(producer) = current_producer(inner) else {
            return;
        };
        let generation = shared.generation.load(Ordering::Acquire);
        let producer = if let Some((code, reason)) = producer.client().fatal_error() {
            drop(producer);
            shared.set_healthy(generation, false, "fatal producer error");
            tracing::error!(%code, reason, "kafka producer hit a fatal error");
            replace_producer(inner, generation, false);
            // Probe the new producer now rather than a second later: until it has
            // seen a broker the sink refuses mail.
            last_probe = None;
            match current_producer(inner) {
                Some(p) => p,
                None => return,
            }
        } else {
            producer
        };
        let suspect = {
            let streak = shared.streak.lock().unwrap_or_else(PoisonError::into_inner);
            match streak.suspect {
                Some(kind) if streak.next_replacement.is_none_or(|t| Instant::now() >= t) => {
                    Some(kind)
                }
                _ => None,
            }
        };
        let due = last_probe.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL);
        match suspect {
            // The broker refused the producer: it answers, so replace at once, and
            // probe with the new producer right away: it takes mail once it has seen
            // a broker.
            Some(Liveness::Rejected) => {
                drop(producer);
                replace_producer(inner, generation, false);
                last_probe = Some(Instant::now());
                if let Some(new) = current_producer(inner) {
                    if probe(&new, inner.options.topic(), PROBE_TIMEOUT, shared) {
                        let generation = shared.generation.load(Ordering::Acquire);
                        shared.set_healthy(generation, true, "broker answered");
                    }
                }
            }
            // Nothing was acknowledged in time. If a broker answers, the producer is
            // stuck: replace it (the broker has just answered, so the new one takes
            // mail at once). If none does, this is an outage like any other: not
            // ready, and the producer is replaced once a broker answers again.
            Some(Liveness::NoAck) if due => {
                last_probe = Some(Instant::now());
                if probe(&producer, inner.options.topic(), PROBE_TIMEOUT, shared) {
                    drop(producer);
                    replace_producer(inner, generation, true);
                } else {
                    shared.set_healthy(
                        generation,
                        false,
                        "nothing acknowledged within the publish timeout and no broker answers",
                    );
                }
            }
            None if due && !shared.healthy.load(Ordering::Acquire) => {
                last_probe = Some(Instant::now());
                // A producer under suspicion stays out of service even though the
                // broker answers; its replacement is only waiting out its backoff.
                let suspected = shared
                    .streak
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .suspect
                    .is_some();
                if probe(&producer, inner.options.topic(), PROBE_TIMEOUT, shared) && !suspected {
                    shared.set_healthy(generation, true, "broker answered");
                }
            }
            _ => {}
        }
    }
}

/// The flusher thread: for each wake (a message that found nothing else in flight),
/// flushes the current producer for at most [`FLUSH_WAIT`], so librdkafka sends at once
/// instead of after `linger.ms`. It holds the sink weakly: it ends when the sink is
/// dropped (the channel closes) or shut down.
pub(super) fn flush_when_idle(inner: &std::sync::Weak<Inner>, kicks: &Receiver<()>) {
    while kicks.recv().is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(producer) = current_producer(&inner) else {
            return;
        };
        let shared = Arc::clone(&inner.shared);
        drop(inner);
        let wait_ms = FLUSH_WAIT.as_millis() as i32;
        shared.peak_inflight.store(
            shared.inflight_messages.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        // Not the safe `Producer::flush`: rdkafka 0.39 implements it as
        // `rd_kafka_flush(rk, 0)` in a loop with `poll(≤100 ms)` in between, and
        // librdkafka sets its "flushing" state (linger.ms counts as 0) only for the
        // duration of an `rd_kafka_flush` call (rdkafka.c, `rk_flushing`), so that loop
        // is flushing for an instant and lingering for the rest: the lone message this
        // thread is woken for would still wait its linger.ms. Its `poll` would also run
        // delivery reports on this thread beside the producer's polling thread. No
        // other safe call sets the flushing state.
        //
        // SAFETY: the pointer is the live producer's (held by `producer` for the whole
        // call); rd_kafka_flush may be called from any thread, and with delivery
        // reports as events (as rust-rdkafka sets them) it only waits for the count of
        // unacknowledged messages to reach zero; the polling thread still serves them.
        unsafe {
            rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), wait_ms);
        }
        drop(producer);
        let peak = shared.peak_inflight.load(Ordering::Relaxed);
        if peak > FLUSH_LOAD {
            tracing::debug!(peak, "kafka flusher: load; holding off");
            // Not low load: let linger.ms batch. A wake that came meanwhile is stale.
            std::thread::sleep(FLUSH_HOLDOFF);
            let _ = kicks.try_recv();
            // The wake just dropped may have been shutdown's: it sets `closed` before
            // it wakes, and joins this thread, which must not wait for another wake.
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

fn current_producer(inner: &Inner) -> Option<Arc<GatewayProducer>> {
    inner
        .producer
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Swaps in a new producer if `generation` is still the current one, and retires the
/// old one on a thread of its own, which answers everything it held. The sink is ready
/// at once if `broker_answered` (a probe just succeeded), else after the next probe.
fn replace_producer(inner: &Arc<Inner>, generation: u64, broker_answered: bool) {
    let shared = &inner.shared;
    let mut slot = inner
        .producer
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    if slot.is_none() {
        return; // shut down
    }
    if shared.generation.load(Ordering::Acquire) != generation {
        return; // already replaced
    }
    let next = generation + 1;
    let new = match new_producer(&inner.config, shared, next) {
        Ok(new) => Arc::new(new),
        Err(error) => {
            // Keep the failed one; the supervisor tries again on its next round.
            tracing::error!(%error, "cannot replace the failed kafka producer");
            return;
        }
    };
    {
        let mut streak = shared.streak.lock().unwrap_or_else(PoisonError::into_inner);
        streak.suspect = None;
        let backoff = FIRST_REPLACEMENT_BACKOFF
            .saturating_mul(1 << streak.replacements.min(5))
            .min(MAX_REPLACEMENT_BACKOFF);
        streak.replacements += 1;
        streak.next_replacement = Some(Instant::now() + backoff);
    }
    if !broker_answered {
        // Not ready until the new producer has seen a broker.
        shared.healthy.store(false, Ordering::Release);
    }
    shared.generation.store(next, Ordering::Release);
    if broker_answered {
        shared.set_healthy(next, true, "broker answered");
    }
    match &shared.handback {
        Some(handback) => tracing::warn!(
            generation = next,
            "new kafka producer in place; the old one's unacknowledged messages go to {}",
            handback.place()
        ),
        None => tracing::warn!(
            generation = next,
            "new kafka producer in place; the old one's unacknowledged messages get 451"
        ),
    }
    let old = slot.replace(new);
    drop(slot);
    // A new producer is a new connection: read the topic's limit again with it.
    let _ = shared.reread.try_send(());
    if let Some(old) = old {
        let timeout = inner.options.publish_timeout();
        let spawned = std::thread::Builder::new()
            .name("smtpgw-kafka-retire".into())
            .spawn(move || drain(old, timeout));
        match spawned {
            Ok(handle) => inner
                .retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(handle),
            Err(error) => {
                tracing::error!(%error, "cannot start a thread to drain the old producer")
            }
        }
    }
}

/// Waits for a producer's outstanding deliveries (bounded by `timeout`), fails what
/// is left, serves those delivery reports and drops the producer. Every message the
/// producer held has been answered when this returns.
pub(super) fn drain(producer: Arc<GatewayProducer>, timeout: Duration) {
    if let Err(error) = producer.flush(timeout) {
        tracing::warn!(%error, pending = producer.in_flight_count(), "kafka flush incomplete; failing the rest with 451");
        producer.purge(PurgeConfig::default().queue().inflight());
        if let Err(error) = producer.flush(AFTER_PURGE_FLUSH) {
            tracing::error!(%error, pending = producer.in_flight_count(), "kafka delivery reports missing after purge");
        }
    }
    // Submitters release their clone right after `send`; wait for them so that the
    // producer (and its polling thread) is torn down here, not on a reactor thread.
    let deadline = Instant::now() + AFTER_PURGE_FLUSH;
    let mut producer = producer;
    loop {
        match Arc::try_unwrap(producer) {
            Ok(p) => {
                drop(p);
                return;
            }
            Err(p) if Instant::now() < deadline => {
                producer = p;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
}
