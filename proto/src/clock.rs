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

/// A readable UTC date for Unix seconds, `2026-12-02 05:11:00 UTC` (logs, status, error
/// messages about certificate and token dates); any `i64`, before 1970 too.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's civil_from_days), overflow-free for
    // any i64.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
