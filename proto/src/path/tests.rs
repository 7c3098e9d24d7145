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
    /// (local socket, destination) -> public port
    map: HashMap<(LocalSocket, SocketAddr), u16>,
    /// public port -> the local socket behind it and the destinations it sent to
    /// (address+port-dependent filtering)
    sent_to: HashMap<u16, (LocalSocket, HashSet<SocketAddr>)>,
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
    fn outbound(&mut self, local: LocalSocket, dest: SocketAddr, rng: &mut u64) -> SocketAddr {
        let port = match self.kind {
            // Port preserving; every pool socket has its own local port.
            MapKind::Cone => self.local_port.wrapping_add(local),
            MapKind::SymmetricSequential => match self.map.get(&(local, dest)) {
                Some(p) => *p,
                None => {
                    self.next_port += 1;
                    self.next_port
                }
            },
            MapKind::SymmetricRandom => match self.map.get(&(local, dest)) {
                Some(p) => *p,
                None => 1024 + (xorshift(rng) % 64000) as u16,
            },
        };
        self.map.insert((local, dest), port);
        self.sent_to
            .entry(port)
            .or_insert_with(|| (local, HashSet::new()))
            .1
            .insert(dest);
        SocketAddr::new(self.ip, port)
    }
    /// The local socket an inbound datagram to public `port` from `src` reaches, if any.
    fn inbound(&self, port: u16, src: SocketAddr) -> Option<LocalSocket> {
        let (local, sent) = self.sent_to.get(&port)?;
        (self.full_cone || sent.contains(&src)).then_some(*local)
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
    /// Pool sockets the node opens when its path asks (the daemon's cap).
    pool_cap: u16,
    /// How often the pool was opened.
    pool_opened: u32,
    /// Spray pings sent per 100 ms window (for pacing checks).
    spray_windows: Vec<u64>,
    nat: Option<Nat>,
    relayed: SocketAddr,
    data_sent: u64,
    data_received: u64,
    changes: Vec<(Duration, PathKind, Option<PathAddr>)>,
    /// Every [`PathEvent::MtuChanged`] with its time.
    mtu_events: Vec<(Duration, Option<u16>)>,
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
    /// Largest datagram a direct / relay path carries (bigger ones are dropped, as with DF).
    direct_max: usize,
    relay_max: usize,
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
                pool_cap: 256,
                pool_opened: 0,
                spray_windows: Vec::new(),
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
                mtu_events: Vec::new(),
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
            direct_max: usize::MAX,
            relay_max: usize::MAX,
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
            Some(nat) => nat.outbound(DATA_SOCKET, STUN.parse().unwrap(), &mut self.rng),
            None => n.local,
        };
        let hard = n.nat.as_ref().is_some_and(|n| n.kind != MapKind::Cone);
        let mut v = vec![
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
        ];
        if hard {
            v.push(Candidate {
                kind: CandidateKind::SrflxDependent,
                addr: srflx,
            });
        }
        v
    }

    /// What two STUN servers would tell node i about its mapping.
    fn mapping(&self, i: usize) -> MappingBehaviour {
        match self.nodes[i].nat.as_ref().map(|n| n.kind) {
            None | Some(MapKind::Cone) => MappingBehaviour::EndpointIndependent,
            Some(_) => MappingBehaviour::EndpointDependent,
        }
    }

    fn start(&mut self) {
        let secret = [9u8; 32];
        let start = self.now + Duration::from_millis(50);
        let ca = self.candidates(0);
        let cb = self.candidates(1);
        let now = self.now;
        for i in 0..2 {
            let m = self.mapping(i);
            self.nodes[i].path.set_local_mapping(m);
            // The rendezvous saw the other node from its public IP.
            let observed = self.public_ip(1 - i);
            self.nodes[i].path.set_peer_observed(Some(observed));
        }
        self.nodes[0].path.start_session(now, &secret, start, cb);
        self.nodes[1].path.start_session(now, &secret, start, ca);
    }

    /// The IP node i's datagrams leave the NAT with (what the rendezvous observes).
    fn public_ip(&self, i: usize) -> IpAddr {
        let n = &self.nodes[i];
        n.nat.as_ref().map_or(n.local.ip(), |nat| nat.ip)
    }

    fn lose(&mut self) -> bool {
        self.loss_percent > 0 && xorshift(&mut self.rng) % 100 < self.loss_percent
    }

    /// Relay model (RFC 8656): a datagram sent straight to a node's relayed address is handed
    /// to that node by its relay as coming from the sender's mapping (`Via::Relay`); a
    /// datagram a node sends through its own allocation leaves from its relayed address.
    /// `dest.local` is the sending socket; delivered datagrams carry the receiving socket.
    fn send(&mut self, from: usize, dest: PathAddr, bytes: Vec<u8>) {
        let to = 1 - from;
        let sock = dest.local;
        match dest.via {
            Via::Relay => {
                if self.relay_dead || bytes.len() > self.relay_max {
                    return;
                }
                let src = self.nodes[from].relayed;
                let rx = self.deliverable(to, dest.addr, src);
                if let Some(rx) = rx {
                    let at = self.now + self.relay_one_way;
                    let mut fromp = PathAddr::direct(src);
                    fromp.local = rx;
                    self.inflight.push((at, to, fromp, bytes));
                }
            }
            Via::Direct if dest.addr == self.nodes[to].relayed => {
                if self.relay_dead || bytes.len() > self.relay_max {
                    return;
                }
                let src = self.source(from, sock, dest.addr);
                let at = self.now + self.relay_one_way;
                self.inflight.push((at, to, PathAddr::relay(src), bytes));
            }
            Via::Direct => {
                if self.direct_dead || bytes.len() > self.direct_max || self.lose() {
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
                let src = self.source(from, sock, dest.addr);
                if let Some(rx) = self.deliverable(to, dest.addr, src) {
                    let at = self.now + self.one_way;
                    self.inflight
                        .push((at, to, PathAddr::direct_on(rx, src), bytes));
                }
            }
        }
    }

    /// The public source address of a datagram node `from` sends from socket `sock`.
    fn source(&mut self, from: usize, sock: LocalSocket, dest: SocketAddr) -> SocketAddr {
        let n = &mut self.nodes[from];
        match n.nat.as_mut() {
            Some(nat) => nat.outbound(sock, dest, &mut self.rng),
            None => SocketAddr::new(n.local.ip(), n.local.port().wrapping_add(sock)),
        }
    }

    /// Which socket of node `to` a datagram to `dest` from `src` reaches, if it gets through.
    fn deliverable(&self, to: usize, dest: SocketAddr, src: SocketAddr) -> Option<LocalSocket> {
        let n = &self.nodes[to];
        match &n.nat {
            Some(nat) if dest.ip() == nat.ip => nat.inbound(dest.port(), src),
            Some(_) => None,
            None if dest.ip() == n.local.ip() => {
                let i = dest.port().checked_sub(n.local.port())?;
                (i <= n.path.pool()).then_some(i)
            }
            None => None,
        }
    }

    fn drain(&mut self) {
        for i in 0..2 {
            // The driver's socket pool: opened when a search wants it, closed when no pair
            // uses it any more.
            let now = self.now;
            let n = &mut self.nodes[i];
            if n.path.wants_pool() && n.path.pool() == 0 {
                n.pool_opened += 1;
                let cap = n.pool_cap;
                n.path.set_pool(now, cap);
            } else if !n.path.wants_pool()
                && n.path.pool() > 0
                && n.path.local_sockets().next().is_none()
            {
                n.path.set_pool(now, 0);
            }
            let sprayed = n.path.birthday_status().spray_sent;
            let w = ((self.now - self.t0).as_millis() / 100) as usize;
            if n.spray_windows.len() <= w {
                n.spray_windows.resize(w + 1, sprayed);
            }
            n.spray_windows[w] = sprayed;
            while let Some(t) = self.nodes[i].path.poll_transmit() {
                self.send(i, t.dest, t.payload);
            }
            while let Some(e) = self.nodes[i].path.poll_event() {
                let at = self.now - self.t0;
                match e {
                    PathEvent::PathChanged { kind, remote, .. } => {
                        self.nodes[i].changes.push((at, kind, remote));
                    }
                    PathEvent::MtuChanged(m) => self.nodes[i].mtu_events.push((at, m)),
                    _ => {}
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
            addr: SocketAddr::from(([192, 168, 7, 1], p)),
        }]
    };
    a.start_session(t0, &[5; 32], t0, cand(2));
    b.start_session(t0, &[5; 32], t0, cand(1));
    a.handle_timeout(t0);
    let ping = a.poll_transmit().unwrap();
    let from = PathAddr::direct(SocketAddr::from(([192, 168, 7, 1], 1)));
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

/// Runs a random-port symmetric NAT (node `hard`) against a port-restricted cone NAT until
/// both are direct; returns the simulation.
fn birthday_sim(hard: usize) -> Sim {
    let kinds = if hard == 0 {
        (MapKind::SymmetricRandom, MapKind::Cone)
    } else {
        (MapKind::Cone, MapKind::SymmetricRandom)
    };
    let mut sim = Sim::new(Some(kinds.0), Some(kinds.1), PathConfig::default());
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(20));
    sim
}

#[test]
fn random_symmetric_nat_against_port_restricted_nat_ends_direct_by_birthday_probing() {
    for hard in 0..2 {
        let easy = 1 - hard;
        let sim = birthday_sim(hard);
        assert_eq!(sim.kind(hard), PathKind::Direct, "hard side {hard}");
        assert_eq!(sim.kind(easy), PathKind::Direct, "easy side {easy}");
        // The relay carried traffic first (after a second), then the birthday pair took over.
        let relay = sim
            .changed_to(easy, PathKind::Relay, Duration::ZERO)
            .unwrap();
        let direct = sim.changed_to(easy, PathKind::Direct, relay).unwrap();
        assert!(direct < Duration::from_secs(12), "direct after {direct:?}");
        // The hard side sends through the pool socket whose port the spray hit ...
        let hr = sim.nodes[hard].path.route().unwrap();
        assert_ne!(hr.local, DATA_SOCKET);
        assert_eq!(hr.addr.ip(), IpAddr::from([198, 51, 100, 1 + easy as u8]));
        // ... the easy side to that port, from its data socket.
        let er = sim.nodes[easy].path.route().unwrap();
        assert_eq!(er.local, DATA_SOCKET);
        assert_eq!(er.addr.ip(), IpAddr::from([198, 51, 100, 1 + hard as u8]));
        let st = sim.nodes[easy].path.status();
        assert!(st.reason.contains("birthday"), "{}", st.reason);
        assert_eq!(st.birthday.role, BirthdayRole::Easy);
        assert!(st.birthday.spray_hits >= 1);
        assert!(st.birthday.spray_sent <= 2048);
        assert!(st
            .pairs
            .iter()
            .any(|p| p.kind == CandidateKind::Birthday && p.state == PairState::Valid));
        let hs = sim.nodes[hard].path.status();
        assert_eq!(hs.birthday.role, BirthdayRole::Hard);
        assert!(hs.reason.contains("birthday"), "{}", hs.reason);
        // The search is over: the pool is down to the sockets of working pairs.
        assert!(!hs.birthday.active);
        assert_eq!(hs.birthday.pool_pairs, 0);
        assert!(!sim.nodes[hard].path.wants_pool());
        let used: HashSet<_> = sim.nodes[hard].path.local_sockets().collect();
        assert!(!used.is_empty() && used.len() <= 4, "{used:?}");
        assert_eq!(sim.nodes[hard].pool_opened, 1);
        // Data flows both ways on the new path.
        assert!(sim.nodes[easy].data_received > 100);
        assert!(sim.nodes[hard].data_received > 100);
        eprintln!(
            "hard={hard}: direct after {direct:?}, {} spray pings, {} hits",
            st.birthday.spray_sent, st.birthday.spray_hits
        );
    }
}

#[test]
fn birthday_search_is_deterministic() {
    let a = birthday_sim(0);
    let b = birthday_sim(0);
    assert_eq!(a.nodes[1].changes, b.nodes[1].changes);
    assert_eq!(
        a.nodes[1].path.birthday_status(),
        b.nodes[1].path.birthday_status()
    );
}

#[test]
fn random_symmetric_nats_do_not_birthday_probe_each_other() {
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::SymmetricRandom),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(20));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay);
        let b = sim.nodes[i].path.birthday_status();
        assert_eq!(b.role, BirthdayRole::None);
        assert_eq!(b.spray_sent, 0);
        assert_eq!(sim.nodes[i].pool_opened, 0);
    }
}

