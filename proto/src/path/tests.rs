//! Deterministic simulated-network tests of the path manager: two peers, NATs with
//! configurable mapping/filtering, a relay, loss, rebinding and dying paths, on a virtual
//! clock that jumps to the next wake-up (as quinn-proto's test `Pair` does).

use super::*;
use crate::probe::{classify, PacketKind};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

const DATA: &[u8] = &[4, 0, 0, 0, 0xda, 0x7a];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapKind {
    /// Endpoint-independent mapping (port preserved).
    Cone,
    /// A new port per destination, allocated sequentially.
    SymmetricSequential,
    /// A new random port per destination.
    SymmetricRandom,
}

struct Nat {
    ip: IpAddr,
    kind: MapKind,
    /// (destination) -> public port
    map: HashMap<SocketAddr, u16>,
    /// public port -> destinations it sent to (address+port-dependent filtering)
    sent_to: HashMap<u16, HashSet<SocketAddr>>,
    next_port: u16,
    local_port: u16,
    /// Endpoint-independent filtering (full cone) instead of address+port-dependent.
    full_cone: bool,
}

impl Nat {
    fn new(ip: [u8; 4], kind: MapKind, local_port: u16) -> Self {
        Nat {
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            kind,
            map: HashMap::new(),
            sent_to: HashMap::new(),
            next_port: 30000,
            local_port,
            full_cone: false,
        }
    }
    fn outbound(&mut self, dest: SocketAddr, rng: &mut u64) -> SocketAddr {
        let port = match self.kind {
            MapKind::Cone => self.local_port,
            MapKind::SymmetricSequential => match self.map.get(&dest) {
                Some(p) => *p,
                None => {
                    self.next_port += 1;
                    self.next_port
                }
            },
            MapKind::SymmetricRandom => match self.map.get(&dest) {
                Some(p) => *p,
                None => 1024 + (xorshift(rng) % 60000) as u16,
            },
        };
        self.map.insert(dest, port);
        self.sent_to.entry(port).or_default().insert(dest);
        SocketAddr::new(self.ip, port)
    }
    fn inbound_allowed(&self, port: u16, src: SocketAddr) -> bool {
        if self.full_cone {
            return self.sent_to.contains_key(&port);
        }
        self.sent_to.get(&port).is_some_and(|s| s.contains(&src))
    }
    fn rebind(&mut self) {
        self.map.clear();
        self.sent_to.clear();
        self.local_port = self.local_port.wrapping_add(1000);
        self.next_port += 500;
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

struct Node {
    path: PeerPath,
    local: SocketAddr,
    nat: Option<Nat>,
    relayed: SocketAddr,
    data_sent: u64,
    data_received: u64,
    changes: Vec<(Duration, PathKind, Option<PathAddr>)>,
}

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: [Node; 2],
    inflight: Vec<(Instant, usize, PathAddr, Vec<u8>)>,
    rng: u64,
    same_lan: bool,
    direct_dead: bool,
    relay_dead: bool,
    loss_percent: u64,
    one_way: Duration,
    relay_one_way: Duration,
    data_every: Option<Duration>,
    /// Only this node sends data (the other one only receives).
    data_only_from: Option<usize>,
    next_data: Instant,
}

const STUN: &str = "203.0.113.1:3478";

impl Sim {
    fn new(a_nat: Option<MapKind>, b_nat: Option<MapKind>, cfg: PathConfig) -> Self {
        let t0 = Instant::now();
        let keys = [[0xA1u8; 32], [0xB2u8; 32]];
        let mk = |i: usize, nat: Option<MapKind>| {
            let local: SocketAddr = if i == 0 {
                "192.168.1.10:51000".parse().unwrap()
            } else {
                "192.168.2.20:52000".parse().unwrap()
            };
            Node {
                path: PeerPath::new(
                    cfg.clone(),
                    keys[i],
                    keys[1 - i],
                    t0,
                    1_700_000_000_000,
                    42 + i as u64,
                ),
                local,
                nat: nat.map(|k| {
                    Nat::new(
                        if i == 0 {
                            [198, 51, 100, 1]
                        } else {
                            [198, 51, 100, 2]
                        },
                        k,
                        local.port(),
                    )
                }),
                relayed: if i == 0 {
                    "203.0.113.9:40000".parse().unwrap()
                } else {
                    "203.0.113.9:40001".parse().unwrap()
                },
                data_sent: 0,
                data_received: 0,
                changes: Vec::new(),
            }
        };
        Sim {
            t0,
            now: t0,
            nodes: [mk(0, a_nat), mk(1, b_nat)],
            inflight: Vec::new(),
            rng: 0x1234_5678_9abc_def1,
            same_lan: false,
            direct_dead: false,
            relay_dead: false,
            loss_percent: 0,
            one_way: Duration::from_millis(15),
            relay_one_way: Duration::from_millis(25),
            data_every: None,
            data_only_from: None,
            next_data: t0,
        }
    }

