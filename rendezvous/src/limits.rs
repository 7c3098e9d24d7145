//! Per-source-IP limiters: token buckets (rates) and counters (concurrent connections), each
//! bounded in size so a spoofing flood cannot grow them without limit.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

/// Token bucket per IP.
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

    /// Takes one token for `ip` at `now`; false when the bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
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

/// Concurrent connections per IP.
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
    /// Takes a slot for `ip` if fewer than `max` are in use.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<ConnSlot> {
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

    /// Connections currently counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.counts.get(&ip).map(|c| *c).unwrap_or(0)
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