#[test]
fn cone_nats_never_start_a_birthday_search() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.start();
    sim.run_for(Duration::from_secs(5));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Direct);
        assert_eq!(
            sim.nodes[i].path.birthday_status(),
            BirthdayStatus::default()
        );
        assert_eq!(sim.nodes[i].pool_opened, 0);
    }
}

#[test]
fn spray_is_paced_capped_and_makes_no_pairs_without_a_pong() {
    let cfg = PathConfig {
        birthday_probes: 500,
        birthday_rate: 200,
        birthday_for: Duration::from_secs(8),
        ..PathConfig::default()
    };
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::Cone),
        cfg.clone(),
    );
    // Nothing direct gets through: every spray ping is lost.
    sim.direct_dead = true;
    sim.start();
    sim.run_for(Duration::from_secs(20));
    let easy = &sim.nodes[1];
    let st = easy.path.status();
    assert_eq!(st.birthday.role, BirthdayRole::Easy);
    assert_eq!(st.birthday.spray_sent, 500);
    assert_eq!(st.birthday.spray_hits, 0);
    // Spray pings are not pairs: only the signalled candidates (+ predicted ports) exist.
    assert!(st.pairs.len() < 10, "{} pairs", st.pairs.len());
    // At most rate/10 (+ one batch) per 100 ms window.
    let per_tick = (cfg.birthday_rate as usize * SPRAY_TICK.as_millis() as usize / 1000) as u64;
    for w in easy.spray_windows.windows(2) {
        assert!(w[1] - w[0] <= 20 + per_tick, "{} in 100 ms", w[1] - w[0]);
    }
    // 500 pings at 200/s take about 2.5 s, not less.
    let first = easy.spray_windows.iter().position(|&n| n > 0).unwrap();
    let last = easy.spray_windows.iter().position(|&n| n == 500).unwrap();
    assert!(last - first >= 23, "{first}..{last}");
    // The hard side gave up after birthday_for: no pool pairs, no pool wanted.
    let hard = &sim.nodes[0];
    let hs = hard.path.birthday_status();
    assert_eq!(hs.role, BirthdayRole::Hard);
    assert!(!hs.active);
    assert_eq!(hs.pool_pairs, 0);
    assert!(!hard.path.wants_pool());
    assert_eq!(hard.path.local_sockets().count(), 0);
    assert_eq!(hard.path.pool(), 0, "pool closed again");
    assert_eq!(sim.kind(0), PathKind::Relay);
}

