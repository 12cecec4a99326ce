//! Rate limits: a token bucket per key (peer identity, source address, token subject, or
//! one for everyone), and optionally a cap on what one key holds open at once.
//!
//! Each bucket is GCRA (the generic cell rate algorithm): its whole state is the
//! "theoretical arrival time" of the next admission, so a key costs one `u64` and a
//! counter. Keys are stored as 64-bit hashes under a per-process random seed, whatever
//! their length, and each limiter keeps at most `max_keys` of them in sharded LRU maps:
//! a flood from ever-new (spoofed) sources evicts the least recently seen keys instead
//! of growing, and every admission is a hash, a lock of one shard for a few nanoseconds
//! and an O(1) map operation. A key that was evicted starts again with a full bucket; the
//! evictions are counted so an operator can see the table was too small.

#![allow(
    clippy::disallowed_types,
    reason = "sixteen shard locks, each held for one map operation: not one lock queueing every connection"
)]

use std::{
    hash::{BuildHasher, Hash, Hasher},
    net::IpAddr,
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lru::LruCache;
use serde::{Deserialize, Serialize};

/// What a limit counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyClass {
    /// The caller's verified SPIFFE ID; callers without one by their source address.
    Identity,
    /// The client's IP address.
    SourceIp,
    /// The verified bearer token's `sub`; requests without one by identity, then address.
    JwtSub,
    /// One bucket for every caller.
    All,
}

impl KeyClass {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyClass::Identity => "identity",
            KeyClass::SourceIp => "source_ip",
            KeyClass::JwtSub => "jwt_sub",
            KeyClass::All => "all",
        }
    }
}

/// What is known about a caller when a limit is checked.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub identity: Option<&'a str>,
    pub ip: IpAddr,
    pub subject: Option<&'a str>,
}

/// The keys per limiter when the configuration names no number: at about 100 bytes each,
/// a megabyte per limit.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// A validated limit: a rate with its burst, a cap on concurrent holders, or both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LimitSpec {
    pub key: KeyClass,
    /// Admissions per second per key, and how many may come at once from a full bucket.
    pub rate: Option<Rate>,
    /// How many admissions one key may hold at once (open connections).
    pub concurrent: Option<u32>,
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

// A rate is finite and positive (see `Rate::new`), so equality is an equivalence.
impl Eq for Rate {}
impl Eq for LimitSpec {}

impl Rate {
    /// A rate as configured: positive and at most a million a second; the burst defaults
    /// to one second's worth.
    pub fn new(per_second: f64, burst: Option<u32>) -> Result<Rate, String> {
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e6) {
            return Err(format!(
                "{per_second} per second: give a rate above 0 and at most 1000000"
            ));
        }
        let burst = burst.unwrap_or(per_second.ceil() as u32).max(1);
        Ok(Rate { per_second, burst })
    }
}

impl std::fmt::Display for LimitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = self.rate {
            parts.push(format!("{}/s burst {}", r.per_second, r.burst));
        }
        if let Some(c) = self.concurrent {
            parts.push(format!("{c} at once"));
        }
        write!(f, "{} per {}", parts.join(", "), self.key.as_str())
    }
}

/// Why an admission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over the rate: the key's next admission is possible after this long.
    Rate { retry_after: Duration },
    /// The key holds as many as it may.
    Concurrent,
}

impl Limited {
    /// The `kind` label of the counter.
    pub fn kind(self) -> &'static str {
        match self {
            Limited::Rate { .. } => "rate",
            Limited::Concurrent => "concurrent",
        }
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Limited::Rate { retry_after } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
            Limited::Concurrent => 1,
        }
    }
}

