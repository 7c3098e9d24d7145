//! The client node: the whole client brain as one sans-IO object ([`Node`]), in the shape of
//! str0m's `Rtc` or quinn-proto's `Connection`.
//!
//! **One input door**: [`Node::handle_datagram`] (a datagram on socket [`Socket`] from an
//! address at `now`), [`Node::handle_wireguard`] (an outgoing WireGuard packet for peer `P`),
//! [`Node::handle_signal`] (a fact from the rendezvous), the control requests
//! ([`Node::ping`], [`Node::set_debug`]), the answers to what the node asked the driver for
//! ([`Node::set_hosts`], [`Node::relay_resolved`], [`Node::pool_report`],
//! [`Node::set_keepalive`], [`Node::offer_not_queued`]) and [`Node::handle_timeout`].
//! **One output door**: [`Node::poll_transmit`] ({socket, destination, bytes}),
//! [`Node::poll_event`] ([`Event`]: offers to signal, candidates to publish, the birthday pool
//! to open or close, host names to resolve, status changes) and [`Node::poll_timeout`].
//!
//! Inside, sub-machines report to the node by return values and events and never call each
//! other: one [`PeerPath`] per peer (pairs, probes, selection, birthday search, keepalive),
//! one [`OfferTimer`] per peer, [`LocalCandidates`] (the candidate sources), [`ServerReflexive`],
//! [`Discovery`] (STUN transactions and our mapping behaviour), [`HomeRelay`] (region choice)
//! and [`RelayLink`] (the TURN allocation over its transport).
//!
//! The driver (`client/src/daemon/`) owns the sockets, the WireGuard side, the rendezvous
//! task, DNS and the clock; it moves inputs in and performs outputs. See
//! `docs/design/client-node.md`.

pub mod candidates;
pub mod discovery;
pub mod offers;
pub mod relay;
pub mod srflx;

#[cfg(test)]
mod sim;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::addr::unmap;
use crate::path::{
    Candidate, CandidateKind, LocalSocket, MappingBehaviour, PathAddr, PathConfig, PathEvent,
    PathKind, PeerPath, Via, DATA_SOCKET,
};
use crate::probe::{classify, peek_key_id, PacketKind, TxId};
use crate::turn_client::Input;
use crate::wire::RelayRegion;
use candidates::{LocalCandidates, Source};
use discovery::{Discovery, Purpose};
use offers::{OfferTimer, OFFER_DEFER, OFFER_RETRY};
use relay::{
    HomeRelay, LinkEvent, LinkId, LinkState, RelayLink, RelayRoute, RelayTransport,
    STREAM_FALLBACK_AFTER, TURN_RETRY, UDP_FALLBACK_AFTER, UDP_RETRY_AFTER,
};
use srflx::{ServerReflexive, SrflxSource};

/// How often the driver is asked to re-read interface addresses ([`Event::ScanHosts`]).
pub const HOST_SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// How long the source of a peer's last WireGuard packet stays usable as the way back while
/// no path is selected (a WireGuard handshake round trip is far shorter).
pub const LAST_RX_FALLBACK: Duration = Duration::from_secs(5);
/// How often unused birthday pool sockets are looked for once no search needs the pool.
pub const POOL_GC_INTERVAL: Duration = Duration::from_secs(1);
/// How often the pool is asked for again while a search needs it and it is not open.
pub const POOL_ASK_INTERVAL: Duration = Duration::from_secs(1);
/// Delay of the first offer after registration for the peer that goes first.
pub const REGISTERED_OFFER_DELAY: Duration = Duration::from_millis(300);
/// Delay of the offer to a peer that came online, for the peer that goes first.
pub const PRESENCE_OFFER_DELAY: Duration = Duration::from_millis(100);

/// A local socket of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Socket {
    /// The data socket.
    Data,
    /// Birthday pool socket `.0` (`1..`; see [`crate::path::LocalSocket`]).
    Pool(LocalSocket),
    /// The stream of relay link `.0` (a stream transport; the destination is the server).
    Relay(LinkId),
}

impl Socket {
    /// The socket a pair's [`PathAddr::local`] names.
    pub fn of_local(local: LocalSocket) -> Socket {
        if local == DATA_SOCKET {
            Socket::Data
        } else {
            Socket::Pool(local)
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// From which socket.
    pub socket: Socket,
    /// To where (canonical form; the driver adapts it to its socket's family).
    pub dst: SocketAddr,
    /// The bytes.
    pub payload: Vec<u8>,
    /// IP TTL for this datagram (`None`: the socket's default; only low-TTL birthday pool
    /// pings set it, see [`crate::path::PathConfig::birthday_ttl`]).
    pub ttl: Option<u8>,
}

/// A received datagram that is a WireGuard packet for peer `peer`: hand `bytes[range]` of the
/// input to its WireGuard side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The peer.
    pub peer: usize,
    /// Where the WireGuard packet is in the input.
    pub range: Range<usize>,
}

/// Something the driver must do or may log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Our candidates changed: give them (and the version) to signalling.
    LocalCandidates {
        /// Version (echoed by signalling with each punch).
        version: u64,
        /// The list.
        candidates: Vec<Candidate>,
    },
    /// Ask the rendezvous to start a session with this peer (if the request cannot be
    /// queued, call [`Node::offer_not_queued`]).
    Offer {
        /// The peer's key.
        peer: [u8; 32],
    },
    /// The pair carrying a peer's data changed (log it; publish a new fast route).
    PathChanged {
        /// Peer index.
        peer: usize,
        /// New kind.
        kind: PathKind,
        /// New remote (None = no path).
        remote: Option<PathAddr>,
        /// Why.
        reason: String,
    },
    /// A pong arrived (answers `meshpunch ping`).
    Pong {
        /// Peer index.
        peer: usize,
        /// The pair.
        remote: PathAddr,
        /// Its kind.
        kind: PathKind,
        /// The ping's transaction id.
        tx: TxId,
        /// Round trip.
        rtt: Duration,
    },
    /// A session with a peer started.
    Punching {
        /// Peer index.
        peer: usize,
        /// Candidates kept.
        candidates: usize,
    },
    /// The peer sent candidates we refuse (newly counted).
    CandidatesRefused {
        /// Peer index.
        peer: usize,
        /// How many more than before.
        count: u64,
    },
    /// Open the birthday pool and answer with [`Node::pool_report`].
    OpenPool,
    /// Close every pool socket not in `keep`, then [`Node::pool_report`].
    ClosePool {
        /// Pool sockets a pair still uses.
        keep: Vec<LocalSocket>,
    },
    /// Re-read interface addresses and answer with [`Node::set_hosts`].
    ScanHosts,
    /// Resolve a relay's host name and answer with [`Node::relay_resolved`].
    Resolve {
        /// Relay probe index.
        index: usize,
        /// `host:port`.
        authority: String,
    },
    /// A STUN answer gave the data socket's public address (the binding-lifetime
    /// measurement keys on it; answer with [`Node::set_keepalive`] when it changes).
    PublicAddress(SocketAddr),
    /// Our server-reflexive address changed.
    ServerReflexive {
        /// Before.
        old: Option<SocketAddr>,
        /// Now.
        new: SocketAddr,
        /// From STUN or from the rendezvous.
        source: SrflxSource,
    },
    /// Our NAT's mapping behaviour as measured changed.
    MappingBehaviour(MappingBehaviour),
    /// An allocation on the home relay started.
    RelayAllocating {
        /// Region.
        region: String,
        /// Server.
        server: SocketAddr,
        /// How the server is reached.
        transport: RelayTransport,
    },
    /// Open a stream for relay link `link` (TURN over TCP or TLS) to `server` and keep it
    /// open (reconnecting with backoff) until [`Event::CloseRelayStream`]; report each
    /// connect and loss with [`Node::relay_stream_up`] / [`Node::relay_stream_down`], hand
    /// every framed message in as `handle_datagram(now, Socket::Relay(link), server, msg)`
    /// and write every `Socket::Relay(link)` transmit to it (with the stream padding).
    OpenRelayStream {
        /// The link.
        link: LinkId,
        /// The TURN server.
        server: SocketAddr,
        /// TCP or TLS.
        kind: relay::StreamKind,
        /// The name a TLS certificate is checked against (the URI's host; an IP literal is
        /// checked against the certificate's IP SANs).
        host: String,
    },
    /// Close relay link `link`'s stream once what was queued for it is written.
    CloseRelayStream {
        /// The link.
        link: LinkId,
    },
    /// The allocation is ready.
    RelayAllocated {
        /// Region.
        region: String,
        /// Our relayed address.
        relayed: SocketAddr,
    },
    /// A relay operation failed.
    RelayError {
        /// Region.
        region: String,
        /// What went wrong.
        message: String,
    },
    /// The smallest tunnel MTU any working path to any peer allows changed ([`Node::mtu`]):
    /// a `--tun` driver sets its interface MTU to `min(configured, this)`; `None` = no path
    /// has a measured MTU (yet).
    PathMtu(Option<u16>),
}