#[test]
fn spray_pongs_must_be_authentic_fresh_and_from_the_address_pinged() {
    let t0 = Instant::now();
    let cfg = PathConfig::default();
    let hard_ip: IpAddr = IpAddr::from([198, 51, 100, 7]);
    let hard_srflx = SocketAddr::new(hard_ip, 40000);
    let mut easy = PeerPath::new(cfg.clone(), [1; 32], [2; 32], t0, 1_000_000, 1);
    let mut hard = PeerPath::new(cfg.clone(), [2; 32], [1; 32], t0, 1_000_000, 2);
    easy.set_local_mapping(MappingBehaviour::EndpointIndependent);
    hard.set_local_mapping(MappingBehaviour::EndpointDependent);
    let easy_srflx: SocketAddr = "203.0.113.50:41641".parse().unwrap();
    easy.set_peer_observed(Some(hard_ip));
    hard.set_peer_observed(Some(easy_srflx.ip()));
    easy.start_session(
        t0,
        &[5; 32],
        t0,
        vec![
            Candidate {
                kind: CandidateKind::Srflx,
                addr: hard_srflx,
            },
            Candidate {
                kind: CandidateKind::SrflxDependent,
                addr: hard_srflx,
            },
        ],
    );
    hard.start_session(
        t0,
        &[5; 32],
        t0,
        vec![Candidate {
            kind: CandidateKind::Srflx,
            addr: easy_srflx,
        }],
    );
    // Run the easy side until it sprays.
    let mut now = t0;
    let mut spray = Vec::new();
    while spray.is_empty() {
        now += Duration::from_millis(10);
        easy.handle_timeout(now);
        while let Some(t) = easy.poll_transmit() {
            // Not the signalled address or its predicted ports: a spray ping.
            if t.dest.addr.ip() == hard_ip && !(40000..=40002).contains(&t.dest.addr.port()) {
                spray.push(t);
            }
        }
    }
    let pairs_before = easy.status().pairs.len();
    let ping = spray.remove(0);
    // The hard side answers the spray ping on its pool socket 3.
    assert!(hard
        .handle_probe(now, PathAddr::direct_on(3, easy_srflx), &ping.payload)
        .is_ok());
    let pong = std::iter::from_fn(|| hard.poll_transmit())
        .find(|t| t.dest == PathAddr::direct_on(3, easy_srflx))
        .unwrap();
    // The pong of another spray ping, arriving from this ping's address (a NAT that
    // remapped, or a guess): authentic, but neither its address nor its id match.
    let ping2 = spray.remove(0);
    assert!(hard
        .handle_probe(now, PathAddr::direct_on(4, easy_srflx), &ping2.payload)
        .is_ok());
    let pong2 = std::iter::from_fn(|| hard.poll_transmit())
        .find(|t| t.dest == PathAddr::direct_on(4, easy_srflx))
        .unwrap();
    assert!(easy.handle_probe(now, ping.dest, &pong2.payload).is_ok());
    assert_eq!(easy.birthday_status().spray_hits, 0);
    assert!(!easy.knows(&ping.dest));
    // Forged: refused, no pair.
    let mut forged = pong.payload.clone();
    forged[30] ^= 1;
    assert!(easy.handle_probe(now, ping.dest, &forged).is_err());
    assert_eq!(easy.birthday_status().spray_hits, 0);
    assert!(!easy.knows(&ping.dest));
    // Genuine, from exactly the address pinged: a valid birthday pair.
    now += Duration::from_millis(30);
    assert!(easy.handle_probe(now, ping.dest, &pong.payload).is_ok());
    assert_eq!(easy.birthday_status().spray_hits, 1);
    assert!(easy.knows(&ping.dest));
    let st = easy.status();
    assert_eq!(st.pairs.len(), pairs_before + 1);
    let p = st.pairs.iter().find(|p| p.remote == ping.dest).unwrap();
    assert_eq!(
        (p.kind, p.state),
        (CandidateKind::Birthday, PairState::Valid)
    );
    assert_eq!(easy.route(), Some(ping.dest));
    assert!(st.reason.contains("birthday"), "{}", st.reason);
    // Replayed: refused and counted, nothing changes.
    assert!(matches!(
        easy.handle_probe(now, ping.dest, &pong.payload),
        Err(ProbeError::Replayed(_))
    ));
    assert_eq!(easy.birthday_status().spray_hits, 1);
    assert_eq!(easy.counters().replayed, 1);
}

