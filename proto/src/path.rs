//! Path selection state machine: per peer, which candidate pair carries traffic, with
//! failover to the relay and upgrade back to direct.
//!
//! One [`PeerPath`] exists per WireGuard peer. A "pair" is identified by a [`PathAddr`]: the
//! local socket (the ONE data socket, index 0, or a birthday pool socket, see below) and the
//! remote side — either a direct UDP address (a host, server-reflexive, peer-reflexive or
//! predicted candidate of the peer) or the peer's TURN relayed address reached through our own
//! TURN allocation ([`Via::Relay`]).
//!
//! Call order (as in quinn-proto and str0m): after every input — [`PeerPath::start_session`],
//! [`PeerPath::handle_probe`], [`PeerPath::handle_timeout`], [`PeerPath::set_remote_candidates`],
//! [`PeerPath::local_addresses_changed`], [`PeerPath::on_data_sent`] — drain
//! [`PeerPath::poll_transmit`] and [`PeerPath::poll_event`], then arm a timer for
//! [`PeerPath::poll_timeout`]. No clock is read here: `now` is always an argument.
//!
//! Rules:
//! * From the session start time every pair is pinged every [`PathConfig::punch_interval`];
//!   after [`PathConfig::fast_punch_for`] unanswered pairs back off exponentially up to
//!   [`PathConfig::backoff_max`] but are never given up while the session lives.
//! * A pair is valid once a pong from exactly the address we pinged authenticates. A ping from
//!   an unknown address adds a peer-reflexive pair (how a symmetric NAT peer is reached).
//! * Until [`PathConfig::relay_after`] has passed since the start only direct pairs are
//!   selected; afterwards the relay is used at once if no direct pair is valid.
//! * A valid LAN/direct pair always beats the relay. Within a tier: score = smoothed RTT +
//!   class penalty (LAN 0, direct [`PathConfig::direct_penalty`], relay
//!   [`PathConfig::relay_penalty`]); the current pair is replaced only if another scores better
//!   by the hysteresis margin, or is of a better class (LAN over direct).
//! * While data flows the selected pair is pinged every [`PathConfig::active_interval`]; a valid
//!   pair whose oldest unanswered ping is older than [`PathConfig::pong_timeout`] and whose last
//!   pong is older than [`PathConfig::dead_after`] is dead — the next best pair takes over at
//!   once (within one second of the loss with the defaults).
//! * Idle, the selected pair gets a keepalive every [`PathConfig::keepalive_interval`].
//!
//! Birthday probing (a random-port symmetric NAT against an endpoint-independent mapping with
//! address-and-port-dependent filtering, where one socket per side can never meet): each side
//! knows its own mapping behaviour ([`PeerPath::set_local_mapping`], from two STUN servers) and
//! the peer's (a [`CandidateKind::SrflxDependent`] candidate marks a "hard" peer). If no direct
//! pair is valid [`PathConfig::birthday_after`] after the start:
//! * the HARD side asks the driver for a pool of extra sockets ([`PeerPath::wants_pool`],
//!   [`PeerPath::set_pool`]) and pings the peer's server-reflexive address from each of them
//!   every [`PathConfig::birthday_ping_interval`] (each gets its own random public port);
//! * the EASY side sprays authenticated pings from its data socket to distinct random ports of
//!   the hard peer's public IP, [`PathConfig::birthday_rate`] per second, at most
//!   [`PathConfig::birthday_probes`] per session. Spray pings are not pairs: their transaction
//!   ids are remembered per port and only an authenticated pong from exactly the address
//!   pinged creates a (valid) pair.
//!
//! A spray ping that hits one of the hard side's ports reaches that pool socket, whose pong
//! passes the easy NAT (the easy side has just sent to that port): both sides then hold a valid
//! pair and WireGuard moves to it (on the hard side, through that pool socket). The search ends
//! at the first valid direct pair or after [`PathConfig::birthday_for`]; then the unanswered
//! pool pairs are dropped and the driver may close every pool socket no pair uses. A search
//! that found nothing (or whose pair died later) is tried again with a new session: the driver
//! offers again at [`PeerPath::birthday_retry_at`] (30 s, doubling per failure, at most 10 min),
//! because a relay path alone never makes it re-offer.
//!
//! Pool pings and routers that accept unsolicited UDP (issue 17): a pool ping that reaches the
//! easy side's router leaves a conntrack entry there if the router accepts unsolicited UDP, and
//! the easy side's later spray to that port collides with it — masquerade moves the spray to
//! another source port, and Linux reuses that port for the rest of the spray. So a pool pair
//! that has heard nothing from the peer pings with IP TTL [`PathConfig::birthday_ttl`]
//! ([`Transmit::ttl`]): enough to pass our own NAT(s) and make the mapping, not enough to reach
//! the peer's NAT. Pongs, the spray and every other ping keep the system's TTL, and so does a
//! pool pair once an authenticated ping from the peer arrived on it. The driver measures the
//! TTL (routers to the STUN server) or takes it from the config. An ordering (spray first, pool
//! pings after) was rejected: it breaks an accepting HARD router, where the spray's entries make
//! the symmetric NAT choose pool ports around every sprayed port.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mtu::{MtuSearch, PathMtu};
use crate::nat::is_lan_ip;
use crate::probe::{
    ProbeBody, ProbeError, ProbeKey, ProbeReceiver, ProbeSender, TxId, MAX_PROBE_LEN,
};

/// How a datagram reaches the remote address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Straight from the data socket.
    Direct,
    /// Through our TURN allocation (ChannelData/Send to the peer's relayed address).
    Relay,
}

/// Index of the local socket a pair uses: the data socket, or a birthday pool socket
/// (`1..=` the pool size the driver announced with [`PeerPath::set_pool`]).
pub type LocalSocket = u16;

/// The data socket's [`LocalSocket`] index.
pub const DATA_SOCKET: LocalSocket = 0;

fn is_data_socket(l: &LocalSocket) -> bool {
    *l == DATA_SOCKET
}

/// The two ends of a pair: our local socket and the remote end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PathAddr {
    /// Direct or through our relay allocation.
    pub via: Via,
    /// The remote UDP address (for `Relay`, the peer's relayed address).
    pub addr: SocketAddr,
    /// Our socket: [`DATA_SOCKET`] or a birthday pool socket (relay pairs always use the data
    /// socket). Left out of JSON when it is the data socket.
    #[serde(default, skip_serializing_if = "is_data_socket")]
    pub local: LocalSocket,
}

impl PathAddr {
    /// A direct address from the data socket.
    pub fn direct(addr: SocketAddr) -> Self {
        PathAddr {
            via: Via::Direct,
            addr,
            local: DATA_SOCKET,
        }
    }
    /// A direct address from local socket `local`.
    pub fn direct_on(local: LocalSocket, addr: SocketAddr) -> Self {
        PathAddr {
            via: Via::Direct,
            addr,
            local,
        }
    }
    /// A relayed address reached through our TURN allocation.
    pub fn relay(addr: SocketAddr) -> Self {
        PathAddr {
            via: Via::Relay,
            addr,
            local: DATA_SOCKET,
        }
    }
}

impl std::fmt::Display for PathAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.via {
            Via::Direct => write!(f, "{}", self.addr),
            Via::Relay => write!(f, "relay:{}", self.addr),
        }
    }
}

/// Where a candidate address comes from (ICE terms, RFC 8445 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// An interface address of the peer.
    Host,
    /// The peer's address as a STUN server / the rendezvous saw it.
    Srflx,
    /// The peer's server-reflexive address of an endpoint-DEPENDENT mapping: the port differs
    /// per destination (symmetric NAT), so it only marks the peer as "hard" for birthday
    /// probing. Sent beside the plain [`CandidateKind::Srflx`] of the same address.
    #[serde(rename = "srflx-dependent")]
    SrflxDependent,
    /// A pair found by birthday probing (a pool socket's pair, or a sprayed port that
    /// answered). Never signalled.
    Birthday,
    /// An address a valid ping came from that we did not know.
    Prflx,
    /// A port guessed near the peer's server-reflexive port (sequential allocation).
    Predicted,
    /// The peer's TURN relayed address.
    Relayed,
    /// A public address the peer's gateway forwards to the peer's data socket (a PCP, NAT-PMP
    /// or UPnP IGD port mapping, [`crate::portmap`]): reachable from anywhere, even behind a
    /// symmetric NAT. Public addresses only (see [`candidate_allowed`]).
    Portmap,
}

/// A remote candidate address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// Where it comes from.
    pub kind: CandidateKind,
    /// The address.
    pub addr: SocketAddr,
}