    /// Candidates of node i as it would gather them (host, srflx via STUN, relayed).
    fn candidates(&mut self, i: usize) -> Vec<Candidate> {
        let n = &mut self.nodes[i];
        let srflx = match n.nat.as_mut() {
            Some(nat) => nat.outbound(STUN.parse().unwrap(), &mut self.rng),
            None => n.local,
        };
        vec![
            Candidate {
                kind: CandidateKind::Host,
                addr: n.local,
            },
            Candidate {
                kind: CandidateKind::Srflx,
                addr: srflx,
            },
            Candidate {
                kind: CandidateKind::Relayed,
                addr: n.relayed,
            },
        ]
    }

    fn start(&mut self) {
        let secret = [9u8; 32];
        let start = self.now + Duration::from_millis(50);
        let ca = self.candidates(0);
        let cb = self.candidates(1);
        let now = self.now;
        self.nodes[0].path.start_session(now, &secret, start, cb);
        self.nodes[1].path.start_session(now, &secret, start, ca);
    }

    fn lose(&mut self) -> bool {
        self.loss_percent > 0 && xorshift(&mut self.rng) % 100 < self.loss_percent
    }

    /// Relay model (RFC 8656): a datagram sent straight to a node's relayed address is handed
    /// to that node by its relay as coming from the sender's mapping (`Via::Relay`); a
    /// datagram a node sends through its own allocation leaves from its relayed address.
    fn send(&mut self, from: usize, dest: PathAddr, bytes: Vec<u8>) {
        let to = 1 - from;
        match dest.via {
            Via::Relay => {
                if self.relay_dead {
                    return;
                }
                let src = self.nodes[from].relayed;
                let ok = match &self.nodes[to].nat {
                    Some(nat) => {
                        dest.addr.ip() == nat.ip && nat.inbound_allowed(dest.addr.port(), src)
                    }
                    None => dest.addr == self.nodes[to].local,
                };
                if ok {
                    let at = self.now + self.relay_one_way;
                    self.inflight.push((at, to, PathAddr::direct(src), bytes));
                }
            }
            Via::Direct if dest.addr == self.nodes[to].relayed => {
                if self.relay_dead {
                    return;
                }
                let src = match self.nodes[from].nat.as_mut() {
                    Some(nat) => nat.outbound(dest.addr, &mut self.rng),
                    None => self.nodes[from].local,
                };
                let at = self.now + self.relay_one_way;
                self.inflight.push((at, to, PathAddr::relay(src), bytes));
            }
            Via::Direct => {
                if self.direct_dead || self.lose() {
                    return;
                }
                // LAN: straight to the other host address.
                if dest.addr == self.nodes[to].local {
                    if self.same_lan {
                        let src = PathAddr::direct(self.nodes[from].local);
                        let at = self.now + Duration::from_millis(1);
                        self.inflight.push((at, to, src, bytes));
                    }
                    return;
                }
                let src = match self.nodes[from].nat.as_mut() {
                    Some(nat) => nat.outbound(dest.addr, &mut self.rng),
                    None => self.nodes[from].local,
                };
                let ok = match &self.nodes[to].nat {
                    Some(nat) => {
                        dest.addr.ip() == nat.ip && nat.inbound_allowed(dest.addr.port(), src)
                    }
                    None => dest.addr == self.nodes[to].local,
                };
                if ok {
                    let at = self.now + self.one_way;
                    self.inflight.push((at, to, PathAddr::direct(src), bytes));
                }
            }
        }
    }

