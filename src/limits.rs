//! The per-address limiter every reactor shares: open connections per IP and per
//! prefix (/24 for IPv4, /64 for IPv6), and connection and message rates per IP, in
//! bounded memory.
//!
//! The driver calls it through [`crate::conn::PeerLimits`] once it knows the client's
//! real address (after a PROXY header), so the backends never do. A table of sharded
//! maps holds one entry per address and per prefix; connections hold their entries, and
//! entries nobody holds are dropped when a shard fills up, those with rate state still
//! pending last (and counted, since that forgets a rate). Rates are GCRA (the "virtual
//! scheduling" form of a token bucket) in one atomic per entry, so the per-message check
//! takes no lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::conn::edge::mask;
use crate::conn::{Cidr, LimitRefusal, PeerLimits, PeerSlot};
use crate::metrics::Metrics;

const SHARDS: usize = 64;

/// So many events per minute, in bursts of up to as many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerMinute(pub u32);

impl PerMinute {
    /// Nanoseconds between two events at the steady rate, and the burst tolerance.
    fn gcra(self) -> Gcra {
        let per = self.0.max(1);
        let interval = 60_000_000_000u64 / u64::from(per);
        Gcra {
            interval,
            tolerance: interval * u64::from(per - 1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    /// Whether an event at `now` conforms to the rate whose theoretical arrival time is
    /// `tat`.
    fn allows(self, tat: u64, now: u64) -> bool {
        tat.saturating_sub(now) <= self.tolerance
    }

    /// Takes one event at `now` if it conforms.
    fn take(self, tat: &AtomicU64, now: u64) -> bool {
        tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            self.allows(t, now).then(|| t.max(now) + self.interval)
        })
        .is_ok()
    }

    /// Counts one event at `now` whatever the rate says.
    fn spend(self, tat: &AtomicU64, now: u64) {
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            Some(t.max(now) + self.interval)
        });
    }
}

/// `n` events per hour, in bursts of up to as many.
fn per_hour(n: u32) -> Gcra {
    let per = n.max(1);
    let interval = 3_600_000_000_000u64 / u64::from(per);
    Gcra {
        interval,
        tolerance: interval * u64::from(per - 1),
    }
}

/// The limiter's settings; `None` turns a limit off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLimitsConfig {
    pub per_ip: Option<u32>,
    pub per_prefix: Option<u32>,
    pub connection_rate: Option<PerMinute>,
    pub message_rate: Option<PerMinute>,
    /// Failed AUTH attempts per address per hour (`--max-auth-failures-per-ip`).
    pub auth_failures: Option<u32>,
    /// Exempt from every limit.
    pub trusted: Vec<Cidr>,
    /// Entries the table keeps at most (beyond those live connections hold).
    pub max_entries: usize,
}

/// Addresses (/32, /128) and prefixes (/24, /64) are keyed apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(IpAddr, u8);

#[derive(Default)]
struct Entry {
    connections: AtomicU32,
    connection_tat: AtomicU64,
    message_tat: AtomicU64,
    auth_failure_tat: AtomicU64,
}

type Shard = Mutex<HashMap<Key, Arc<Entry>>>;

pub struct PeerLimiter {
    config: PeerLimitsConfig,
    connection_rate: Option<Gcra>,
    message_rate: Option<Gcra>,
    auth_failures: Option<Gcra>,
    origin: Instant,
    hasher: RandomState,
    shards: Box<[Shard]>,
    metrics: Arc<Metrics>,
}

impl PeerLimiter {
    pub fn new(
        config: PeerLimitsConfig,
        origin: Instant,
        metrics: Arc<Metrics>,
    ) -> Arc<PeerLimiter> {
        Arc::new(PeerLimiter {
            connection_rate: config.connection_rate.map(PerMinute::gcra),
            message_rate: config.message_rate.map(PerMinute::gcra),
            auth_failures: config.auth_failures.map(per_hour),
            config,
            origin,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
        })
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn entry(&self, key: Key, now: u64) -> Arc<Entry> {
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&key) {
            return e.clone();
        }
        let cap = (self.config.max_entries / SHARDS).max(16);
        if map.len() >= cap {
            self.sweep(&mut map, now, cap);
        }
        let e = Arc::new(Entry::default());
        map.insert(key, e.clone());
        self.metrics.peer_table_entries.inc();
        e
    }