impl Candidate {
    /// Where a datagram to this candidate goes: always straight from the data socket. A
    /// peer's relayed address is reached directly too — its relay hands the packet to the peer
    /// through the peer's allocation, and the peer answers through that allocation, so the
    /// answer comes back from the relayed address (one relay hop, and never relay-to-itself).
    pub fn path_addr(&self) -> PathAddr {
        PathAddr::direct(self.addr)
    }
}

/// Whether a candidate the peer signalled may be probed at all. A peer (or whoever holds its
/// key) must not be able to make us send to an arbitrary address, so:
/// * never to loopback (unless `loopback_ok`: our data socket is itself on loopback),
///   unspecified, multicast, broadcast or reserved addresses, nor to port 0;
/// * private, link-local, unique-local and CGNAT addresses only as host candidates (a peer's
///   interface on a LAN we may share), never as server-reflexive, port-mapped, predicted or
///   relayed ones.
///
/// The address is classified after canonicalisation ([`crate::addr::classify`]), so
/// `::ffff:127.0.0.1` is as loopback as `127.0.0.1`.
pub fn candidate_allowed(c: &Candidate, loopback_ok: bool) -> bool {
    use crate::addr::AddrClass;
    if c.addr.port() == 0 {
        return false;
    }
    match crate::addr::classify(c.addr.ip()) {
        AddrClass::Public => true,
        AddrClass::Loopback => loopback_ok,
        AddrClass::Private
        | AddrClass::LinkLocal
        | AddrClass::UniqueLocal
        | AddrClass::SharedCgnat => c.kind == CandidateKind::Host,
        AddrClass::Unspecified
        | AddrClass::Multicast
        | AddrClass::Broadcast
        | AddrClass::Reserved => false,
    }
}

/// The kind of path carrying a peer's traffic (`meshpunch status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Direct to a private/link-local address: both peers on one LAN.
    Lan,
    /// Direct over the internet (a punched hole or a public address).
    Direct,
    /// Through the TURN relay.
    Relay,
    /// No working path yet.
    None,
}

impl PathKind {
    /// The status spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
            PathKind::None => "none",
        }
    }
}

/// Kind of path an address gives when nothing else is known about it (a pair to a peer's
/// relayed candidate is a relay path although it is sent directly: see
/// [`PeerPath::class_of`]).
pub fn path_kind(p: &PathAddr) -> PathKind {
    match p.via {
        Via::Relay => PathKind::Relay,
        Via::Direct if is_lan_ip(p.addr.ip()) => PathKind::Lan,
        Via::Direct => PathKind::Direct,
    }
}

/// Timers and limits of the path manager.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// Ping interval of unanswered pairs while punching.
    pub punch_interval: Duration,
    /// How long after the start pairs are pinged at the punch interval before backing off.
    pub fast_punch_for: Duration,
    /// Largest interval between pings of a pair that never answered.
    pub backoff_max: Duration,
    /// How long direct pairs get before the relay is used.
    pub relay_after: Duration,
    /// Ping interval of the selected pair while data flows.
    pub active_interval: Duration,
    /// Ping interval of valid pairs that are not selected while data flows.
    pub standby_interval: Duration,
    /// Ping interval of every valid pair when idle (NAT keepalive).
    pub keepalive_interval: Duration,
    /// No data sent for this long = idle.
    pub idle_after: Duration,
    /// A ping without pong for this long is lost.
    pub pong_timeout: Duration,
    /// A valid pair without any pong for this long (with a lost ping) is dead.
    pub dead_after: Duration,
    /// Score penalty of a direct (non-LAN) pair.
    pub direct_penalty: Duration,
    /// Score penalty of a relayed pair.
    pub relay_penalty: Duration,
    /// Minimum score gain for switching between valid pairs.
    pub hysteresis: Duration,
    /// Ports after each server-reflexive port of the peer to try (sequential port allocation).
    pub predicted_ports: u16,
    /// Birthday probing, hard side: pool sockets pinging the easy peer (0 disables the hard
    /// role). The driver's pool may be smaller; pairs use `1..=min(pool, this)`.
    pub birthday_sockets: u16,
    /// Birthday probing, easy side: most spray pings per session (0 disables the easy role).
    pub birthday_probes: u16,
    /// Spray pings per second (paced in batches every [`SPRAY_TICK`]).
    pub birthday_rate: u32,
    /// How long after the session start without a valid direct pair birthday probing starts.
    pub birthday_after: Duration,
    /// How long a birthday search lasts without a hit (pool pairs are dropped afterwards).
    pub birthday_for: Duration,
    /// Ping interval of an unanswered pool pair (keeps its NAT mapping open for the spray).
    pub birthday_ping_interval: Duration,
    /// IP TTL of unanswered pool pings (0: the system's TTL). It should pass our own NAT(s)
    /// and die before the peer's NAT: see "Pool pings and routers that accept unsolicited
    /// UDP" in the module doc. The driver sets it (configured, or measured:
    /// [`PeerPath::set_birthday_ttl`]).
    pub birthday_ttl: u8,
    /// How long predicted pairs are probed before they are dropped.
    pub predicted_for: Duration,
    /// Cap on pairs per peer (peer-reflexive ones included).
    pub max_pairs: usize,
    /// Accept loopback candidates from the peer. Only for a daemon whose data socket is bound
    /// to a loopback address (tests, single-host setups), where loopback is the only network
    /// there is; otherwise a peer could make us send to services on our own host.
    pub loopback_candidates: bool,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            punch_interval: Duration::from_millis(200),
            fast_punch_for: Duration::from_secs(3),
            backoff_max: Duration::from_secs(8),
            relay_after: Duration::from_secs(1),
            active_interval: Duration::from_millis(200),
            standby_interval: Duration::from_secs(2),
            keepalive_interval: crate::nat::DEFAULT_KEEPALIVE,
            idle_after: Duration::from_secs(5),
            pong_timeout: Duration::from_millis(600),
            dead_after: Duration::from_millis(600),
            direct_penalty: Duration::from_millis(20),
            relay_penalty: Duration::from_millis(150),
            hysteresis: Duration::from_millis(10),
            predicted_ports: 2,
            birthday_sockets: 256,
            birthday_probes: 2048,
            birthday_rate: 300,
            birthday_after: Duration::from_millis(500),
            birthday_for: Duration::from_secs(15),
            birthday_ping_interval: Duration::from_secs(3),
            birthday_ttl: 0,
            predicted_for: Duration::from_secs(5),
            max_pairs: 64,
            loopback_candidates: false,
        }
    }
}

/// A datagram the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: PathAddr,
    /// The probe bytes.
    pub payload: Vec<u8>,
    /// IP TTL for this datagram (`None`: the socket's default). Only low-TTL pool pings set
    /// it ([`PathConfig::birthday_ttl`]).
    pub ttl: Option<u8>,
}

/// Something the driver (and `meshpunch status`) should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    /// The pair carrying data changed.
    PathChanged {
        /// New kind.
        kind: PathKind,
        /// New remote (None = no path).
        remote: Option<PathAddr>,
        /// Why.
        reason: String,
    },
    /// The set of remote addresses changed (the driver's address → peer map needs updating).
    RemotesChanged,
    /// A pong told us our address as the peer sees it (a peer-reflexive local candidate).
    ObservedAddress(SocketAddr),
    /// The smallest tunnel MTU any pair of this peer has proven ([`PeerPath::mtu`]) changed.
    MtuChanged(Option<u16>),
    /// A pong arrived (for `meshpunch ping`).
    Pong {
        /// The pair it validated.
        remote: PathAddr,
        /// Kind of path of that pair.
        kind: PathKind,
        /// The ping's transaction id.
        tx: TxId,
        /// This ping's round-trip time.
        rtt: Duration,
    },
}

/// State of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairState {
    /// Pinged, no pong yet (or dead again).
    Probing,
    /// A pong authenticated recently.
    Valid,
}

#[derive(Debug, Clone)]
struct Pair {
    dest: PathAddr,
    kind: CandidateKind,
    state: PairState,
    added: Instant,
    next_ping: Instant,
    interval: Duration,
    pings: VecDeque<(TxId, Instant)>,
    last_pong: Option<Instant>,
    srtt: Option<Duration>,
    pings_sent: u64,
    pongs_received: u64,
    /// An authenticated ping arrived on this pair: its own pings no longer need a low TTL.
    heard: bool,
    mtu: MtuSearch,
}

const MAX_OUTSTANDING: usize = 8;

/// Snapshot of one pair for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    /// The remote.
    pub remote: PathAddr,
    /// Candidate kind.
    pub kind: CandidateKind,
    /// Probing or valid.
    pub state: PairState,
    /// Smoothed RTT in microseconds.
    pub rtt_us: Option<u64>,
    /// Pings sent.
    pub pings_sent: u64,
    /// Pongs received.
    pub pongs_received: u64,
    /// Path MTU found by the last search of this pair ([`crate::mtu`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<PathMtu>,
}