#[test]
fn unknown_mapping_or_disabled_limits_mean_no_birthday() {
    for (mapping, cfg) in [
        (MappingBehaviour::Unknown, PathConfig::default()),
        (
            MappingBehaviour::EndpointIndependent,
            PathConfig {
                birthday_probes: 0,
                ..PathConfig::default()
            },
        ),
    ] {
        let mut sim = Sim::new(Some(MapKind::SymmetricRandom), Some(MapKind::Cone), cfg);
        sim.start();
        sim.nodes[1].path.set_local_mapping(mapping);
        sim.run_for(Duration::from_secs(5));
        assert_eq!(sim.nodes[1].path.birthday_status().spray_sent, 0);
        assert_eq!(sim.kind(1), PathKind::Relay);
    }
}

#[test]
fn failed_birthday_search_is_retried_in_a_new_session_with_backoff() {
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.direct_dead = true;
    sim.start();
    sim.run_for(Duration::from_secs(20));
    // Search from start + 0.55 s for 15 s, nothing found: a new session is due 30 s later.
    let first_end = Duration::from_millis(50 + 500 + 15_000);
    let mut due = Vec::new();
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay);
        let at = sim.nodes[i].path.birthday_retry_at().unwrap() - sim.t0;
        assert_eq!(at, first_end + BIRTHDAY_RETRY, "node {i}");
        due.push(at);
    }
    // Until then nothing changes (the relay path is "working": only the retry offers again).
    sim.run_for(due[0] - (sim.now - sim.t0));
    sim.start();
    sim.run_for(Duration::from_secs(20));
    // Second failure: twice the wait.
    for i in 0..2 {
        let ended = sim.nodes[i].path.birthday_retry_at().unwrap() - sim.t0;
        assert_eq!(ended, due[0] + first_end + BIRTHDAY_RETRY * 2, "node {i}");
    }
    // The second search had no spray budget left: one budget per peer per 10 minutes,
    // however many sessions.
    assert_eq!(
        sim.nodes[1].path.birthday_status().spray_sent,
        u64::from(PathConfig::default().birthday_probes)
    );
    // The network lets the spray through now; once the budget window is over, the next
    // session ends direct, no retry due.
    sim.direct_dead = false;
    sim.run_for(SPRAY_BUDGET_WINDOW);
    sim.start();
    sim.run_for(Duration::from_secs(20));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Direct, "node {i}");
        assert_eq!(sim.nodes[i].path.birthday_retry_at(), None);
    }
    assert_ne!(sim.nodes[0].path.route().unwrap().local, DATA_SOCKET);
}

