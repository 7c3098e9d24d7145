//! Limits: token buckets for per-allocation bandwidth, a lock-free shared bucket for
//! per-network bandwidth ([`SharedRate`], one per tenant network, shared by every worker of a
//! process), and the per-source rate tables ([`RateTable`]) that limit what any source, with
//! or without credentials, can make the server do.
//!
//! The rate tables are shared by all workers of one process (`SO_REUSEPORT` spreads a flood
//! over workers, so a per-worker table would multiply the limit by the worker count). They are
//! sharded (a short mutex per shard, never a global lock) and bounded: when a shard is full a
//! new source replaces the least recently seen of [`EVICTION_SAMPLE`] randomly sampled entries
//! (sampled LRU, as Redis does), so inserting costs O(1) however full the table is and a flood
//! of spoofed sources never locks new sources out. IPv6 sources are keyed per /64 (one
//! subscriber's prefix), IPv4 sources per address.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::addr::canonical_ip;

/// A token bucket rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained units per second (0 disables the limit).
    pub per_sec: u64,
    /// Burst size in units.
    pub burst: u64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        burst: 0,
    };
}

/// Default per-allocation bandwidth, both directions together: 25 MB/s (200 Mbit/s) with a
/// 100 ms burst. BENCHMARKS.md measured one relay worker at ≥ 2.4 Gbit/s (250,000 pps of
/// 1200 B): one allocation takes at most ~1/12 of a core, and a WireGuard tunnel through the
/// relay still gets more than NetBird's ~100 Mbit/s relayed flows.
pub const DEFAULT_ALLOCATION_BANDWIDTH: Rate = Rate {
    per_sec: 25_000_000,
    burst: 2_500_000,
};
/// Default per-network bandwidth over all allocations of one network: 125 MB/s (1 Gbit/s)
/// with a 100 ms burst — under half of what one worker relays, so one tenant cannot take a
/// whole core of a small relay.
pub const DEFAULT_NETWORK_BANDWIDTH: Rate = Rate {
    per_sec: 125_000_000,
    burst: 12_500_000,
};
/// Default allocations one username may hold (one node: an IPv4 and an IPv6 allocation, a
/// few after restarts before the old ones expire).
pub const DEFAULT_USER_QUOTA: u32 = 10;
/// Default allocations one network may hold over all its usernames: 1/16 of the 16,384 ports
/// of the default range, so a tenant minting throw-away keys takes at most that share of a
/// relay IP.
pub const DEFAULT_NETWORK_QUOTA: u32 = 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            last: now,
        }
    }
    /// Takes `n` tokens if available.
    #[inline]
    pub(crate) fn take(&mut self, rate: Rate, n: u64, now: Instant) -> bool {
        if rate.per_sec == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() as u64 / 1000).saturating_mul(rate.per_sec) / 1_000_000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(rate.burst.max(1));
            self.last = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Entries sampled to pick a victim when a rate-table shard is full.
pub const EVICTION_SAMPLE: usize = 8;
/// Shards of a rate table (a power of two).
pub const RATE_SHARDS: usize = 64;

/// What a rate table keys a source by: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 source (IPv6 spellings of IPv4 are reduced first).
    V4(u32),
    /// The /64 of an IPv6 source.
    V6(u64),
}

