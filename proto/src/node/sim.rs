//! Whole-node simulation: two [`Node`]s, an in-memory TURN server ([`TurnServer`]), two STUN
//! servers ([`BindingServer`]), a simulated rendezvous and NAT models (open, port-restricted
//! cone, symmetric with random ports; rebinding), on a virtual clock that jumps to the next
//! wake-up. Everything is seeded: a run is the same every time, and the whole set takes a few
//! seconds. The natlab scenarios (`natlab/tests/mesh_*`) are the same stories on real sockets.

use super::relay::{RELAY_MEASURE_INTERVAL, UDP_FALLBACK_AFTER, UDP_RETRY_AFTER};
use super::*;
use crate::channeldata;
use crate::creds;
use crate::stun::BindingServer;
use crate::turn::{Auth, ClientAction, PeerAction, PortPool, ServerConfig, TurnServer};
use std::net::Ipv4Addr;

const STUN1: &str = "203.0.113.1:3478";
const STUN2: &str = "203.0.113.2:3478";
const TURN: &str = "203.0.113.9:3478";
/// The same relay's TURN-over-TLS port (a stream: not subject to a UDP block).
const TURNS: &str = "203.0.113.9:443";
const RDV: &str = "203.0.113.5:443";
const SECRET: &[u8] = b"sim-secret";
const UNIX0: u64 = 1_800_000_000;
/// One network hop (host to server, server to host, host to host).
const HOP: Duration = Duration::from_millis(10);
/// A WireGuard transport-data packet (type 4) as the WireGuard side hands it over.
const WG_DATA: [u8; 32] = {
    let mut p = [0x5au8; 32];
    p[0] = 4;
    p[1] = 0;
    p[2] = 0;
    p[3] = 0;
    p
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| unreachable!())
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    /// Endpoint-independent mapping, address+port-dependent filtering (port-restricted cone).
    Cone,
    /// A new random port per destination (endpoint-dependent mapping), same filtering.
    Symmetric,
}

struct NatBox {
    kind: NatKind,
    ip: IpAddr,
    /// Cone: local socket -> public port.
    eim: HashMap<LocalSocket, u16>,
    /// Symmetric: (local socket, destination) -> public port.
    edm: HashMap<(LocalSocket, SocketAddr), u16>,
    /// Public port -> the local socket behind it and the destinations it sent to.
    sent_to: HashMap<u16, (LocalSocket, HashSet<SocketAddr>)>,
    next_port: u16,
}

impl NatBox {
    fn new(kind: NatKind, ip: [u8; 4]) -> Self {
        NatBox {
            kind,
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            eim: HashMap::new(),
            edm: HashMap::new(),
            sent_to: HashMap::new(),
            next_port: 40000,
        }
    }

    fn outbound(&mut self, local: LocalSocket, dst: SocketAddr, rng: &mut u64) -> SocketAddr {
        let port = match self.kind {
            NatKind::Cone => match self.eim.get(&local) {
                Some(p) => *p,
                None => {
                    self.next_port += 1;
                    self.eim.insert(local, self.next_port);
                    self.next_port
                }
            },
            NatKind::Symmetric => match self.edm.get(&(local, dst)) {
                Some(p) => *p,
                None => loop {
                    let p = 1024 + (xorshift(rng) % 64000) as u16;
                    if !self.sent_to.contains_key(&p) {
                        self.edm.insert((local, dst), p);
                        break p;
                    }
                },
            },
        };
        self.sent_to
            .entry(port)
            .or_insert_with(|| (local, HashSet::new()))
            .1
            .insert(dst);
        SocketAddr::new(self.ip, port)
    }

    fn inbound(&self, port: u16, src: SocketAddr) -> Option<LocalSocket> {
        let (local, sent) = self.sent_to.get(&port)?;
        sent.contains(&src).then_some(*local)
    }

    /// The NAT forgets every mapping (a reboot, a new uplink): new ports from now on.
    fn rebind(&mut self) {
        self.eim.clear();
        self.edm.clear();
        self.sent_to.clear();
        self.next_port += 1000;
    }
}

struct Host {
    node: Node,
    key: [u8; 32],
    /// The data socket's address (pool socket `l` is on port + `l`).
    local: SocketAddr,
    nat: Option<NatBox>,
    pool: u16,
    cands: (u64, Vec<Candidate>),
    registered: bool,
    sent: u64,
    received: u64,
    last_rx: Option<Instant>,
    /// Longest gap between two received data packets while data flows.
    max_gap: Duration,
    changes: Vec<(Duration, PathKind, Option<PathAddr>)>,
    allocations: u32,
    offers: u32,
    pool_opened: u32,
}

struct Packet {
    at: Instant,
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
    /// Carried on host `.0`'s stream of relay link `.1` (TURN over TLS), not as UDP.
    stream: Option<(usize, LinkId)>,
}