#[test]
fn birthday_retry_backoff_is_capped() {
    let t0 = Instant::now();
    let mut p = PeerPath::new(PathConfig::default(), [1; 32], [2; 32], t0, 1_000_000, 1);
    p.set_local_mapping(MappingBehaviour::EndpointIndependent);
    let hard: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    p.set_peer_observed(Some(hard.ip()));
    let cands = vec![
        Candidate {
            kind: CandidateKind::Srflx,
            addr: hard,
        },
        Candidate {
            kind: CandidateKind::SrflxDependent,
            addr: hard,
        },
    ];
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..8 {
        p.start_session(now, &[3; 32], now, cands.clone());
        assert_eq!(p.birthday_retry_at(), None);
        // The search runs from start + birthday_after for birthday_for; nothing answers.
        let cfg = PathConfig::default();
        let search_end = now + cfg.birthday_after + cfg.birthday_for;
        let end = now + Duration::from_secs(30);
        while now < end {
            now += Duration::from_millis(50);
            p.handle_timeout(now);
            while p.poll_transmit().is_some() {}
        }
        let at = p.birthday_retry_at().unwrap();
        waits.push((at - search_end).as_secs());
        now = at;
    }
    assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600, 600]);
}

#[test]
fn a_new_session_during_a_search_does_not_restart_it() {
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.direct_dead = true;
    sim.start();
    // Searching (spray running, pool open) when both sides get a new session.
    sim.run_for(Duration::from_millis(1200));
    let sent = sim.nodes[1].path.birthday_status().spray_sent;
    assert!(sent > 0 && sim.nodes[0].path.wants_pool());
    let ports: HashSet<_> = sim.nodes[0].path.local_sockets().collect();
    sim.direct_dead = false;
    sim.start();
    sim.run_for(Duration::from_secs(15));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Direct, "node {i}");
    }
    // The same search went on: same pool, counters continued, one pool opening.
    let b = sim.nodes[1].path.birthday_status();
    // (found, not necessarily a spray pong: a pool ping may also reach us through a port we
    // sprayed before that pool mapping existed.)
    assert!(b.spray_sent > sent && b.found >= 1, "{b:?}");
    assert_eq!(sim.nodes[0].pool_opened, 1);
    let used = sim.nodes[0].path.route().unwrap().local;
    assert!(ports.contains(&used));
    assert!(sim.nodes[1].path.status().reason.contains("birthday"));
}

#[test]
fn a_new_session_never_drops_a_working_relay_path() {
    // Only the relay works; traffic flows over it. Then both sides get a new session (a
    // re-offer, a birthday retry): the relay pair keeps carrying traffic throughout.
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    sim.direct_dead = true;
    sim.data_every = Some(Duration::from_millis(20));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    for i in 0..2 {
        assert_eq!(sim.kind(i), PathKind::Relay, "node {i}");
    }
    let restart = sim.now - sim.t0;
    let received = [sim.nodes[0].data_received, sim.nodes[1].data_received];
    sim.start();
    // Sample the state every 10 ms across the new session's first seconds.
    for _ in 0..300 {
        sim.run_for(Duration::from_millis(10));
        for i in 0..2 {
            assert_eq!(
                sim.kind(i),
                PathKind::Relay,
                "node {i} at {:?}: {:?}",
                sim.now - sim.t0,
                sim.nodes[i].changes
            );
        }
    }
    for (i, (node, before)) in sim.nodes.iter().zip(received).enumerate() {
        assert!(
            node.changes
                .iter()
                .all(|(t, k, _)| *t < restart || *k != PathKind::None),
            "node {i}: {:?}",
            node.changes
        );
        // 3 s at one packet per 20 ms: nothing lost on the way.
        assert!(node.data_received - before >= 145, "node {i}");
    }
}