impl SourceKey {
    /// Key of `ip`.
    pub fn of(ip: IpAddr) -> SourceKey {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => SourceKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

#[derive(Debug)]
struct Shard {
    index: HashMap<SourceKey, u32>,
    entries: Vec<(SourceKey, Bucket)>,
    rng: u64,
}

/// Per-source token buckets in a bounded, sharded table shared by every worker of a process.
/// See the module docs.
#[derive(Debug)]
pub struct RateTable {
    rate: Rate,
    shard_cap: usize,
    seed: u64,
    shards: Box<[Mutex<Shard>]>,
    /// Entries examined by inserts into full shards (the eviction's cost, for tests/benches).
    probes: AtomicU64,
    /// Sources evicted to make room.
    evictions: AtomicU64,
}

impl RateTable {
    /// A table allowing `rate` per source with room for about `cap` sources in total.
    pub fn new(rate: Rate, cap: usize) -> RateTable {
        let shard_cap = cap.div_ceil(RATE_SHARDS).max(EVICTION_SAMPLE);
        let shards = (0..RATE_SHARDS)
            .map(|i| {
                Mutex::new(Shard {
                    index: HashMap::new(),
                    entries: Vec::new(),
                    rng: 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                })
            })
            .collect();
        RateTable {
            rate,
            shard_cap,
            seed: RandomState::new().hash_one(0x6d65_7368_u64),
            shards,
            probes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Most sources the table holds.
    pub fn capacity(&self) -> usize {
        self.shard_cap * RATE_SHARDS
    }

    /// Sources currently held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.entries.len()))
            .sum()
    }

    /// True when no source is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries examined to choose eviction victims since creation: at most
    /// [`EVICTION_SAMPLE`] per insert, however full the table.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Sources evicted since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Shard of `key`: keyed (seeded per table), so a flood cannot be aimed at one shard
    /// offline; SipHash inside the shard's map guards the buckets themselves.
    #[inline]
    fn shard_of(&self, key: SourceKey) -> usize {
        let x = match key {
            SourceKey::V4(v) => u64::from(v),
            SourceKey::V6(v) => v ^ 0x5555_5555_0000_0000,
        };
        let h = (x ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - RATE_SHARDS.trailing_zeros())) as usize & (RATE_SHARDS - 1)
    }

    /// Takes one token for the source `ip`; false when it is over its rate.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate.per_sec == 0 {
            return true;
        }
        let key = SourceKey::of(ip);
        let shard_ix = self.shard_of(key);
        let Some(m) = self.shards.get(shard_ix) else {
            return true;
        };
        let Ok(mut shard) = m.lock() else {
            return false;
        };
        let shard = &mut *shard;
        if let Some(&i) = shard.index.get(&key) {
            return match shard.entries.get_mut(i as usize) {
                Some((_, b)) => b.take(self.rate, 1, now),
                None => false,
            };
        }
        let mut b = Bucket::new(self.rate, now);
        let ok = b.take(self.rate, 1, now);
        if shard.entries.len() < self.shard_cap {
            shard.index.insert(key, shard.entries.len() as u32);
            shard.entries.push((key, b));
            return ok;
        }
        // Full: replace the least recently used of a few random entries (O(1)).
        let n = shard.entries.len();
        let mut victim = 0;
        let mut oldest: Option<Instant> = None;
        for _ in 0..EVICTION_SAMPLE {
            let i = (crate::rng::xorshift64star(&mut shard.rng) % n as u64) as usize;
            let last = shard.entries[i].1.last;
            if oldest.is_none_or(|o| last < o) {
                oldest = Some(last);
                victim = i;
            }
        }
        self.probes
            .fetch_add(EVICTION_SAMPLE as u64, Ordering::Relaxed);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        let old = shard.entries[victim].0;
        shard.index.remove(&old);
        shard.entries[victim] = (key, b);
        shard.index.insert(key, victim as u32);
        ok
    }

    /// Forgets the buckets of one shard (round robin by `turn`) that are idle long enough to be
    /// full again: an incremental sweep, 1/[`RATE_SHARDS`] of the table per call.
    pub fn sweep_shard(&self, turn: usize, now: Instant) {
        if self.rate.per_sec == 0 {
            return;
        }
        let refill = Duration::from_secs(self.rate.burst / self.rate.per_sec + 1);
        let Some(m) = self.shards.get(turn % RATE_SHARDS) else {
            return;
        };
        let Ok(mut shard) = m.lock() else { return };
        let shard = &mut *shard;
        let mut i = 0;
        while i < shard.entries.len() {
            if now.saturating_duration_since(shard.entries[i].1.last) >= refill {
                let (k, _) = shard.entries.swap_remove(i);
                shard.index.remove(&k);
                if let Some((moved, _)) = shard.entries.get(i) {
                    shard.index.insert(*moved, i as u32);
                }
            } else {
                i += 1;
            }
        }
    }
}

/// A token bucket that any number of threads take from without a lock: GCRA (the "virtual
/// scheduling" form of a token bucket) on one atomic holding the theoretical arrival time.
/// Used for the per-network bandwidth limit, which every worker serving that network shares.
#[derive(Debug)]
pub struct SharedRate {
    epoch: Instant,
    /// Theoretical arrival time, nanoseconds since `epoch`.
    tat: AtomicU64,
    /// Nanoseconds per unit, scaled by 2^16 (keeps precision for fast rates).
    ns_per_unit_x65536: u64,
    /// How far ahead of `now` the TAT may run (the burst), in nanoseconds.
    tolerance_ns: u64,
}

