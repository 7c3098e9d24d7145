//! Per-source limiters: token buckets (rates) and counters (concurrent connections), each
//! bounded in size so a spoofing flood cannot grow them without limit, plus the per-connection
//! [`TokenBucket`].
//!
//! Every per-source table is keyed by [`source_key`]: the IPv4 address, or the /64 prefix of an
//! IPv6 address. One IPv6 host (a home router's delegated prefix, one VM) routinely owns a whole
//! /64 and can pick any of its 2^64 addresses, so per-address IPv6 limits would limit nothing.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

/// Length of the IPv6 prefix one per-source limit covers (RFC 4291 §2.5.1 interface IDs are
/// 64 bits, so a /64 is the smallest block a single site is given).
pub const IPV6_SOURCE_PREFIX: u8 = 64;

/// The key a source address is counted under: an IPv4 address as it is (also when it arrives
/// IPv4-mapped on a dual-stack socket), an IPv6 address truncated to its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - u32::from(IPV6_SOURCE_PREFIX));
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// A token bucket owned by one connection (no map, no lock): `rate` tokens per second up to
/// `burst`, starting full.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens at `now`.
    pub fn full(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Refills at `rate` per second up to `burst`, then takes one token; false when empty.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate.max(0.0);
        self.tokens = (self.tokens + refill).min(f64::from(burst.max(1)));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Token bucket per source ([`source_key`]).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_entries: usize,
    buckets: DashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    /// `rate` tokens per second, up to `burst`, tracking at most `max_entries` IPs.
    pub fn new(rate: f64, burst: u32, max_entries: usize) -> Self {
        RateLimiter {
            rate: rate.max(0.0),
            burst: f64::from(burst.max(1)),
            max_entries: max_entries.max(16),
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `ip`'s source key at `now`; false when the bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = source_key(ip);
        if self.buckets.len() >= self.max_entries && !self.buckets.contains_key(&ip) {
            self.evict(now);
        }
        let mut e = self.buckets.entry(ip).or_insert((self.burst, now));
        let (tokens, last) = *e;
        let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
        let tokens = (tokens + refill).min(self.burst);
        if tokens >= 1.0 {
            *e = (tokens - 1.0, now);
            true
        } else {
            *e = (tokens, now);
            false
        }
    }

    fn evict(&self, now: Instant) {
        // Drop buckets that are full again (idle sources); if none, drop everything: a fresh
        // bucket is the most generous state, so eviction never blocks a legitimate source.
        let full_after = std::time::Duration::from_secs_f64(if self.rate > 0.0 {
            self.burst / self.rate
        } else {
            60.0
        });
        self.buckets
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < full_after);
        if self.buckets.len() >= self.max_entries {
            self.buckets.clear();
        }
    }

    /// Number of tracked IPs.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Concurrent connections per source ([`source_key`]).
#[derive(Debug, Default)]
pub struct ConnCounter {
    counts: DashMap<IpAddr, u32>,
}

/// Decrements the per-IP count when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    /// Takes a slot for `ip`'s source key if fewer than `max` are in use.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<ConnSlot> {
        let ip = source_key(ip);
        let mut e = self.counts.entry(ip).or_insert(0);
        if *e >= max {
            return None;
        }
        *e += 1;
        Some(ConnSlot {
            counter: self.clone(),
            ip,
        })
    }

    /// Connections currently counted for `ip`'s source key.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.counts.get(&source_key(ip)).map(|c| *c).unwrap_or(0)
    }
}

impl ConnSlot {
    /// The source key this slot is counted under.
    pub fn key(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.counter.counts.entry(self.ip) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills() {
        let r = RateLimiter::new(1.0, 2, 100);
        let ip: IpAddr = [1, 2, 3, 4].into();
        let t = Instant::now();
        assert!(r.allow(ip, t));
        assert!(r.allow(ip, t));
        assert!(!r.allow(ip, t));
        assert!(r.allow(ip, t + Duration::from_secs(1)));
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());

        let c = Arc::new(ConnCounter::default());
        let _s = c.acquire(a, 1).unwrap();
        assert!(c.acquire(b, 1).is_none(), "same /64 shares one slot");
        assert!(c.acquire(other, 1).is_some());
        let r = RateLimiter::new(0.0, 1, 100);
        let t = Instant::now();
        assert!(r.allow(a, t));
        assert!(!r.allow(b, t), "same /64 shares one bucket");
        assert!(r.allow(other, t));
    }

    #[test]
    fn token_bucket_takes_and_refills() {
        let t = Instant::now();
        let mut b = TokenBucket::full(2, t);
        assert!(b.take(1.0, 2, t));
        assert!(b.take(1.0, 2, t));
        assert!(!b.take(1.0, 2, t));
        assert!(b.take(1.0, 2, t + Duration::from_secs(1)));
        assert!(!b.take(1.0, 2, t + Duration::from_secs(1)));
    }

    #[test]
    fn conn_slots_release() {
        let c = Arc::new(ConnCounter::default());
        let ip: IpAddr = [1, 2, 3, 4].into();
        let a = c.acquire(ip, 1).unwrap();
        assert!(c.acquire(ip, 1).is_none());
        drop(a);
        assert!(c.acquire(ip, 1).is_some());
        assert_eq!(c.count(ip), 0);
    }
}