/// Snapshot of a peer's path for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    /// Kind of the selected path.
    pub kind: PathKind,
    /// Selected remote.
    pub remote: Option<PathAddr>,
    /// RTT of the selected pair.
    pub rtt: Option<Duration>,
    /// The selected remote as shown to users (`relay:IP:PORT` for relay paths).
    pub remote_label: Option<String>,
    /// Why this path (or why none).
    pub reason: String,
    /// Every pair (unanswered birthday pool pairs are only counted in `birthday`).
    pub pairs: Vec<PairStatus>,
    /// Birthday probing towards this peer.
    pub birthday: BirthdayStatus,
    /// The smallest tunnel MTU any pair of this peer has proven ([`PeerPath::mtu`]).
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// Spray pings are sent in batches this far apart ([`PathConfig::birthday_rate`] per second).
pub const SPRAY_TICK: Duration = Duration::from_millis(20);
/// The easy side starts spraying this long after the search starts, so the hard side's pool
/// pings (which open the ports the spray must hit) are out first.
pub const SPRAY_DELAY: Duration = Duration::from_millis(100);
/// Lowest port a NAT with random port allocation hands out (Linux `fully-random`: 1024-65535).
pub const SPRAY_MIN_PORT: u16 = 1024;
/// After a birthday search failed (or its path died), a new session is due this long after
/// it ended, doubling with every further failure up to [`BIRTHDAY_RETRY_MAX`]. Each session
/// has its own spray budget, so this bounds the spray towards one peer over time.
pub const BIRTHDAY_RETRY: Duration = Duration::from_secs(30);
/// Longest wait between two birthday searches towards one peer.
pub const BIRTHDAY_RETRY_MAX: Duration = Duration::from_secs(600);
/// One spray budget ([`PathConfig::birthday_probes`] pings) per peer per this window, however
/// many sessions the peer starts: a peer cannot turn re-offers into a sustained port scan.
pub const SPRAY_BUDGET_WINDOW: Duration = Duration::from_secs(600);

/// Our own NAT's mapping behaviour as the driver measured it (two STUN servers from the data
/// socket, RFC 5780 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingBehaviour {
    /// Not measured (fewer than two STUN answers).
    #[default]
    Unknown,
    /// The same public address for every destination (no NAT, or a cone NAT): "easy".
    EndpointIndependent,
    /// A public port per destination (symmetric NAT): "hard".
    EndpointDependent,
}

/// Which half of birthday probing this side plays towards a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BirthdayRole {
    /// No birthday probing (not needed, not possible, or not decided yet).
    #[default]
    None,
    /// We are behind the endpoint-dependent mapping: many pool sockets ping the peer.
    Hard,
    /// The peer is: we spray pings to random ports of its public IP.
    Easy,
}

/// Birthday probing as `meshpunch status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirthdayStatus {
    /// Our role towards this peer.
    pub role: BirthdayRole,
    /// A search is running now.
    pub active: bool,
    /// Pool pairs still waiting for a hit (hard side).
    pub pool_pairs: u32,
    /// Spray pings sent since start (easy side).
    pub spray_sent: u64,
    /// Spray pings answered by an authenticated pong since start (easy side).
    pub spray_hits: u64,
    /// Birthday-found pairs that became valid since start (both sides).
    pub found: u64,
    /// Pool pings sent with the low TTL ([`PathConfig::birthday_ttl`]) since start (hard side).
    #[serde(default)]
    pub low_ttl_pings: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    /// Waiting for [`PathConfig::birthday_after`].
    Idle,
    /// Searching until the instant.
    Active(Instant),
    /// Over for this session.
    Done,
}

/// Per-session birthday state (reset by every new session).
#[derive(Debug)]
struct Birthday {
    search: Search,
    role: BirthdayRole,
    /// Pool sockets the driver has open (`1..=pool`).
    pool: u16,
    pool_pairs_made: bool,
    /// The hard peer's public IP (easy side).
    target: Option<SocketAddr>,
    /// Sprayed port -> (transaction id, sent at). Bounded by [`PathConfig::birthday_probes`].
    sprayed: std::collections::HashMap<u16, (TxId, Instant)>,
    next_spray: Option<Instant>,
    status: BirthdayStatus,
}

impl Birthday {
    fn new() -> Self {
        Birthday {
            search: Search::Idle,
            role: BirthdayRole::None,
            pool: 0,
            pool_pairs_made: false,
            target: None,
            sprayed: std::collections::HashMap::new(),
            next_spray: None,
            status: BirthdayStatus::default(),
        }
    }
}

/// Counters of refused probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeCounters {
    /// Accepted probes.
    pub accepted: u64,
    /// Refused: bad tag / malformed / unknown key.
    pub unauthenticated: u64,
    /// Refused: replayed or stale.
    pub replayed: u64,
    /// Candidates from the peer refused by [`candidate_allowed`] (loopback, multicast, a
    /// private address that is not a host candidate, ...).
    #[serde(default)]
    pub refused_candidates: u64,
}

struct Session {
    sender: ProbeSender,
    receiver: ProbeReceiver,
    prev_receiver: Option<ProbeReceiver>,
    start_at: Instant,
}

/// Per-peer path state machine. See the module docs for the rules and call order.
pub struct PeerPath {
    cfg: PathConfig,
    local_public: [u8; 32],
    remote_public: [u8; 32],
    session: Option<Session>,
    pairs: Vec<Pair>,
    remote_candidates: Vec<Candidate>,
    selected: Option<PathAddr>,
    reason: String,
    relay_blocked: bool,
    direct_blocked: bool,
    relay_deadline_fired: bool,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PathEvent>,
    last_data_sent: Option<Instant>,
    epoch: Instant,
    epoch_unix_ms: u64,
    rng: u64,
    counters: ProbeCounters,
    buf: Vec<u8>,
    local_mapping: MappingBehaviour,
    birthday: Birthday,
    /// Birthday searches in a row that ended without a direct pair (kept across sessions).
    birthday_failures: u32,
    /// When the last birthday search of a session ended.
    birthday_ended: Option<Instant>,
    /// The peer's IP as the rendezvous itself observed it (carried in the punch start): the
    /// only IP birthday probing sends to, whatever candidates the peer claims.
    peer_observed: Option<std::net::IpAddr>,
    /// Spray budget across sessions: when the current window started and how many spray
    /// pings it has used ([`PathConfig::birthday_probes`] per [`SPRAY_BUDGET_WINDOW`]).
    spray_window: Option<(Instant, u64)>,
    /// The [`PeerPath::mtu`] last reported by [`PathEvent::MtuChanged`].
    mtu_reported: Option<u16>,
    /// Our TURN server's address ([`PeerPath::set_relay_leg`]): the first hop of pairs via
    /// our allocation, whose family sets their MTU overhead.
    relay_leg: Option<SocketAddr>,
}

