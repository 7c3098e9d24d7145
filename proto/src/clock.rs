//! Unix time, the one conversion every crate uses (probe timestamps, TURN REST-API credential
//! expiry, cache ages, the rendezvous' common start time).
//!
//! `proto` never reads a clock: the driver passes the wall-clock time it read
//! (`SystemTime::now()`), and gets whole seconds or milliseconds since the epoch. A clock set
//! before 1970 counts as 0 rather than failing: every use compares or adds, and 0 only makes
//! timestamps look old.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch at `at` (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whole seconds since the Unix epoch at `at` (0 before it).
pub fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn epoch_offsets_and_times_before_1970() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(unix_ms(t), 1_700_000_000_123);
        assert_eq!(unix_secs(t), 1_700_000_000);
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!((unix_ms(before), unix_secs(before)), (0, 0));
    }
}