    fn drain(&mut self) {
        for i in 0..2 {
            while let Some(t) = self.nodes[i].path.poll_transmit() {
                self.send(i, t.dest, t.payload);
            }
            while let Some(e) = self.nodes[i].path.poll_event() {
                if let PathEvent::PathChanged { kind, remote, .. } = e {
                    let at = self.now - self.t0;
                    self.nodes[i].changes.push((at, kind, remote));
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        for _ in 0..2_000_000 {
            self.drain();
            let mut next = until;
            for (t, ..) in &self.inflight {
                next = next.min(*t);
            }
            for n in &self.nodes {
                if let Some(t) = n.path.poll_timeout() {
                    next = next.min(t);
                }
            }
            if self.data_every.is_some() {
                next = next.min(self.next_data);
            }
            if next >= until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            let (due, rest): (Vec<_>, Vec<_>) =
                self.inflight.drain(..).partition(|(t, ..)| *t <= now);
            self.inflight = rest;
            for (_, to, from, bytes) in due {
                match classify(&bytes) {
                    PacketKind::Probe => {
                        let _ = self.nodes[to].path.handle_probe(now, from, &bytes);
                    }
                    PacketKind::WireGuard if self.nodes[to].path.knows(&from) => {
                        self.nodes[to].data_received += 1;
                        self.nodes[to].path.on_data_received(now, &from);
                    }
                    _ => {}
                }
            }
            for n in &mut self.nodes {
                if n.path.poll_timeout().is_some_and(|t| t <= now) {
                    n.path.handle_timeout(now);
                }
            }
            if let Some(every) = self.data_every {
                if self.next_data <= now {
                    self.next_data = now + every;
                    for i in 0..2 {
                        if self.data_only_from.is_some_and(|only| only != i) {
                            continue;
                        }
                        self.nodes[i].path.on_data_sent(now);
                        if let Some(dest) = self.nodes[i].path.route() {
                            self.nodes[i].data_sent += 1;
                            self.send(i, dest, DATA.to_vec());
                        }
                    }
                }
            }
        }
        panic!("simulation did not converge");
    }

    fn kind(&self, i: usize) -> PathKind {
        self.nodes[i].path.status().kind
    }

    /// Time (since t0) of the first change of node i to `kind` at or after `after`.
    fn changed_to(&self, i: usize, kind: PathKind, after: Duration) -> Option<Duration> {
        self.nodes[i]
            .changes
            .iter()
            .find(|(t, k, _)| *k == kind && *t >= after)
            .map(|(t, ..)| *t)
    }
}

#[test]
fn cone_nats_punch_a_direct_path_quickly() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.start();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    let t = sim.changed_to(0, PathKind::Direct, Duration::ZERO).unwrap();
    assert!(t < Duration::from_millis(600), "direct after {t:?}");
    // Never went through the relay on the way.
    assert!(sim.changed_to(0, PathKind::Relay, Duration::ZERO).is_none());
    let st = sim.nodes[0].path.status();
    assert_eq!(st.remote.unwrap().addr.ip().to_string(), "198.51.100.2");
    assert!(st.rtt.unwrap() >= Duration::from_millis(30));
}

#[test]
fn peers_on_one_lan_prefer_the_lan_path() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.same_lan = true;
    sim.start();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::Lan);
    assert_eq!(sim.kind(1), PathKind::Lan);
    assert_eq!(
        sim.nodes[0].path.route(),
        Some(PathAddr::direct(sim.nodes[1].local))
    );
}

#[test]
fn blocked_direct_uses_relay_after_a_second_then_moves_back_to_direct() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.direct_dead = true;
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.kind(0), PathKind::Relay);
    assert_eq!(sim.kind(1), PathKind::Relay);
    let t = sim.changed_to(0, PathKind::Relay, Duration::ZERO).unwrap();
    assert!(
        t >= Duration::from_millis(1000) && t <= Duration::from_millis(1200),
        "relay after {t:?}"
    );
    // The network heals: direct attempts continue with backoff and win.
    sim.direct_dead = false;
    let healed = sim.now - sim.t0;
    sim.run_for(Duration::from_secs(12));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    let back = sim.changed_to(0, PathKind::Direct, healed).unwrap();
    assert!(back - healed <= PathConfig::default().backoff_max + Duration::from_secs(1));
    assert!(sim.nodes[1].data_received > 100);
}

