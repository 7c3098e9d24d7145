//! NAT binding-lifetime discovery (RFC 5780 §4.6) as a sans-IO state machine: how long the NAT
//! in front of us keeps an idle UDP mapping, so keepalives can be sent just often enough.
//!
//! Asking "is my mapping still the same?" from the socket that owns it does not work on the
//! most common NAT: a port-preserving one (Linux `masquerade`, most home routers) re-creates an
//! expired mapping with the same public port, so the answer never changes. RFC 5780 §4.6 uses
//! two kinds of sockets instead, and so does [`LifetimeProbe`]:
//!
//! * one **probe** socket `X` per idle period to test (the schedule, e.g. 15, 30, 60, 120 s).
//!   Each sends one Binding request to the server and learns its mapped address; then it stays
//!   silent.
//! * one **tester** socket `Y`. When probe `X` has been idle for its period, `Y` sends a
//!   Binding request with RESPONSE-PORT = `X`'s mapped port (RFC 5780 §7.5). The server answers
//!   to `Y`'s public IP on that port: the answer reaches `X` only while `X`'s mapping (and the
//!   filter entry for the server) still exists.
//!
//! All probes start together, so the whole search takes about the longest period tested, and
//! it stops at the first period whose answer does not come back (every longer period would
//! expire too). The cost is one request per probe plus a few per check: no spam.
//!
//! Socket indexes: `0` is the tester, `1..=n` the probes in schedule order. The driver binds
//! `1 + steps` UDP sockets, sends each [`Transmit`] from the socket it names, feeds every
//! datagram received on socket `i` to [`LifetimeProbe::handle`], and arms a timer for
//! [`LifetimeProbe::poll_timeout`] (as every state machine in this crate: drain transmits after
//! each input). [`LifetimeProbe::outcome`] is set when the search is over.
//!
//! The server must support RFC 5780 (it has an alternate address: its answers carry
//! OTHER-ADDRESS); one that does not ends the search with [`Outcome::Unsupported`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::nat::BindingLifetime;
use crate::stun::{binding_request, binding_request_with_response_port, parse_binding_response};

/// The default idle periods tested by the daemon (seconds): bounded (the search ends after
/// about two minutes at most) and matching the NAT timeouts seen in practice (Linux defaults
/// to 30 s for UDP without a stream, 120–180 s with one; RFC 4787 REQ-5 asks for ≥ 120 s).
pub const DEFAULT_STEPS_S: [u64; 4] = [15, 30, 60, 120];

/// Retransmission interval of the probes' first request and of the tester's requests.
pub const RTX_INTERVAL: Duration = Duration::from_millis(500);

/// How many times one request is sent before it counts as unanswered.
pub const MAX_TRIES: u32 = 4;

/// How long a check waits for the answer on the probe socket before the mapping counts as
/// expired (covers [`MAX_TRIES`] sends [`RTX_INTERVAL`] apart plus a round trip).
pub const CHECK_WAIT: Duration = Duration::from_millis(2500);

/// A datagram the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Socket to send from: `0` tester, `1..=n` probes.
    pub socket: usize,
    /// Destination (the STUN server).
    pub dest: SocketAddr,
    /// The Binding request.
    pub payload: Vec<u8>,
}

/// How the search ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The lifetime is within these bounds.
    Measured(BindingLifetime),
    /// This server (or this NAT) cannot be used for the test: no RFC 5780, RESPONSE-PORT
    /// refused, or the tester left from another public IP than the probes.
    Unsupported(String),
    /// The server did not answer.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeState {
    /// First request sent `tries` times, last at `sent`.
    Setup { sent: Instant, tries: u32 },
    /// Mapped to `mapped`; silent since `since` (the answer's arrival).
    Idle { since: Instant, mapped: SocketAddr },
    /// The tester asked the server to answer to `mapped`'s port.
    Checking {
        mapped: SocketAddr,
        tx: [u8; 12],
        started: Instant,
        sent: Instant,
        tries: u32,
    },
    /// The answer arrived: the mapping survived the period.
    Alive,
    /// No answer: the mapping expired within the period.
    Expired,
    /// Not needed any more (a shorter period expired) or its setup got no answer.
    Abandoned,
}