/// Node 0's view of a malicious peer that advertises addresses it has no business making us
/// send to, plus a server-reflexive candidate on an IP the rendezvous did not observe.
fn hostile_candidates(observed_ip: IpAddr) -> (Vec<Candidate>, Vec<SocketAddr>) {
    let bad: Vec<SocketAddr> = [
        "127.0.0.1:9",
        "[::ffff:127.0.0.1]:9",
        "224.0.0.1:9",
        "0.0.0.0:9",
        "255.255.255.255:9",
        "[::1]:9",
        "[ff02::1]:9",
        "203.0.113.77:0",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut v: Vec<Candidate> = bad
        .iter()
        .flat_map(|a| {
            [
                CandidateKind::Host,
                CandidateKind::Srflx,
                CandidateKind::Relayed,
            ]
            .map(|kind| Candidate { kind, addr: *a })
        })
        .collect();
    // Private addresses only count as host candidates.
    let private: Vec<SocketAddr> = ["10.1.2.3:9", "169.254.1.1:9", "100.64.0.1:9"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for a in &private {
        for kind in [
            CandidateKind::Srflx,
            CandidateKind::SrflxDependent,
            CandidateKind::Relayed,
            CandidateKind::Predicted,
        ] {
            v.push(Candidate { kind, addr: *a });
        }
    }
    // A "hard" srflx (a birthday target) on a victim's IP, not the observed one: neither the
    // spray nor any ping may go there.
    let victim: SocketAddr = "192.0.2.200:40000".parse().unwrap();
    assert_ne!(victim.ip(), observed_ip);
    v.push(Candidate {
        kind: CandidateKind::SrflxDependent,
        addr: victim,
    });
    let mut never = bad;
    never.extend(&private);
    (v, never)
}

#[test]
fn hostile_candidates_and_a_foreign_birthday_ip_get_no_packet() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::SymmetricRandom),
        PathConfig::default(),
    );
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    let observed = sim.public_ip(1);
    let (hostile, never) = hostile_candidates(observed);
    let mut cands = sim.candidates(1);
    cands.retain(|c| c.kind != CandidateKind::SrflxDependent);
    cands.extend(hostile);
    let now = sim.now;
    sim.nodes[0]
        .path
        .start_session(now, &[9; 32], now + Duration::from_millis(50), cands);
    // Record every destination node 0 sends to.
    let mut dests: HashSet<IpAddr> = HashSet::new();
    let mut spray = 0;
    for _ in 0..2000 {
        sim.run_for(Duration::from_millis(10));
        // (run_for drains transmits itself; peek at the pairs and the spray instead)
        for p in sim.nodes[0].path.status().pairs {
            dests.insert(p.remote.addr.ip());
            assert!(!never.contains(&p.remote.addr), "pair to {}", p.remote.addr);
        }
        spray = sim.nodes[0].path.birthday_status().spray_sent;
    }
    assert!(!dests.contains(&"192.0.2.200".parse::<IpAddr>().unwrap()));
    // The victim's srflx-dependent candidate did not make node 0 the easy side: no spray.
    assert_eq!(spray, 0);
    assert!(sim.nodes[0].path.counters().refused_candidates >= 30);
}

#[test]
fn no_transmit_ever_goes_to_a_hostile_candidate() {
    // The same, checked on every transmit (sans-IO: the driver sends exactly these).
    let t0 = Instant::now();
    let observed: IpAddr = "198.51.100.2".parse().unwrap();
    let (hostile, never) = hostile_candidates(observed);
    let mut p = PeerPath::new(PathConfig::default(), [1; 32], [2; 32], t0, 1_000_000, 1);
    p.set_local_mapping(MappingBehaviour::EndpointIndependent);
    p.set_peer_observed(Some(observed));
    p.start_session(t0, &[4; 32], t0, hostile);
    let mut now = t0;
    let mut sent = 0;
    while now < t0 + Duration::from_secs(30) {
        now += Duration::from_millis(10);
        p.handle_timeout(now);
        while let Some(t) = p.poll_transmit() {
            sent += 1;
            assert!(!never.contains(&t.dest.addr), "sent to {}", t.dest.addr);
            assert_ne!(t.dest.addr.ip(), "192.0.2.200".parse::<IpAddr>().unwrap());
        }
    }
    // Nothing is left to probe at all.
    assert_eq!(p.birthday_status().spray_sent, 0);
    assert_eq!(sent, 0);
}