/// The rendezvous' go-ahead to punch towards one peer ([`Signal::Punch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Punch {
    /// The peer.
    pub peer: [u8; 32],
    /// Its candidates.
    pub candidates: Vec<Candidate>,
    /// Session secret.
    pub secret: [u8; 32],
    /// When to start probing.
    pub start_at: Instant,
    /// Version of our candidates the peer received.
    pub local_version: u64,
    /// The peer's address as the rendezvous observed it (the only birthday target IP).
    pub peer_observed: Option<SocketAddr>,
}

/// A fact from the rendezvous (the driver's signalling task translates its events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// (Re)registered.
    Registered {
        /// Our address as the rendezvous saw it.
        observed: SocketAddr,
        /// STUN servers to use from the data socket.
        stun: Vec<SocketAddr>,
        /// Relay regions with credentials.
        relays: Vec<RelayRegion>,
        /// The rendezvous connection rides the data socket (`observed` is its mapping).
        shared_socket: bool,
        /// The transport the registration came over: an address observed over TCP is a TCP
        /// mapping, never a UDP candidate.
        transport: crate::wire::Transport,
    },
    /// Fresh relay credentials.
    Relays(Vec<RelayRegion>),
    /// The rendezvous sees us from a new address.
    ObservedChanged(SocketAddr),
    /// A watched peer came or went.
    Presence {
        /// Its key.
        key: [u8; 32],
        /// Online now.
        online: bool,
    },
    /// Punch now.
    Punch(Punch),
    /// Our offer to this peer failed.
    OfferFailed {
        /// The peer.
        peer: [u8; 32],
        /// Why (status).
        reason: String,
    },
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Our public key.
    pub me: [u8; 32],
    /// Port of the data socket (host candidates use it).
    pub data_port: u16,
    /// The data socket is dual-stack (IPv6 candidates usable).
    pub v6: bool,
    /// Path manager timers (with `loopback_candidates` as the data socket allows).
    pub path: PathConfig,
    /// A rendezvous is configured (offers are made).
    pub signalling: bool,
    /// Seed of every random choice (path managers, STUN and TURN transaction ids).
    pub seed: u64,
    /// Unix time in milliseconds at `now` (probe replay windows).
    pub unix_ms: u64,
}

/// One configured peer.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// Its key.
    pub key: [u8; 32],
    /// Static candidates from the config.
    pub static_candidates: Vec<SocketAddr>,
    /// The session secret of a static session (both sides derive it from their keys);
    /// `None` = no static session.
    pub static_secret: Option<[u8; 32]>,
}

/// Traffic counters of one peer (data through the node; a driver's fast path counts its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets dropped for want of a path.
    pub dropped: u64,
    /// Of `tx_bytes`, bytes sent through the relay.
    pub relay_tx_bytes: u64,
    /// Of `rx_bytes`, bytes received through the relay.
    pub relay_rx_bytes: u64,
}

/// One peer inside the node.
#[derive(Debug)]
pub struct NodePeer {
    key: [u8; 32],
    path: PeerPath,
    offer: OfferTimer,
    /// Version of our candidates the peer got with the latest punch.
    sent_version: u64,
    static_candidates: Vec<SocketAddr>,
    refused_seen: u64,
    note: Option<String>,
    /// Where this peer's last WireGuard packet came from, and when: the way back while no
    /// path is selected yet (the peer found its path before we did).
    last_rx: Option<(PathAddr, Instant)>,
    traffic: Traffic,
    /// Removed ([`Node::remove_peer`]): keeps its index (the driver's slot), has no session,
    /// drops its packets, is never offered to; [`Node::add_peer`] revives it.
    removed: bool,
}

impl NodePeer {
    /// The peer's key.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }
    /// Its path manager (the one source of truth for its route: [`PeerPath::route`]).
    pub fn path(&self) -> &PeerPath {
        &self.path
    }
    /// Why there is no session (offer failed, peer offline), if that is the news.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }
    /// Traffic through the node.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }
    /// Removed with [`Node::remove_peer`] (its index stays taken).
    pub fn is_removed(&self) -> bool {
        self.removed
    }
}

/// The client node (see the module docs).
#[derive(Debug)]
pub struct Node {
    me: [u8; 32],
    v6: bool,
    /// Path manager settings (for peers added later).
    path_cfg: PathConfig,
    signalling: bool,
    peers: Vec<NodePeer>,
    key_ids: HashMap<u32, usize>,
    addrs: HashMap<PathAddr, usize>,
    hosts: Vec<IpAddr>,
    cands: LocalCandidates,
    srflx: ServerReflexive,
    observed: Option<SocketAddr>,
    shares_data_socket: bool,
    /// The transport of the current rendezvous registration.
    observed_via: crate::wire::Transport,
    discovery: Discovery,
    home: HomeRelay,
    link: Option<RelayLink>,
    next_link_id: LinkId,
    turn_retry_at: Option<Instant>,
    /// The routes of the current link's region and which one the link uses.
    link_routes: Vec<RelayRoute>,
    link_route: usize,
    /// When the current link moves on to the next route if the server has not answered.
    link_fallback_at: Option<Instant>,
    /// When UDP to the home relay last went unanswered.
    udp_failed_at: Option<Instant>,
    keepalive: Duration,
    next_host_scan: Instant,
    pool_announced: u16,
    pool_open: usize,
    pool_asked: Option<Instant>,
    pool_gc_at: Option<Instant>,
    unknown_probes: u64,
    /// The [`Node::mtu`] last reported by [`Event::PathMtu`].
    mtu_reported: Option<u16>,
    rng: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    out: Vec<u8>,
}

/// A candidate address as the data socket can use it: the canonical form (IPv4-mapped
/// spellings become IPv4), and `None` for IPv6 when the socket is IPv4 only.
pub fn usable_candidate(v6_socket: bool, a: SocketAddr) -> Option<SocketAddr> {
    let a = unmap(a);
    (v6_socket || a.is_ipv4()).then_some(a)
}