/// Held while an admission lasts (a connection stays open); gives its slot back on drop.
#[derive(Debug, Default)]
pub struct Held(Option<Arc<AtomicU32>>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(live) = self.0.take() {
            live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

struct Entry {
    /// Nanoseconds since the limiter's epoch at which the bucket is full again plus one
    /// emission interval (GCRA's theoretical arrival time).
    tat: u64,
    /// Admissions held now (only for limits with `concurrent`).
    live: Option<Arc<AtomicU32>>,
}

const SHARDS: usize = 16;

/// One limit's buckets.
pub struct Limiter {
    spec: LimitSpec,
    /// Nanoseconds per admission, and the slack a full bucket gives (burst intervals).
    interval: u64,
    tolerance: u64,
    epoch: Instant,
    shards: Box<[Mutex<LruCache<u64, Entry>>]>,
    evicted: AtomicU64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

impl Limiter {
    pub fn new(spec: LimitSpec) -> Limiter {
        let (interval, tolerance) = match spec.rate {
            Some(r) => {
                let interval = (1e9 / r.per_second).max(1.0) as u64;
                (interval, interval.saturating_mul(u64::from(r.burst)))
            }
            None => (0, 0),
        };
        let per_shard = NonZeroUsize::new(spec.max_keys.div_ceil(SHARDS).max(1)).expect("max 1");
        Limiter {
            spec,
            interval,
            tolerance,
            epoch: Instant::now(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn spec(&self) -> &LimitSpec {
        &self.spec
    }

    /// The key `caller` is counted under, by this limit's class.
    pub fn key(&self, caller: &Caller<'_>) -> u64 {
        let mut h = seed().build_hasher();
        // Each class of key is tagged so that an address and an identity never share a
        // bucket.
        let by_id = |h: &mut dyn Hasher| match caller.identity {
            Some(id) => {
                h.write_u8(1);
                h.write(id.as_bytes());
            }
            None => by_ip(h, caller.ip),
        };
        match self.spec.key {
            KeyClass::All => h.write_u8(0),
            KeyClass::SourceIp => by_ip(&mut h, caller.ip),
            KeyClass::Identity => by_id(&mut h),
            KeyClass::JwtSub => match caller.subject.filter(|s| !s.is_empty()) {
                Some(sub) => {
                    h.write_u8(3);
                    h.write(sub.as_bytes());
                }
                None => by_id(&mut h),
            },
        }
        h.finish()
    }

    /// Admits `caller` now, or says why not.
    pub fn admit(&self, caller: &Caller<'_>) -> Result<Held, Limited> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.admit_at(self.key(caller), now)
    }

    /// Admits the key at `now` (nanoseconds since the epoch).
    pub fn admit_at(&self, key: u64, now: u64) -> Result<Held, Limited> {
        // The high bits pick the shard; the map hashes the whole key again.
        let shard = &self.shards[(key >> 60) as usize % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        // A caller seen before (the common case) costs one lookup.
        if let Some(entry) = map.get_mut(&key) {
            return self.take(entry, now);
        }
        let fresh = Entry {
            tat: 0,
            // A counter only where the limit caps what a key holds.
            live: self.spec.concurrent.map(|_| Arc::new(AtomicU32::new(0))),
        };
        if map.push(key, fresh).is_some() {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        self.take(map.get_mut(&key).expect("inserted above"), now)
    }

    /// Takes a token (and a slot) from `entry`, or says why not.
    fn take(&self, entry: &mut Entry, now: u64) -> Result<Held, Limited> {
        if let (Some(max), Some(live)) = (self.spec.concurrent, &entry.live) {
            // Refused for holding too many: no token is taken.
            if live.load(Ordering::Relaxed) >= max {
                return Err(Limited::Concurrent);
            }
        }
        if self.interval > 0 {
            let next = entry.tat.max(now) + self.interval;
            if next - now > self.tolerance {
                return Err(Limited::Rate {
                    retry_after: Duration::from_nanos(next - now - self.tolerance),
                });
            }
            entry.tat = next;
        }
        Ok(Held(entry.live.as_ref().map(|live| {
            live.fetch_add(1, Ordering::Relaxed);
            live.clone()
        })))
    }

    /// How many keys are remembered now.
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// How many keys were forgotten to make room for others.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Takes over what `previous` (the same limit, before a reload) knew, so that a policy
    /// reload does not hand every caller a full bucket.
    pub fn adopt(&self, previous: &Limiter) {
        if previous.spec != self.spec {
            return;
        }
        // The previous limiter's epoch is the earlier one.
        let offset = self
            .epoch
            .checked_duration_since(previous.epoch)
            .map_or(0, |d| d.as_nanos() as u64);
        for (old, new) in previous.shards.iter().zip(self.shards.iter()) {
            let old = old.lock().unwrap_or_else(|p| p.into_inner());
            let mut new = new.lock().unwrap_or_else(|p| p.into_inner());
            // Oldest first, so the most recent stay most recent.
            for (k, e) in old.iter().rev() {
                // A key seen since in the new limiter keeps the stricter of the two.
                let tat = e.tat.saturating_sub(offset);
                match new.get_mut(k) {
                    Some(n) => n.tat = n.tat.max(tat),
                    None => {
                        new.push(
                            *k,
                            Entry {
                                tat,
                                live: e.live.clone(),
                            },
                        );
                    }
                }
            }
        }
    }
}

/// The hash seed of every limiter: random per process, so that a client cannot choose
/// addresses that collide, and one for all limiters, so that a reloaded limit finds the
/// keys its predecessor stored.
fn seed() -> &'static std::collections::hash_map::RandomState {
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    SEED.get_or_init(Default::default)
}

fn by_ip(h: &mut dyn Hasher, ip: IpAddr) {
    h.write_u8(2);
    ip.to_canonical().hash(&mut HasherRef(h));
}

/// `Hash::hash` wants a sized hasher.
struct HasherRef<'a>(&'a mut dyn Hasher);

impl Hasher for HasherRef<'_> {
    fn finish(&self) -> u64 {
        self.0.finish()
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limiter(per_second: f64, burst: u32, concurrent: Option<u32>, max_keys: usize) -> Limiter {
        Limiter::new(LimitSpec {
            key: KeyClass::SourceIp,
            rate: (per_second > 0.0).then(|| Rate::new(per_second, Some(burst)).unwrap()),
            concurrent,
            max_keys,
        })
    }

    fn admitted(l: &Limiter, key: u64, at: impl Iterator<Item = u64>) -> usize {
        at.filter(|t| l.admit_at(key, *t).is_ok()).count()
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_the_rate() {
        let l = limiter(10.0, 5, None, 100);
        // 1,000 attempts over 10 s (100/s): 5 at once, then 10 a second.
        let n = admitted(&l, 7, (0..1000).map(|i| i * SEC / 100));
        assert!((104..=106).contains(&n), "{n}");
        // After a quiet second the bucket holds the rate's worth again, not more than burst.
        let n = admitted(&l, 7, (0..20).map(|_| 12 * SEC));
        assert_eq!(n, 5);
    }

    #[test]
    fn a_refusal_says_when_to_come_back() {
        let l = limiter(2.0, 1, None, 100);
        assert!(l.admit_at(1, SEC).is_ok());
        let Err(Limited::Rate { retry_after }) = l.admit_at(1, SEC) else {
            panic!("the second at once must be refused");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        assert_eq!(Limited::Rate { retry_after }.retry_after_secs(), 1);
        assert!(l.admit_at(1, SEC + SEC / 2).is_ok());
    }

    #[test]
    fn keys_are_counted_apart() {
        let l = limiter(1.0, 1, None, 100);
        let ip = |s: &str| Caller {
            identity: None,
            ip: s.parse().unwrap(),
            subject: None,
        };
        let (a, b) = (l.key(&ip("10.0.0.1")), l.key(&ip("10.0.0.2")));
        assert_ne!(a, b);
        // An IPv4-mapped IPv6 address is the same client.
        assert_eq!(a, l.key(&ip("::ffff:10.0.0.1")));
        assert!(l.admit_at(a, 0).is_ok());
        assert!(l.admit_at(a, 0).is_err());
        assert!(l.admit_at(b, 0).is_ok());
    }

    #[test]
    fn identity_and_subject_keys_fall_back_when_absent() {
        let spec = |key| LimitSpec {
            key,
            rate: Some(Rate::new(1.0, None).unwrap()),
            concurrent: None,
            max_keys: 10,
        };
        let by_id = Limiter::new(spec(KeyClass::Identity));
        let anon = |ip: &str| Caller {
            identity: None,
            ip: ip.parse().unwrap(),
            subject: None,
        };
        let alice = Caller {
            identity: Some("spiffe://td/a"),
            ..anon("10.0.0.1")
        };
        assert_ne!(by_id.key(&alice), by_id.key(&anon("10.0.0.1")));
        assert_eq!(
            by_id.key(&alice),
            by_id.key(&Caller {
                ip: "10.0.0.9".parse().unwrap(),
                ..alice
            })
        );
        let by_sub = Limiter::new(spec(KeyClass::JwtSub));
        let with_sub = Caller {
            subject: Some("alice"),
            ..alice
        };
        assert_ne!(by_sub.key(&with_sub), by_sub.key(&alice));
        let all = Limiter::new(spec(KeyClass::All));
        assert_eq!(all.key(&alice), all.key(&anon("10.9.9.9")));
    }

    #[test]
    fn concurrency_is_capped_and_given_back() {
        let l = limiter(0.0, 0, Some(2), 100);
        let a = l.admit_at(1, 0).unwrap();
        let _b = l.admit_at(1, 0).unwrap();
        assert_eq!(l.admit_at(1, 0).unwrap_err(), Limited::Concurrent);
        assert!(l.admit_at(2, 0).is_ok(), "another key is not affected");
        drop(a);
        assert!(l.admit_at(1, 0).is_ok());
    }

    #[test]
    fn a_flood_of_new_keys_stays_within_max_keys() {
        let l = limiter(1.0, 1, None, 1_000);
        for k in 0..100_000u64 {
            // Spread like hashes are, over the shards.
            let _ = l.admit_at(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0);
        }
        assert!(l.keys() <= 1_000 + SHARDS, "{}", l.keys());
        assert!(
            l.evicted() >= 100_000 - 1_000 - SHARDS as u64,
            "{} evicted",
            l.evicted()
        );
    }

    #[test]
    fn a_reload_keeps_what_the_buckets_knew() {
        let old = limiter(1.0, 3, None, 100);
        assert_eq!(admitted(&old, 5, (0..3).map(|_| 0)), 3);
        let new = limiter(1.0, 3, None, 100);
        new.adopt(&old);
        assert!(
            new.admit(&Caller {
                identity: None,
                ip: "10.0.0.1".parse().unwrap(),
                subject: None
            })
            .is_ok(),
            "another key has a full bucket"
        );
        assert!(
            new.admit_at(5, 0).is_err(),
            "key 5's empty bucket came along"
        );
        // A changed limit starts afresh.
        let changed = limiter(2.0, 3, None, 100);
        changed.adopt(&old);
        assert!(changed.admit_at(5, 0).is_ok());
    }

    #[test]
    fn rates_are_validated() {
        assert!(Rate::new(0.0, None).is_err());
        assert!(Rate::new(f64::NAN, None).is_err());
        assert!(Rate::new(2e6, None).is_err());
        assert_eq!(Rate::new(2.5, None).unwrap().burst, 3);
        assert_eq!(Rate::new(0.1, None).unwrap().burst, 1);
    }
}