#[test]
fn ten_sessions_in_a_minute_spray_at_most_one_budget() {
    let cfg = PathConfig::default();
    let mut sim = Sim::new(
        Some(MapKind::SymmetricRandom),
        Some(MapKind::Cone),
        cfg.clone(),
    );
    sim.direct_dead = true;
    for _ in 0..10 {
        sim.start();
        sim.run_for(Duration::from_secs(6));
        // Let the search end so the next session starts a new one.
        sim.run_for(Duration::from_millis(100));
    }
    let sent = sim.nodes[1].path.birthday_status().spray_sent;
    assert!(sent > 0);
    assert!(
        sent <= u64::from(cfg.birthday_probes),
        "{sent} spray pings in 10 sessions"
    );
}

#[test]
fn a_relayed_address_learned_as_peer_reflexive_is_a_relay_pair_once_signalled() {
    let t0 = Instant::now();
    let cfg = PathConfig::default();
    let a_srflx: SocketAddr = "198.51.100.42:41641".parse().unwrap();
    let b_srflx: SocketAddr = "198.51.100.30:33397".parse().unwrap();
    let b_relayed: SocketAddr = "203.0.113.20:49160".parse().unwrap();
    let mut a = PeerPath::new(cfg.clone(), [1; 32], [2; 32], t0, 1_000_000, 1);
    let mut b = PeerPath::new(cfg, [2; 32], [1; 32], t0, 1_000_000, 2);
    // B's relayed candidate is not in this session's list (its allocation was not ready).
    let srflx = |addr| Candidate {
        kind: CandidateKind::Srflx,
        addr,
    };
    a.start_session(t0, &[5; 32], t0, vec![srflx(b_srflx)]);
    b.start_session(t0, &[5; 32], t0, vec![srflx(a_srflx)]);
    b.handle_timeout(t0);
    let ping = std::iter::from_fn(|| b.poll_transmit())
        .find(|t| t.dest.addr == a_srflx)
        .unwrap();
    // B's ping went out through B's relay: it reaches A from B's relayed address.
    let from = PathAddr::direct(b_relayed);
    assert!(a.handle_probe(t0, from, &ping.payload).is_ok());
    assert_eq!(
        a.class_of(&from),
        PathKind::Direct,
        "peer-reflexive, unknown"
    );
    // Then B's candidates with the relayed address arrive.
    a.set_remote_candidates(
        t0,
        vec![
            srflx(b_srflx),
            Candidate {
                kind: CandidateKind::Relayed,
                addr: b_relayed,
            },
        ],
    );
    assert_eq!(a.class_of(&from), PathKind::Relay);
    let kinds: Vec<CandidateKind> = a
        .status()
        .pairs
        .iter()
        .filter(|p| p.remote == from)
        .map(|p| p.kind)
        .collect();
    assert_eq!(kinds, [CandidateKind::Relayed]);
}

/// Issue 17: unanswered pool pings carry `birthday_ttl` (they must open our own NAT and die
/// before the peer's NAT, which may accept unsolicited UDP and keep a conntrack entry that
/// breaks the spray); everything else — the data socket's pings, the spray, pongs, and a pool
/// pair's pings once the peer reached it — keeps the system's TTL.
#[test]
fn only_unanswered_pool_pings_carry_the_low_ttl() {
    for ttl in [0u8, 2] {
        let t0 = Instant::now();
        let cfg = PathConfig {
            birthday_ttl: ttl,
            ..PathConfig::default()
        };
        let hard_ip: IpAddr = IpAddr::from([198, 51, 100, 7]);
        let hard_srflx = SocketAddr::new(hard_ip, 40000);
        let easy_srflx: SocketAddr = "203.0.113.50:41641".parse().unwrap();
        let mut easy = PeerPath::new(cfg.clone(), [1; 32], [2; 32], t0, 1_000_000, 1);
        let mut hard = PeerPath::new(cfg.clone(), [2; 32], [1; 32], t0, 1_000_000, 2);
        easy.set_local_mapping(MappingBehaviour::EndpointIndependent);
        hard.set_local_mapping(MappingBehaviour::EndpointDependent);
        easy.set_peer_observed(Some(hard_ip));
        hard.set_peer_observed(Some(easy_srflx.ip()));
        easy.start_session(
            t0,
            &[5; 32],
            t0,
            vec![
                Candidate {
                    kind: CandidateKind::Srflx,
                    addr: hard_srflx,
                },
                Candidate {
                    kind: CandidateKind::SrflxDependent,
                    addr: hard_srflx,
                },
            ],
        );
        hard.start_session(
            t0,
            &[5; 32],
            t0,
            vec![Candidate {
                kind: CandidateKind::Srflx,
                addr: easy_srflx,
            }],
        );
        let mut now = t0;
        let mut pool_ttls = HashMap::new();
        let mut other_ttls = HashSet::new();
        let mut spray = Vec::new();
        while now < t0 + Duration::from_secs(2) {
            now += Duration::from_millis(10);
            if hard.wants_pool() && hard.pool() == 0 {
                hard.set_pool(now, 8);
            }
            hard.handle_timeout(now);
            easy.handle_timeout(now);
            while let Some(t) = hard.poll_transmit() {
                if t.dest.local == DATA_SOCKET {
                    other_ttls.insert(t.ttl);
                } else {
                    pool_ttls.insert(t.dest.local, t.ttl);
                }
            }
            while let Some(t) = easy.poll_transmit() {
                other_ttls.insert(t.ttl);
                if t.dest.addr.ip() == hard_ip && !(40000..=40002).contains(&t.dest.addr.port()) {
                    spray.push(t);
                }
            }
        }
        let want = (ttl > 0).then_some(ttl);
        assert_eq!(pool_ttls.len(), 8, "{pool_ttls:?}");
        assert!(pool_ttls.values().all(|t| *t == want), "{pool_ttls:?}");
        assert_eq!(other_ttls, HashSet::from([None]));
        if ttl > 0 {
            assert!(hard.birthday_status().low_ttl_pings >= 8);
        } else {
            assert_eq!(hard.birthday_status().low_ttl_pings, 0);
        }
        // A spray ping reaches pool socket 3: its pong and its next pings use the full TTL;
        // socket 4, still unanswered, keeps the low one.
        let ping = spray.remove(0);
        assert!(hard
            .handle_probe(now, PathAddr::direct_on(3, easy_srflx), &ping.payload)
            .is_ok());
        let mut sent = Vec::new();
        for _ in 0..400 {
            now += Duration::from_millis(10);
            hard.handle_timeout(now);
            sent.extend(std::iter::from_fn(|| hard.poll_transmit()));
        }
        let on = |l| sent.iter().filter(move |t: &&Transmit| t.dest.local == l);
        assert!(on(3).count() >= 2, "a pong and a triggered ping");
        assert!(on(3).all(|t| t.ttl.is_none()));
        assert!(on(4).count() >= 1);
        assert!(on(4).all(|t| t.ttl == want));
    }
}