struct Sim {
    t0: Instant,
    now: Instant,
    hosts: [Host; 2],
    turn: TurnServer<PortPool>,
    stun: [BindingServer; 2],
    inflight: Vec<Packet>,
    rng: u64,
    rdv_up: bool,
    /// The rendezvous hands out relay credentials the relay refuses.
    bad_credentials: bool,
    /// Rendezvous messages in flight: (when, host, signal).
    signals: Vec<(Instant, usize, Signal)>,
    sessions: u8,
    direct_dead: bool,
    relay_dead: bool,
    data_every: Option<Duration>,
    next_data: Instant,
    out: Vec<u8>,
    /// Host `i`'s network drops every UDP datagram both ways (only TCP/TLS gets out).
    udp_blocked: [bool; 2],
    /// The relay region also lists a `turns:` URI.
    offer_tls: bool,
    /// Open relay streams: the TURN server's view of the client (the stream's source) to
    /// (host, link).
    streams: HashMap<SocketAddr, (usize, LinkId)>,
    streams_opened: u16,
}

impl Sim {
    fn new(a: Option<NatKind>, b: Option<NatKind>, path: PathConfig) -> Self {
        Self::with(a, b, path, false)
    }

    fn with(a: Option<NatKind>, b: Option<NatKind>, path: PathConfig, bad_creds: bool) -> Self {
        let mut sim = Self::unstarted(a, b, path, bad_creds);
        sim.start();
        sim
    }