#[derive(Debug, Clone)]
struct Probe {
    step: Duration,
    tx: [u8; 12],
    state: ProbeState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TesterState {
    Setup { sent: Instant, tries: u32 },
    Ready { mapped: SocketAddr },
    Failed,
}

/// The binding-lifetime search. See the module docs for the method and the call order.
#[derive(Debug, Clone)]
pub struct LifetimeProbe {
    server: SocketAddr,
    probes: Vec<Probe>,
    tester: TesterState,
    tester_tx: [u8; 12],
    transmits: std::collections::VecDeque<Transmit>,
    outcome: Option<Outcome>,
    rng: u64,
}

impl LifetimeProbe {
    /// Starts a search against the STUN `server` for the idle periods `steps` (sorted and
    /// de-duplicated here; zero periods are ignored). `seed` feeds transaction ids.
    pub fn new(now: Instant, server: SocketAddr, steps: &[Duration], seed: u64) -> Self {
        let mut steps: Vec<Duration> = steps.iter().copied().filter(|s| !s.is_zero()).collect();
        steps.sort();
        steps.dedup();
        let mut me = LifetimeProbe {
            server,
            probes: Vec::new(),
            tester: TesterState::Setup {
                sent: now,
                tries: 1,
            },
            tester_tx: [0; 12],
            transmits: std::collections::VecDeque::new(),
            outcome: None,
            rng: seed | 1,
        };
        if steps.is_empty() {
            me.outcome = Some(Outcome::Measured(BindingLifetime {
                at_least_s: 0,
                at_most_s: None,
            }));
            return me;
        }
        me.tester_tx = me.new_tx();
        me.send(0, binding_request(me.tester_tx, false, false));
        for (i, step) in steps.into_iter().enumerate() {
            let tx = me.new_tx();
            me.send(i + 1, binding_request(tx, false, false));
            me.probes.push(Probe {
                step,
                tx,
                state: ProbeState::Setup {
                    sent: now,
                    tries: 1,
                },
            });
        }
        me
    }

    /// Number of sockets the driver needs (tester + one per period).
    pub fn sockets(&self) -> usize {
        1 + self.probes.len()
    }

    fn new_tx(&mut self) -> [u8; 12] {
        let mut t = [0u8; 12];
        for chunk in t.chunks_mut(4) {
            let v = (crate::rng::xorshift64star(&mut self.rng) >> 32) as u32;
            chunk.copy_from_slice(&v.to_be_bytes());
        }
        t
    }

    fn send(&mut self, socket: usize, payload: Vec<u8>) {
        self.transmits.push_back(Transmit {
            socket,
            dest: self.server,
            payload,
        });
    }

    /// Feeds a datagram that arrived on `socket` from `from`. Anything that is not the answer
    /// to one of our requests is ignored.
    pub fn handle(&mut self, now: Instant, socket: usize, from: SocketAddr, bytes: &[u8]) {
        let _ = from;
        if self.outcome.is_some() {
            return;
        }
        let Ok(r) = parse_binding_response(bytes) else {
            return;
        };
        if socket == 0 {
            if r.transaction_id == self.tester_tx {
                if let TesterState::Setup { .. } = self.tester {
                    match (r.error_code, r.mapped, r.other_address) {
                        (None, Some(mapped), Some(_)) => {
                            self.tester = TesterState::Ready { mapped };
                        }
                        (None, Some(_), None) => {
                            self.finish(Outcome::Unsupported(
                                "the STUN server has no alternate address (RFC 5780), so no \
                                 RESPONSE-PORT"
                                    .into(),
                            ));
                        }
                        _ => {
                            self.finish(Outcome::Unsupported(format!(
                                "the STUN server refused a Binding request (error {:?})",
                                r.error_code
                            )));
                        }
                    }
                }
                return;
            }
            // An error answer to a check comes back to the tester (the source), not the probe.
            let is_check = self.probes.iter().any(
                |p| matches!(p.state, ProbeState::Checking { tx, .. } if tx == r.transaction_id),
            );
            if is_check && r.error_code.is_some() {
                self.finish(Outcome::Unsupported(format!(
                    "the STUN server refused RESPONSE-PORT (error {:?})",
                    r.error_code
                )));
            }
            return;
        }
        let Some(p) = self.probes.get_mut(socket - 1) else {
            return;
        };
        match p.state {
            ProbeState::Setup { .. } if r.transaction_id == p.tx => {
                if let (None, Some(mapped)) = (r.error_code, r.mapped) {
                    p.state = ProbeState::Idle { since: now, mapped };
                }
            }
            ProbeState::Checking { tx, .. } if tx == r.transaction_id && r.error_code.is_none() => {
                p.state = ProbeState::Alive;
                self.evaluate();
            }
            _ => {}
        }
    }