#[test]
fn mtu_search_finds_each_paths_size_and_the_peer_takes_the_smallest() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    // A 1400-byte direct link (IPv4: 1372-byte datagrams) and a relay that carries 1300.
    sim.direct_max = 1372;
    sim.relay_max = 1300;
    sim.data_every = Some(Duration::from_millis(100));
    sim.start();
    sim.run_for(Duration::from_secs(6));
    assert_eq!(sim.kind(0), PathKind::Direct);
    let st = sim.nodes[0].path.status();
    let direct = st
        .pairs
        .iter()
        .find(|p| Some(p.remote) == st.remote)
        .and_then(|p| p.mtu)
        .expect("direct pair measured");
    assert_eq!(
        (direct.outer, direct.datagram, direct.inner),
        (1400, 1372, 1340)
    );
    let relay = st
        .pairs
        .iter()
        .find(|p| p.kind == CandidateKind::Relayed && p.state == PairState::Valid)
        .and_then(|p| p.mtu)
        .expect("relay pair measured");
    // Ladder step 1320 on the wire: 1320 - 20 - 8 - 4 = 1288 datagram, the largest <= 1300.
    assert_eq!(relay.datagram, 1288);
    assert_eq!(sim.nodes[0].path.mtu(), Some(1288 - 32));
    assert_eq!(st.mtu, Some(1256));
    assert_eq!(
        sim.nodes[0].mtu_events.last().map(|e| e.1),
        Some(Some(1256))
    );
    // Both sides measure their own direction.
    assert_eq!(sim.nodes[1].path.mtu(), Some(1256));
    // Data still flowed all along: lost big probes never kill a path.
    assert_eq!(sim.changed_to(0, PathKind::Relay, Duration::ZERO), None);
}

#[test]
fn a_peer_without_sized_probes_leaves_the_mtu_unknown() {
    let mut sim = Sim::new(
        Some(MapKind::Cone),
        Some(MapKind::Cone),
        PathConfig::default(),
    );
    // Nothing larger than a plain probe gets through: no size of the ladder answers.
    sim.direct_max = MAX_PROBE_LEN;
    sim.relay_max = MAX_PROBE_LEN;
    sim.start();
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.kind(0), PathKind::Direct);
    assert_eq!(sim.nodes[0].path.mtu(), None);
    assert!(sim.nodes[0].mtu_events.is_empty());
}

#[test]
fn a_pair_via_our_allocation_has_the_overhead_of_the_relay_leg_family() {
    let relayed: SocketAddr = "203.0.113.20:49152".parse().unwrap();
    let leg6: SocketAddr = "[2001:db8:ffff::10]:3478".parse().unwrap();
    let via = PathAddr::relay(relayed);
    // An IPv6 leg to the TURN server: 40 + 8 + 4, though the peer's relayed address is IPv4
    // (1420 + 32 + 52 = 1504 bytes for WireGuard's default MTU).
    let hop = mtu_first_hop(&via, Some(leg6));
    assert_eq!(hop, leg6);
    assert_eq!(crate::mtu::overhead(&hop, true), 52);
    // Without a known leg, and for direct pairs (also to a relayed address): the remote.
    assert_eq!(mtu_first_hop(&via, None), relayed);
    let direct = PathAddr::direct(relayed);
    assert_eq!(mtu_first_hop(&direct, Some(leg6)), relayed);
    assert_eq!(crate::mtu::overhead(&relayed, true), 32);
}