impl SharedRate {
    /// A bucket of `rate` (per_sec must be > 0) starting full at `now`.
    pub fn new(rate: Rate, now: Instant) -> SharedRate {
        let per_sec = rate.per_sec.max(1);
        let ns_per_unit_x65536 =
            ((1_000_000_000u128 << 16) / u128::from(per_sec)).min(u128::from(u64::MAX)) as u64;
        let tolerance_ns = (u128::from(rate.burst.max(1)) * 1_000_000_000 / u128::from(per_sec))
            .min(u128::from(u64::MAX / 4)) as u64;
        SharedRate {
            epoch: now,
            tat: AtomicU64::new(0),
            ns_per_unit_x65536,
            tolerance_ns,
        }
    }

    /// Takes `n` units at `now`; false (and nothing taken) when that would exceed the burst.
    #[inline]
    pub fn take(&self, n: u64, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let cost = ((u128::from(n) * u128::from(self.ns_per_unit_x65536)) >> 16) as u64;
        let limit = now_ns.saturating_add(self.tolerance_ns);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now_ns).saturating_add(cost);
            if new > limit {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

/// The per-source rate tables one process shares between its workers.
#[derive(Debug, Clone)]
pub struct SharedLimits {
    /// All STUN requests per source.
    pub requests: std::sync::Arc<RateTable>,
    /// Unauthenticated answers (401, Binding responses, pre-auth errors) per source.
    pub unauth: std::sync::Arc<RateTable>,
}

impl SharedLimits {
    /// Tables sized from `cfg`.
    pub fn new(cfg: &super::ServerConfig) -> SharedLimits {
        SharedLimits {
            requests: std::sync::Arc::new(RateTable::new(cfg.request_rate, cfg.max_rate_entries)),
            unauth: std::sync::Arc::new(RateTable::new(cfg.unauth_rate, cfg.max_rate_entries)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let t = RateTable::new(
            Rate {
                per_sec: 1,
                burst: 2,
            },
            1024,
        );
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(t.allow(a, now));
        assert!(t.allow(b, now));
        assert!(!t.allow(a, now), "the /64 spent its burst of 2");
        assert!(t.allow(other, now), "another /64 has its own bucket");
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(t.allow(v4, now) && t.allow(mapped, now) && !t.allow(v4, now));
    }

    /// The cost of inserting into a full table does not grow with the table: a deterministic
    /// count of entries examined per insert, for a small and a 16x larger table.
    #[test]
    fn insert_into_a_full_table_examines_a_constant_number_of_entries() {
        let rate = Rate {
            per_sec: 10,
            burst: 20,
        };
        let now = Instant::now();
        for cap in [4_096usize, 65_536] {
            let t = RateTable::new(rate, cap);
            // Shards fill unevenly: insert until every shard is full, then measure.
            let mut i = 0u32;
            while t.len() < t.capacity() {
                t.allow(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), now);
                i += 1;
            }
            let (p0, e0) = (t.probes(), t.evictions());
            let flood = 10_000u32;
            for k in 0..flood {
                // New sources are admitted (full burst) even though the table is full.
                assert!(t.allow(IpAddr::from((0x6400_0000u32 + k).to_be_bytes()), now));
            }
            assert_eq!(t.evictions() - e0, u64::from(flood));
            assert_eq!(
                t.probes() - p0,
                u64::from(flood) * EVICTION_SAMPLE as u64,
                "cap {cap}"
            );
            assert!(t.len() <= t.capacity());
        }
    }

    #[test]
    fn idle_entries_are_swept_incrementally() {
        let t = RateTable::new(
            Rate {
                per_sec: 10,
                burst: 10,
            },
            65_536,
        );
        let now = Instant::now();
        for i in 0..500u32 {
            t.allow(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), now);
        }
        assert_eq!(t.len(), 500);
        for k in 0..RATE_SHARDS {
            t.sweep_shard(k, now + Duration::from_secs(5));
        }
        assert!(t.is_empty());
    }

    #[test]
    fn shared_rate_limits_bytes_across_threads() {
        let now = Instant::now();
        let r = std::sync::Arc::new(SharedRate::new(
            Rate {
                per_sec: 1_000_000,
                burst: 100_000,
            },
            now,
        ));
        // Four threads race for the 100 kB burst in 1000-byte units at one instant.
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).filter(|_| r.take(1000, now)).count())
            })
            .collect();
        let taken: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(taken, 100, "exactly the burst, whoever took it");
        // 50 ms later 50 ms' worth (50 kB) is back; never more than the burst.
        let later = now + Duration::from_millis(50);
        let n = (0..1000).filter(|_| r.take(1000, later)).count();
        assert_eq!(n, 50);
        let much_later = now + Duration::from_secs(10);
        let n = (0..1000).filter(|_| r.take(1000, much_later)).count();
        assert_eq!(n, 100);
    }
}