    /// The world before the hosts register (set the network's knobs, then [`Sim::start`]).
    fn unstarted(
        a: Option<NatKind>,
        b: Option<NatKind>,
        path: PathConfig,
        bad_creds: bool,
    ) -> Self {
        let t0 = Instant::now();
        let keys = [[0xA1u8; 32], [0xB2u8; 32]];
        let mk = |i: usize, nat: Option<NatKind>| {
            let public = [198, 51, 100, 1 + i as u8];
            let local = match nat {
                Some(_) => SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(192, 168, 1 + i as u8, 10)),
                    51000 + i as u16,
                ),
                None => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(public)), 51000 + i as u16),
            };
            let node = Node::new(
                NodeConfig {
                    me: keys[i],
                    data_port: local.port(),
                    v6: false,
                    path: path.clone(),
                    signalling: true,
                    seed: 0x5eed + i as u64,
                    unix_ms: UNIX0 * 1000,
                },
                vec![PeerSpec {
                    key: keys[1 - i],
                    static_candidates: Vec::new(),
                    static_secret: None,
                }],
                t0,
            );
            Host {
                node,
                key: keys[i],
                local,
                nat: nat.map(|k| NatBox::new(k, public)),
                pool: 0,
                cands: (0, Vec::new()),
                registered: false,
                sent: 0,
                received: 0,
                last_rx: None,
                max_gap: Duration::ZERO,
                changes: Vec::new(),
                allocations: 0,
                offers: 0,
                pool_opened: 0,
            }
        };
        let cfg = ServerConfig::new(
            "meshpunch.sim",
            Auth {
                secrets: vec![SECRET.to_vec()],
                users: HashMap::new(),
            },
            [7u8; 32],
        );
        let ports = PortPool::new(vec![sa(TURN).ip()], 50000, 50099, 0);
        Sim {
            t0,
            now: t0,
            hosts: [mk(0, a), mk(1, b)],
            turn: TurnServer::new(cfg, ports, t0, UNIX0),
            stun: [
                BindingServer::new("sim", [Some(sa(STUN1)), None, None, None]),
                BindingServer::new("sim", [Some(sa(STUN2)), None, None, None]),
            ],
            inflight: Vec::new(),
            rng: 0x1234_5678_9abc_def1,
            rdv_up: true,
            bad_credentials: bad_creds,
            signals: Vec::new(),
            sessions: 0,
            direct_dead: false,
            relay_dead: false,
            data_every: None,
            next_data: t0,
            out: vec![0u8; 65536],
            udp_blocked: [false; 2],
            offer_tls: false,
            streams: HashMap::new(),
            streams_opened: 0,
        }
    }

    /// The hosts learn their addresses and register.
    fn start(&mut self) {
        let t0 = self.now;
        for i in 0..2 {
            let ip = self.hosts[i].local.ip();
            self.hosts[i].node.set_hosts(t0, vec![ip]);
            self.pump(i);
            self.register(i);
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    // ----- the rendezvous -----

    fn relays(&self, i: usize) -> Vec<RelayRegion> {
        let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, &format!("host{i}"));
        vec![RelayRegion {
            region: "sim".into(),
            urls: if self.offer_tls {
                vec![
                    format!("turns:{TURNS}"),
                    format!("turn:{TURN}?transport=udp"),
                ]
            } else {
                vec![format!("turn:{TURN}?transport=udp")]
            },
            username: c.username,
            password: if self.bad_credentials {
                "wrong".into()
            } else {
                c.password
            },
            expires_unix: c.expires_unix,
        }]
    }

    /// Host `i` (re)connects and registers: the rendezvous connection rides the data socket,
    /// so what it observes is the data socket's mapping towards it.
    fn register(&mut self, i: usize) {
        let observed = self.source(i, DATA_SOCKET, sa(RDV));
        let sig = Signal::Registered {
            observed,
            stun: vec![sa(STUN1), sa(STUN2)],
            relays: self.relays(i),
            shared_socket: true,
            transport: crate::wire::Transport::Quic,
        };
        let at = self.now + 2 * HOP;
        self.signals.push((at, i, sig));
        self.hosts[i].registered = true;
        if self.hosts[1 - i].registered {
            for j in 0..2 {
                let key = self.hosts[1 - j].key;
                self.signals
                    .push((at, j, Signal::Presence { key, online: true }));
            }
        }
    }

    fn on_offer(&mut self, from: usize) {
        self.hosts[from].offers += 1;
        let to = 1 - from;
        if !self.rdv_up || !self.hosts[from].registered {
            let sig = Signal::OfferFailed {
                peer: self.hosts[to].key,
                reason: "rendezvous unreachable".into(),
            };
            self.signals
                .push((self.now + Duration::from_secs(1), from, sig));
            return;
        }
        if !self.hosts[to].registered {
            let sig = Signal::OfferFailed {
                peer: self.hosts[to].key,
                reason: "peer offline".into(),
            };
            self.signals.push((self.now + 2 * HOP, from, sig));
            return;
        }
        self.sessions = self.sessions.wrapping_add(1);
        let secret = [self.sessions; 32];
        let at = self.now + 2 * HOP;
        let start_at = at + HOP;
        for j in 0..2 {
            let other = &self.hosts[1 - j];
            let peer_observed = other
                .nat
                .as_ref()
                .map_or(other.local, |n| SocketAddr::new(n.ip, 1));
            let sig = Signal::Punch(super::Punch {
                peer: other.key,
                candidates: other.cands.1.clone(),
                secret,
                start_at,
                local_version: self.hosts[j].cands.0,
                peer_observed: Some(peer_observed),
            });
            self.signals.push((at, j, sig));
        }
    }

    // ----- the network -----

    /// The public source of a datagram host `i` sends from local socket `l` to `dst`.
    fn source(&mut self, i: usize, l: LocalSocket, dst: SocketAddr) -> SocketAddr {
        let h = &mut self.hosts[i];
        match h.nat.as_mut() {
            Some(nat) => nat.outbound(l, dst, &mut self.rng),
            None => SocketAddr::new(h.local.ip(), h.local.port() + l),
        }
    }

    fn emit(&mut self, i: usize, socket: Socket, dst: SocketAddr, bytes: Vec<u8>) {
        let l = match socket {
            Socket::Data => DATA_SOCKET,
            Socket::Pool(l) => l,
            Socket::Relay(link) => {
                let Some((&src, _)) = self.streams.iter().find(|(_, v)| **v == (i, link)) else {
                    return;
                };
                self.inflight.push(Packet {
                    at: self.now + HOP,
                    src,
                    dst,
                    bytes,
                    stream: Some((i, link)),
                });
                return;
            }
        };
        if self.udp_blocked[i] {
            return;
        }
        if crate::nat::is_lan_ip(dst.ip()) {
            // The hosts are on different LANs.
            return;
        }
        let src = self.source(i, l, dst);
        self.inflight.push(Packet {
            at: self.now + HOP,
            src,
            dst,
            bytes,
            stream: None,
        });
    }

    /// Host `i` opens the stream of relay link `link` (connected at once).
    fn open_stream(&mut self, i: usize, link: LinkId) {
        let ip = self.hosts[i]
            .nat
            .as_ref()
            .map_or(self.hosts[i].local.ip(), |n| n.ip);
        // A new connection, a new source port (TCP ports: apart from the NATs' UDP ones).
        let src = SocketAddr::new(ip, 61000 + self.streams_opened);
        self.streams_opened += 1;
        self.streams.insert(src, (i, link));
    }

    /// Host `i`'s stream of relay link `link` closes (the server drops its allocation).
    fn close_stream(&mut self, i: usize, link: LinkId) {
        let gone: Vec<SocketAddr> = self
            .streams
            .iter()
            .filter(|(_, v)| **v == (i, link))
            .map(|(k, _)| *k)
            .collect();
        for c in gone {
            self.streams.remove(&c);
            self.turn.release_client(c);
        }
    }

    /// A message the TURN server sends to `client`: on its stream if it has one.
    fn reply_to_client(&mut self, client: SocketAddr, bytes: Vec<u8>) {
        let stream = self.streams.get(&client).copied();
        self.inflight.push(Packet {
            at: self.now + HOP,
            src: if stream.is_some() {
                sa(TURNS)
            } else {
                sa(TURN)
            },
            dst: client,
            bytes,
            stream,
        });
    }

    fn is_host_ip(&self, ip: IpAddr) -> bool {
        self.hosts
            .iter()
            .any(|h| h.nat.as_ref().map_or(h.local.ip(), |n| n.ip) == ip)
    }

    fn deliver(&mut self, p: Packet) {
        let turn = sa(TURN);
        let touches_relay = p.src.ip() == turn.ip() || p.dst.ip() == turn.ip();
        if touches_relay && self.relay_dead {
            return;
        }
        if let Some((i, link)) = p.stream {
            if !self
                .streams
                .contains_key(if p.dst == sa(TURNS) { &p.src } else { &p.dst })
            {
                return;
            }
            if p.dst == sa(TURNS) {
                match self
                    .turn
                    .handle_client(self.now, p.src, &p.bytes, &mut self.out)
                {
                    ClientAction::None => {}
                    ClientAction::Reply(n) => {
                        let b = self.out[..n].to_vec();
                        self.reply_to_client(p.src, b);
                    }
                    ClientAction::Relay {
                        relayed,
                        peer,
                        range,
                    } => self.inflight.push(Packet {
                        at: self.now + HOP,
                        src: relayed,
                        dst: peer,
                        bytes: p.bytes[range].to_vec(),
                        stream: None,
                    }),
                }
            } else {
                let now = self.now;
                let r = self.hosts[i].node.handle_datagram(
                    now,
                    Socket::Relay(link),
                    sa(TURNS),
                    &p.bytes,
                );
                if let Some(d) = r {
                    assert_eq!(&p.bytes[d.range], &WG_DATA[..]);
                    self.hosts[i].received += 1;
                }
                self.pump(i);
            }
            return;
        }
        let blocked = |h: &Host| {
            let ip = h.nat.as_ref().map_or(h.local.ip(), |n| n.ip);
            ip == p.src.ip() || ip == p.dst.ip()
        };
        if (0..2).any(|i| self.udp_blocked[i] && blocked(&self.hosts[i])) {
            return;
        }
        if self.direct_dead && self.is_host_ip(p.src.ip()) && self.is_host_ip(p.dst.ip()) {
            return;
        }
        if let Some(k) = [sa(STUN1), sa(STUN2)].iter().position(|s| *s == p.dst) {
            if let Some(r) = self.stun[k].handle(0, p.src, &p.bytes) {
                self.inflight.push(Packet {
                    at: self.now + HOP,
                    src: p.dst,
                    dst: r.to,
                    bytes: r.bytes,
                    stream: None,
                });
            }
            return;
        }
        if p.dst == turn {
            match self
                .turn
                .handle_client(self.now, p.src, &p.bytes, &mut self.out)
            {
                ClientAction::None => {}
                ClientAction::Reply(n) => {
                    let b = self.out[..n].to_vec();
                    self.reply_to_client(p.src, b);
                }
                ClientAction::Relay {
                    relayed,
                    peer,
                    range,
                } => self.inflight.push(Packet {
                    at: self.now + HOP,
                    src: relayed,
                    dst: peer,
                    bytes: p.bytes[range].to_vec(),
                    stream: None,
                }),
            }
            return;
        }
        if p.dst.ip() == turn.ip() {
            match self
                .turn
                .handle_peer(self.now, p.dst, p.src, &p.bytes, &mut self.out)
            {
                PeerAction::Drop => {}
                PeerAction::ChannelData { client, channel } => {
                    let mut b = vec![0u8; 4 + p.bytes.len()];
                    let _ = channeldata::write_header(channel, p.bytes.len(), &mut b);
                    b[4..].copy_from_slice(&p.bytes);
                    self.reply_to_client(client, b);
                }
                PeerAction::Indication { client, len } => {
                    let b = self.out[..len].to_vec();
                    self.reply_to_client(client, b);
                }
            }
            return;
        }
        for j in 0..2 {
            let h = &self.hosts[j];
            let l = match &h.nat {
                Some(nat) if nat.ip == p.dst.ip() => nat.inbound(p.dst.port(), p.src),
                None if h.local.ip() == p.dst.ip() => p
                    .dst
                    .port()
                    .checked_sub(h.local.port())
                    .filter(|l| *l <= h.pool),
                _ => continue,
            };
            let Some(l) = l else { return };
            let socket = Socket::of_local(l);
            let now = self.now;
            let r = self.hosts[j]
                .node
                .handle_datagram(now, socket, p.src, &p.bytes);
            if let Some(d) = r {
                assert_eq!(&p.bytes[d.range], &WG_DATA[..]);
                let h = &mut self.hosts[j];
                h.received += 1;
                if let Some(last) = h.last_rx {
                    h.max_gap = h.max_gap.max(now - last);
                }
                h.last_rx = Some(now);
            }
            self.pump(j);
            return;
        }
    }

    /// Performs everything host `i`'s node wants.
    fn pump(&mut self, i: usize) {
        loop {
            let mut idle = true;
            while let Some(t) = self.hosts[i].node.poll_transmit() {
                idle = false;
                self.emit(i, t.socket, t.dst, t.payload);
            }
            while let Some(ev) = self.hosts[i].node.poll_event() {
                idle = false;
                self.on_event(i, ev);
            }
            if idle {
                return;
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        let now = self.now;
        let elapsed = self.elapsed();
        if let Event::Offer { .. } = ev {
            self.on_offer(i);
            return;
        }
        let h = &mut self.hosts[i];
        match ev {
            Event::LocalCandidates {
                version,
                candidates,
            } => h.cands = (version, candidates),
            Event::PathChanged { kind, remote, .. } => h.changes.push((elapsed, kind, remote)),
            Event::OpenPool => {
                h.pool = 256;
                h.pool_opened += 1;
                h.node.pool_report(now, 256, 256);
            }
            Event::ClosePool { keep } => {
                h.pool = keep.iter().copied().max().unwrap_or(0);
                h.node.pool_report(now, 0, keep.len());
            }
            Event::ScanHosts => {
                let ip = h.local.ip();
                h.node.set_hosts(now, vec![ip]);
            }
            Event::RelayAllocating { .. } => h.allocations += 1,
            Event::Resolve { .. } => unreachable!("the relay URI is an address"),
            Event::OpenRelayStream { link, server, .. } => {
                assert_eq!(server, sa(TURNS));
                self.open_stream(i, link);
                self.hosts[i].node.relay_stream_up(now, link);
            }
            Event::CloseRelayStream { link } => self.close_stream(i, link),
            _ => {}
        }
    }

    fn send_data(&mut self, i: usize) {
        let now = self.now;
        let h = &mut self.hosts[i];
        let Some((socket, dst, bytes)) = h.node.handle_wireguard(now, 0, &WG_DATA) else {
            return;
        };
        let bytes = bytes.to_vec();
        h.sent += 1;
        self.emit(i, socket, dst, bytes);
        self.pump(i);
    }

    /// Runs the world for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(steps < 5_000_000, "the simulation does not advance");
            let mut next = end;
            for p in &self.inflight {
                next = next.min(p.at);
            }
            for (at, _, _) in &self.signals {
                next = next.min(*at);
            }
            for h in &self.hosts {
                next = next.min(h.node.poll_timeout());
            }
            if let Some(t) = self.turn.poll_timeout() {
                next = next.min(t);
            }
            if let Some(_e) = self.data_every {
                next = next.min(self.next_data);
            }
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            let due: Vec<Packet> = {
                let (due, rest) = std::mem::take(&mut self.inflight)
                    .into_iter()
                    .partition(|p| p.at <= now);
                self.inflight = rest;
                due
            };
            for p in due {
                self.deliver(p);
            }
            let sigs: Vec<(Instant, usize, Signal)> = {
                let (due, rest) = std::mem::take(&mut self.signals)
                    .into_iter()
                    .partition(|(at, _, _)| *at <= now);
                self.signals = rest;
                due
            };
            for (_, i, s) in sigs {
                self.hosts[i].node.handle_signal(now, s);
                self.pump(i);
            }
            for i in 0..2 {
                if self.hosts[i].node.poll_timeout() <= now {
                    self.hosts[i].node.handle_timeout(now);
                    self.pump(i);
                }
            }
            if self.turn.poll_timeout().is_some_and(|t| t <= now) {
                self.turn.handle_timeout(now);
            }
            if let Some(e) = self.data_every {
                if self.next_data <= now {
                    self.next_data = now + e;
                    self.send_data(0);
                    self.send_data(1);
                }
            }
            if self.now >= end {
                return;
            }
        }
    }

    fn route(&self, i: usize) -> Option<PathAddr> {
        self.hosts[i].node.peers()[0].path().route()
    }

    fn kind(&self, i: usize) -> PathKind {
        self.hosts[i].node.peers()[0].path().status().kind
    }

    /// Runs until both hosts' paths have `kind` (at most `limit`); returns the time it took.
    fn until_both(&mut self, kind: PathKind, limit: Duration) -> Duration {
        let start = self.now;
        while self.now - start < limit {
            self.run_for(Duration::from_millis(50));
            if self.kind(0) == kind && self.kind(1) == kind {
                return self.now - start;
            }
        }
        panic!(
            "paths {:?}/{:?} after {:?}, wanted {kind:?}; changes A {:?} B {:?}",
            self.kind(0),
            self.kind(1),
            limit,
            self.hosts[0].changes,
            self.hosts[1].changes
        );
    }

    /// Starts data both ways (50 packets per second each).
    fn start_data(&mut self) {
        self.data_every = Some(Duration::from_millis(20));
        self.next_data = self.now;
        for h in &mut self.hosts {
            h.max_gap = Duration::ZERO;
            h.last_rx = None;
        }
    }

    fn dropped(&self, i: usize) -> u64 {
        self.hosts[i].node.peers()[0].traffic().dropped
    }
}

