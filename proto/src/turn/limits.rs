//! Token buckets: per-allocation bandwidth and the per-source rate tables that limit what an
//! unauthenticated source can make the server do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

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

/// Per-source-IP token buckets with a bounded table.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: Rate,
    cap: usize,
    map: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    pub(crate) fn new(rate: Rate, cap: usize) -> Self {
        RateLimiter {
            rate,
            cap: cap.max(1),
            map: HashMap::new(),
        }
    }
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate.per_sec == 0 {
            return true;
        }
        if let Some(b) = self.map.get_mut(&ip) {
            return b.take(self.rate, 1, now);
        }
        if self.map.len() >= self.cap {
            self.sweep(now);
            if self.map.len() >= self.cap {
                return false;
            }
        }
        let mut b = Bucket::new(self.rate, now);
        let ok = b.take(self.rate, 1, now);
        self.map.insert(ip, b);
        ok
    }
    /// Forgets buckets idle long enough to be full again.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let rate = self.rate;
        if rate.per_sec == 0 {
            self.map.clear();
            return;
        }
        let refill = Duration::from_secs(rate.burst / rate.per_sec + 1);
        self.map
            .retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }
}