#[test]
fn dead_direct_path_fails_over_to_relay_within_a_second() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(50));
    sim.start();
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.kind(0), PathKind::Direct);
    sim.direct_dead = true;
    let died = sim.now - sim.t0;
    sim.run_for(Duration::from_secs(3));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay);
        let t = sim.changed_to(i, PathKind::Relay, died).unwrap();
        assert!(
            t - died <= Duration::from_secs(1),
            "failover took {:?}",
            t - died
        );
    }
}

#[test]
fn both_paths_dead_reports_none_and_recovers() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    sim.direct_dead = true;
    sim.relay_dead = true;
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::None);
    assert!(sim.nodes[0]
        .path
        .status()
        .reason
        .contains("no working path"));
    sim.direct_dead = false;
    sim.relay_dead = false;
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.kind(0), PathKind::Direct);
}

#[test]
fn nat_rebinding_behind_full_cone_peer_moves_to_the_new_address() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.nodes[0].nat.as_mut().unwrap().full_cone = true;
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    let old = sim.nodes[0].path.route().unwrap();
    sim.nodes[1].nat.as_mut().unwrap().rebind();
    sim.run_for(Duration::from_secs(5));
    // B's pings from its new mapping reach A, which learns the peer-reflexive address.
    assert_eq!(sim.kind(0), PathKind::Direct);
    let new = sim.nodes[0].path.route().unwrap();
    assert_ne!(old, new);
    assert_eq!(new.addr.port(), old.addr.port().wrapping_add(1000));
}

#[test]
fn nat_rebinding_with_resignaled_candidates_returns_to_direct() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    sim.nodes[1].nat.as_mut().unwrap().rebind();
    sim.run_for(Duration::from_secs(2));
    // Port-restricted on both sides: the old path dies and the relay takes over ...
    assert_eq!(sim.kind(0), PathKind::Relay);
    // ... until B notices its new observed address and re-signals its candidates.
    let now = sim.now;
    let cb = sim.candidates(1);
    sim.nodes[1].path.local_addresses_changed(now);
    sim.nodes[0].path.set_remote_candidates(now, cb);
    sim.nodes[0].path.local_addresses_changed(now);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
}

#[test]
fn sequential_symmetric_nat_is_punched_with_predicted_ports() {
    let mut sim = Sim::new(
        Some(MapKind::SymmetricSequential),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.start();
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
}

#[test]
fn random_symmetric_nats_fall_back_to_relay() {
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::SymmetricRandom),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.kind(0), PathKind::Relay);
    assert_eq!(sim.kind(1), PathKind::Relay);
    assert!(sim.nodes[0].data_received > 50);
}

#[test]
fn lossy_network_keeps_delivering() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.loss_percent = 10;
    sim.data_every = Some(Duration::from_millis(20));
    sim.start();
    sim.run_for(Duration::from_secs(30));
    let sent = sim.nodes[0].data_sent;
    let got = sim.nodes[1].data_received;
    assert!(sent > 1000);
    assert!(got * 100 >= sent * 80, "{got}/{sent}");
    assert_ne!(sim.kind(0), PathKind::None);
}