#[test]
fn cone_nats_go_direct_via_stun_rendezvous_and_relay_allocation() {
    let mut s = Sim::new(
        Some(NatKind::Cone),
        Some(NatKind::Cone),
        PathConfig::default(),
    );
    let took = s.until_both(PathKind::Direct, Duration::from_secs(5));
    assert!(took < Duration::from_secs(3), "direct after {took:?}");
    for h in &s.hosts {
        // Host, server-reflexive (from the rendezvous, then STUN) and the relayed candidate.
        let kinds: Vec<CandidateKind> = h.cands.1.iter().map(|c| c.kind).collect();
        assert!(kinds.contains(&CandidateKind::Srflx), "{kinds:?}");
        assert!(kinds.contains(&CandidateKind::Relayed), "{kinds:?}");
        assert_eq!(h.node.mapping(), MappingBehaviour::EndpointIndependent);
        assert_eq!(
            h.node.relay_link().map(|l| l.state()),
            Some(LinkState::Allocated)
        );
        assert_eq!(h.allocations, 1);
    }
    s.start_data();
    s.run_for(Duration::from_secs(5));
    for i in 0..2 {
        assert!(
            s.hosts[i].received >= 240,
            "host {i}: {}",
            s.hosts[i].received
        );
        assert_eq!(s.dropped(i), 0);
    }
}

