//! When to offer to a peer (ask the rendezvous to start a punching session with it).
//!
//! An offer is scheduled for a reason (registered, the peer came online, our candidates
//! changed, a retry, a birthday retry); the earliest wins, and two offers to one peer are at
//! least [`OFFER_MIN_GAP`] apart. Of two peers the one with the lower key offers first; the
//! other waits [`OFFER_DEFER`], so two crossing offers — each resetting the other side's
//! session — are rare.

use std::time::{Duration, Instant};

/// Retry interval of offers to a peer that has no path.
pub const OFFER_RETRY: Duration = Duration::from_secs(20);
/// Delay before the peer with the higher key offers (the lower key offers at once).
pub const OFFER_DEFER: Duration = Duration::from_secs(1);
/// Shortest time between two offers to one peer.
pub const OFFER_MIN_GAP: Duration = Duration::from_secs(2);

/// The offer timer of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfferTimer {
    next: Option<Instant>,
    last: Option<Instant>,
}

impl OfferTimer {
    /// Asks for an offer `delay` from `now` (kept if an earlier one is already due; never
    /// sooner than [`OFFER_MIN_GAP`] after the last).
    pub fn schedule(&mut self, now: Instant, delay: Duration) {
        let mut at = now + delay;
        if let Some(last) = self.last {
            at = at.max(last + OFFER_MIN_GAP);
        }
        self.next = Some(self.next.map_or(at, |t| t.min(at)));
    }

    /// Drops the scheduled offer (a session started).
    pub fn cancel(&mut self) {
        self.next = None;
    }

    /// When the next offer is due.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// If an offer is due at `now`: clears it and returns true (the driver may still decide
    /// that none is needed; call [`OfferTimer::sent`] when one goes out).
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.next.is_some_and(|t| t <= now) {
            self.next = None;
            true
        } else {
            false
        }
    }

    /// An offer went to signalling at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// The signalling queue was full: try again after the minimum gap.
    pub fn send_failed(&mut self, now: Instant) {
        self.next = Some(now + OFFER_MIN_GAP);
    }
}

/// Whether we offer first to the peer with key `peer` (the lower key does).
pub fn we_go_first(me: &[u8; 32], peer: &[u8; 32]) -> bool {
    me < peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_wins_and_offers_keep_their_minimum_gap() {
        let t0 = Instant::now();
        let mut o = OfferTimer::default();
        o.schedule(t0, OFFER_RETRY);
        o.schedule(t0, Duration::from_millis(300));
        assert_eq!(o.next(), Some(t0 + Duration::from_millis(300)));
        assert!(!o.take_due(t0));
        let sent = t0 + Duration::from_millis(300);
        assert!(o.take_due(sent));
        o.sent(sent);
        assert_eq!(o.next(), None);
        // Our candidates changed right after: the new offer waits for the gap.
        o.schedule(sent, Duration::ZERO);
        assert_eq!(o.next(), Some(sent + OFFER_MIN_GAP));
        o.cancel();
        assert_eq!(o.next(), None);
        assert!(we_go_first(&[1; 32], &[2; 32]) && !we_go_first(&[2; 32], &[1; 32]));
    }
}