    /// Makes room: first entries that nobody holds and that carry no rate state, then
    /// (counted) ones that do. Entries live connections hold always stay.
    fn sweep(&self, map: &mut HashMap<Key, Arc<Entry>>, now: u64, cap: usize) {
        let before = map.len();
        let idle = |e: &Arc<Entry>| {
            Arc::strong_count(e) == 1
                && e.connection_tat.load(Ordering::Relaxed) <= now
                && e.message_tat.load(Ordering::Relaxed) <= now
                && e.auth_failure_tat.load(Ordering::Relaxed) <= now
        };
        map.retain(|_, e| !idle(e));
        if map.len() >= cap {
            let held = map.len();
            map.retain(|_, e| Arc::strong_count(e) > 1);
            self.metrics
                .peer_table_evictions
                .inc_by((held - map.len()) as u64);
        }
        self.metrics
            .peer_table_entries
            .sub((before - map.len()) as i64);
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.config.trusted.iter().any(|c| c.contains(ip))
    }
}

impl PeerLimits for PeerLimiter {
    fn admit(&self, now: Instant, ip: IpAddr) -> Result<Box<dyn PeerSlot>, LimitRefusal> {
        let ip = ip.to_canonical();
        if self.trusted(ip) {
            return Ok(Box::new(Unlimited));
        }
        let t = self.nanos(now);
        let host_bits = if ip.is_ipv4() { 32 } else { 128 };
        let host = self.entry(Key(ip, host_bits), t);
        let mut slot = Slot {
            host,
            prefix: None,
            message_rate: self.message_rate,
            auth_failures: self.auth_failures,
            origin: self.origin,
        };
        // The slot gives back whatever it took if a later check refuses.
        let n = slot.host.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if self.config.per_ip.is_some_and(|max| n > max) {
            return Err(LimitRefusal::ConnectionsPerIp);
        }
        if let Some(max) = self.config.per_prefix {
            let bits = if ip.is_ipv4() { 24 } else { 64 };
            let prefix = self.entry(Key(mask(ip, bits), bits), t);
            let n = prefix.connections.fetch_add(1, Ordering::AcqRel) + 1;
            slot.prefix = Some(prefix);
            if n > max {
                return Err(LimitRefusal::ConnectionsPerPrefix);
            }
        }
        if let Some(rate) = self.connection_rate {
            if !rate.take(&slot.host.connection_tat, t) {
                return Err(LimitRefusal::ConnectionRate);
            }
        }
        Ok(Box::new(slot))
    }
}

/// A trusted client's slot.
struct Unlimited;

impl PeerSlot for Unlimited {
    fn message_allowed(&self, _now: Instant) -> bool {
        true
    }
    fn message_sent(&self, _now: Instant) {}
}

struct Slot {
    host: Arc<Entry>,
    prefix: Option<Arc<Entry>>,
    message_rate: Option<Gcra>,
    auth_failures: Option<Gcra>,
    origin: Instant,
}