impl Node {
    /// A node with `peers` at `now`; static sessions start at once. The driver then reports
    /// the interface addresses ([`Node::set_hosts`]).
    pub fn new(cfg: NodeConfig, peers: Vec<PeerSpec>, now: Instant) -> Self {
        let mut rng = cfg.seed | 1;
        let mut node_peers = Vec::with_capacity(peers.len());
        for spec in peers {
            let seed = crate::rng::xorshift64star(&mut rng);
            let mut statics: Vec<SocketAddr> = spec
                .static_candidates
                .iter()
                .filter_map(|a| usable_candidate(cfg.v6, *a))
                .collect();
            statics.dedup();
            let mut path =
                PeerPath::new(cfg.path.clone(), cfg.me, spec.key, now, cfg.unix_ms, seed);
            if let (Some(secret), false) = (spec.static_secret, statics.is_empty()) {
                let cands = statics
                    .iter()
                    .map(|a| Candidate {
                        kind: CandidateKind::Host,
                        addr: *a,
                    })
                    .collect();
                path.start_session(now, &secret, now, cands);
            }
            node_peers.push(NodePeer {
                key: spec.key,
                path,
                offer: OfferTimer::default(),
                sent_version: 0,
                static_candidates: statics,
                refused_seen: 0,
                note: None,
                last_rx: None,
                traffic: Traffic::default(),
                removed: false,
            });
        }
        let dseed = crate::rng::xorshift64star(&mut rng);
        let mut node = Node {
            me: cfg.me,
            v6: cfg.v6,
            path_cfg: cfg.path.clone(),
            signalling: cfg.signalling,
            peers: node_peers,
            key_ids: HashMap::new(),
            addrs: HashMap::new(),
            hosts: Vec::new(),
            cands: LocalCandidates::new(cfg.data_port),
            srflx: ServerReflexive::default(),
            observed: None,
            shares_data_socket: false,
            observed_via: crate::wire::Transport::Quic,
            discovery: Discovery::new(now, dseed),
            home: HomeRelay::default(),
            link: None,
            next_link_id: 1,
            turn_retry_at: None,
            link_routes: Vec::new(),
            link_route: 0,
            link_fallback_at: None,
            udp_failed_at: None,
            keepalive: cfg.path.keepalive_interval,
            next_host_scan: now + HOST_SCAN_INTERVAL,
            pool_announced: 0,
            pool_open: 0,
            pool_asked: None,
            pool_gc_at: None,
            unknown_probes: 0,
            mtu_reported: None,
            rng,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            out: vec![0u8; 65536 + 64],
        };
        node.rebuild_maps();
        node
    }

    // ----- inputs -----