    /// Advances timers: retransmits, starts due checks, expires unanswered ones.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        if let TesterState::Setup { sent, tries } = self.tester {
            if now >= sent + RTX_INTERVAL {
                if tries >= MAX_TRIES {
                    self.tester = TesterState::Failed;
                } else {
                    self.tester = TesterState::Setup {
                        sent: now,
                        tries: tries + 1,
                    };
                    self.send(0, binding_request(self.tester_tx, false, false));
                }
            }
        }
        if self.tester == TesterState::Failed {
            self.finish(Outcome::Failed(format!(
                "no answer from STUN server {}",
                self.server
            )));
            return;
        }
        let tester_ip = match self.tester {
            TesterState::Ready { mapped } => Some(mapped.ip()),
            _ => None,
        };
        for i in 0..self.probes.len() {
            let p = self.probes[i].clone();
            match p.state {
                ProbeState::Setup { sent, tries } if now >= sent + RTX_INTERVAL => {
                    if tries >= MAX_TRIES {
                        self.probes[i].state = ProbeState::Abandoned;
                    } else {
                        self.probes[i].state = ProbeState::Setup {
                            sent: now,
                            tries: tries + 1,
                        };
                        self.send(i + 1, binding_request(p.tx, false, false));
                    }
                }
                ProbeState::Idle { since, mapped } if now >= since + p.step => {
                    let Some(ip) = tester_ip else { continue };
                    if ip != mapped.ip() {
                        self.finish(Outcome::Unsupported(format!(
                            "the NAT maps sockets to different public IPs ({ip} and {})",
                            mapped.ip()
                        )));
                        return;
                    }
                    let tx = self.new_tx();
                    self.probes[i].state = ProbeState::Checking {
                        mapped,
                        tx,
                        started: now,
                        sent: now,
                        tries: 1,
                    };
                    self.send(0, binding_request_with_response_port(tx, mapped.port()));
                }
                ProbeState::Checking {
                    mapped,
                    tx,
                    started,
                    sent,
                    tries,
                } => {
                    if now >= started + CHECK_WAIT {
                        self.probes[i].state = ProbeState::Expired;
                    } else if now >= sent + RTX_INTERVAL && tries < MAX_TRIES {
                        self.probes[i].state = ProbeState::Checking {
                            mapped,
                            tx,
                            started,
                            sent: now,
                            tries: tries + 1,
                        };
                        self.send(0, binding_request_with_response_port(tx, mapped.port()));
                    }
                }
                _ => {}
            }
        }
        self.evaluate();
    }

    /// Decides when enough is known: the shortest expired period and every shorter one
    /// resolved, or every period resolved.
    fn evaluate(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let first_expired = self
            .probes
            .iter()
            .position(|p| p.state == ProbeState::Expired);
        let end = first_expired.unwrap_or(self.probes.len());
        let shorter_resolved = self.probes[..end]
            .iter()
            .all(|p| matches!(p.state, ProbeState::Alive | ProbeState::Abandoned));
        if !shorter_resolved {
            return;
        }
        if self.probes.iter().all(|p| p.state == ProbeState::Abandoned) {
            self.finish(Outcome::Failed(format!(
                "no answer from STUN server {} to the probe sockets",
                self.server
            )));
            return;
        }
        let at_least = self.probes[..end]
            .iter()
            .filter(|p| p.state == ProbeState::Alive)
            .map(|p| p.step.as_secs())
            .max()
            .unwrap_or(0);
        let at_most = first_expired
            .and_then(|i| self.probes.get(i))
            .map(|p| p.step.as_secs());
        for p in &mut self.probes[end..] {
            if p.state != ProbeState::Expired {
                p.state = ProbeState::Abandoned;
            }
        }
        self.finish(Outcome::Measured(BindingLifetime {
            at_least_s: at_least,
            at_most_s: at_most,
        }));
    }

    fn finish(&mut self, o: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some(o);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next (`None` when done).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut take = |x: Instant| t = Some(t.map_or(x, |t: Instant| t.min(x)));
        if let TesterState::Setup { sent, .. } = self.tester {
            take(sent + RTX_INTERVAL);
        }
        for p in &self.probes {
            match p.state {
                ProbeState::Setup { sent, .. } => take(sent + RTX_INTERVAL),
                ProbeState::Idle { since, .. } => take(since + p.step),
                ProbeState::Checking {
                    started,
                    sent,
                    tries,
                    ..
                } => {
                    take(started + CHECK_WAIT);
                    if tries < MAX_TRIES {
                        take(sent + RTX_INTERVAL);
                    }
                }
                _ => {}
            }
        }
        t
    }

    /// How the search ended (`None` while it runs).
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Whether the search is over.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::BindingServer;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    const PRIMARY: &str = "203.0.113.10:3478";
    const ALT: &str = "203.0.113.11:3479";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    /// A port-preserving NAT (like Linux `masquerade`) whose mappings expire after `timeout`
    /// without traffic in either direction; an expired mapping is re-created with the SAME
    /// port, which is why asking from the owning socket cannot see the expiry.
    struct Nat {
        public: IpAddr,
        timeout: Duration,
        /// (public port, remote) -> last activity
        entries: HashMap<(u16, SocketAddr), Instant>,
    }

    impl Nat {
        fn out(&mut self, now: Instant, local_port: u16, dest: SocketAddr) -> SocketAddr {
            self.entries.insert((local_port, dest), now);
            SocketAddr::new(self.public, local_port)
        }
        fn inbound(&mut self, now: Instant, to_port: u16, from: SocketAddr) -> bool {
            match self.entries.get_mut(&(to_port, from)) {
                Some(t) if now.saturating_duration_since(*t) < self.timeout => {
                    *t = now;
                    true
                }
                _ => false,
            }
        }
    }

    fn server(rfc5780: bool) -> BindingServer {
        if rfc5780 {
            BindingServer::new(
                "test",
                [
                    Some(sa(PRIMARY)),
                    Some(sa("203.0.113.10:3479")),
                    Some(sa("203.0.113.11:3478")),
                    Some(sa(ALT)),
                ],
            )
        } else {
            BindingServer::new("test", [Some(sa(PRIMARY)), None, None, None])
        }
    }

    /// Drives a search to its end on a virtual clock that jumps to the next wake-up. Socket
    /// `i` has local port `40000 + i`. Returns the outcome and the virtual time it took.
    fn run(nat_timeout: Duration, steps: &[u64], rfc5780: bool) -> (Outcome, Duration, usize) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut nat = Nat {
            public: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
            timeout: nat_timeout,
            entries: HashMap::new(),
        };
        let srv = server(rfc5780);
        let steps: Vec<Duration> = steps.iter().map(|s| Duration::from_secs(*s)).collect();
        let mut m = LifetimeProbe::new(now, sa(PRIMARY), &steps, 7);
        let mut sent = 0usize;
        for _ in 0..10_000 {
            while let Some(t) = m.poll_transmit() {
                sent += 1;
                let port = 40000 + t.socket as u16;
                let src = nat.out(now, port, t.dest);
                let Some(reply) = srv.handle(0, src, &t.payload) else {
                    continue;
                };
                let origin = sa(PRIMARY);
                if nat.inbound(now, reply.to.port(), origin) {
                    let sock = usize::from(reply.to.port() - 40000);
                    m.handle(now, sock, origin, &reply.bytes);
                }
            }
            if m.is_done() {
                break;
            }
            let Some(next) = m.poll_timeout() else { break };
            now = next.max(now);
            m.handle_timeout(now);
        }
        let o = m
            .outcome()
            .cloned()
            .unwrap_or(Outcome::Failed("not done".into()));
        (o, now - t0, sent)
    }

    #[test]
    fn port_preserving_nat_lifetime_is_bracketed() {
        let (o, took, sent) = run(Duration::from_secs(40), &[15, 30, 60, 120], true);
        assert_eq!(
            o,
            Outcome::Measured(BindingLifetime {
                at_least_s: 30,
                at_most_s: Some(60)
            })
        );
        // Stops at the first expiry: the 120 s probe is never checked.
        assert!(took < Duration::from_secs(70), "{took:?}");
        // Cheap: 5 setup requests + 2 checks + 3 retransmits of the failed check.
        assert!(sent <= 12, "{sent} datagrams");
        assert_eq!(
            crate::nat::keepalive_interval(Some(BindingLifetime {
                at_least_s: 30,
                at_most_s: Some(60)
            })),
            crate::nat::DEFAULT_KEEPALIVE
        );
    }

    #[test]
    fn short_lifetime_with_a_test_schedule() {
        let (o, took, _) = run(Duration::from_secs(10), &[3, 6, 9, 12, 15], true);
        let Outcome::Measured(l) = o else {
            panic!("{o:?}")
        };
        assert_eq!((l.at_least_s, l.at_most_s), (9, Some(12)));
        assert!(took < Duration::from_secs(16), "{took:?}");
        let k = crate::nat::keepalive_interval(Some(l));
        assert!(k < Duration::from_secs(9), "{k:?}");
    }

    #[test]
    fn lifetime_longer_than_every_period() {
        let (o, _, _) = run(Duration::from_secs(600), &[15, 30], true);
        assert_eq!(
            o,
            Outcome::Measured(BindingLifetime {
                at_least_s: 30,
                at_most_s: None
            })
        );
    }

    #[test]
    fn shortest_period_already_expired() {
        let (o, _, _) = run(Duration::from_secs(5), &[15, 30, 60], true);
        assert_eq!(
            o,
            Outcome::Measured(BindingLifetime {
                at_least_s: 0,
                at_most_s: Some(15)
            })
        );
    }

    #[test]
    fn server_without_rfc5780_is_unsupported() {
        let (o, took, _) = run(Duration::from_secs(30), &[15, 30], false);
        assert!(matches!(o, Outcome::Unsupported(_)), "{o:?}");
        assert!(took < Duration::from_secs(1));
    }

    #[test]
    fn silent_server_fails_after_retries() {
        let now = Instant::now();
        let mut m = LifetimeProbe::new(now, sa(PRIMARY), &[Duration::from_secs(15)], 1);
        let mut t = now;
        let mut sends = 0;
        while let Some(next) = m.poll_timeout() {
            while m.poll_transmit().is_some() {
                sends += 1;
            }
            t = next;
            m.handle_timeout(t);
        }
        assert!(matches!(m.outcome(), Some(Outcome::Failed(_))));
        assert!(t - now <= Duration::from_secs(3));
        assert!(sends <= 2 * MAX_TRIES as usize);
    }

    /// The measured interval reaches paths that are already idle: a pair whose next
    /// keepalive is 25 s away is pinged within the new, shorter interval.
    #[test]
    fn shorter_keepalive_reschedules_idle_pairs() {
        use crate::path::{Candidate, CandidateKind, PathAddr, PathConfig, PeerPath};
        let t0 = Instant::now();
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let (aa, ab) = (sa("192.0.2.1:4000"), sa("192.0.2.2:4000"));
        let secret = [9u8; 32];
        let mut a = PeerPath::new(PathConfig::default(), ka, kb, t0, 1_700_000_000_000, 1);
        let mut b = PeerPath::new(PathConfig::default(), kb, ka, t0, 1_700_000_000_000, 2);
        let host = |addr| Candidate {
            kind: CandidateKind::Host,
            addr,
        };
        a.start_session(t0, &secret, t0, vec![host(ab)]);
        b.start_session(t0, &secret, t0, vec![host(aa)]);
        let mut now = t0;
        for _ in 0..50 {
            a.handle_timeout(now);
            b.handle_timeout(now);
            for _ in 0..4 {
                while let Some(t) = a.poll_transmit() {
                    let _ = b.handle_probe(now, PathAddr::direct(aa), &t.payload);
                }
                while let Some(t) = b.poll_transmit() {
                    let _ = a.handle_probe(now, PathAddr::direct(ab), &t.payload);
                }
            }
            if a.route().is_some() && b.route().is_some() {
                break;
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(a.route(), Some(PathAddr::direct(ab)));
        // Idle (no data for 9 s): the valid pair waits for its next default keepalive.
        for _ in 0..3 {
            now += Duration::from_secs(3);
            a.handle_timeout(now);
            b.handle_timeout(now);
            while let Some(t) = a.poll_transmit() {
                let _ = b.handle_probe(now, PathAddr::direct(aa), &t.payload);
            }
            while let Some(t) = b.poll_transmit() {
                let _ = a.handle_probe(now, PathAddr::direct(ab), &t.payload);
            }
        }
        let next = a.poll_timeout().unwrap_or(now);
        assert!(next >= now + Duration::from_secs(15), "{:?}", next - now);
        a.set_keepalive_interval(now, Duration::from_secs(5));
        assert_eq!(a.keepalive_interval(), Duration::from_secs(5));
        let next = a.poll_timeout().unwrap_or(now);
        assert!(next <= now + Duration::from_secs(5), "{:?}", next - now);
    }

    #[test]
    fn garbage_is_ignored() {
        let now = Instant::now();
        let mut m = LifetimeProbe::new(now, sa(PRIMARY), &[Duration::from_secs(15)], 1);
        for n in 0..64usize {
            let mut b = vec![0x01, 0x01, 0, 44, 0x21, 0x12, 0xA4, 0x42];
            b.resize(20 + n, 0xFF);
            m.handle(now, n % 3, sa(PRIMARY), &b);
        }
        assert!(!m.is_done());
        assert_eq!(m.sockets(), 2);
    }
}
