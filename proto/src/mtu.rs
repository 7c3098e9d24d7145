//! Path MTU arithmetic and the per-pair search (padded, authenticated sized pings of
//! [`crate::probe`]), driven by [`crate::path::PeerPath`].
//!
//! The search measures the largest **WireGuard datagram** (the UDP payload meshpunch hands to a
//! pair) that reaches the peer: every size of a small ladder is sent as a sized ping at once, a
//! size works when its sized pong comes back, and unanswered sizes above the best answered one
//! are retried for [`ROUNDS`] rounds (loss must not read as a smaller MTU). The data socket sends
//! with "don't fragment" and ignores the kernel's path-MTU cache (`IP_PMTUDISC_PROBE`), so a
//! ping too large for a link is dropped rather than fragmented. Only our sending direction is
//! measured: the peer measures its own.
//!
//! Arithmetic of a full-size packet (docs/mtu.md): inner packet + [`WG_OVERHEAD`] = the
//! datagram; + [`UDP_HEADER`] + [`IPV4_HEADER`] or [`IPV6_HEADER`] = the packet on the wire;
//! a relay path adds [`CHANNEL_DATA_HEADER`] on the leg between a TURN server and its client.
//! WireGuard's default MTU 1420 relayed over IPv6: 1420 + 32 + 4 + 8 + 40 = 1504 > 1500.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::probe::TxId;

/// IPv4 header without options (RFC 791).
pub const IPV4_HEADER: u16 = 20;
/// IPv6 fixed header (RFC 8200).
pub const IPV6_HEADER: u16 = 40;
/// UDP header (RFC 768).
pub const UDP_HEADER: u16 = 8;
/// TURN ChannelData header (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER: u16 = 4;
/// WireGuard transport data overhead: type and reserved 4, receiver index 4, counter 8,
/// Poly1305 tag 16 (WireGuard paper §5.4.6).
pub const WG_OVERHEAD: u16 = 32;
/// The IPv6 minimum link MTU (RFC 8200 §5): the least a tunnel interface with an IPv6
/// address accepts, and the floor of the interface MTU meshpunch sets.
pub const MIN_INNER_MTU: u16 = 1280;
/// Packet sizes on the first hop the search tries, largest first: Ethernet 1500, PPPoE 1492,
/// 1480 (6in4), DS-Lite 1460, common VPN/mobile sizes, down to the IPv6 minimum.
pub const LADDER: [u16; 11] = [
    1500, 1492, 1480, 1460, 1440, 1420, 1400, 1380, 1350, 1320, 1280,
];
/// Rounds per search: sizes still unanswered above the best answered one are sent again.
pub const ROUNDS: u8 = 3;
/// Shortest wait for the sized pongs of one round (twice the pair's RTT if that is longer).
pub const ROUND_TIMEOUT: Duration = Duration::from_millis(500);
/// A pair with a result is searched again after this long (a route may change under it).
pub const RECHECK: Duration = Duration::from_secs(600);

/// Bytes between the WireGuard datagram and the packet on the wire for a pair: IP and UDP of
/// the destination's family, plus the ChannelData header on relay paths.
pub fn overhead(dest: &SocketAddr, relayed: bool) -> u16 {
    let ip = if dest.is_ipv4() {
        IPV4_HEADER
    } else {
        IPV6_HEADER
    };
    ip + UDP_HEADER + if relayed { CHANNEL_DATA_HEADER } else { 0 }
}

/// The inner (tunnel interface) MTU a working datagram size allows.
pub fn inner_mtu(datagram: u16) -> u16 {
    datagram.saturating_sub(WG_OVERHEAD)
}

/// The result of a pair's search, as `meshpunch status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathMtu {
    /// Largest packet on the first hop that got through (datagram + [`overhead`]).
    pub outer: u16,
    /// Largest WireGuard datagram (UDP payload) that got through.
    pub datagram: u16,
    /// The tunnel MTU it implies (datagram − [`WG_OVERHEAD`]).
    pub inner: u16,
}

/// One pair's MTU search state.
#[derive(Debug, Clone, Default)]
pub struct MtuSearch {
    /// Overhead of the pair (set when the search starts).
    overhead: u16,
    /// Last finished result (datagram size), if any size ever answered.
    result: Option<u16>,
    /// Best answered datagram size in the running search.
    best: Option<u16>,
    /// Sized pings of the running round: (tx, datagram size).
    outstanding: Vec<(TxId, u16)>,
    /// Rounds sent in the running search.
    round: u8,
    /// Some while a search runs: when the current round ends.
    round_end: Option<Instant>,
    /// When the next search starts (None = not scheduled).
    next: Option<Instant>,
    /// Searches finished.
    pub searches: u64,
}

impl MtuSearch {
    /// The last finished result.
    pub fn result(&self) -> Option<PathMtu> {
        self.result.map(|d| PathMtu {
            outer: d + self.overhead,
            datagram: d,
            inner: inner_mtu(d),
        })
    }

    /// Schedules a search at `at` unless one runs or is due earlier.
    pub fn schedule(&mut self, at: Instant) {
        if self.round_end.is_none() {
            self.next = Some(self.next.map_or(at, |n| n.min(at)));
        }
    }

    /// Stops a running search and forgets the schedule (the pair stopped answering).
    pub fn pause(&mut self) {
        self.round_end = None;
        self.outstanding.clear();
        self.next = None;
    }

    /// When [`MtuSearch::poll`] must be called next.
    pub fn timeout(&self) -> Option<Instant> {
        self.round_end.or(self.next)
    }