    /// A datagram on `socket` from `from`. Returns the WireGuard packet in it, if it is one
    /// for a peer (hand `pkt[range]` to that peer's WireGuard side).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        socket: Socket,
        from: SocketAddr,
        pkt: &[u8],
    ) -> Option<Delivery> {
        let from = unmap(from);
        let r = self.on_datagram(now, socket, from, pkt);
        self.drive(now);
        r
    }

    fn on_datagram(
        &mut self,
        now: Instant,
        socket: Socket,
        from: SocketAddr,
        pkt: &[u8],
    ) -> Option<Delivery> {
        let kind = classify(pkt);
        if let Socket::Pool(l) = socket {
            return match kind {
                PacketKind::Probe | PacketKind::WireGuard => {
                    self.on_peer_packet(now, PathAddr::direct_on(l, from), pkt, 0..pkt.len())
                }
                _ => None,
            };
        }
        if socket == Socket::Data && kind == PacketKind::Stun && self.discovery.is_ours(pkt) {
            self.on_stun(now, from, pkt);
            return None;
        }
        if let Some(link) = &mut self.link {
            if link.owns(socket, from) {
                match link.handle_input(now, pkt) {
                    Input::Data { peer, range } => {
                        let inner = pkt.get(range.clone())?;
                        let r = self.on_peer_packet(
                            now,
                            PathAddr::relay(unmap(peer)),
                            inner,
                            0..inner.len(),
                        )?;
                        return Some(Delivery {
                            peer: r.peer,
                            range: range.start + r.range.start..range.start + r.range.end,
                        });
                    }
                    Input::Consumed => return None,
                    Input::NotTurn => {}
                }
            }
        }
        if socket != Socket::Data {
            return None;
        }
        match kind {
            PacketKind::Probe | PacketKind::WireGuard => {
                self.on_peer_packet(now, PathAddr::direct(from), pkt, 0..pkt.len())
            }
            _ => None,
        }
    }

    fn on_peer_packet(
        &mut self,
        now: Instant,
        from: PathAddr,
        pkt: &[u8],
        range: Range<usize>,
    ) -> Option<Delivery> {
        match classify(pkt) {
            PacketKind::Probe => {
                let kid = peek_key_id(pkt).ok()?;
                let Some(&i) = self.key_ids.get(&kid) else {
                    self.unknown_probes += 1;
                    return None;
                };
                // A refused probe is counted by the path manager.
                let _ = self.peers[i].path.handle_probe(now, from, pkt);
                None
            }
            PacketKind::WireGuard => {
                let &i = self.addrs.get(&from)?;
                let p = &mut self.peers[i];
                if p.path.direct_blocked() && p.path.class_of(&from) != PathKind::Relay {
                    return None;
                }
                p.traffic.rx_bytes += pkt.len() as u64;
                p.traffic.rx_packets += 1;
                if p.path.class_of(&from) == PathKind::Relay {
                    p.traffic.relay_rx_bytes += pkt.len() as u64;
                }
                p.last_rx = Some((from, now));
                p.path.on_data_received(now, &from);
                Some(Delivery { peer: i, range })
            }
            _ => None,
        }
    }

    /// An outgoing WireGuard packet for peer `peer`. Returns where to send which bytes (the
    /// packet itself, or its relay framing), or `None` when there is no way to the peer.
    pub fn handle_wireguard<'a>(
        &'a mut self,
        now: Instant,
        peer: usize,
        pkt: &'a [u8],
    ) -> Option<(Socket, SocketAddr, &'a [u8])> {
        let p = self.peers.get_mut(peer)?;
        if p.removed {
            return None;
        }
        p.path.on_data_sent(now);
        self.flush_peer(now, peer);
        let p = &mut self.peers[peer];
        // No path selected yet, but the peer's packets arrive from a known remote: answer
        // there instead of dropping (a lost handshake response costs WireGuard a 5 s retry).
        let fallback = p
            .last_rx
            .filter(|(_, at)| now.saturating_duration_since(*at) < LAST_RX_FALLBACK)
            .map(|(from, _)| from)
            .filter(|from| !p.path.direct_blocked() || p.path.class_of(from) == PathKind::Relay);
        let Some(dest) = p.path.route().or(fallback) else {
            p.traffic.dropped += 1;
            return None;
        };
        p.traffic.tx_bytes += pkt.len() as u64;
        p.traffic.tx_packets += 1;
        match dest.via {
            Via::Direct => Some((Socket::of_local(dest.local), dest.addr, pkt)),
            Via::Relay => {
                let sent = self.frame_relay(now, dest.addr, pkt);
                let Some((socket, server, n)) = sent else {
                    self.peers[peer].traffic.dropped += 1;
                    return None;
                };
                self.peers[peer].traffic.relay_tx_bytes += pkt.len() as u64;
                Some((socket, server, &self.out[..n]))
            }
        }
    }

    /// The data path of peer `peer` sent packets without the node (the driver's fast path):
    /// data is flowing.
    pub fn on_data_sent(&mut self, now: Instant, peer: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.path.on_data_sent(now);
        }
        self.drive(now);
    }

    /// A fact from the rendezvous.
    pub fn handle_signal(&mut self, now: Instant, sig: Signal) {
        match sig {
            Signal::Registered {
                observed,
                stun,
                relays,
                shared_socket,
                transport,
            } => {
                let before = self.observed.replace(observed);
                self.shares_data_socket = shared_socket;
                self.observed_via = transport;
                self.observed_as_srflx(now, before, observed);
                self.discovery.set_servers(now, stun);
                self.set_regions(now, relays);
                for i in 0..self.peers.len() {
                    if self.peers[i].path.route().is_none() {
                        let delay = if self.me < self.peers[i].key {
                            REGISTERED_OFFER_DELAY
                        } else {
                            OFFER_DEFER
                        };
                        self.schedule_offer(now, i, delay);
                    }
                }
            }
            Signal::Relays(r) => self.set_regions(now, r),
            Signal::ObservedChanged(a) => {
                let before = self.observed.replace(a);
                self.observed_as_srflx(now, before, a);
                // Re-ask STUN from the data socket now; a changed mapping re-gathers.
                self.discovery.refresh(now);
                self.events.push_back(Event::ScanHosts);
                self.update_local(now);
            }
            Signal::Presence { key, online } => {
                if let Some(i) = self.find(&key) {
                    if online {
                        self.peers[i].note = None;
                        let p = &self.peers[i];
                        if p.path.route().is_none() || !p.path.has_session() {
                            let delay = if self.me < key {
                                PRESENCE_OFFER_DELAY
                            } else {
                                OFFER_DEFER
                            };
                            self.schedule_offer(now, i, delay);
                        }
                    } else {
                        let msg = "peer is not connected to the rendezvous";
                        self.peers[i].note = Some(msg.into());
                        self.peers[i].path.set_reason(msg);
                    }
                }
            }
            Signal::Punch(punch) => self.on_punch(now, punch),
            Signal::OfferFailed { peer, reason } => {
                if let Some(i) = self.find(&peer) {
                    let msg = format!("offer failed: {reason}");
                    self.peers[i].note = Some(msg.clone());
                    self.peers[i].path.set_reason(msg);
                    self.schedule_offer(now, i, OFFER_RETRY);
                }
            }
        }
        self.drive(now);
    }

    fn on_punch(&mut self, now: Instant, punch: Punch) {
        let Punch {
            peer,
            candidates,
            secret,
            start_at,
            local_version,
            peer_observed,
        } = punch;
        let Some(i) = self.find(&peer) else { return };
        let v6 = self.v6;
        let p = &mut self.peers[i];
        let mut cands: Vec<Candidate> = candidates
            .into_iter()
            .filter_map(|c| usable_candidate(v6, c.addr).map(|addr| Candidate { addr, ..c }))
            .collect();
        for a in &p.static_candidates {
            if !cands.iter().any(|c| c.addr == *a) {
                cands.push(Candidate {
                    kind: CandidateKind::Host,
                    addr: *a,
                });
            }
        }
        self.events.push_back(Event::Punching {
            peer: i,
            candidates: cands.len(),
        });
        p.note = None;
        p.offer.cancel();
        // Before the candidates: birthday targets are checked against it.
        p.path
            .set_peer_observed(peer_observed.map(|a| unmap(a).ip()));
        p.path.start_session(now, &secret, start_at, cands);
        let refused = p.path.counters().refused_candidates;
        if refused > p.refused_seen {
            self.events.push_back(Event::CandidatesRefused {
                peer: i,
                count: refused - p.refused_seen,
            });
            p.refused_seen = refused;
        }
        p.sent_version = local_version;
        self.rebuild_maps();
        self.bind_relay_channels(now);
        if local_version < self.cands.version() {
            // Our candidates changed while this offer/answer was in flight (typically the
            // relay allocation became ready): send the new set at once.
            self.schedule_offer(now, i, Duration::ZERO);
        } else {
            // If nothing works after a while, offer again (fresh candidates, new secret).
            self.schedule_offer(now, i, OFFER_RETRY);
        }
    }

    /// The interface addresses to offer as host candidates (at start, and after
    /// [`Event::ScanHosts`]).
    pub fn set_hosts(&mut self, now: Instant, hosts: Vec<IpAddr>) {
        let hosts: Vec<IpAddr> = hosts
            .into_iter()
            .filter(|ip| self.v6 || ip.is_ipv4())
            .collect();
        self.hosts = hosts;
        self.update_local(now);
        self.drive(now);
    }

    /// A candidate source the driver runs (a port mapper, say) reports what it knows now: its
    /// candidates join ours ([`LocalCandidates::set`]), and a changed list is published and
    /// re-offered like any other change.
    pub fn set_candidate_source(&mut self, now: Instant, source: Source) {
        let first = self.cands.list().is_empty();
        if self.cands.set(source) {
            self.local_changed(now, first);
        }
        self.drive(now);
    }

    /// The driver resolved relay probe `index` (see [`Event::Resolve`]).
    pub fn relay_resolved(&mut self, now: Instant, index: usize, addr: Option<SocketAddr>) {
        self.home.resolved(now, index, addr);
        self.drive(now);
    }

    /// The driver's stream of relay link `link` connected (again): the allocation starts.
    pub fn relay_stream_up(&mut self, now: Instant, link: LinkId) {
        let seed = self.next_seed();
        if let Some(l) = self.link.as_mut().filter(|l| l.id() == link) {
            l.stream_up(now, seed);
        }
        self.drive(now);
    }

    /// The driver's stream of relay link `link` closed (the driver reconnects with backoff):
    /// the allocation died with it, relayed pairs wait for the next one.
    pub fn relay_stream_down(&mut self, now: Instant, link: LinkId, reason: &str) {
        let seed = self.next_seed();
        let mut lost = false;
        if let Some(l) = self.link.as_mut().filter(|l| l.id() == link) {
            lost = l.is_up();
            l.stream_down(now, seed, reason);
        }
        if lost {
            if let Some(l) = &self.link {
                self.events.push_back(Event::RelayError {
                    region: l.region().to_string(),
                    message: l.error().unwrap_or_default().to_string(),
                });
            }
            self.update_local(now);
        }
        self.drive(now);
    }

    /// The birthday pool's state after [`Event::OpenPool`] / [`Event::ClosePool`]: `announced`
    /// sockets (`1..=announced`) usable by new pairs, `open` sockets open in all.
    pub fn pool_report(&mut self, now: Instant, announced: u16, open: usize) {
        if announced > 0 {
            self.pool_gc_at = None;
        }
        self.pool_announced = announced;
        self.pool_open = open;
        self.drive(now);
    }

    /// Sets the IP TTL of unanswered birthday pool pings for every peer, present and future
    /// ([`crate::path::PathConfig::birthday_ttl`]; the driver measures or is configured).
    pub fn set_birthday_ttl(&mut self, ttl: u8) {
        self.path_cfg.birthday_ttl = ttl;
        for p in &mut self.peers {
            p.path.set_birthday_ttl(ttl);
        }
    }

    /// The NAT keepalive interval (configured, cached or measured).
    pub fn set_keepalive(&mut self, now: Instant, keepalive: Duration) {
        self.keepalive = keepalive;
        for p in &mut self.peers {
            p.path.set_keepalive_interval(now, keepalive);
        }
        self.drive(now);
    }

    /// The offer [`Event::Offer`] asked for could not be queued: try again shortly.
    pub fn offer_not_queued(&mut self, now: Instant, peer: &[u8; 32]) {
        if let Some(i) = self.find(peer) {
            self.peers[i].offer.send_failed(now);
        }
    }

    /// Control: ping peer `peer` on its selected pair now; the answer is an [`Event::Pong`]
    /// with the returned transaction id.
    pub fn ping(&mut self, now: Instant, peer: usize) -> Result<TxId, String> {
        let p = self
            .peers
            .get_mut(peer)
            .ok_or_else(|| "unknown peer".to_string())?;
        let r = match p.path.ping_now(now) {
            Some((tx, _)) => Ok(tx),
            None => Err(format!("no path: {}", p.path.status().reason)),
        };
        self.drive(now);
        r
    }

    /// Control: a debug knob of peer `peer` (`block-direct` / `force-relay`, `block-relay`).
    pub fn set_debug(
        &mut self,
        now: Instant,
        peer: usize,
        knob: &str,
        on: bool,
    ) -> Result<(), String> {
        let p = self
            .peers
            .get_mut(peer)
            .ok_or_else(|| "unknown peer".to_string())?;
        let r = match knob {
            "block-direct" | "force-relay" => {
                p.path.set_direct_blocked(now, on);
                Ok(())
            }
            "block-relay" => {
                p.path.set_relay_blocked(now, on);
                Ok(())
            }
            k => Err(format!(
                "unknown knob {k}; expected block-direct, force-relay or block-relay"
            )),
        };
        self.drive(now);
        r
    }

    /// Timers: call when [`Node::poll_timeout`] is reached (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        let relay_leg = self.link.as_ref().map(RelayLink::server);
        for p in &mut self.peers {
            p.path.set_relay_leg(relay_leg);
            if p.path.poll_timeout().is_some_and(|t| t <= now) {
                p.path.handle_timeout(now);
            }
        }
        if let Some(link) = &mut self.link {
            link.handle_timeout(now);
        }
        for (server, bytes) in self.discovery.due(now, self.keepalive) {
            self.transmits.push_back(Transmit {
                socket: Socket::Data,
                dst: server,
                payload: bytes,
                ttl: None,
            });
        }
        for (i, server) in self.home.measure_due(now) {
            let bytes = self.discovery.request(now, Purpose::RelayLatency(i));
            self.transmits.push_back(Transmit {
                socket: Socket::Data,
                dst: server,
                payload: bytes,
                ttl: None,
            });
        }
        if let Some((region, changed)) = self.home.evaluate_due(now) {
            if changed || self.link.is_none() {
                self.setup_link(now, &region);
            }
        }
        if self.turn_retry_at.is_some_and(|t| t <= now) {
            self.turn_retry_at = None;
            if let Some(region) = self.home.home().map(str::to_string) {
                self.setup_link(now, &region);
            }
        }
        if self.link_fallback_at.is_some_and(|t| t <= now) {
            self.link_fallback_at = None;
            self.fall_back(now);
        }
        if self.next_host_scan <= now {
            self.next_host_scan = now + HOST_SCAN_INTERVAL;
            self.events.push_back(Event::ScanHosts);
        }
        for i in 0..self.peers.len() {
            if self.peers[i].offer.take_due(now) {
                let p = &self.peers[i];
                // A working path whose peer has our latest candidates needs no new session,
                // unless a birthday search could still turn a relay path into a direct one.
                let up_to_date = p.path.route().is_some()
                    && p.sent_version >= self.cands.version()
                    && p.path.birthday_retry_at().is_none_or(|t| t > now);
                if !up_to_date {
                    self.send_offer(now, i);
                }
            }
        }
        self.drive(now);
    }

    // ----- outputs -----

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        let t = self.link.as_mut()?.poll_transmit()?;
        Some(Transmit {
            socket: t.socket,
            dst: t.dst,
            payload: t.payload,
            ttl: None,
        })
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.discovery.poll_timeout().min(self.next_host_scan);
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        for p in &self.peers {
            take(p.path.poll_timeout());
            take(p.offer.next());
        }
        take(self.link.as_ref().and_then(|l| l.poll_timeout()));
        take(self.home.poll_timeout());
        take(self.turn_retry_at);
        take(self.link_fallback_at);
        let wants_pool = self.peers.iter().any(|p| p.path.wants_pool());
        if wants_pool && self.pool_announced == 0 {
            take(self.pool_asked.map(|a| a + POOL_ASK_INTERVAL));
        }
        if !wants_pool && self.pool_open > 0 {
            // (`None` never outlives a `drive`: the collection runs at once then.)
            take(self.pool_gc_at);
        }
        t
    }

    // ----- status -----

    /// The peers, in config order.
    pub fn peers(&self) -> &[NodePeer] {
        &self.peers
    }

    /// Peer index of `key` (removed peers are not found).
    pub fn find(&self, key: &[u8; 32]) -> Option<usize> {
        self.peers.iter().position(|p| &p.key == key && !p.removed)
    }

    /// Adds a peer at run time (a peer added to the WireGuard interface) and returns its
    /// index: the next free one, or the index it had if it was removed before (indices never
    /// move, so the driver's per-peer state stays valid). A peer already present keeps its
    /// state. Once registered with the rendezvous, the new peer is offered to at once.
    pub fn add_peer(&mut self, now: Instant, unix_ms: u64, spec: PeerSpec) -> usize {
        if let Some(i) = self.find(&spec.key) {
            return i;
        }
        let seed = self.next_seed();
        let mut statics: Vec<SocketAddr> = spec
            .static_candidates
            .iter()
            .filter_map(|a| usable_candidate(self.v6, *a))
            .collect();
        statics.dedup();
        let mut path = PeerPath::new(self.path_cfg.clone(), self.me, spec.key, now, unix_ms, seed);
        path.set_keepalive_interval(now, self.keepalive);
        if let (Some(secret), false) = (spec.static_secret, statics.is_empty()) {
            let cands = statics
                .iter()
                .map(|a| Candidate {
                    kind: CandidateKind::Host,
                    addr: *a,
                })
                .collect();
            path.start_session(now, &secret, now, cands);
        }
        let np = NodePeer {
            key: spec.key,
            path,
            offer: OfferTimer::default(),
            sent_version: 0,
            static_candidates: statics,
            refused_seen: 0,
            note: None,
            last_rx: None,
            traffic: Traffic::default(),
            removed: false,
        };
        let i = match self.peers.iter().position(|p| p.key == spec.key) {
            Some(i) => {
                self.peers[i] = np;
                i
            }
            None => {
                self.peers.push(np);
                self.peers.len() - 1
            }
        };
        self.rebuild_maps();
        if self.observed.is_some() {
            self.schedule_offer(now, i, REGISTERED_OFFER_DELAY);
        }
        self.drive(now);
        i
    }

    /// Clean exit, the last call before the driver stops: the relay allocation is deleted
    /// (its Refresh with lifetime 0 is queued; drain [`Node::poll_transmit`] once more) so the
    /// next run from the same address allocates at once instead of meeting its own stale
    /// allocation (RFC 8656 §7.2: 437 on the 5-tuple until the lifetime runs out).
    pub fn shutdown(&mut self, now: Instant) {
        self.close_link(now);
    }

    /// Removes a peer at run time (gone from the WireGuard interface): its session and
    /// pairs are dropped at once, its packets from now on too, it is never offered to; its
    /// index stays taken (see [`Node::add_peer`]). Returns its index, `None` if unknown.
    pub fn remove_peer(&mut self, now: Instant, unix_ms: u64, key: &[u8; 32]) -> Option<usize> {
        let i = self.find(key)?;
        let seed = self.next_seed();
        let p = &mut self.peers[i];
        p.path = PeerPath::new(self.path_cfg.clone(), self.me, *key, now, unix_ms, seed);
        p.path.set_reason("removed from the WireGuard interface");
        p.offer = OfferTimer::default();
        p.static_candidates.clear();
        p.last_rx = None;
        p.note = None;
        p.removed = true;
        self.rebuild_maps();
        Some(i)
    }

    /// Our server-reflexive address and where it came from.
    pub fn server_reflexive(&self) -> &ServerReflexive {
        &self.srflx
    }

    /// Our candidates and their version.
    pub fn local_candidates(&self) -> &LocalCandidates {
        &self.cands
    }

    /// Our NAT's mapping behaviour as measured.
    pub fn mapping(&self) -> MappingBehaviour {
        self.discovery.behaviour()
    }

    /// The STUN servers in use.
    pub fn stun_servers(&self) -> &[SocketAddr] {
        self.discovery.servers()
    }

    /// The home relay link, if any.
    pub fn relay_link(&self) -> Option<&RelayLink> {
        self.link.as_ref()
    }

    /// Relay regions with their measured latencies.
    pub fn relay_latencies(&self) -> Vec<crate::nat::RelayLatency> {
        self.home.latencies()
    }

    /// Probes for no known session.
    pub fn unknown_probes(&self) -> u64 {
        self.unknown_probes
    }

    /// The smallest tunnel MTU the measured paths of all peers allow
    /// ([`PeerPath::mtu`]); `None` until one search found a working size.
    pub fn mtu(&self) -> Option<u16> {
        self.peers
            .iter()
            .filter(|p| !p.removed)
            .filter_map(|p| p.path.mtu())
            .min()
    }

    /// The keepalive interval in use.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    // ----- internals -----

    fn next_seed(&mut self) -> u64 {
        crate::rng::xorshift64star(&mut self.rng)
    }

    fn rebuild_maps(&mut self) {
        self.key_ids.clear();
        self.addrs.clear();
        for (i, p) in self.peers.iter().enumerate() {
            for k in p.path.key_ids() {
                self.key_ids.insert(k, i);
            }
            for a in p.path.remotes() {
                self.addrs.entry(a).or_insert(i);
            }
        }
    }

    fn schedule_offer(&mut self, now: Instant, i: usize, delay: Duration) {
        if self.signalling && !self.peers[i].removed {
            self.peers[i].offer.schedule(now, delay);
        }
    }

    fn send_offer(&mut self, now: Instant, i: usize) {
        if !self.signalling {
            return;
        }
        let p = &mut self.peers[i];
        p.offer.sent(now);
        self.events.push_back(Event::Offer { peer: p.key });
    }

    /// Recomputes our candidates; on a change, re-checks every pair and re-offers.
    fn update_local(&mut self, now: Instant) {
        let first = self.cands.list().is_empty();
        let mut changed = self.cands.set(Source::Hosts(self.hosts.clone()));
        changed |= self.cands.set(Source::ServerReflexive(
            self.srflx.addr(),
            self.discovery.behaviour(),
        ));
        changed |= self.cands.set(Source::Relayed(
            self.link.as_ref().and_then(|l| l.relayed_addr()),
        ));
        if changed {
            self.local_changed(now, first);
        }
    }

    /// Our candidate list changed: publish it, re-check every pair and re-offer (not for the
    /// very first list).
    fn local_changed(&mut self, now: Instant, first: bool) {
        self.events.push_back(Event::LocalCandidates {
            version: self.cands.version(),
            candidates: self.cands.list().to_vec(),
        });
        if first {
            return;
        }
        for i in 0..self.peers.len() {
            self.peers[i].path.local_addresses_changed(now);
            if self.peers[i].path.has_session() {
                self.schedule_offer(now, i, Duration::ZERO);
            }
        }
    }

    /// The rendezvous observed `observed` (before: `before`); see [`ServerReflexive`].
    fn observed_as_srflx(
        &mut self,
        now: Instant,
        before: Option<SocketAddr>,
        observed: SocketAddr,
    ) {
        let old = self.srflx.addr();
        if self
            .srflx
            .on_observed_via(self.observed_via, self.shares_data_socket, before, observed)
        {
            self.events.push_back(Event::ServerReflexive {
                old,
                new: unmap(observed),
                source: SrflxSource::Rendezvous,
            });
            self.update_local(now);
        }
    }

    fn on_stun(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) {
        let Some(a) = self.discovery.on_response(now, from, pkt) else {
            return;
        };
        match a.purpose {
            Purpose::Srflx => {
                let Some(m) = a.mapped else { return };
                let (use_it, behaviour_changed) = self.discovery.note_mapping(a.server, m);
                if behaviour_changed {
                    let b = self.discovery.behaviour();
                    self.events.push_back(Event::MappingBehaviour(b));
                    for p in &mut self.peers {
                        p.path.set_local_mapping(b);
                    }
                    self.update_local(now);
                }
                if !use_it {
                    return;
                }
                let old = self.srflx.addr();
                if self.srflx.on_stun(m) {
                    self.events.push_back(Event::ServerReflexive {
                        old,
                        new: m,
                        source: SrflxSource::Stun,
                    });
                    self.update_local(now);
                }
                self.events.push_back(Event::PublicAddress(m));
            }
            Purpose::RelayLatency(i) => {
                self.home.on_latency(now, i, a.rtt);
                self.maybe_back_to_udp(now, i);
            }
        }
    }

    fn set_regions(&mut self, now: Instant, regions: Vec<RelayRegion>) {
        let change = self.home.set_regions(now, regions);
        if change.same_layout {
            // Fresh credentials only: a failed allocation retries with them.
            if self
                .link
                .as_ref()
                .is_some_and(|l| l.state() == LinkState::Failed)
            {
                self.turn_retry_at = Some(now);
            }
            return;
        }
        for (index, authority) in change.resolve {
            self.events.push_back(Event::Resolve { index, authority });
        }
    }

    /// A new link in `region`: UDP first unless UDP failed less than [`UDP_RETRY_AFTER`] ago.
    fn setup_link(&mut self, now: Instant, region: &str) {
        let routes = self.home.transports_for(region);
        let udp_recently_failed = self
            .udp_failed_at
            .is_some_and(|t| now.saturating_duration_since(t) < UDP_RETRY_AFTER);
        let start = routes
            .iter()
            .position(|r| !udp_recently_failed || r.transport.is_stream())
            .unwrap_or(0);
        self.setup_link_on(now, region, start);
    }

    /// A new link in `region` on its route `index` (see [`HomeRelay::transports_for`]).
    fn setup_link_on(&mut self, now: Instant, region: &str, index: usize) {
        let Some((routes, creds)) = self.home.allocation_for(region) else {
            return;
        };
        let Some(route) = routes.get(index).cloned() else {
            return;
        };
        self.close_link(now);
        let id = self.next_link_id;
        self.next_link_id += 1;
        let seed = self.next_seed();
        let transport = route.transport;
        let server = transport.server();
        if let RelayTransport::Stream { kind, .. } = transport {
            self.events.push_back(Event::OpenRelayStream {
                link: id,
                server,
                kind,
                host: route.host.clone(),
            });
        }
        self.link = Some(RelayLink::new(id, region, route, creds, now, seed));
        self.link_routes = routes;
        self.link_route = index;
        self.link_fallback_at = Some(
            now + if transport.is_stream() {
                STREAM_FALLBACK_AFTER
            } else {
                UDP_FALLBACK_AFTER
            },
        );
        self.turn_retry_at = None;
        self.events.push_back(Event::RelayAllocating {
            region: region.to_string(),
            server,
            transport,
        });
    }

    /// Releases the current link (its Refresh with lifetime 0 goes out first) and closes its
    /// stream.
    fn close_link(&mut self, now: Instant) {
        let Some(mut old) = self.link.take() else {
            return;
        };
        old.release(now);
        while let Some(t) = old.poll_transmit() {
            self.transmits.push_back(Transmit {
                socket: t.socket,
                dst: t.dst,
                payload: t.payload,
                ttl: None,
            });
        }
        if old.transport().is_stream() {
            self.events
                .push_back(Event::CloseRelayStream { link: old.id() });
        }
    }

    /// The fallback deadline of the current link passed: if its server never answered, the
    /// link moves to the region's next route; after the last one, everything is retried from
    /// the start after [`TURN_RETRY`].
    fn fall_back(&mut self, now: Instant) {
        let Some(link) = &self.link else { return };
        if link.heard() || link.is_allocated() {
            return;
        }
        let region = link.region().to_string();
        if !link.transport().is_stream() {
            self.udp_failed_at = Some(now);
        }
        self.events.push_back(Event::RelayError {
            region: region.clone(),
            message: format!(
                "no answer from {} over {}; trying the next transport",
                link.url(),
                link.transport().as_str()
            ),
        });
        let next = self.link_route + 1;
        if next < self.link_routes.len() {
            self.setup_link_on(now, &region, next);
        } else {
            self.close_link(now);
            self.turn_retry_at = Some(now + TURN_RETRY);
        }
    }

    /// A latency answer from probe `i`'s (UDP) server: if the home link is on a stream and
    /// UDP failed long enough ago, UDP is tried again.
    fn maybe_back_to_udp(&mut self, now: Instant, i: usize) {
        let Some(link) = &self.link else { return };
        if !link.transport().is_stream() {
            return;
        }
        let region = link.region().to_string();
        if self.home.index_of(&region) != Some(i) {
            return;
        }
        if self
            .udp_failed_at
            .is_some_and(|t| now.saturating_duration_since(t) < UDP_RETRY_AFTER)
        {
            return;
        }
        if let Some(udp) = self
            .link_routes
            .iter()
            .position(|r| !r.transport.is_stream())
        {
            self.setup_link_on(now, &region, udp);
        }
    }

    /// Installs TURN permissions for every direct address of every peer, so that a peer's
    /// probes and packets sent straight to our relayed address are let through.
    fn sync_permissions(&mut self, now: Instant) {
        let Some(link) = &mut self.link else { return };
        if !link.is_allocated() {
            return;
        }
        for p in &self.peers {
            for a in p.path.remotes() {
                if a.via == Via::Direct && p.path.class_of(&a) != PathKind::Relay {
                    link.permit(now, a.addr.ip());
                }
            }
        }
    }

    /// Binds a TURN channel to every relayed remote of every peer.
    fn bind_relay_channels(&mut self, now: Instant) {
        let Some(link) = &mut self.link else { return };
        for a in self.addrs.keys() {
            if a.via == Via::Relay {
                link.ensure_channel(now, a.addr);
            }
        }
    }

    /// Frames `payload` for the peer's relayed address `peer` into `self.out`.
    fn frame_relay(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        payload: &[u8],
    ) -> Option<(Socket, SocketAddr, usize)> {
        let link = self.link.as_mut()?;
        link.ensure_channel(now, peer);
        if !link.is_allocated() {
            return None;
        }
        let n = link.encode_send(peer, payload, &mut self.out)?;
        Some((link.socket(), link.server(), n))
    }

    fn send_path(&mut self, now: Instant, dest: PathAddr, payload: Vec<u8>, ttl: Option<u8>) {
        match dest.via {
            Via::Direct => self.transmits.push_back(Transmit {
                socket: Socket::of_local(dest.local),
                dst: dest.addr,
                payload,
                ttl,
            }),
            Via::Relay => {
                if let Some((socket, server, n)) = self.frame_relay(now, dest.addr, &payload) {
                    self.transmits.push_back(Transmit {
                        socket,
                        dst: server,
                        payload: self.out[..n].to_vec(),
                        ttl: None,
                    });
                }
            }
        }
    }

    /// Drains peer `i`'s path manager; returns whether its remotes changed.
    fn flush_peer(&mut self, now: Instant, i: usize) -> bool {
        let mut remap = false;
        while let Some(t) = self.peers[i].path.poll_transmit() {
            self.send_path(now, t.dest, t.payload, t.ttl);
        }
        while let Some(ev) = self.peers[i].path.poll_event() {
            match ev {
                PathEvent::PathChanged {
                    kind,
                    remote,
                    reason,
                } => self.events.push_back(Event::PathChanged {
                    peer: i,
                    kind,
                    remote,
                    reason,
                }),
                PathEvent::RemotesChanged => remap = true,
                PathEvent::ObservedAddress(_) | PathEvent::MtuChanged(_) => {}
                PathEvent::Pong {
                    remote,
                    kind,
                    tx,
                    rtt,
                } => self.events.push_back(Event::Pong {
                    peer: i,
                    remote,
                    kind,
                    tx,
                    rtt,
                }),
            }
        }
        if remap {
            self.rebuild_maps();
            self.bind_relay_channels(now);
            self.sync_permissions(now);
        }
        remap
    }

    /// Runs what follows every input: the pool, every path manager's output, birthday
    /// retries, the relay link's events.
    fn drive(&mut self, now: Instant) {
        self.sync_pool(now);
        for i in 0..self.peers.len() {
            self.flush_peer(now, i);
        }
        let mtu = self.mtu();
        if mtu != self.mtu_reported {
            self.mtu_reported = mtu;
            self.events.push_back(Event::PathMtu(mtu));
        }
        self.schedule_birthday_retries(now);
        let Some(link) = &mut self.link else { return };
        let region = link.region().to_string();
        let mut allocated = false;
        while let Some(ev) = link.poll_event() {
            match ev {
                LinkEvent::Allocated { relayed } => {
                    allocated = true;
                    self.events.push_back(Event::RelayAllocated {
                        region: region.clone(),
                        relayed,
                    });
                }
                LinkEvent::Failed {
                    message,
                    fatal,
                    retry,
                } => {
                    self.events.push_back(Event::RelayError {
                        region: region.clone(),
                        message,
                    });
                    if fatal {
                        self.turn_retry_at = Some(now + retry);
                    }
                }
            }
        }
        if allocated {
            self.update_local(now);
            self.bind_relay_channels(now);
            self.sync_permissions(now);
        }
    }

    /// A peer whose birthday search failed (or whose birthday path died) gets a new offer, so
    /// a new session searches again, at the time its path manager names (with backoff). The
    /// peer with the higher key waits [`OFFER_DEFER`] longer: the first offer resets the
    /// other side's search, so two crossing offers are rare.
    fn schedule_birthday_retries(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.offer.next().is_some() {
                continue;
            }
            let Some(at) = p.path.birthday_retry_at() else {
                continue;
            };
            let at = if self.me < p.key {
                at
            } else {
                at + OFFER_DEFER
            };
            self.schedule_offer(now, i, at.saturating_duration_since(now));
        }
    }

    /// Asks for the birthday pool while a peer searches as the hard side and tells those
    /// peers its size; once no search needs it, asks to close every pool socket no pair uses.
    fn sync_pool(&mut self, now: Instant) {
        if self.peers.iter().any(|p| p.path.wants_pool()) {
            if self.pool_announced == 0 {
                if self
                    .pool_asked
                    .is_none_or(|t| now.saturating_duration_since(t) >= POOL_ASK_INTERVAL)
                {
                    self.pool_asked = Some(now);
                    self.events.push_back(Event::OpenPool);
                }
                return;
            }
            let n = self.pool_announced;
            for p in &mut self.peers {
                if p.path.wants_pool() && p.path.pool() != n {
                    p.path.set_pool(now, n);
                }
            }
            return;
        }
        self.pool_asked = None;
        if self.pool_open == 0 || self.pool_gc_at.is_some_and(|t| t > now) {
            return;
        }
        self.pool_gc_at = Some(now + POOL_GC_INTERVAL);
        let keep: HashSet<LocalSocket> = self
            .peers
            .iter()
            .flat_map(|p| p.path.local_sockets())
            .collect();
        let mut keep: Vec<LocalSocket> = keep.into_iter().collect();
        keep.sort_unstable();
        self.events.push_back(Event::ClosePool { keep });
        self.pool_announced = 0;
        for p in &mut self.peers {
            if p.path.pool() != 0 {
                p.path.set_pool(now, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(signalling: bool, statics: Vec<SocketAddr>) -> (Node, Instant) {
        let t0 = Instant::now();
        let n = Node::new(
            NodeConfig {
                me: [1; 32],
                data_port: 41641,
                v6: false,
                path: PathConfig::default(),
                signalling,
                seed: 3,
                unix_ms: 1_800_000_000_000,
            },
            vec![PeerSpec {
                key: [2; 32],
                static_candidates: statics,
                static_secret: Some([7; 32]),
            }],
            t0,
        );
        (n, t0)
    }

    /// Peers added and removed at run time (a WireGuard interface's peers changed): indices
    /// never move, a removed peer drops its packets and is never offered to, re-adding
    /// revives its index, the other peers keep their sessions.
    #[test]
    fn peers_added_and_removed_at_run_time_keep_indices() {
        let a: SocketAddr = "192.0.2.1:5".parse().unwrap_or_else(|_| unreachable!());
        let (mut n, t0) = node(true, vec![a]);
        assert!(n.peers()[0].path().has_session());
        n.handle_signal(
            t0,
            Signal::Registered {
                observed: "198.51.100.1:40000"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
                stun: Vec::new(),
                relays: Vec::new(),
                shared_socket: true,
                transport: crate::wire::Transport::Quic,
            },
        );
        while n.poll_event().is_some() {}
        let spec = |k: u8| PeerSpec {
            key: [k; 32],
            static_candidates: Vec::new(),
            static_secret: None,
        };
        let i = n.add_peer(t0, 1_800_000_000_000, spec(3));
        assert_eq!(i, 1);
        assert_eq!(n.find(&[3; 32]), Some(1));
        // Adding it again changes nothing.
        assert_eq!(n.add_peer(t0, 1_800_000_000_000, spec(3)), 1);
        // Registered: the new peer is offered to soon.
        let t1 = t0 + REGISTERED_OFFER_DELAY + Duration::from_millis(1);
        n.handle_timeout(t1);
        let offers: Vec<[u8; 32]> = std::iter::from_fn(|| n.poll_event())
            .filter_map(|e| match e {
                Event::Offer { peer } => Some(peer),
                _ => None,
            })
            .collect();
        assert!(offers.contains(&[3; 32]), "{offers:?}");

        assert_eq!(n.remove_peer(t1, 1_800_000_000_000, &[3; 32]), Some(1));
        assert_eq!(n.find(&[3; 32]), None);
        assert!(n.peers()[1].is_removed());
        assert!(n.handle_wireguard(t1, 1, b"wireguard packet").is_none());
        assert_eq!(n.remove_peer(t1, 1_800_000_000_000, &[3; 32]), None);
        // Presence for a removed peer does not bring offers back.
        n.handle_signal(
            t1,
            Signal::Presence {
                key: [3; 32],
                online: true,
            },
        );
        let t2 = t1 + Duration::from_secs(60);
        n.handle_timeout(t2);
        assert!(!std::iter::from_fn(|| n.poll_event())
            .any(|e| matches!(e, Event::Offer { peer } if peer == [3; 32])));
        // The first peer kept its session throughout.
        assert!(n.peers()[0].path().has_session());
        // Re-added: the same index, alive again.
        assert_eq!(n.add_peer(t2, 1_800_000_000_000, spec(3)), 1);
        assert!(!n.peers()[1].is_removed());
        assert_eq!(n.peers().len(), 2);
    }

    #[test]
    fn an_address_observed_over_tcp_never_becomes_our_public_address() {
        let observed: SocketAddr = "198.51.100.1:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let registered = |transport| Signal::Registered {
            observed,
            stun: Vec::new(),
            relays: Vec::new(),
            shared_socket: true,
            transport,
        };
        let srflx_events = |n: &mut Node| {
            std::iter::from_fn(|| n.poll_event())
                .filter(|e| matches!(e, Event::ServerReflexive { .. }))
                .count()
        };
        let (mut n, t0) = node(true, Vec::new());
        n.handle_signal(t0, registered(crate::wire::Transport::Tcp));
        assert_eq!(srflx_events(&mut n), 0);
        // The same registration over QUIC on the data socket is its mapping.
        n.handle_signal(t0, registered(crate::wire::Transport::Quic));
        assert_eq!(srflx_events(&mut n), 1);
    }

    #[test]
    fn control_requests_say_what_is_wrong() {
        let (mut n, t0) = node(true, Vec::new());
        assert_eq!(n.ping(t0, 5), Err("unknown peer".to_string()));
        assert!(n.ping(t0, 0).is_err_and(|e| e.starts_with("no path")));
        assert!(n
            .set_debug(t0, 0, "block-everything", true)
            .is_err_and(|e| e.contains("expected block-direct")));
        assert_eq!(n.set_debug(t0, 0, "force-relay", true), Ok(()));
        assert!(n.peers()[0].path().direct_blocked());
    }

    #[test]
    fn static_candidates_start_a_session_at_once_and_ipv6_ones_need_a_dual_stack_socket() {
        let statics = vec![
            "[::ffff:198.51.100.2]:41641"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            "[2001:db8::2]:41641"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ];
        let (mut n, t0) = node(false, statics);
        assert!(n.peers()[0].path().has_session());
        n.handle_timeout(t0);
        let dsts: Vec<(Socket, SocketAddr)> = std::iter::from_fn(|| n.poll_transmit())
            .map(|t| (t.socket, t.dst))
            .collect();
        // The IPv4-mapped spelling is pinged as IPv4; the IPv6 one is dropped (IPv4 socket).
        assert!(dsts.contains(&(
            Socket::Data,
            "198.51.100.2:41641"
                .parse()
                .unwrap_or_else(|_| unreachable!())
        )));
        assert!(dsts.iter().all(|(_, d)| d.is_ipv4()), "{dsts:?}");
        // Without a rendezvous nothing is ever offered.
        n.handle_signal(
            t0,
            Signal::Presence {
                key: [2; 32],
                online: true,
            },
        );
        n.handle_timeout(t0 + Duration::from_secs(30));
        assert!(std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, Event::Offer { .. })));
    }

    #[test]
    fn a_pool_no_search_needs_is_closed_to_the_sockets_in_use_once_per_interval() {
        let (mut n, t0) = node(true, Vec::new());
        // No peer searches: nothing to open, nothing to close.
        n.handle_timeout(t0);
        assert!(std::iter::from_fn(|| n.poll_event())
            .all(|e| !matches!(e, Event::OpenPool | Event::ClosePool { .. })));
        // A pool reported open while no search needs it is closed down to what pairs use.
        n.pool_report(t0, 4, 4);
        let closes: Vec<Event> = std::iter::from_fn(|| n.poll_event())
            .filter(|e| matches!(e, Event::ClosePool { .. }))
            .collect();
        assert_eq!(closes, [Event::ClosePool { keep: Vec::new() }]);
        // ... and not again before POOL_GC_INTERVAL.
        n.pool_report(t0, 0, 1);
        assert!(
            std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, Event::ClosePool { .. }))
        );
        assert!(n.poll_timeout() <= t0 + POOL_GC_INTERVAL);
    }
}