#[test]
fn failover_to_the_relay_and_back_to_direct() {
    let mut s = Sim::new(
        Some(NatKind::Cone),
        Some(NatKind::Cone),
        PathConfig::default(),
    );
    s.until_both(PathKind::Direct, Duration::from_secs(5));
    s.start_data();
    s.run_for(Duration::from_secs(2));
    s.direct_dead = true;
    let took = s.until_both(PathKind::Relay, Duration::from_secs(5));
    assert!(took < Duration::from_secs(3), "relay after {took:?}");
    let before = (s.hosts[0].received, s.hosts[1].received);
    s.run_for(Duration::from_secs(3));
    for (i, b) in [before.0, before.1].into_iter().enumerate() {
        assert!(
            s.hosts[i].received - b >= 140,
            "host {i} received {} over the relay in 3 s",
            s.hosts[i].received - b
        );
    }
    // Failover gap: the longest data gap stays short (pong timeout + dead detection).
    for h in &s.hosts {
        assert!(
            h.max_gap < Duration::from_millis(2500),
            "gap {:?}",
            h.max_gap
        );
    }
    s.direct_dead = false;
    s.until_both(PathKind::Direct, Duration::from_secs(40));
    let before = (s.hosts[0].received, s.hosts[1].received);
    s.run_for(Duration::from_secs(2));
    assert!(s.hosts[0].received > before.0 && s.hosts[1].received > before.1);
}