    /// Advances the search; returns the datagram sizes to send as sized pings now (the
    /// caller gives each a transaction id with [`MtuSearch::sent`]). Returns whether a search
    /// finished (its result may be unchanged).
    pub fn poll(&mut self, now: Instant, overhead: u16, rtt: Option<Duration>) -> (Vec<u16>, bool) {
        let mut finished = false;
        if let Some(end) = self.round_end {
            if now < end {
                return (Vec::new(), false);
            }
            // Round over.
            if self.round >= ROUNDS || self.best == Some(self.top()) {
                finished = self.finish(now);
            }
        } else if self.next.is_some_and(|n| now >= n) {
            self.overhead = overhead;
            self.best = None;
            self.round = 0;
            self.next = None;
        } else {
            return (Vec::new(), false);
        }
        if finished {
            return (Vec::new(), true);
        }
        self.round += 1;
        self.outstanding.clear();
        self.round_end = Some(now + ROUND_TIMEOUT.max(rtt.map_or(Duration::ZERO, |r| r * 2)));
        let best = self.best.unwrap_or(0);
        let sizes = LADDER
            .iter()
            .map(|o| o.saturating_sub(self.overhead))
            .filter(|d| *d > best)
            .collect();
        (sizes, false)
    }

    /// Records the transaction id of a sized ping of `datagram` bytes sent for this search.
    pub fn sent(&mut self, tx: TxId, datagram: u16) {
        self.outstanding.push((tx, datagram));
    }

    /// A sized pong: returns true if it belonged to this search. A pong whose reported size
    /// disagrees with the ping's is ignored (the padding was altered on the way).
    pub fn pong(&mut self, now: Instant, tx: TxId, size: u16) -> bool {
        let Some(&(_, d)) = self.outstanding.iter().find(|(t, _)| *t == tx) else {
            return false;
        };
        if d != size {
            return false;
        }
        self.best = Some(self.best.map_or(d, |b| b.max(d)));
        if d == self.top() {
            // The largest size works: nothing left to try.
            self.finish(now);
        }
        true
    }

    fn top(&self) -> u16 {
        LADDER[0].saturating_sub(self.overhead)
    }

    fn finish(&mut self, now: Instant) -> bool {
        self.result = self.best;
        self.round_end = None;
        self.outstanding.clear();
        self.next = Some(now + RECHECK);
        self.searches += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn relayed_default_wireguard_mtu_over_ipv6_is_1504_bytes() {
        let d = 1420 + WG_OVERHEAD;
        assert_eq!(d + overhead(&a("[2001:db8::1]:1"), true), 1504);
        assert_eq!(d + overhead(&a("192.0.2.1:1"), true), 1484);
        assert_eq!(
            inner_mtu(1500 - overhead(&a("[2001:db8::1]:1"), true)),
            1416
        );
    }

    #[test]
    fn search_finds_largest_answered_size_over_rounds() {
        let t0 = Instant::now();
        let oh = overhead(&a("192.0.2.1:1"), false);
        let mut m = MtuSearch::default();
        m.schedule(t0);
        let (sizes, done) = m.poll(t0, oh, None);
        assert!(!done);
        assert_eq!(sizes.len(), LADDER.len());
        assert_eq!(sizes[0], 1472);
        // A 1400-byte link: everything up to 1372 answers; the round-1 pong for 1352 is lost.
        for (i, d) in sizes.iter().enumerate() {
            m.sent([i as u8; 12], *d);
        }
        for (i, d) in sizes.iter().enumerate() {
            if *d <= 1372 && *d != 1352 {
                assert!(m.pong(t0, [i as u8; 12], *d));
            }
        }
        // Round 2 only retries sizes above the best (1372).
        let (sizes, done) = m.poll(t0 + ROUND_TIMEOUT, oh, None);
        assert!(!done);
        assert_eq!(sizes, vec![1472, 1464, 1452, 1432, 1412, 1392]);
        let (sizes, _) = m.poll(t0 + ROUND_TIMEOUT * 2, oh, None);
        assert_eq!(sizes.len(), 6);
        assert_eq!(m.result(), None);
        let (sizes, done) = m.poll(t0 + ROUND_TIMEOUT * 3, oh, None);
        assert!(sizes.is_empty() && done);
        assert_eq!(
            m.result(),
            Some(PathMtu {
                outer: 1400,
                datagram: 1372,
                inner: 1340
            })
        );
        // Searched again after RECHECK.
        assert_eq!(m.timeout(), Some(t0 + ROUND_TIMEOUT * 3 + RECHECK));
    }

    #[test]
    fn answered_top_size_ends_search_and_wrong_size_pong_is_ignored() {
        let t0 = Instant::now();
        let oh = overhead(&a("[2001:db8::1]:1"), true);
        let mut m = MtuSearch::default();
        m.schedule(t0);
        let (sizes, _) = m.poll(t0, oh, None);
        m.sent([1; 12], sizes[0]);
        assert!(!m.pong(t0, [1; 12], sizes[0] - 1));
        assert!(!m.pong(t0, [2; 12], sizes[0]));
        assert!(m.pong(t0, [1; 12], sizes[0]));
        assert_eq!(m.result().map(|r| r.outer), Some(1500));
        assert_eq!(m.result().map(|r| r.inner), Some(1416));
    }

    #[test]
    fn nothing_answered_means_unknown() {
        let t0 = Instant::now();
        let mut m = MtuSearch::default();
        m.schedule(t0);
        let mut t = t0;
        for _ in 0..=ROUNDS {
            let (_, done) = m.poll(t, 28, None);
            if done {
                break;
            }
            t += ROUND_TIMEOUT;
        }
        assert_eq!(m.searches, 1);
        assert_eq!(m.result(), None);
    }
}