impl std::fmt::Debug for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPath")
            .field("selected", &self.selected)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl PeerPath {
    /// A path manager for the peer with `remote_public` key, seen from the holder of
    /// `local_public`. `now_unix_ms` is the wall-clock time at `now` (probe timestamps);
    /// `seed` feeds transaction ids and birthday ports.
    pub fn new(
        cfg: PathConfig,
        local_public: [u8; 32],
        remote_public: [u8; 32],
        now: Instant,
        now_unix_ms: u64,
        seed: u64,
    ) -> Self {
        PeerPath {
            cfg,
            local_public,
            remote_public,
            session: None,
            pairs: Vec::new(),
            remote_candidates: Vec::new(),
            selected: None,
            reason: "waiting for the peer's candidates".into(),
            relay_blocked: false,
            direct_blocked: false,
            relay_deadline_fired: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            last_data_sent: None,
            epoch: now,
            epoch_unix_ms: now_unix_ms,
            rng: seed | 1,
            counters: ProbeCounters::default(),
            buf: Vec::with_capacity(MAX_PROBE_LEN),
            local_mapping: MappingBehaviour::Unknown,
            birthday: Birthday::new(),
            birthday_failures: 0,
            birthday_ended: None,
            peer_observed: None,
            spray_window: None,
            mtu_reported: None,
            relay_leg: None,
        }
    }

    /// The remote peer's public key.
    pub fn remote_public(&self) -> &[u8; 32] {
        &self.remote_public
    }

    /// Starts (or restarts) punching with a session secret from the rendezvous: probes to every
    /// candidate pair begin at `start_at`. Valid pairs survive a restart (a working path is
    /// never dropped because of a new offer); probes with the previous key are still accepted.
    pub fn start_session(
        &mut self,
        now: Instant,
        secret: &[u8; 32],
        start_at: Instant,
        remote: Vec<Candidate>,
    ) {
        // Counter from the wall clock (microseconds): a restarted daemon with a re-derived key
        // (static sessions) still counts upwards past the peer's replay window.
        let counter = self.unix_ms(now).saturating_mul(1000);
        let sender =
            ProbeSender::with_counter(ProbeKey::derive(secret, &self.local_public), counter);
        let receiver = ProbeReceiver::new(ProbeKey::derive(secret, &self.remote_public));
        let prev_receiver = self.session.take().map(|s| s.receiver);
        let start_at = start_at.max(now);
        self.relay_deadline_fired = false;
        self.session = Some(Session {
            sender,
            receiver,
            prev_receiver,
            start_at,
        });
        for p in self.pairs.iter_mut().filter(|p| !is_waiting_pool_pair(p)) {
            p.pings.clear();
            p.next_ping = start_at;
            p.interval = self.cfg.punch_interval;
            p.added = start_at;
        }
        // A running birthday search goes on in the new session (typically a re-offer because
        // our relay allocation became ready): its pool ports and spray records stay valid, and
        // pongs signed with the previous key are still accepted. Otherwise the new session
        // searches again with a new spray budget; unanswered pool pairs of the old search go,
        // a working birthday pair stays. The counters are kept (totals since start).
        if !matches!(self.birthday.search, Search::Active(_)) {
            let (pool, status) = (self.birthday.pool, self.birthday.status);
            self.birthday = Birthday::new();
            self.birthday.pool = pool;
            self.birthday.status = status;
            let selected = self.selected;
            self.pairs.retain(|p| {
                p.kind != CandidateKind::Birthday
                    || p.state == PairState::Valid
                    || Some(p.dest) == selected
            });
        }
        self.set_remote_candidates(now, remote);
        if self.selected.is_none() {
            self.reason = "punching".into();
        }
    }

    /// Whether a session exists.
    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }

    /// Key ids whose probes belong to this peer (the driver's demux table).
    pub fn key_ids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        if let Some(s) = &self.session {
            v.push(s.receiver.key_id());
            if let Some(p) = &s.prev_receiver {
                v.push(p.key_id());
            }
        }
        v
    }

    /// Replaces the peer's candidates (a new offer/answer, or the peer re-gathered).
    /// Pairs for vanished candidates are dropped unless valid or selected. Candidates
    /// [`candidate_allowed`] refuses, and srflx-dependent ones off the IP the rendezvous
    /// observed ([`PeerPath::set_peer_observed`], set it first), are dropped and counted.
    pub fn set_remote_candidates(&mut self, now: Instant, remote: Vec<Candidate>) {
        let start = self.session.as_ref().map(|s| s.start_at).unwrap_or(now);
        let before = remote.len();
        let loopback_ok = self.cfg.loopback_candidates;
        let remote: Vec<Candidate> = remote
            .into_iter()
            .map(|c| Candidate {
                addr: crate::addr::unmap(c.addr),
                ..c
            })
            .filter(|c| candidate_allowed(c, loopback_ok))
            // A "hard" marker is a birthday target: only on the IP the rendezvous observed.
            .filter(|c| c.kind != CandidateKind::SrflxDependent || self.observed_ip(&c.addr))
            .collect();
        self.counters.refused_candidates += (before - remote.len()) as u64;
        let mut wanted: Vec<(PathAddr, CandidateKind)> =
            remote.iter().map(|c| (c.path_addr(), c.kind)).collect();
        for c in &remote {
            if c.kind != CandidateKind::Srflx {
                continue;
            }
            for d in 1..=self.cfg.predicted_ports {
                if let Some(port) = c.addr.port().checked_add(d) {
                    let mut a = c.addr;
                    a.set_port(port);
                    wanted.push((PathAddr::direct(a), CandidateKind::Predicted));
                }
            }
        }
        self.remote_candidates = remote;
        let selected = self.selected;
        self.pairs.retain(|p| {
            p.state == PairState::Valid
                || Some(p.dest) == selected
                || p.kind == CandidateKind::Prflx
                || p.kind == CandidateKind::Birthday
                || wanted.iter().any(|w| w.0 == p.dest)
        });
        for (dest, kind) in wanted {
            if let Some(p) = self.pairs.iter_mut().find(|p| p.dest == dest) {
                // A peer-reflexive pair learned before the candidate arrived (the peer's
                // probes sent through its relay, from its relayed address, reached us first):
                // the candidate says what it is, so a relayed address is never ranked, shown
                // or blocked as a direct one.
                if p.kind == CandidateKind::Prflx && kind == CandidateKind::Relayed {
                    p.kind = kind;
                }
                continue;
            }
            let cap = self.cfg.max_pairs
                + usize::from(self.cfg.birthday_sockets)
                + usize::from(self.cfg.predicted_ports) * 4;
            if self.pairs.len() >= cap {
                break;
            }
            self.pairs.push(self.new_pair(dest, kind, start.max(now)));
        }
        self.events.push_back(PathEvent::RemotesChanged);
    }

    fn new_pair(&self, dest: PathAddr, kind: CandidateKind, at: Instant) -> Pair {
        Pair {
            dest,
            kind,
            state: PairState::Probing,
            added: at,
            next_ping: at,
            interval: self.cfg.punch_interval,
            pings: VecDeque::new(),
            last_pong: None,
            srtt: None,
            pings_sent: 0,
            pongs_received: 0,
            heard: false,
            mtu: MtuSearch::default(),
        }
    }

    /// Our local addresses or observed address changed: re-check every pair now, with the
    /// punch interval again. (The driver also sends our new candidates to the peer.)
    pub fn local_addresses_changed(&mut self, now: Instant) {
        for p in &mut self.pairs {
            p.next_ping = now;
            p.interval = self.cfg.punch_interval;
            p.added = now;
            if p.state == PairState::Valid {
                p.mtu.schedule(now);
            }
        }
    }

    /// Forces traffic off direct pairs (`debug block-direct`): direct pairs are neither
    /// probed nor selected until unblocked.
    pub fn set_direct_blocked(&mut self, now: Instant, blocked: bool) {
        self.direct_blocked = blocked;
        for p in &mut self.pairs {
            if pair_kind(p) != PathKind::Relay {
                p.state = PairState::Probing;
                p.pings.clear();
                p.next_ping = now;
                p.interval = self.cfg.punch_interval;
                p.added = now;
            }
        }
        self.select(
            now,
            if blocked {
                "direct blocked by operator"
            } else {
                "direct unblocked"
            },
        );
    }

    /// Forces traffic off the relay (`debug block-relay`).
    pub fn set_relay_blocked(&mut self, now: Instant, blocked: bool) {
        self.relay_blocked = blocked;
        for p in &mut self.pairs {
            if pair_kind(p) == PathKind::Relay {
                p.state = PairState::Probing;
                p.pings.clear();
                p.next_ping = now;
            }
        }
        self.select(
            now,
            if blocked {
                "relay blocked by operator"
            } else {
                "relay unblocked"
            },
        );
    }

    /// Whether direct pairs are blocked by the operator.
    pub fn direct_blocked(&self) -> bool {
        self.direct_blocked
    }

    fn blocked(&self, d: &PathAddr) -> bool {
        match self.class_of(d) {
            PathKind::Relay => self.relay_blocked,
            _ => self.direct_blocked,
        }
    }

    /// The kind of path `addr` gives for this peer: relay for the peer's relayed candidates
    /// and for anything through our own allocation, else LAN/direct by address.
    pub fn class_of(&self, addr: &PathAddr) -> PathKind {
        match self.pairs.iter().find(|p| p.dest == *addr) {
            Some(p) => pair_kind(p),
            None => path_kind(addr),
        }
    }

    /// Where WireGuard data for this peer goes now (from the local socket `local` names).
    pub fn route(&self) -> Option<PathAddr> {
        self.selected
    }

    /// Whether `from` is one of this peer's remotes (for demultiplexing WireGuard data).
    pub fn knows(&self, from: &PathAddr) -> bool {
        self.pairs.iter().any(|p| p.dest == *from)
    }

    /// Every remote address of this peer.
    pub fn remotes(&self) -> impl Iterator<Item = PathAddr> + '_ {
        self.pairs.iter().map(|p| p.dest)
    }

    /// Record that WireGuard data was sent (switches the selected pair to active probing).
    pub fn on_data_sent(&mut self, now: Instant) {
        let was_idle = self.is_idle(now);
        self.last_data_sent = Some(now);
        if was_idle {
            if let Some(sel) = self.selected {
                let iv = self.cfg.active_interval;
                if let Some(p) = self.pairs.iter_mut().find(|p| p.dest == sel) {
                    p.next_ping = p.next_ping.min(now + iv);
                }
            }
        }
    }

    /// Record that WireGuard data arrived from `from`. Data arriving on another pair than the
    /// selected one hints that the peer moved (its side of our path may be dead): the selected
    /// pair is checked at once instead of at the next keepalive.
    pub fn on_data_received(&mut self, now: Instant, from: &PathAddr) {
        let Some(sel) = self.selected else { return };
        if sel == *from {
            return;
        }
        if let Some(p) = self.pairs.iter_mut().find(|p| p.dest == sel) {
            if p.pings.is_empty() && p.next_ping > now {
                p.next_ping = now;
            }
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        match self.last_data_sent {
            Some(t) => now.saturating_duration_since(t) > self.cfg.idle_after,
            None => true,
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.epoch_unix_ms
            .saturating_add(now.saturating_duration_since(self.epoch).as_millis() as u64)
    }

    fn next_rand(&mut self) -> u64 {
        // Transaction ids need uniqueness, not secrecy (probes are authenticated).
        crate::rng::xorshift64star(&mut self.rng)
    }

    /// Feeds a probe (classified as [`crate::probe::PacketKind::Probe`]) that arrived from
    /// `from` (whose `local` names the socket it arrived on). Pings are answered from that
    /// socket; pongs validate pairs, or — from exactly a sprayed address, echoing that spray
    /// ping — make a birthday pair.
    pub fn handle_probe(
        &mut self,
        now: Instant,
        from: PathAddr,
        bytes: &[u8],
    ) -> Result<(), ProbeError> {
        let unix = self.unix_ms(now);
        let Some(sess) = self.session.as_mut() else {
            self.counters.unauthenticated += 1;
            return Err(ProbeError::UnknownKey(crate::probe::peek_key_id(bytes)?));
        };
        let res = match sess.receiver.open(unix, bytes) {
            Err(ProbeError::UnknownKey(k)) => match sess.prev_receiver.as_mut() {
                Some(prev) => prev.open(unix, bytes),
                None => Err(ProbeError::UnknownKey(k)),
            },
            r => r,
        };
        let probe = match res {
            Ok(p) => p,
            Err(e) => {
                match e {
                    ProbeError::Replayed(_) | ProbeError::Stale => self.counters.replayed += 1,
                    _ => self.counters.unauthenticated += 1,
                }
                return Err(e);
            }
        };
        self.counters.accepted += 1;
        if self.blocked(&from) {
            return Ok(());
        }
        match probe.body {
            ProbeBody::Ping { tx } => {
                let body = ProbeBody::Pong {
                    tx,
                    observed: from.addr,
                };
                if let Some(s) = self.session.as_mut() {
                    s.sender.seal(unix, &body, &mut self.buf);
                    self.transmits.push_back(Transmit {
                        dest: from,
                        payload: self.buf.clone(),
                        ttl: None,
                    });
                }
                // Triggered check: make sure we ping back soon (and learn prflx addresses).
                match self.pairs.iter_mut().find(|p| p.dest == from) {
                    Some(p) => {
                        // The peer reached us on this pair: our pings may travel all the way.
                        p.heard = true;
                        // Triggered check: ping back now unless we just did.
                        let recent = p.pings.back().is_some_and(|(_, t)| {
                            now.saturating_duration_since(*t) < self.cfg.punch_interval / 2
                        });
                        if p.state != PairState::Valid && !recent {
                            p.next_ping = now;
                        }
                    }
                    None => {
                        let cap = self.cfg.max_pairs + 64 + usize::from(self.cfg.birthday_sockets);
                        if self.pairs.len() < cap {
                            // A ping from a port we sprayed: the hard peer's pool socket got
                            // through because our spray opened our NAT towards it.
                            let kind = if self.sprayed_port(&from).is_some() {
                                CandidateKind::Birthday
                            } else {
                                CandidateKind::Prflx
                            };
                            let mut p = self.new_pair(from, kind, now);
                            p.next_ping = now;
                            self.pairs.push(p);
                            self.events.push_back(PathEvent::RemotesChanged);
                        }
                    }
                }
            }
            ProbeBody::SizedPing { tx, size } => {
                // Answered small: the search measures our peer's sending direction only.
                let body = ProbeBody::SizedPong {
                    tx,
                    observed: from.addr,
                    size,
                };
                if let Some(s) = self.session.as_mut() {
                    s.sender.seal(unix, &body, &mut self.buf);
                    self.transmits.push_back(Transmit {
                        dest: from,
                        payload: self.buf.clone(),
                        ttl: None,
                    });
                }
            }
            ProbeBody::SizedPong { tx, size, .. } => self.mtu_pong(now, from, tx, size),
            ProbeBody::Pong { tx, observed } => {
                self.spray_pong(now, from, tx);
                let Some(p) = self.pairs.iter_mut().find(|p| p.dest == from) else {
                    return Ok(());
                };
                let Some(idx) = p.pings.iter().position(|(t, _)| *t == tx) else {
                    return Ok(());
                };
                let sent = p.pings[idx].1;
                // Older pings than the answered one are as good as answered.
                p.pings.drain(..=idx);
                let sample = now.saturating_duration_since(sent);
                p.srtt = Some(match p.srtt {
                    Some(s) => (s * 7 + sample) / 8,
                    None => sample,
                });
                p.last_pong = Some(now);
                p.pongs_received += 1;
                let became_valid = p.state != PairState::Valid;
                p.state = PairState::Valid;
                if became_valid {
                    p.interval = self.cfg.punch_interval;
                    p.mtu.schedule(now);
                }
                let birthday = became_valid && p.kind == CandidateKind::Birthday;
                self.events.push_back(PathEvent::ObservedAddress(observed));
                let kind = pair_kind(p);
                self.events.push_back(PathEvent::Pong {
                    remote: from,
                    kind,
                    tx,
                    rtt: sample,
                });
                if birthday {
                    self.birthday.status.found += 1;
                }
                // Every pong may change the ranking (RTT), not only a newly valid pair.
                self.select(
                    now,
                    if birthday {
                        "found by birthday probing"
                    } else {
                        "pong received"
                    },
                );
            }
        }
        Ok(())
    }

    /// Advances timers: sends due pings, expires lost ones, detects dead pairs, reselects.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(start) = self.session.as_ref().map(|s| s.start_at) else {
            return;
        };
        if now < start {
            return;
        }
        let idle = self.is_idle(now);
        let cfg = self.cfg.clone();
        let mut died = false;
        // Expire lost pings; detect dead pairs; drop predicted pairs that never answered.
        // Only valid pairs expire pings: a probing pair keeps its (bounded) outstanding pings,
        // so a pong slower than the timeout still validates a long path.
        for p in self
            .pairs
            .iter_mut()
            .filter(|p| p.state == PairState::Valid)
        {
            while let Some((_, t)) = p.pings.front() {
                // Long paths (satellite, far relays) get twice their RTT before a ping is lost.
                let rtt2 = p.srtt.map_or(Duration::ZERO, |r| r * 2);
                if now.saturating_duration_since(*t) >= cfg.pong_timeout.max(rtt2) {
                    p.pings.pop_front();
                    if p.state == PairState::Valid
                        && p.last_pong.is_none_or(|l| {
                            now.saturating_duration_since(l) >= cfg.dead_after.max(rtt2)
                        })
                    {
                        p.state = PairState::Probing;
                        p.interval = cfg.punch_interval;
                        p.added = now;
                        p.next_ping = p.next_ping.min(now);
                        p.mtu.pause();
                        died = true;
                    }
                } else {
                    break;
                }
            }
        }
        let before = self.pairs.len();
        self.pairs.retain(|p| {
            !(p.kind == CandidateKind::Predicted
                && p.state != PairState::Valid
                && now.saturating_duration_since(p.added) > cfg.predicted_for)
        });
        if self.pairs.len() != before {
            self.events.push_back(PathEvent::RemotesChanged);
        }
        if died {
            self.select(now, "selected path stopped answering");
        }
        if now >= start + cfg.relay_after && !self.relay_deadline_fired {
            self.relay_deadline_fired = true;
            self.select(now, "no direct path answered in time");
        }
        self.birthday_tick(now, start);
        self.mtu_tick(now);
        // Send due pings.
        let selected = self.selected;
        let unix = self.unix_ms(now);
        for i in 0..self.pairs.len() {
            let p = &self.pairs[i];
            if p.next_ping > now || self.blocked(&p.dest) {
                continue;
            }
            let next_interval = match p.state {
                PairState::Valid if Some(p.dest) == selected && !idle => cfg.active_interval,
                PairState::Valid if idle => cfg.keepalive_interval,
                PairState::Valid => cfg.standby_interval,
                PairState::Probing if p.kind == CandidateKind::Birthday => {
                    cfg.birthday_ping_interval
                }
                PairState::Probing => {
                    if now.saturating_duration_since(p.added) < cfg.fast_punch_for {
                        cfg.punch_interval
                    } else {
                        (p.interval * 2).min(cfg.backoff_max)
                    }
                }
            };
            let mut tx = [0u8; 12];
            tx[..8].copy_from_slice(&self.next_rand().to_be_bytes());
            tx[8..].copy_from_slice(&(i as u32).to_be_bytes());
            if let Some(s) = self.session.as_mut() {
                s.sender.seal(unix, &ProbeBody::Ping { tx }, &mut self.buf);
            }
            let ttl = self.pool_ping_ttl(&self.pairs[i]);
            if ttl.is_some() {
                self.birthday.status.low_ttl_pings += 1;
            }
            let p = &mut self.pairs[i];
            if p.pings.len() >= MAX_OUTSTANDING {
                p.pings.pop_front();
            }
            p.pings.push_back((tx, now));
            p.pings_sent += 1;
            p.interval = next_interval;
            p.next_ping = now + next_interval;
            self.transmits.push_back(Transmit {
                dest: p.dest,
                payload: self.buf.clone(),
                ttl,
            });
        }
    }

    fn score(&self, p: &Pair) -> Duration {
        let rtt = p.srtt.unwrap_or(Duration::from_millis(500));
        rtt + match pair_kind(p) {
            PathKind::Lan => Duration::ZERO,
            PathKind::Direct => self.cfg.direct_penalty,
            _ => self.cfg.relay_penalty,
        }
    }

    fn select(&mut self, now: Instant, why: &str) {
        let Some(start) = self.session.as_ref().map(|s| s.start_at) else {
            return;
        };
        // Before `relay_after` a fresh session gives direct pairs their chance first — but
        // the pair that carries traffic now stays usable whatever its class: a new session
        // (a re-offer, a birthday retry) never drops a working relay path.
        let relay_ok = now >= start + self.cfg.relay_after || self.direct_blocked;
        let selected = self.selected;
        let usable = |p: &Pair| {
            p.state == PairState::Valid
                && !self.blocked(&p.dest)
                && (pair_kind(p) != PathKind::Relay || relay_ok || Some(p.dest) == selected)
        };
        // A working direct (or LAN) pair always beats the relay: RTT only ranks pairs of the
        // same tier, so a slow first sample on a loaded host never hands traffic to the relay.
        let any_direct = self
            .pairs
            .iter()
            .any(|p| usable(p) && pair_kind(p) != PathKind::Relay);
        let tier_ok = |p: &Pair| !any_direct || pair_kind(p) != PathKind::Relay;
        let best = self
            .pairs
            .iter()
            .filter(|p| usable(p) && tier_ok(p))
            .min_by_key(|p| (self.score(p), p.dest))
            .map(|p| (p.dest, self.score(p)));
        let current = self
            .selected
            .and_then(|s| self.pairs.iter().find(|p| p.dest == s))
            .filter(|p| usable(p) && tier_ok(p))
            .map(|p| (p.dest, self.score(p)));
        let new = match (current, best) {
            (Some(c), Some(b)) => {
                let (bk, ck) = (self.class_of(&b.0), self.class_of(&c.0));
                let class_better = bk != ck && kind_rank(bk) < kind_rank(ck);
                if b.0 != c.0 && (class_better || b.1 + self.cfg.hysteresis < c.1) {
                    Some(b.0)
                } else {
                    Some(c.0)
                }
            }
            (None, b) => b.map(|b| b.0),
            (Some(c), None) => Some(c.0),
        };
        if new != self.selected {
            let old = self.selected;
            self.selected = new;
            let kind = new.as_ref().map_or(PathKind::None, |n| self.class_of(n));
            self.reason = match (old, new) {
                (_, None) => format!("no working path ({why})"),
                (None, Some(_)) => format!("{} path found ({why})", kind.as_str()),
                (Some(o), Some(_)) if self.class_of(&o) == kind => {
                    format!("better {} path: lower RTT", kind.as_str())
                }
                (Some(o), Some(_)) => {
                    format!(
                        "{} -> {} ({why})",
                        self.class_of(&o).as_str(),
                        kind.as_str()
                    )
                }
            };
            self.events.push_back(PathEvent::PathChanged {
                kind,
                remote: new,
                reason: self.reason.clone(),
            });
        } else if new.is_none() && now >= start + self.cfg.relay_after {
            let has_relay = self
                .pairs
                .iter()
                .any(|p| pair_kind(p) == PathKind::Relay && !self.relay_blocked);
            let r = if has_relay {
                "no pong yet on any path, relay included"
            } else {
                "no pong yet on any direct path and no relayed candidate"
            };
            if self.reason != r {
                self.reason = r.into();
            }
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        let mtu = self.mtu();
        if mtu != self.mtu_reported {
            self.mtu_reported = mtu;
            self.events.push_back(PathEvent::MtuChanged(mtu));
        }
        self.events.pop_front()
    }

    /// The smallest tunnel MTU ([`crate::mtu::inner_mtu`]) among the pairs whose last MTU
    /// search found a working size — every path that has worked, not only the selected one,
    /// so a failover never meets a path too small for the tunnel. `None` until a search
    /// finished (or when the peer predates sized probes).
    pub fn mtu(&self) -> Option<u16> {
        self.pairs
            .iter()
            .filter_map(|p| p.mtu.result())
            .map(|m| m.inner)
            .min()
    }

    /// Our TURN server's address (`None` without an allocation link): pairs via our
    /// allocation leave on that leg, so an IPv6 leg costs IPv6's 40-byte header even towards
    /// an IPv4 relayed address.
    pub fn set_relay_leg(&mut self, server: Option<SocketAddr>) {
        self.relay_leg = server;
    }

    /// Runs the MTU searches of valid pairs: sends their due sized pings.
    fn mtu_tick(&mut self, now: Instant) {
        let unix = self.unix_ms(now);
        for i in 0..self.pairs.len() {
            let p = &self.pairs[i];
            if p.state != PairState::Valid || self.blocked(&p.dest) {
                continue;
            }
            let first_hop = mtu_first_hop(&p.dest, self.relay_leg);
            let oh = crate::mtu::overhead(&first_hop, pair_kind(p) == PathKind::Relay);
            let srtt = p.srtt;
            let (sizes, _) = self.pairs[i].mtu.poll(now, oh, srtt);
            for size in sizes {
                let mut tx = [0u8; 12];
                tx[..8].copy_from_slice(&self.next_rand().to_be_bytes());
                tx[8..10].copy_from_slice(&size.to_be_bytes());
                let Some(s) = self.session.as_mut() else {
                    return;
                };
                s.sender
                    .seal(unix, &ProbeBody::SizedPing { tx, size }, &mut self.buf);
                self.pairs[i].mtu.sent(tx, size);
                self.transmits.push_back(Transmit {
                    dest: self.pairs[i].dest,
                    payload: self.buf.clone(),
                    ttl: None,
                });
            }
        }
    }

    /// A sized pong from `from`.
    fn mtu_pong(&mut self, now: Instant, from: PathAddr, tx: TxId, size: u16) {
        if let Some(p) = self.pairs.iter_mut().find(|p| p.dest == from) {
            p.mtu.pong(now, tx, size);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let s = self.session.as_ref()?;
        let mut t: Option<Instant> = None;
        let mut take = |x: Instant| t = Some(t.map_or(x, |t: Instant| t.min(x)));
        for p in &self.pairs {
            if !self.blocked(&p.dest) {
                take(p.next_ping);
            }
            if p.state == PairState::Valid && !self.blocked(&p.dest) {
                if let Some(m) = p.mtu.timeout() {
                    take(m);
                }
            }
            if let (PairState::Valid, Some((_, sent))) = (p.state, p.pings.front()) {
                let rtt2 = p.srtt.map_or(Duration::ZERO, |r| r * 2);
                take(*sent + self.cfg.pong_timeout.max(rtt2));
            }
        }
        if !self.relay_deadline_fired {
            take(s.start_at + self.cfg.relay_after);
        }
        match self.birthday.search {
            Search::Idle if !self.direct_blocked => take(s.start_at + self.cfg.birthday_after),
            Search::Active(until) if !self.direct_blocked => {
                take(until);
                if let Some(t) = self.birthday.next_spray {
                    take(t);
                }
            }
            _ => {}
        }
        Some(t.map_or(s.start_at, |t| t.max(s.start_at)))
    }

    /// Status snapshot.
    pub fn status(&self) -> PathStatus {
        let sel = self
            .selected
            .and_then(|s| self.pairs.iter().find(|p| p.dest == s));
        PathStatus {
            kind: self
                .selected
                .as_ref()
                .map_or(PathKind::None, |s| self.class_of(s)),
            remote: self.selected,
            remote_label: self.selected.map(|s| match (s.via, self.class_of(&s)) {
                (Via::Direct, PathKind::Relay) => format!("relay:{}", s.addr),
                _ => s.to_string(),
            }),
            rtt: sel.and_then(|p| p.srtt),
            reason: self.reason.clone(),
            pairs: self
                .pairs
                .iter()
                .filter(|p| !is_waiting_pool_pair(p))
                .map(|p| PairStatus {
                    remote: p.dest,
                    kind: p.kind,
                    state: p.state,
                    rtt_us: p.srtt.map(|d| d.as_micros() as u64),
                    pings_sent: p.pings_sent,
                    pongs_received: p.pongs_received,
                    mtu: p.mtu.result(),
                })
                .collect(),
            birthday: self.birthday_status(),
            mtu: self.mtu(),
        }
    }

    /// Sets the reason shown while nothing is selected (e.g. "peer not in network").
    pub fn set_reason(&mut self, reason: impl Into<String>) {
        if self.selected.is_none() {
            self.reason = reason.into();
        }
    }

    /// Probe counters (accepted / refused).
    pub fn counters(&self) -> ProbeCounters {
        self.counters
    }

    /// Changes the idle keepalive interval (the daemon measured the NAT binding lifetime).
    /// A valid pair whose next ping is further away than the new interval is pinged one new
    /// interval after its last pong — at once if that is past: its binding may be about to
    /// expire (or have expired, which is then found now rather than when data needs the path).
    pub fn set_keepalive_interval(&mut self, now: Instant, interval: Duration) {
        self.cfg.keepalive_interval = interval;
        for p in &mut self.pairs {
            if p.state == PairState::Valid && p.next_ping > now + interval {
                let due = p.last_pong.map_or(now, |l| l + interval).max(now);
                p.next_ping = due.min(now + interval);
                p.interval = interval;
            }
        }
    }

    /// The idle keepalive interval in use.
    pub fn keepalive_interval(&self) -> Duration {
        self.cfg.keepalive_interval
    }

    /// Sends a ping on the selected pair now (`meshpunch ping`); returns its transaction id.
    pub fn ping_now(&mut self, now: Instant) -> Option<(TxId, PathAddr)> {
        let sel = self.selected?;
        let unix = self.unix_ms(now);
        let mut tx = [0u8; 12];
        tx[..8].copy_from_slice(&self.next_rand().to_be_bytes());
        tx[8..].copy_from_slice(&u32::MAX.to_be_bytes());
        let s = self.session.as_mut()?;
        s.sender.seal(unix, &ProbeBody::Ping { tx }, &mut self.buf);
        let p = self.pairs.iter_mut().find(|p| p.dest == sel)?;
        if p.pings.len() >= MAX_OUTSTANDING {
            p.pings.pop_front();
        }
        p.pings.push_back((tx, now));
        p.pings_sent += 1;
        self.transmits.push_back(Transmit {
            dest: sel,
            payload: self.buf.clone(),
            ttl: None,
        });
        Some((tx, sel))
    }

    /// When the pong to `tx` arrived, the last pong time of `dest` (for `meshpunch ping`).
    pub fn last_pong(&self, dest: &PathAddr) -> Option<Instant> {
        self.pairs
            .iter()
            .find(|p| p.dest == *dest)
            .and_then(|p| p.last_pong)
    }
}

/// Birthday probing (see the module docs).
impl PeerPath {
    /// Sets [`PathConfig::birthday_ttl`] (configured, or measured by the driver; 0 = the
    /// system's TTL). Applies to the next pool pings.
    pub fn set_birthday_ttl(&mut self, ttl: u8) {
        self.cfg.birthday_ttl = ttl;
    }

    /// Tells the path manager how our own NAT maps the data socket (the driver measures it
    /// with two STUN servers). Decides whether we are the hard or the easy side.
    pub fn set_local_mapping(&mut self, mapping: MappingBehaviour) {
        if mapping == self.local_mapping {
            return;
        }
        self.local_mapping = mapping;
        // A search that was skipped for want of a role is decided again with the new fact.
        if self.birthday.search == Search::Done && self.birthday.role == BirthdayRole::None {
            self.birthday.search = Search::Idle;
        }
    }

    /// The peer's IP as the rendezvous observed it (from the punch start; `None` for static
    /// sessions or an older rendezvous). Birthday probing — the spray and the pool pings —
    /// only ever targets this IP: a server-reflexive candidate naming another IP is not used
    /// for it.
    pub fn set_peer_observed(&mut self, ip: Option<std::net::IpAddr>) {
        self.peer_observed = ip.map(crate::addr::canonical_ip);
    }

    /// Spray pings still allowed in the current budget window.
    fn spray_budget_left(&self, now: Instant) -> u64 {
        let limit = u64::from(self.cfg.birthday_probes);
        match self.spray_window {
            Some((start, used)) if now.saturating_duration_since(start) < SPRAY_BUDGET_WINDOW => {
                limit.saturating_sub(used)
            }
            _ => limit,
        }
    }

    fn spray_budget_use(&mut self, now: Instant) {
        match &mut self.spray_window {
            Some((start, used)) if now.saturating_duration_since(*start) < SPRAY_BUDGET_WINDOW => {
                *used += 1
            }
            w => *w = Some((now, 1)),
        }
    }

    /// Whether a birthday search needs the driver's socket pool open (hard side, searching).
    pub fn wants_pool(&self) -> bool {
        self.birthday.role == BirthdayRole::Hard
            && matches!(self.birthday.search, Search::Active(_))
    }

    /// The driver has `sockets` pool sockets open, with [`LocalSocket`] indices
    /// `1..=sockets` (0 = closed). Pool pairs are made at once if a search waits for them.
    pub fn set_pool(&mut self, now: Instant, sockets: u16) {
        self.birthday.pool = sockets;
        if self.wants_pool() {
            self.make_pool_pairs(now);
        }
    }

    /// The pool size last announced with [`set_pool`](Self::set_pool).
    pub fn pool(&self) -> u16 {
        self.birthday.pool
    }

    /// Pool sockets this peer's pairs use (the driver keeps them open).
    pub fn local_sockets(&self) -> impl Iterator<Item = LocalSocket> + '_ {
        self.pairs
            .iter()
            .map(|p| p.dest.local)
            .filter(|l| *l != DATA_SOCKET)
    }

    /// Birthday probing counters and state.
    pub fn birthday_status(&self) -> BirthdayStatus {
        let mut st = self.birthday.status;
        st.role = self.birthday.role;
        st.active = matches!(self.birthday.search, Search::Active(_));
        st.pool_pairs = self
            .pairs
            .iter()
            .filter(|p| is_waiting_pool_pair(p))
            .count() as u32;
        st
    }

    /// When a new session (a fresh offer) would let a birthday search try again: the last
    /// search ended without a direct pair, or its direct pair died since. `None` while a
    /// search runs, when a direct pair works, or when this peer needs no birthday search.
    /// The driver offers again at that time (see [`BIRTHDAY_RETRY`]).
    pub fn birthday_retry_at(&self) -> Option<Instant> {
        if self.birthday.search != Search::Done
            || self.birthday.role == BirthdayRole::None
            || self.session.is_none()
            || self.has_valid_direct()
        {
            return None;
        }
        let ended = self.birthday_ended?;
        let doublings = self.birthday_failures.saturating_sub(1).min(16);
        let wait = BIRTHDAY_RETRY
            .saturating_mul(1u32 << doublings)
            .min(BIRTHDAY_RETRY_MAX);
        Some(ended + wait)
    }

    fn has_valid_direct(&self) -> bool {
        self.pairs
            .iter()
            .any(|p| p.state == PairState::Valid && pair_kind(p) != PathKind::Relay)
    }

    /// The peer's server-reflexive IPv4 address of an endpoint-independent mapping, if it
    /// signalled one (birthday probing is IPv4 only: NATs with random ports are IPv4 NATs).
    fn peer_easy_srflx(&self) -> Option<SocketAddr> {
        let dependent = |a: &SocketAddr| {
            self.remote_candidates
                .iter()
                .any(|c| c.kind == CandidateKind::SrflxDependent && c.addr == *a)
        };
        self.remote_candidates
            .iter()
            .find(|c| {
                c.kind == CandidateKind::Srflx
                    && c.addr.is_ipv4()
                    && !dependent(&c.addr)
                    && self.observed_ip(&c.addr)
            })
            .map(|c| c.addr)
    }

    fn peer_hard_srflx(&self) -> Option<SocketAddr> {
        self.remote_candidates
            .iter()
            .find(|c| {
                c.kind == CandidateKind::SrflxDependent
                    && c.addr.is_ipv4()
                    && self.observed_ip(&c.addr)
            })
            .map(|c| c.addr)
    }

    /// Whether `a` is on the IP the rendezvous observed for the peer.
    fn observed_ip(&self, a: &SocketAddr) -> bool {
        self.peer_observed == Some(a.ip())
    }

    fn decide_role(&self) -> BirthdayRole {
        match self.local_mapping {
            MappingBehaviour::EndpointDependent
                if self.cfg.birthday_sockets > 0
                    && self.peer_hard_srflx().is_none()
                    && self.peer_easy_srflx().is_some() =>
            {
                BirthdayRole::Hard
            }
            MappingBehaviour::EndpointIndependent
                if self.cfg.birthday_probes > 0 && self.peer_hard_srflx().is_some() =>
            {
                BirthdayRole::Easy
            }
            _ => BirthdayRole::None,
        }
    }

    fn birthday_tick(&mut self, now: Instant, start: Instant) {
        if self.direct_blocked {
            return;
        }
        match self.birthday.search {
            Search::Done => return,
            Search::Idle => {
                if now < start + self.cfg.birthday_after {
                    return;
                }
                if self.has_valid_direct() {
                    self.birthday.search = Search::Done;
                    return;
                }
                let role = self.decide_role();
                self.birthday.role = role;
                match role {
                    BirthdayRole::None => {
                        self.birthday.search = Search::Done;
                        return;
                    }
                    BirthdayRole::Easy => {
                        self.birthday.target = self.peer_hard_srflx();
                        self.birthday.next_spray = Some(now + SPRAY_DELAY);
                    }
                    BirthdayRole::Hard => {}
                }
                self.birthday.search = Search::Active(now + self.cfg.birthday_for);
            }
            Search::Active(until) => {
                if self.has_valid_direct() || now >= until {
                    self.end_birthday(now);
                    return;
                }
            }
        }
        match self.birthday.role {
            BirthdayRole::Hard => self.make_pool_pairs(now),
            BirthdayRole::Easy => self.spray(now),
            BirthdayRole::None => {}
        }
    }

    /// Hard side: one pair per pool socket to the easy peer's server-reflexive address.
    fn make_pool_pairs(&mut self, now: Instant) {
        if self.birthday.pool_pairs_made || self.birthday.pool == 0 {
            return;
        }
        let Some(dest) = self.peer_easy_srflx() else {
            return;
        };
        let n = self.birthday.pool.min(self.cfg.birthday_sockets);
        for i in 1..=n {
            let pa = PathAddr::direct_on(i, dest);
            if self.pairs.iter().any(|p| p.dest == pa) {
                continue;
            }
            let mut p = self.new_pair(pa, CandidateKind::Birthday, now);
            // Spread the first pings over one punch interval instead of a burst of `n`.
            p.next_ping = now + self.cfg.punch_interval * u32::from(i - 1) / u32::from(n);
            self.pairs.push(p);
        }
        self.birthday.pool_pairs_made = true;
        self.events.push_back(PathEvent::RemotesChanged);
    }

    /// The TTL of `p`'s next ping: [`PathConfig::birthday_ttl`] for a waiting pool pair that
    /// has heard nothing from the peer yet, else the system's.
    fn pool_ping_ttl(&self, p: &Pair) -> Option<u8> {
        (self.cfg.birthday_ttl > 0 && is_waiting_pool_pair(p) && !p.heard)
            .then_some(self.cfg.birthday_ttl)
    }

    /// Easy side: the next batch of spray pings to distinct random ports of the hard peer.
    fn spray(&mut self, now: Instant) {
        let (Some(target), Some(at)) = (self.birthday.target, self.birthday.next_spray) else {
            return;
        };
        if now < at {
            return;
        }
        let limit = usize::from(self.cfg.birthday_probes);
        let per_tick = (u128::from(self.cfg.birthday_rate) * SPRAY_TICK.as_millis() / 1000)
            .clamp(1, 10_000) as usize;
        if self.spray_budget_left(now) == 0 {
            // This window's budget went to earlier sessions: no spray until it ends.
            self.birthday.next_spray = None;
            return;
        }
        let unix = self.unix_ms(now);
        let span = u64::from(u16::MAX - SPRAY_MIN_PORT) + 1;
        for _ in 0..per_tick {
            if self.birthday.sprayed.len() >= limit || self.spray_budget_left(now) == 0 {
                break;
            }
            // Distinct ports, never the one the plain pairs already ping.
            let mut port = None;
            for _ in 0..16 {
                let p = SPRAY_MIN_PORT + (self.next_rand() % span) as u16;
                if p != target.port() && !self.birthday.sprayed.contains_key(&p) {
                    port = Some(p);
                    break;
                }
            }
            let Some(port) = port else { break };
            let mut tx = [0u8; 12];
            tx[..8].copy_from_slice(&self.next_rand().to_be_bytes());
            tx[8..10].copy_from_slice(&[0xB1, 0xD7]);
            tx[10..].copy_from_slice(&port.to_be_bytes());
            let Some(s) = self.session.as_mut() else {
                return;
            };
            s.sender.seal(unix, &ProbeBody::Ping { tx }, &mut self.buf);
            self.birthday.sprayed.insert(port, (tx, now));
            self.birthday.status.spray_sent += 1;
            self.spray_budget_use(now);
            self.transmits.push_back(Transmit {
                dest: PathAddr::direct(SocketAddr::new(target.ip(), port)),
                payload: self.buf.clone(),
                ttl: None,
            });
        }
        self.birthday.next_spray =
            if self.birthday.sprayed.len() < limit && self.spray_budget_left(now) > 0 {
                Some(now + SPRAY_TICK)
            } else {
                None
            };
    }

    /// The spray entry for `from` (a port we sprayed on the hard peer's IP, from the data
    /// socket), if any.
    fn sprayed_port(&self, from: &PathAddr) -> Option<(TxId, Instant)> {
        let target = self.birthday.target?;
        if from.via != Via::Direct || from.local != DATA_SOCKET || from.addr.ip() != target.ip() {
            return None;
        }
        self.birthday.sprayed.get(&from.addr.port()).copied()
    }

    /// An authenticated pong from exactly a sprayed address, echoing that spray ping's id:
    /// the pair (found by birthday probing) is made or marked, and the normal pong handling
    /// that follows validates it.
    fn spray_pong(&mut self, now: Instant, from: PathAddr, tx: TxId) {
        let Some((stx, sent)) = self.sprayed_port(&from) else {
            return;
        };
        if stx != tx {
            return;
        }
        self.birthday.sprayed.remove(&from.addr.port());
        self.birthday.status.spray_hits += 1;
        match self.pairs.iter_mut().find(|p| p.dest == from) {
            Some(p) => {
                if p.kind == CandidateKind::Prflx {
                    p.kind = CandidateKind::Birthday;
                }
                if p.pings.len() >= MAX_OUTSTANDING {
                    p.pings.pop_front();
                }
                p.pings.push_back((tx, sent));
            }
            None => {
                let mut p = self.new_pair(from, CandidateKind::Birthday, now);
                p.pings.push_back((tx, sent));
                p.pings_sent = 1;
                p.next_ping = now + self.cfg.punch_interval;
                self.pairs.push(p);
                self.events.push_back(PathEvent::RemotesChanged);
            }
        }
    }

    /// The search is over (a direct pair works, or time is up): unanswered birthday pairs go,
    /// so the driver can close the pool sockets nobody uses.
    fn end_birthday(&mut self, now: Instant) {
        self.birthday.search = Search::Done;
        self.birthday_ended = Some(now);
        if self.has_valid_direct() {
            self.birthday_failures = 0;
        } else {
            self.birthday_failures = self.birthday_failures.saturating_add(1);
        }
        self.birthday.next_spray = None;
        let selected = self.selected;
        let before = self.pairs.len();
        self.pairs.retain(|p| {
            p.kind != CandidateKind::Birthday
                || p.state == PairState::Valid
                || Some(p.dest) == selected
        });
        if self.pairs.len() != before {
            self.events.push_back(PathEvent::RemotesChanged);
        }
    }
}

/// An unanswered pair of a birthday pool socket (hundreds of them exist while searching).
fn is_waiting_pool_pair(p: &Pair) -> bool {
    p.kind == CandidateKind::Birthday && p.state != PairState::Valid && p.dest.local != DATA_SOCKET
}

/// Where a pair's packets go on their first hop: our TURN server for pairs via our allocation
/// (when known), else the pair's remote address. Its family sets the pair's MTU overhead.
fn mtu_first_hop(dest: &PathAddr, relay_leg: Option<SocketAddr>) -> SocketAddr {
    match (dest.via, relay_leg) {
        (Via::Relay, Some(server)) => server,
        _ => dest.addr,
    }
}

fn pair_kind(p: &Pair) -> PathKind {
    if p.kind == CandidateKind::Relayed {
        PathKind::Relay
    } else {
        path_kind(&p.dest)
    }
}

fn kind_rank(k: PathKind) -> u8 {
    match k {
        PathKind::Lan => 0,
        PathKind::Direct => 1,
        PathKind::Relay => 2,
        PathKind::None => 3,
    }
}

#[cfg(test)]
mod tests;