#[test]
fn relay_fallback_when_both_sides_are_symmetric() {
    let cfg = PathConfig {
        birthday_sockets: 0,
        birthday_probes: 0,
        ..PathConfig::default()
    };
    let mut s = Sim::new(Some(NatKind::Symmetric), Some(NatKind::Symmetric), cfg);
    s.until_both(PathKind::Relay, Duration::from_secs(5));
    for h in &s.hosts {
        assert_eq!(h.node.mapping(), MappingBehaviour::EndpointDependent);
    }
    s.start_data();
    s.run_for(Duration::from_secs(4));
    for i in 0..2 {
        assert!(
            s.hosts[i].received >= 190,
            "host {i}: {}",
            s.hosts[i].received
        );
    }
}

#[test]
fn birthday_search_finds_a_direct_path_from_a_pool_socket() {
    let mut s = Sim::new(
        Some(NatKind::Symmetric),
        Some(NatKind::Cone),
        PathConfig::default(),
    );
    s.until_both(PathKind::Direct, Duration::from_secs(30));
    assert_eq!(
        s.hosts[0].node.mapping(),
        MappingBehaviour::EndpointDependent
    );
    assert!(s.hosts[0].pool_opened >= 1);
    // The hard side's path leaves from a pool socket.
    let r = s.route(0).unwrap_or_else(|| unreachable!());
    assert_ne!(r.local, DATA_SOCKET, "{r:?}");
    s.start_data();
    s.run_for(Duration::from_secs(3));
    assert!(s.hosts[0].received >= 140 && s.hosts[1].received >= 140);
    // Unused pool sockets are closed again; the one carrying the path stays.
    assert_eq!(s.hosts[0].pool, r.local);
}