#[test]
fn new_session_keeps_the_working_path() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    let n = sim.nodes[0].changes.len();
    let secret = [10u8; 32];
    let now = sim.now;
    let ca = sim.candidates(0);
    let cb = sim.candidates(1);
    sim.nodes[0]
        .path
        .start_session(now, &secret, now + Duration::from_millis(30), cb);
    sim.run_for(Duration::from_millis(5));
    sim.nodes[1]
        .path
        .start_session(sim.now, &secret, now + Duration::from_millis(30), ca);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.nodes[0].changes.len(), n, "{:?}", sim.nodes[0].changes);
}

#[test]
fn operator_block_direct_forces_relay_and_unblock_returns() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::Direct);
    let now = sim.now;
    sim.nodes[0].path.set_direct_blocked(now, true);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(0), PathKind::Relay);
    assert_eq!(sim.kind(1), PathKind::Relay);
    let now = sim.now;
    sim.nodes[0].path.set_direct_blocked(now, false);
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
}

#[test]
fn replayed_and_forged_probes_are_refused_and_counted() {
    let t0 = Instant::now();
    let mut a = PeerPath::new(PathConfig::default(), [1; 32], [2; 32], t0, 1_000_000, 1);
    let mut b = PeerPath::new(PathConfig::default(), [2; 32], [1; 32], t0, 1_000_000, 2);
    let cand = |p| {
        vec![Candidate {
            kind: CandidateKind::Host,
            addr: SocketAddr::from(([127, 0, 0, 1], p)),
        }]
    };
    a.start_session(t0, &[5; 32], t0, cand(2));
    b.start_session(t0, &[5; 32], t0, cand(1));
    a.handle_timeout(t0);
    let ping = a.poll_transmit().unwrap();
    let from = PathAddr::direct(SocketAddr::from(([127, 0, 0, 1], 1)));
    assert!(b.handle_probe(t0, from, &ping.payload).is_ok());
    assert!(matches!(
        b.handle_probe(t0, from, &ping.payload),
        Err(ProbeError::Replayed(_))
    ));
    let mut forged = ping.payload.clone();
    forged[20] ^= 0x55;
    assert!(b.handle_probe(t0, from, &forged).is_err());
    let c = b.counters();
    assert_eq!((c.accepted, c.replayed, c.unauthenticated), (1, 1, 1));
    // A probe reflected back to its sender fails too.
    assert!(a.handle_probe(t0, from, &ping.payload).is_err());
}

#[test]
fn receiving_side_follows_the_sender_to_the_relay_quickly() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(50));
    sim.data_only_from = Some(0);
    sim.start();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.kind(1), PathKind::Direct);
    // B only receives, so it is idle (keepalive every 25 s) when the direct path dies.
    sim.run_for(Duration::from_secs(10));
    sim.direct_dead = true;
    let died = sim.now - sim.t0;
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.kind(0), PathKind::Relay);
    assert_eq!(sim.kind(1), PathKind::Relay);
    let t = sim.changed_to(1, PathKind::Relay, died).unwrap();
    assert!(
        t - died <= Duration::from_secs(3),
        "receiver followed after {:?}",
        t - died
    );
}

#[test]
fn a_slow_direct_path_is_kept_over_a_fast_relay() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    // Direct RTT 800 ms (beyond the 600 ms pong timeout), relay RTT 20 ms: the relay never
    // takes over from a working direct path.
    sim.one_way = Duration::from_millis(400);
    sim.relay_one_way = Duration::from_millis(10);
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.kind(1), PathKind::Direct);
    assert!(
        sim.changed_to(0, PathKind::Relay, Duration::ZERO).is_none(),
        "{:?}",
        sim.nodes[0].changes
    );
}