impl Slot {
    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl PeerSlot for Slot {
    fn message_allowed(&self, now: Instant) -> bool {
        match self.message_rate {
            None => true,
            Some(rate) => rate.allows(
                self.host.message_tat.load(Ordering::Acquire),
                self.nanos(now),
            ),
        }
    }

    fn message_sent(&self, now: Instant) {
        if let Some(rate) = self.message_rate {
            rate.spend(&self.host.message_tat, self.nanos(now));
        }
    }

    fn auth_allowed(&self, now: Instant) -> bool {
        self.auth_failures.is_none_or(|rate| {
            rate.allows(
                self.host.auth_failure_tat.load(Ordering::Acquire),
                self.nanos(now),
            )
        })
    }

    fn auth_failed(&self, now: Instant) {
        if let Some(rate) = self.auth_failures {
            rate.spend(&self.host.auth_failure_tat, self.nanos(now));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.host.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(p) = &self.prefix {
            p.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(config: PeerLimitsConfig) -> (Arc<PeerLimiter>, Instant) {
        let t0 = Instant::now();
        let metrics = Arc::new(Metrics::new().unwrap());
        (PeerLimiter::new(config, t0, metrics), t0)
    }

    fn config() -> PeerLimitsConfig {
        PeerLimitsConfig {
            per_ip: Some(2),
            per_prefix: Some(3),
            connection_rate: None,
            message_rate: None,
            auth_failures: None,
            trusted: vec![Cidr::parse("192.0.2.9").unwrap()],
            max_entries: 1024,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_and_per_prefix_caps_release_on_drop() {
        let (l, t0) = limiter(config());
        let a1 = l.admit(t0, ip("198.51.100.1")).unwrap();
        let a2 = l.admit(t0, ip("198.51.100.1")).unwrap();
        assert_eq!(
            l.admit(t0, ip("198.51.100.1")).err(),
            Some(LimitRefusal::ConnectionsPerIp)
        );
        let b1 = l.admit(t0, ip("198.51.100.2")).unwrap();
        // Three in the /24 now: a fourth address of it is refused for the prefix.
        assert_eq!(
            l.admit(t0, ip("198.51.100.3")).err(),
            Some(LimitRefusal::ConnectionsPerPrefix)
        );
        // Another /24 is unaffected.
        let _c = l.admit(t0, ip("198.51.101.1")).unwrap();
        drop(a1);
        let _a3 = l.admit(t0, ip("198.51.100.1")).unwrap();
        drop((a2, b1));
        // Refusals gave back what they took.
        let _d = l.admit(t0, ip("198.51.100.4")).unwrap();
        // Trusted addresses are never counted.
        let t: Vec<_> = (0..10)
            .map(|_| l.admit(t0, ip("192.0.2.9")).unwrap())
            .collect();
        assert_eq!(t.len(), 10);
    }

    #[test]
    fn ipv6_prefix_is_the_64() {
        let (l, t0) = limiter(config());
        let _a = l.admit(t0, ip("2001:db8:1:2::1")).unwrap();
        let _b = l.admit(t0, ip("2001:db8:1:2::2")).unwrap();
        let _c = l.admit(t0, ip("2001:db8:1:2::3")).unwrap();
        assert_eq!(
            l.admit(t0, ip("2001:db8:1:2:ffff::4")).err(),
            Some(LimitRefusal::ConnectionsPerPrefix)
        );
        let _d = l.admit(t0, ip("2001:db8:1:3::1")).unwrap();
        // An IPv4-mapped address is the IPv4 client.
        let _e = l.admit(t0, ip("::ffff:198.51.100.7")).unwrap();
        let _f = l.admit(t0, ip("198.51.100.7")).unwrap();
        assert_eq!(
            l.admit(t0, ip("::ffff:198.51.100.7")).err(),
            Some(LimitRefusal::ConnectionsPerIp)
        );
    }

    #[test]
    fn connection_rate_is_a_bucket_that_refills() {
        let mut c = config();
        c.per_ip = None;
        c.per_prefix = None;
        c.connection_rate = Some(PerMinute(6));
        let (l, t0) = limiter(c);
        for _ in 0..6 {
            drop(l.admit(t0, ip("203.0.113.5")).unwrap());
        }
        assert_eq!(
            l.admit(t0, ip("203.0.113.5")).err(),
            Some(LimitRefusal::ConnectionRate)
        );
        // One more every ten seconds.
        let t1 = t0 + Duration::from_secs(10);
        drop(l.admit(t1, ip("203.0.113.5")).unwrap());
        assert!(l.admit(t1, ip("203.0.113.5")).is_err());
        // Other addresses are not affected.
        drop(l.admit(t1, ip("203.0.113.6")).unwrap());
    }

    #[test]
    fn message_rate_peeks_and_spends() {
        let mut c = config();
        c.message_rate = Some(PerMinute(2));
        let (l, t0) = limiter(c);
        let s = l.admit(t0, ip("203.0.113.7")).unwrap();
        assert!(s.message_allowed(t0));
        s.message_sent(t0);
        assert!(s.message_allowed(t0));
        s.message_sent(t0);
        assert!(!s.message_allowed(t0));
        // Shared by every connection of the address.
        let s2 = l.admit(t0, ip("203.0.113.7")).unwrap();
        assert!(!s2.message_allowed(t0));
        assert!(s2.message_allowed(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn auth_failures_per_address_per_hour() {
        let mut c = config();
        c.auth_failures = Some(3);
        let (l, t0) = limiter(c);
        let s = l.admit(t0, ip("203.0.113.8")).unwrap();
        for _ in 0..3 {
            assert!(s.auth_allowed(t0));
            s.auth_failed(t0);
        }
        assert!(!s.auth_allowed(t0));
        // Another connection of the address is over it too; another address is not.
        assert!(!l.admit(t0, ip("203.0.113.8")).unwrap().auth_allowed(t0));
        assert!(l.admit(t0, ip("203.0.113.9")).unwrap().auth_allowed(t0));
        // One more every twenty minutes.
        assert!(s.auth_allowed(t0 + Duration::from_secs(20 * 60)));
        // Trusted addresses are never limited.
        let t = l.admit(t0, ip("192.0.2.9")).unwrap();
        for _ in 0..10 {
            t.auth_failed(t0);
        }
        assert!(t.auth_allowed(t0));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut c = config();
        c.per_prefix = None;
        c.connection_rate = Some(PerMinute(100));
        c.max_entries = SHARDS * 16;
        let (l, t0) = limiter(c);
        for i in 0..20_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(l.admit(t0, a).unwrap());
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= SHARDS * 16, "{total} entries");
        assert!(l.metrics.peer_table_evictions.get() > 0);
        // Entries held by live connections are never dropped.
        let held: Vec<_> = (0..100u32)
            .map(|i| {
                l.admit(t0, IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)))
                    .unwrap()
            })
            .collect();
        for i in 0..5_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0c00_0000 + i));
            drop(l.admit(t0, a).unwrap());
        }
        drop(held);
    }
}