#[test]
fn a_rebinding_nat_gets_its_peer_back() {
    let mut s = Sim::new(
        Some(NatKind::Cone),
        Some(NatKind::Cone),
        PathConfig::default(),
    );
    s.until_both(PathKind::Direct, Duration::from_secs(5));
    s.start_data();
    s.run_for(Duration::from_secs(1));
    if let Some(nat) = s.hosts[0].nat.as_mut() {
        nat.rebind();
    }
    // The rendezvous connection notices first (its datagrams come from a new port).
    let observed = s.source(0, DATA_SOCKET, sa(RDV));
    let at = s.now + 2 * HOP;
    s.signals.push((at, 0, Signal::ObservedChanged(observed)));
    s.run_for(Duration::from_secs(20));
    assert_eq!(s.kind(0), PathKind::Direct);
    assert_eq!(s.kind(1), PathKind::Direct);
    let before = (s.hosts[0].received, s.hosts[1].received);
    s.run_for(Duration::from_secs(2));
    assert!(s.hosts[0].received - before.0 >= 90);
    assert!(s.hosts[1].received - before.1 >= 90);
    // Our new mapping became our server-reflexive candidate.
    let srflx = s.hosts[0].node.server_reflexive().addr();
    assert_eq!(srflx.map(|a| a.port()), Some(observed.port()));
}

#[test]
fn a_rendezvous_outage_keeps_working_paths() {
    let mut s = Sim::new(
        Some(NatKind::Cone),
        Some(NatKind::Cone),
        PathConfig::default(),
    );
    s.until_both(PathKind::Direct, Duration::from_secs(5));
    s.start_data();
    s.rdv_up = false;
    // Gone for two minutes (longer than the NAT keepalive and the offer retry).
    s.run_for(Duration::from_secs(120));
    assert_eq!((s.kind(0), s.kind(1)), (PathKind::Direct, PathKind::Direct));
    for h in &s.hosts {
        assert!(
            h.max_gap < Duration::from_millis(100),
            "gap {:?}",
            h.max_gap
        );
        assert_eq!(h.changes.len(), 1, "{:?}", h.changes);
    }
    // Back: both register again; nothing drops.
    s.rdv_up = true;
    s.register(0);
    s.register(1);
    s.run_for(Duration::from_secs(10));
    for h in &s.hosts {
        assert_eq!(h.changes.len(), 1, "{:?}", h.changes);
        assert!(
            h.max_gap < Duration::from_millis(100),
            "gap {:?}",
            h.max_gap
        );
    }
}

#[test]
fn reauthentication_keeps_paths_and_the_relay_allocation() {
    let cfg = PathConfig {
        birthday_sockets: 0,
        birthday_probes: 0,
        ..PathConfig::default()
    };
    let mut s = Sim::new(Some(NatKind::Symmetric), Some(NatKind::Symmetric), cfg);
    s.until_both(PathKind::Relay, Duration::from_secs(5));
    s.start_data();
    s.run_for(Duration::from_secs(1));
    // The rendezvous re-authenticates both (a new session on the same connection): a new
    // registration with fresh relay credentials in the same layout.
    s.register(0);
    s.register(1);
    s.run_for(Duration::from_secs(10));
    for h in &s.hosts {
        assert_eq!(h.allocations, 1, "the allocation was redone");
        assert_eq!(h.changes.len(), 1, "{:?}", h.changes);
        assert!(
            h.max_gap < Duration::from_millis(100),
            "gap {:?}",
            h.max_gap
        );
    }
}

#[test]
fn a_working_path_is_never_dropped_by_a_new_session() {
    let cfg = PathConfig {
        birthday_sockets: 0,
        birthday_probes: 0,
        ..PathConfig::default()
    };
    let mut s = Sim::new(Some(NatKind::Symmetric), Some(NatKind::Symmetric), cfg);
    s.until_both(PathKind::Relay, Duration::from_secs(5));
    s.start_data();
    s.run_for(Duration::from_secs(1));
    let offers = s.hosts[0].offers;
    // New sessions while the relay path carries traffic: the peer comes online again, the
    // offers are retried (the two nodes re-offer on their own timers as well).
    for _ in 0..3 {
        let key = s.hosts[1].key;
        let at = s.now;
        s.signals
            .push((at, 0, Signal::Presence { key, online: true }));
        s.on_offer(0);
        s.run_for(Duration::from_secs(3));
    }
    assert!(s.hosts[0].offers > offers);
    for i in 0..2 {
        let h = &s.hosts[i];
        assert!(
            h.changes.iter().all(|(_, k, _)| *k != PathKind::None),
            "host {i}: {:?}",
            h.changes
        );
        assert_eq!(s.dropped(i), 0);
        assert!(
            h.max_gap < Duration::from_millis(100),
            "gap {:?}",
            h.max_gap
        );
    }
}

#[test]
fn the_simulation_is_deterministic() {
    let run = || {
        let mut s = Sim::new(
            Some(NatKind::Symmetric),
            Some(NatKind::Cone),
            PathConfig::default(),
        );
        s.until_both(PathKind::Direct, Duration::from_secs(30));
        (
            s.hosts[0].changes.clone(),
            s.hosts[1].changes.clone(),
            s.route(0),
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn a_refused_allocation_retries_with_fresh_credentials() {
    let cfg = PathConfig {
        birthday_sockets: 0,
        birthday_probes: 0,
        ..PathConfig::default()
    };
    let mut s = Sim::with(
        Some(NatKind::Symmetric),
        Some(NatKind::Symmetric),
        cfg,
        true,
    );
    s.run_for(Duration::from_secs(3));
    for h in &s.hosts {
        let link = h.node.relay_link().unwrap_or_else(|| unreachable!());
        assert_eq!(link.state(), LinkState::Failed);
        assert!(
            link.error().is_some_and(|e| e.contains("401")),
            "{:?}",
            link.error()
        );
        assert!(!h.cands.1.iter().any(|c| c.kind == CandidateKind::Relayed));
    }
    assert_eq!((s.kind(0), s.kind(1)), (PathKind::None, PathKind::None));
    // The rendezvous pushes fresh credentials (same regions): the failed allocation is
    // retried at once, the relayed candidate is offered, the relay carries the pair.
    s.bad_credentials = false;
    for i in 0..2 {
        let r = s.relays(i);
        let at = s.now;
        s.signals.push((at, i, Signal::Relays(r)));
    }
    let took = s.until_both(PathKind::Relay, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "relay after {took:?}");
    for h in &s.hosts {
        assert_eq!(h.allocations, 2);
    }
}

#[test]
fn a_host_without_udp_relays_over_tls_and_reaches_its_peer() {
    let cfg = PathConfig {
        birthday_sockets: 0,
        birthday_probes: 0,
        ..PathConfig::default()
    };
    let mut s = Sim::unstarted(Some(NatKind::Cone), Some(NatKind::Cone), cfg, false);
    s.udp_blocked[0] = true;
    s.offer_tls = true;
    s.start();
    let took = s.until_both(PathKind::Relay, Duration::from_secs(30));
    // The UDP Allocate goes unanswered for UDP_FALLBACK_AFTER, then TLS allocates at once.
    assert!(
        took < UDP_FALLBACK_AFTER + Duration::from_secs(5),
        "relay after {took:?}"
    );
    let a = s.hosts[0]
        .node
        .relay_link()
        .unwrap_or_else(|| unreachable!());
    assert_eq!(a.transport().as_str(), "tls");
    assert!(a.is_allocated());
    assert_eq!(s.hosts[0].allocations, 2, "UDP first, then TLS");
    // The other host's UDP works: it stays on UDP.
    let b = s.hosts[1]
        .node
        .relay_link()
        .unwrap_or_else(|| unreachable!());
    assert_eq!(b.transport().as_str(), "udp");
    let link = a.id();
    s.start_data();
    s.run_for(Duration::from_secs(5));
    for h in &s.hosts {
        assert!(h.received > 200, "received {}", h.received);
    }
    // The stream breaks: the allocation goes with it; the driver reconnects and the link
    // allocates again, and the peers keep reaching each other.
    let now = s.now;
    s.close_stream(0, link);
    s.hosts[0]
        .node
        .relay_stream_down(now, link, "reset by peer");
    s.pump(0);
    assert_eq!(
        s.hosts[0].node.relay_link().map(|l| l.state()),
        Some(LinkState::Failed)
    );
    s.run_for(Duration::from_secs(1));
    let now = s.now;
    s.open_stream(0, link);
    s.hosts[0].node.relay_stream_up(now, link);
    s.pump(0);
    let before = s.hosts[1].received;
    s.run_for(Duration::from_secs(10));
    assert!(s.hosts[0]
        .node
        .relay_link()
        .is_some_and(|l| l.is_allocated()));
    assert!(s.hosts[1].received > before + 100);
    assert_eq!((s.kind(0), s.kind(1)), (PathKind::Relay, PathKind::Relay));
    // UDP comes back: after UDP_RETRY_AFTER the latency probe answers and the link returns
    // to UDP.
    s.udp_blocked[0] = false;
    s.run_for(UDP_RETRY_AFTER + RELAY_MEASURE_INTERVAL + Duration::from_secs(5));
    let a = s.hosts[0]
        .node
        .relay_link()
        .unwrap_or_else(|| unreachable!());
    assert_eq!(a.transport().as_str(), "udp");
    assert!(a.is_allocated());
}
