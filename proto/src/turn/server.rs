//! The TURN server state machine ([`TurnServer`]): allocations, permissions, channels and the
//! relaying paths. See the [module docs](super) for the call order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MessageIntegrity, MessageIntegritySha256, Nonce, Realm,
    UnknownAttributes, XorMappedAddress,
};
use stun_rs::attributes::turn::{
    ChannelNumber, LifeTime, RequestedAddressFamily, RequestedTrasport, ReservationToken,
    XorPeerAddress, XorRelayedAddress,
};
use stun_rs::methods::{ALLOCATE, BINDING, CHANNEL_BIND, CREATE_PERMMISSION, REFRESH};
use stun_rs::{
    AddressFamily, HMACKey, MessageClass, MessageDecoder, MessageEncoder, StunAttribute,
    StunMessage, StunMessageBuilder, TransactionId,
};

use super::auth::{AuthOutcome, Integrity};
use super::codec::{
    attr, decode_xor_addr, encode_data_indication, msgtype, parse_header, unknown_required, Header,
    RawAttrs,
};
use super::limits::{
    Bucket, Rate, RateTable, SharedLimits, SharedRate, DEFAULT_ALLOCATION_BANDWIDTH,
};
use super::ports::{AllocateError, PortRequest, RelayAllocator, RESERVATION_TOKEN_LEN};
use super::{Auth, Family};
use crate::addr::{DenyReason, PeerPolicy};
use crate::channeldata;
use crate::creds::Tenant;
use std::sync::Arc;

/// Default allocation lifetime (RFC 8656 §2.2, 10 minutes).
pub const DEFAULT_ALLOCATION_LIFETIME: Duration = Duration::from_secs(600);
/// Largest allocation lifetime the server grants (RFC 8656 §7.2 suggests 3600 s).
pub const MAX_ALLOCATION_LIFETIME: Duration = Duration::from_secs(3600);
/// Permission lifetime (RFC 8656 §9, 300 s, not configurable by the client).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 §12, 600 s).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel binding expires, neither its number nor its peer may be rebound to anything
/// else for this long (RFC 8656 §12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// How long a nonce stays valid before the server answers 438 Stale Nonce.
pub const DEFAULT_NONCE_LIFETIME: Duration = Duration::from_secs(600);
/// How often expired state is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Configuration of the server core. [`ServerConfig::new`] gives RFC defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// REALM sent in challenges and required in requests.
    pub realm: String,
    /// Credentials.
    pub auth: Auth,
    /// Which peers may be reached.
    pub policy: PeerPolicy,
    /// Lifetime granted when the client asks for none (or less).
    pub default_lifetime: Duration,
    /// Longest lifetime granted.
    pub max_lifetime: Duration,
    /// Nonce validity.
    pub nonce_lifetime: Duration,
    /// Permissions per allocation (a client can grow this table).
    pub max_permissions: usize,
    /// Channels per allocation.
    pub max_channels: usize,
    /// Per-allocation bandwidth limit in bytes per second, both directions together
    /// (default [`DEFAULT_ALLOCATION_BANDWIDTH`]; the per-network limit lives in the port pool,
    /// which every worker shares).
    pub bandwidth: Rate,
    /// Requests per second per source IP (all STUN requests and indications).
    pub request_rate: Rate,
    /// Unauthenticated answers (401, Binding responses, pre-auth errors) per source IP.
    pub unauth_rate: Rate,
    /// Sources per rate-limit table, shared by all workers (when full, a new source replaces the
    /// least recently seen of a few sampled entries).
    pub max_rate_entries: usize,
    /// Key for stateless nonces. Set it randomly (all workers of one relay share it).
    pub nonce_key: [u8; 32],
    /// Whether responses carry FINGERPRINT when the request did.
    pub fingerprint: bool,
    /// Highest channel number accepted: [`channeldata::LEGACY_CHANNEL_MAX`] (0x7FFF, RFC 5766,
    /// what coturn accepts and its tools use; the default) or [`channeldata::CHANNEL_MAX`]
    /// (0x4FFF, strict RFC 8656).
    pub channel_max: u16,
    /// Relayed IP as bound → IP advertised in XOR-RELAYED-ADDRESS (a relay behind 1:1 NAT,
    /// e.g. a cloud VM that only sees its private address; coturn's `external-ip`).
    pub external_ips: Vec<(IpAddr, IpAddr)>,
    /// Relayed port range (inclusive) on which the relay's own addresses are allowed as peers:
    /// two clients of one relay reaching each other allocation to allocation (TURN to TURN on
    /// one server, as coturn allows). Only ports that are the relayed address of a live
    /// allocation pass ([`RelayAllocator::is_live_relayed`]); every other port of an own
    /// address stays refused (free relayed ports, the listening port, services on the host).
    /// `None` refuses own addresses entirely.
    pub self_relay_ports: Option<(u16, u16)>,
}

impl ServerConfig {
    /// RFC defaults with the given realm and credentials and an all-denying peer policy.
    pub fn new(realm: impl Into<String>, auth: Auth, nonce_key: [u8; 32]) -> Self {
        ServerConfig {
            realm: realm.into(),
            auth,
            policy: PeerPolicy::default(),
            default_lifetime: DEFAULT_ALLOCATION_LIFETIME,
            max_lifetime: MAX_ALLOCATION_LIFETIME,
            nonce_lifetime: DEFAULT_NONCE_LIFETIME,
            max_permissions: 64,
            max_channels: 64,
            bandwidth: DEFAULT_ALLOCATION_BANDWIDTH,
            request_rate: Rate {
                per_sec: 1000,
                burst: 2000,
            },
            unauth_rate: Rate {
                per_sec: 200,
                burst: 400,
            },
            max_rate_entries: 65_536,
            nonce_key,
            fingerprint: true,
            channel_max: channeldata::LEGACY_CHANNEL_MAX,
            external_ips: Vec::new(),
            self_relay_ports: None,
        }
    }
}

/// Fixed labels of [`Stats::denied`] (peer-address denials by reason).
pub const DENY_LABELS: [&str; 12] = [
    "loopback",
    "unspecified",
    "link_local",
    "multicast",
    "broadcast",
    "private",
    "cgnat",
    "unique_local",
    "reserved",
    "relay_self",
    "denied",
    "public",
];

fn deny_index(r: DenyReason) -> usize {
    DENY_LABELS
        .iter()
        .position(|l| *l == r.as_str())
        .unwrap_or(DENY_LABELS.len() - 1)
}

/// Counters kept by one server core (plain integers: one core per worker, no atomics on the
/// hot path). The driver exports deltas to its metrics registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Allocations created.
    pub allocations_created: u64,
    /// Allocations ended by expiry.
    pub allocations_expired: u64,
    /// Allocations ended by Refresh with lifetime 0.
    pub allocations_released: u64,
    /// Permissions created (not refreshes).
    pub permissions_created: u64,
    /// Channels bound (not refreshes).
    pub channels_bound: u64,
    /// Packets client → peer.
    pub packets_to_peer: u64,
    /// Payload bytes client → peer.
    pub bytes_to_peer: u64,
    /// Packets peer → client.
    pub packets_to_client: u64,
    /// Payload bytes peer → client.
    pub bytes_to_client: u64,
    /// Peer addresses refused (403), by [`DENY_LABELS`] index.
    pub denied: [u64; 12],
    /// Requests refused for bad credentials (401 after an integrity check, 441).
    pub auth_failures: u64,
    /// Challenges sent (401 without credentials).
    pub challenges: u64,
    /// 438 answers.
    pub stale_nonces: u64,
    /// 486 answers: the username's allocation quota.
    pub quota_hits: u64,
    /// 486 answers: the network's allocation quota.
    pub network_quota_hits: u64,
    /// 508 answers.
    pub capacity_hits: u64,
    /// Datagrams dropped by the per-source rate limits.
    pub rate_limited: u64,
    /// Malformed datagrams (dropped or answered 400).
    pub malformed: u64,
    /// Data dropped for lack of a permission.
    pub no_permission: u64,
    /// ChannelData dropped: channel not bound (or no allocation).
    pub unbound_channel: u64,
    /// Data dropped by the per-allocation bandwidth limit.
    pub bandwidth_dropped: u64,
    /// Data dropped by the per-network bandwidth limit.
    pub network_bandwidth_dropped: u64,
    /// Other error responses (400, 420, 437, 440, 442, 443).
    pub errors: u64,
    /// Binding requests answered.
    pub bindings: u64,
}

/// Current table sizes (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Live allocations.
    pub allocations: usize,
    /// Live permissions over all allocations.
    pub permissions: usize,
    /// Live channel bindings over all allocations.
    pub channels: usize,
}

/// What the driver does with a datagram from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send.
    None,
    /// Send `out[..len]` back to the client from the listening socket.
    Reply(usize),
    /// Send `packet[range]` from relayed address `relayed` to `peer`.
    Relay {
        /// The allocation's relayed transport address (which socket to send from).
        relayed: SocketAddr,
        /// Destination.
        peer: SocketAddr,
        /// Payload within the input datagram.
        range: Range<usize>,
    },
}

/// What the driver does with a datagram a peer sent to a relayed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Drop it.
    Drop,
    /// Send the payload to `client` as ChannelData on `channel`: write the header with
    /// [`channeldata::write_header`] in the 4 bytes before the payload.
    ChannelData {
        /// Client transport address.
        client: SocketAddr,
        /// Channel number.
        channel: u16,
    },
    /// Send `out[..len]` (a Data indication) to `client`.
    Indication {
        /// Client transport address.
        client: SocketAddr,
        /// Bytes written to `out`.
        len: usize,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Channel {
    number: u16,
    peer: SocketAddr,
    /// The peer is an own address of the relay (allocation to allocation): re-checked by the
    /// peer policy on every datagram, since the target allocation may end.
    own: bool,
    /// Binding valid until.
    expires: Instant,
}

#[derive(Debug)]
pub(super) struct Allocation {
    client: SocketAddr,
    relayed: SocketAddr,
    /// Quota keys (username and network).
    tenant: Tenant,
    /// The network's shared bandwidth bucket.
    network_rate: Option<Arc<SharedRate>>,
    expires: Instant,
    created_by: TransactionId,
    granted: u32,
    /// RESERVATION-TOKEN handed out with this allocation (EVEN-PORT with the R bit), repeated
    /// when the Allocate is retransmitted.
    token: Option<[u8; RESERVATION_TOKEN_LEN]>,
    /// Peer IP (canonical) → permission expiry.
    perms: Vec<(IpAddr, Instant)>,
    /// Bound and cooling-down channels (a channel cools down until `expires + CHANNEL_COOLDOWN`).
    channels: Vec<Channel>,
    bucket: Bucket,
}

impl Allocation {
    #[inline]
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }
    #[inline]
    fn channel_by_number(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }
    #[inline]
    fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }
}

/// The TURN server state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct TurnServer<A: RelayAllocator> {
    pub(super) cfg: ServerConfig,
    pub(super) allocator: A,
    pub(super) epoch: Instant,
    pub(super) epoch_unix: u64,
    pub(super) slots: Vec<Option<Allocation>>,
    pub(super) free_slots: Vec<usize>,
    pub(super) by_client: HashMap<SocketAddr, usize>,
    pub(super) by_relay: HashMap<SocketAddr, usize>,
    pub(super) request_limit: Arc<RateTable>,
    pub(super) unauth_limit: Arc<RateTable>,
    pub(super) sweep_turn: usize,
    pub(super) stats: Stats,
    pub(super) next_sweep: Instant,
    pub(super) rng: u64,
    pub(super) decoder: MessageDecoder,
    pub(super) encoder: MessageEncoder,
}

/// Reason phrase of a 486 caused by the network quota (counted apart from the username quota).
const NETWORK_QUOTA_REASON: &str = "Allocation Quota Reached (network)";

/// An error response to send: code + reason.
pub(super) struct Refuse(pub(super) u16, pub(super) &'static str);

impl<A: RelayAllocator> TurnServer<A> {
    /// A server with `cfg` and `allocator`; `now`/`unix_now` anchor the clock (REST-API
    /// usernames carry Unix expiry times). Its per-source rate tables are its own: a driver
    /// running several cores in one process shares them with [`TurnServer::with_limits`].
    pub fn new(cfg: ServerConfig, allocator: A, now: Instant, unix_now: u64) -> Self {
        let limits = SharedLimits::new(&cfg);
        Self::with_limits(cfg, allocator, limits, now, unix_now)
    }

    /// A server sharing the per-source rate tables `limits` with the other cores (workers) of
    /// the process, so that a source's limits are per process, not per worker.
    pub fn with_limits(
        cfg: ServerConfig,
        allocator: A,
        limits: SharedLimits,
        now: Instant,
        unix_now: u64,
    ) -> Self {
        let seed = u64::from_le_bytes([
            cfg.nonce_key[0],
            cfg.nonce_key[1],
            cfg.nonce_key[2],
            cfg.nonce_key[3],
            cfg.nonce_key[4],
            cfg.nonce_key[5],
            cfg.nonce_key[6],
            cfg.nonce_key[7],
        ]) ^ unix_now;
        TurnServer {
            request_limit: limits.requests,
            unauth_limit: limits.unauth,
            sweep_turn: (seed as usize) % super::limits::RATE_SHARDS,
            cfg,
            allocator,
            epoch: now,
            epoch_unix: unix_now,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_client: HashMap::new(),
            by_relay: HashMap::new(),
            stats: Stats::default(),
            next_sweep: now + SWEEP_INTERVAL,
            rng: seed | 1,
            decoder: MessageDecoder::default(),
            encoder: MessageEncoder::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The allocator (the driver reaches its sockets through this).
    pub fn allocator(&self) -> &A {
        &self.allocator
    }

    /// Mutable access to the allocator.
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.allocator
    }

    /// Counters since start.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Current table sizes.
    pub fn gauges(&self, now: Instant) -> Gauges {
        let mut g = Gauges::default();
        for a in self.slots.iter().flatten() {
            if a.expires <= now {
                continue;
            }
            g.allocations += 1;
            g.permissions += a.perms.iter().filter(|(_, e)| *e > now).count();
            g.channels += a.channels.iter().filter(|c| c.expires > now).count();
        }
        g
    }

    /// Relayed address of the allocation of `client`, if it has a live one.
    pub fn relayed_addr(&self, client: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let a = self.slots.get(*self.by_client.get(&client)?)?.as_ref()?;
        (a.expires > now).then_some(a.relayed)
    }

    /// True when no allocation is live (used to finish a graceful drain).
    pub fn is_idle(&self) -> bool {
        self.by_client.is_empty()
    }

    pub(super) fn unix_now(&self, now: Instant) -> u64 {
        self.epoch_unix + now.saturating_duration_since(self.epoch).as_secs()
    }

    fn next_rand(&mut self) -> u64 {
        // Transaction ids of Data indications only need not to collide.
        crate::rng::xorshift64star(&mut self.rng)
    }

    /// When [`TurnServer::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    /// Expires allocations, permissions, channels and idle rate-limit entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let mut expired = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot else { continue };
            if a.expires <= now {
                expired.push(i);
                continue;
            }
            a.perms.retain(|(_, e)| *e > now);
            a.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
        }
        for i in expired {
            self.free_slot(i);
            self.stats.allocations_expired += 1;
        }
        // Incremental: one shard of each shared table per sweep (other workers sweep others).
        self.sweep_turn = self.sweep_turn.wrapping_add(1);
        self.request_limit.sweep_shard(self.sweep_turn, now);
        self.unauth_limit.sweep_shard(self.sweep_turn, now);
    }

    /// Ends the allocation of `client` now, if it has one: a stream transport (TCP/TLS)
    /// connection closed, and an allocation made over a stream lives only as long as its
    /// connection (RFC 8656 §3.1). Returns whether one ended.
    pub fn release_client(&mut self, client: SocketAddr) -> bool {
        match self.by_client.get(&client) {
            Some(&i) => {
                self.free_slot(i);
                self.stats.allocations_released += 1;
                true
            }
            None => false,
        }
    }

    /// Ends every allocation now (graceful shutdown after the drain period).
    pub fn release_all(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].is_some() {
                self.free_slot(i);
            }
        }
    }

    fn free_slot(&mut self, i: usize) {
        if let Some(a) = self.slots.get_mut(i).and_then(Option::take) {
            self.by_client.remove(&a.client);
            self.by_relay.remove(&a.relayed);
            self.allocator.release(a.relayed, &a.tenant);
            self.free_slots.push(i);
        }
    }

    fn live_slot(&self, client: SocketAddr, now: Instant) -> Option<usize> {
        let i = *self.by_client.get(&client)?;
        match self.slots.get(i) {
            Some(Some(a)) if a.expires > now => Some(i),
            _ => None,
        }
    }

    /// Handles a datagram that arrived on the listening socket from `from`. Replies are
    /// written into `out` (give it at least 1500 bytes).
    pub fn handle_client(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        out: &mut [u8],
    ) -> ClientAction {
        if channeldata::is_channel_data(packet) {
            return self.client_channel_data(now, from, packet);
        }
        let Some(hdr) = parse_header(packet) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        if hdr.msg_type == msgtype::SEND_INDICATION {
            // Data, not a request: limited by the allocation's bandwidth, not the request rate.
            return self.send_indication(now, from, packet, &hdr);
        }
        if !self.request_limit.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::None;
        }
        if hdr.msg_type & 0x0110 != 0 {
            // Indications other than Send, responses: nothing for a server to do.
            self.stats.malformed += 1;
            return ClientAction::None;
        }
        let msg = match self.decoder.decode(packet) {
            Ok((msg, _)) => msg,
            Err(_) => {
                self.stats.malformed += 1;
                let method = stun_rs::MessageType::from(hdr.msg_type).method();
                return self.unauth_error(
                    now,
                    from,
                    method,
                    &hdr.txid,
                    Refuse(400, "Bad Request"),
                    out,
                );
            }
        };
        self.request(now, from, packet, &msg, out)
    }

    fn client_channel_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> ClientAction {
        let cd = match channeldata::parse_up_to(packet, self.cfg.channel_max) {
            Ok(cd) => cd,
            Err(_) => {
                self.stats.malformed += 1;
                return ClientAction::None;
            }
        };
        let Some(i) = self.live_slot(from, now) else {
            self.stats.unbound_channel += 1;
            return ClientAction::None;
        };
        let Some(Some(a)) = self.slots.get(i) else {
            return ClientAction::None;
        };
        let Some(ch) = a.channel_by_number(cd.channel, now) else {
            self.stats.unbound_channel += 1;
            return ClientAction::None;
        };
        let peer = ch.peer;
        let own = ch.own;
        if !a.permitted(crate::addr::canonical_ip(peer.ip()), now) {
            self.stats.no_permission += 1;
            return ClientAction::None;
        }
        let relayed = a.relayed;
        if own && self.peer_policy(relayed, peer, false).is_err() {
            return ClientAction::None;
        }
        let len = cd.data.len();
        if !self.take_bandwidth(i, len as u64, now) {
            return ClientAction::None;
        }
        self.stats.packets_to_peer += 1;
        self.stats.bytes_to_peer += len as u64;
        ClientAction::Relay {
            relayed,
            peer,
            range: channeldata::HEADER_LEN..channeldata::HEADER_LEN + len,
        }
    }

    fn send_indication(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        hdr: &Header,
    ) -> ClientAction {
        let mut peer = None;
        let mut data = None;
        for (typ, range) in RawAttrs::new(packet) {
            match typ {
                attr::XOR_PEER_ADDRESS if peer.is_none() => {
                    peer = decode_xor_addr(&packet[range.clone()], &hdr.txid)
                }
                attr::DATA if data.is_none() => data = Some(range),
                _ => {}
            }
        }
        let (Some(peer), Some(range)) = (peer, data) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        let Some(i) = self.live_slot(from, now) else {
            self.stats.unbound_channel += 1;
            return ClientAction::None;
        };
        let Some(Some(a)) = self.slots.get(i) else {
            return ClientAction::None;
        };
        let canon = crate::addr::canonical_ip(peer.ip());
        if !a.permitted(canon, now) {
            self.stats.no_permission += 1;
            return ClientAction::None;
        }
        let relayed = a.relayed;
        if Family::of(canon) != Family::of(relayed.ip()) {
            self.stats.malformed += 1;
            return ClientAction::None;
        }
        // The port of a Send indication is the real destination: the peer policy decides on it
        // (an own address only on the relayed port of a live allocation, deny list, classes).
        let peer = match self.peer_policy(relayed, peer, false) {
            Ok((peer, _)) => peer,
            Err(_) => return ClientAction::None,
        };
        let len = range.len() as u64;
        if !self.take_bandwidth(i, len, now) {
            return ClientAction::None;
        }
        self.stats.packets_to_peer += 1;
        self.stats.bytes_to_peer += len;
        ClientAction::Relay {
            relayed,
            peer,
            range,
        }
    }

    /// Handles a datagram that peer `from` sent to relayed address `relayed`. `payload` is the
    /// datagram; a Data indication (when no channel is bound) is written into `out`.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relayed: SocketAddr,
        from: SocketAddr,
        payload: &[u8],
        out: &mut [u8],
    ) -> PeerAction {
        let Some(&i) = self.by_relay.get(&relayed) else {
            return PeerAction::Drop;
        };
        let Some(Some(a)) = self.slots.get(i) else {
            return PeerAction::Drop;
        };
        if a.expires <= now {
            return PeerAction::Drop;
        }
        let canon = crate::addr::canonical_ip(from.ip());
        if !a.permitted(canon, now) {
            self.stats.no_permission += 1;
            return PeerAction::Drop;
        }
        let len = payload.len() as u64;
        if !self.take_bandwidth(i, len, now) {
            return PeerAction::Drop;
        }
        let Some(Some(a)) = self.slots.get(i) else {
            return PeerAction::Drop;
        };
        let client = a.client;
        let peer = SocketAddr::new(canon, from.port());
        if let Some(ch) = a.channel_by_peer(peer, now) {
            if payload.len() <= usize::from(u16::MAX) {
                self.stats.packets_to_client += 1;
                self.stats.bytes_to_client += len;
                return PeerAction::ChannelData {
                    client,
                    channel: ch.number,
                };
            }
            return PeerAction::Drop;
        }
        let r = self.next_rand();
        let r2 = self.next_rand();
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&r.to_le_bytes());
        txid[8..].copy_from_slice(&r2.to_le_bytes()[..4]);
        match encode_data_indication(&txid, peer, payload, out) {
            Some(len_out) => {
                self.stats.packets_to_client += 1;
                self.stats.bytes_to_client += len;
                PeerAction::Indication {
                    client,
                    len: len_out,
                }
            }
            None => PeerAction::Drop,
        }
    }

    // ---- requests -------------------------------------------------------------------------

    fn request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        msg: &StunMessage,
        out: &mut [u8],
    ) -> ClientAction {
        let method = msg.method();
        let txid = *msg.transaction_id().as_bytes();
        if msg.class() != MessageClass::Request {
            self.stats.malformed += 1;
            return ClientAction::None;
        }
        if method == BINDING {
            if !self.unauth_limit.allow(from.ip(), now) {
                self.stats.rate_limited += 1;
                return ClientAction::None;
            }
            self.stats.bindings += 1;
            let resp = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(TransactionId::from(txid))
                .with_attribute(XorMappedAddress::from(from))
                .build();
            return self.encode_reply(&resp, out);
        }
        if method != ALLOCATE
            && method != REFRESH
            && method != CREATE_PERMMISSION
            && method != CHANNEL_BIND
        {
            return self.unauth_error(now, from, method, &txid, Refuse(400, "Bad Request"), out);
        }
        // Comprehension-required attributes we do not implement (RFC 8489 §7.3.1 → 420).
        let unknown: Vec<u16> = unknown_required(packet);
        if !unknown.is_empty() {
            return self.reply_unknown(now, from, method, &txid, &unknown, out);
        }
        let (user, key, integrity) = match self.authenticate(now, from, packet, msg, out) {
            AuthOutcome::Ok {
                user,
                key,
                integrity,
            } => (user, key, integrity),
            AuthOutcome::Replied(n) => return ClientAction::Reply(n),
            AuthOutcome::Drop => return ClientAction::None,
        };
        let ctx = ReplyCtx {
            method,
            txid,
            key: key.clone(),
            integrity,
            fingerprint: self.cfg.fingerprint && msg.get::<Fingerprint>().is_some(),
        };
        let existing = self.live_slot(from, now);
        if let Some(i) = existing {
            if let Some(Some(a)) = self.slots.get(i) {
                // The same user, not the same username: a REST-API username carries its expiry,
                // so a client that fetched new credentials (or a new run of the same host,
                // deleting its stale allocation) is the same user under a new username.
                if a.tenant.user != user.user {
                    self.stats.auth_failures += 1;
                    return self.reply_error(&ctx, Refuse(441, "Wrong Credentials"), out);
                }
            }
        }
        let result = if method == ALLOCATE {
            self.allocate(now, from, msg, existing, user)
        } else {
            match existing {
                None => Err(Refuse(437, "Allocation Mismatch")),
                Some(i) if method == REFRESH => self.refresh(now, i, msg),
                Some(i) if method == CREATE_PERMMISSION => self.create_permission(now, i, msg),
                Some(i) => self.channel_bind(now, i, msg),
            }
        };
        match result {
            Ok(attrs) => {
                let mut b = StunMessageBuilder::new(method, MessageClass::SuccessResponse)
                    .with_transaction_id(TransactionId::from(txid));
                for a in attrs {
                    b = b.with_attribute(a);
                }
                self.finish_reply(b, &ctx, out)
            }
            Err(refuse) => {
                match refuse.0 {
                    486 if refuse.1 == NETWORK_QUOTA_REASON => self.stats.network_quota_hits += 1,
                    486 => self.stats.quota_hits += 1,
                    508 => self.stats.capacity_hits += 1,
                    403 => {}
                    _ => self.stats.errors += 1,
                }
                self.reply_error(&ctx, refuse, out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn challenge(
        &mut self,
        now: Instant,
        from: SocketAddr,
        method: stun_rs::MessageMethod,
        txid: &[u8; 12],
        code: u16,
        reason: &'static str,
        out: &mut [u8],
    ) -> AuthOutcome {
        if !self.unauth_limit.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return AuthOutcome::Drop;
        }
        let nonce = self.make_nonce(from.ip(), now);
        let (Ok(err), Ok(realm), Ok(nonce)) = (
            stun_rs::ErrorCode::new(code, reason),
            Realm::new(self.cfg.realm.clone()),
            Nonce::new(nonce),
        ) else {
            return AuthOutcome::Drop;
        };
        let resp = StunMessageBuilder::new(method, MessageClass::ErrorResponse)
            .with_transaction_id(TransactionId::from(*txid))
            .with_attribute(ErrorCode::new(err))
            .with_attribute(realm)
            .with_attribute(nonce)
            .build();
        match self.encode_reply(&resp, out) {
            ClientAction::Reply(n) => AuthOutcome::Replied(n),
            _ => AuthOutcome::Drop,
        }
    }

    pub(super) fn unauth_error(
        &mut self,
        now: Instant,
        from: SocketAddr,
        method: stun_rs::MessageMethod,
        txid: &[u8; 12],
        refuse: Refuse,
        out: &mut [u8],
    ) -> ClientAction {
        if !self.unauth_limit.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::None;
        }
        let Ok(err) = stun_rs::ErrorCode::new(refuse.0, refuse.1) else {
            return ClientAction::None;
        };
        let resp = StunMessageBuilder::new(method, MessageClass::ErrorResponse)
            .with_transaction_id(TransactionId::from(*txid))
            .with_attribute(ErrorCode::new(err))
            .build();
        self.encode_reply(&resp, out)
    }

    fn reply_unknown(
        &mut self,
        now: Instant,
        from: SocketAddr,
        method: stun_rs::MessageMethod,
        txid: &[u8; 12],
        unknown: &[u16],
        out: &mut [u8],
    ) -> ClientAction {
        if !self.unauth_limit.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::None;
        }
        self.stats.errors += 1;
        let Ok(err) = stun_rs::ErrorCode::new(420, "Unknown Attribute") else {
            return ClientAction::None;
        };
        let mut ua = UnknownAttributes::default();
        for t in unknown.iter().take(8) {
            ua.add(*t);
        }
        let resp = StunMessageBuilder::new(method, MessageClass::ErrorResponse)
            .with_transaction_id(TransactionId::from(*txid))
            .with_attribute(ErrorCode::new(err))
            .with_attribute(ua)
            .build();
        self.encode_reply(&resp, out)
    }

    fn reply_error(&mut self, ctx: &ReplyCtx, refuse: Refuse, out: &mut [u8]) -> ClientAction {
        let Ok(err) = stun_rs::ErrorCode::new(refuse.0, refuse.1) else {
            return ClientAction::None;
        };
        let b = StunMessageBuilder::new(ctx.method, MessageClass::ErrorResponse)
            .with_transaction_id(TransactionId::from(ctx.txid))
            .with_attribute(ErrorCode::new(err));
        self.finish_reply(b, ctx, out)
    }

    fn finish_reply(
        &mut self,
        mut b: StunMessageBuilder,
        ctx: &ReplyCtx,
        out: &mut [u8],
    ) -> ClientAction {
        b = match ctx.integrity {
            Integrity::Sha1 => b.with_attribute(MessageIntegrity::new(ctx.key.clone())),
            Integrity::Sha256 => b.with_attribute(MessageIntegritySha256::new(ctx.key.clone())),
        };
        if ctx.fingerprint {
            b = b.with_attribute(Fingerprint::default());
        }
        self.encode_reply(&b.build(), out)
    }

    fn encode_reply(&mut self, msg: &StunMessage, out: &mut [u8]) -> ClientAction {
        match self.encoder.encode(out, msg) {
            Ok(n) => ClientAction::Reply(n),
            Err(_) => ClientAction::None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &StunMessage,
        existing: Option<usize>,
        tenant: Tenant,
    ) -> Result<Vec<StunAttribute>, Refuse> {
        if let Some(i) = existing {
            let Some(Some(a)) = self.slots.get(i) else {
                return Err(Refuse(437, "Allocation Mismatch"));
            };
            // A retransmitted Allocate gets the original success again (RFC 8656 §7.2).
            if a.created_by == *msg.transaction_id() {
                return Ok(allocate_success(
                    self.advertised(a.relayed),
                    a.granted,
                    from,
                    a.token,
                ));
            }
            return Err(Refuse(437, "Allocation Mismatch"));
        }
        match msg.get::<RequestedTrasport>() {
            Some(StunAttribute::RequestedTrasport(rt)) => {
                if rt.protocol().as_u8() != 17 {
                    return Err(Refuse(442, "Unsupported Transport Protocol"));
                }
            }
            _ => return Err(Refuse(400, "Bad Request")),
        }
        let family = match msg.get::<RequestedAddressFamily>() {
            Some(StunAttribute::RequestedAddressFamily(f)) => match f.family() {
                AddressFamily::IPv4 => Family::V4,
                AddressFamily::IPv6 => Family::V6,
            },
            _ => Family::V4,
        };
        let lifetime = self.granted_lifetime(msg);
        // EVEN-PORT (with or without the R bit) and RESERVATION-TOKEN (RFC 8656 §7.2): not
        // both, and no REQUESTED-ADDRESS-FAMILY beside a token (400).
        let mut port = PortRequest::Any;
        let mut has_even = false;
        let mut has_token = false;
        for a in msg.attributes() {
            match a {
                StunAttribute::EvenPort(e) => {
                    has_even = true;
                    port = if e.reserve() {
                        PortRequest::EvenReserveNext
                    } else {
                        PortRequest::Even
                    };
                }
                StunAttribute::ReservationToken(t) => {
                    has_token = true;
                    let Ok(token) = <[u8; RESERVATION_TOKEN_LEN]>::try_from(t.token()) else {
                        return Err(Refuse(400, "Bad Request"));
                    };
                    port = PortRequest::Token(token);
                }
                _ => {}
            }
        }
        if has_even && has_token {
            return Err(Refuse(400, "Bad Request"));
        }
        if has_token && msg.get::<RequestedAddressFamily>().is_some() {
            return Err(Refuse(400, "Bad Request"));
        }
        let reservation = match self.allocator.allocate(from, &tenant, family, port, now) {
            Ok(r) => r,
            Err(AllocateError::Quota) => return Err(Refuse(486, "Allocation Quota Reached")),
            Err(AllocateError::NetworkQuota) => return Err(Refuse(486, NETWORK_QUOTA_REASON)),
            Err(AllocateError::Capacity) => return Err(Refuse(508, "Insufficient Capacity")),
            Err(AllocateError::Family) => return Err(Refuse(440, "Address Family not Supported")),
        };
        let token = reservation.reserved_next.map(|(t, _)| t);
        let relayed = reservation.relayed;
        let alloc = Allocation {
            client: from,
            relayed,
            tenant,
            network_rate: reservation.network_rate,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            created_by: *msg.transaction_id(),
            granted: lifetime,
            token,
            perms: Vec::new(),
            channels: Vec::new(),
            bucket: Bucket::new(self.cfg.bandwidth, now),
        };
        // An expired allocation on the same 5-tuple may still occupy a slot: free it first.
        if let Some(&old) = self.by_client.get(&from) {
            self.free_slot(old);
            self.stats.allocations_expired += 1;
        }
        let i = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(alloc);
                i
            }
            None => {
                self.slots.push(Some(alloc));
                self.slots.len() - 1
            }
        };
        self.by_client.insert(from, i);
        self.by_relay.insert(relayed, i);
        self.stats.allocations_created += 1;
        Ok(allocate_success(
            self.advertised(relayed),
            lifetime,
            from,
            token,
        ))
    }

    /// The relayed address as clients must see it (external IP mapping applied).
    fn advertised(&self, relayed: SocketAddr) -> SocketAddr {
        match self
            .cfg
            .external_ips
            .iter()
            .find(|(bound, _)| *bound == relayed.ip())
        {
            Some((_, public)) => SocketAddr::new(*public, relayed.port()),
            None => relayed,
        }
    }

    fn granted_lifetime(&self, msg: &StunMessage) -> u32 {
        let default = self.cfg.default_lifetime.as_secs() as u32;
        let max = self.cfg.max_lifetime.as_secs() as u32;
        match msg.get::<LifeTime>() {
            Some(StunAttribute::LifeTime(l)) => l.as_u32().clamp(default.min(max), max),
            _ => default.min(max),
        }
    }

    fn refresh(
        &mut self,
        now: Instant,
        i: usize,
        msg: &StunMessage,
    ) -> Result<Vec<StunAttribute>, Refuse> {
        let requested = match msg.get::<LifeTime>() {
            Some(StunAttribute::LifeTime(l)) => Some(l.as_u32()),
            _ => None,
        };
        if let Some(StunAttribute::RequestedAddressFamily(f)) = msg.get::<RequestedAddressFamily>()
        {
            let fam = match f.family() {
                AddressFamily::IPv4 => Family::V4,
                AddressFamily::IPv6 => Family::V6,
            };
            if let Some(Some(a)) = self.slots.get(i) {
                if Family::of(a.relayed.ip()) != fam {
                    return Err(Refuse(443, "Peer Address Family Mismatch"));
                }
            }
        }
        if requested == Some(0) {
            self.free_slot(i);
            self.stats.allocations_released += 1;
            return Ok(vec![LifeTime::new(0).into()]);
        }
        let lifetime = self.granted_lifetime(msg);
        if let Some(Some(a)) = self.slots.get_mut(i) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
            a.granted = lifetime;
        }
        Ok(vec![LifeTime::new(lifetime).into()])
    }

    /// The peer policy: the one decision every path that names a peer goes through —
    /// CreatePermission, ChannelBind, Send indications and ChannelData to an own address —
    /// whatever transport the request arrived on (UDP, TCP and TLS drivers call the same core).
    ///
    /// In order: the operator deny list and the address classes on the canonical address
    /// ([`PeerPolicy::check`], so a denied address is 403 in every spelling); an own address of
    /// the relay only when `relay_to_self` is on and the port is the relayed address of a live
    /// allocation; then the family (443). Every refusal is counted by reason. Returns the
    /// canonical peer and whether it is an own address.
    ///
    /// `permission_only`: the address only installs a permission (CreatePermission), whose
    /// port RFC 8656 §9 ignores. There an own address with port 0 ("the IP, any port", what
    /// clients that know only the peer's IP send) is accepted when relaying to self is on:
    /// the permission lets nothing out by itself, every datagram sent under it comes back
    /// here with its real port. A non-zero port must be a live allocation's.
    pub(super) fn peer_policy(
        &mut self,
        relayed: SocketAddr,
        peer: SocketAddr,
        permission_only: bool,
    ) -> Result<(SocketAddr, bool), Refuse> {
        let (ip, own) = match self.cfg.policy.check(peer.ip()) {
            Ok(ip) => (ip, false),
            Err(DenyReason::RelaySelf) => {
                let ip = crate::addr::canonical_ip(peer.ip());
                let ok = if permission_only && peer.port() == 0 {
                    self.cfg.self_relay_ports.is_some()
                } else {
                    self.own_peer_live(SocketAddr::new(ip, peer.port()))
                };
                if !ok {
                    self.stats.denied[deny_index(DenyReason::RelaySelf)] += 1;
                    return Err(Refuse(403, "Forbidden"));
                }
                (ip, true)
            }
            Err(reason) => {
                self.stats.denied[deny_index(reason)] += 1;
                return Err(Refuse(403, "Forbidden"));
            }
        };
        if Family::of(ip) != Family::of(relayed.ip()) {
            return Err(Refuse(443, "Peer Address Family Mismatch"));
        }
        Ok((SocketAddr::new(ip, peer.port()), own))
    }

    /// Whether an own address `peer` (canonical) is the relayed address of a live allocation,
    /// with relaying to self enabled. An advertised external IP maps back to its bound IP.
    fn own_peer_live(&self, peer: SocketAddr) -> bool {
        let Some((lo, hi)) = self.cfg.self_relay_ports else {
            return false;
        };
        if !(lo..=hi).contains(&peer.port()) {
            return false;
        }
        let bound = self
            .cfg
            .external_ips
            .iter()
            .find(|(_, public)| *public == peer.ip())
            .map_or(peer.ip(), |(bound, _)| *bound);
        self.allocator
            .is_live_relayed(SocketAddr::new(bound, peer.port()))
    }

    /// Takes `len` bytes from allocation `i`'s bucket and its network's; counts a drop.
    #[inline]
    fn take_bandwidth(&mut self, i: usize, len: u64, now: Instant) -> bool {
        let bw = self.cfg.bandwidth;
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return false;
        };
        if !a.bucket.take(bw, len, now) {
            self.stats.bandwidth_dropped += 1;
            return false;
        }
        if let Some(net) = &a.network_rate {
            if !net.take(len, now) {
                self.stats.network_bandwidth_dropped += 1;
                return false;
            }
        }
        true
    }

    fn create_permission(
        &mut self,
        now: Instant,
        i: usize,
        msg: &StunMessage,
    ) -> Result<Vec<StunAttribute>, Refuse> {
        let relayed = match self.slots.get(i) {
            Some(Some(a)) => a.relayed,
            _ => return Err(Refuse(437, "Allocation Mismatch")),
        };
        let peers: Vec<SocketAddr> = msg
            .attributes()
            .iter()
            .filter_map(|a| match a {
                StunAttribute::XorPeerAddress(p) => Some(*p.socket_address()),
                _ => None,
            })
            .collect();
        if peers.is_empty() {
            return Err(Refuse(400, "Bad Request"));
        }
        // All or nothing (RFC 8656 §9.2): check every address before installing any.
        let mut ips = Vec::with_capacity(peers.len());
        for p in peers {
            ips.push(self.peer_policy(relayed, p, true)?.0.ip());
        }
        let max = self.cfg.max_permissions;
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return Err(Refuse(437, "Allocation Mismatch"));
        };
        a.perms.retain(|(_, e)| *e > now);
        let new = ips
            .iter()
            .filter(|ip| !a.perms.iter().any(|(p, _)| p == *ip))
            .count();
        if a.perms.len() + new > max {
            return Err(Refuse(508, "Insufficient Capacity"));
        }
        let mut created = 0;
        for ip in ips {
            created += install_permission(a, ip, now);
        }
        self.stats.permissions_created += created;
        Ok(Vec::new())
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        i: usize,
        msg: &StunMessage,
    ) -> Result<Vec<StunAttribute>, Refuse> {
        let number = match msg.get::<ChannelNumber>() {
            Some(StunAttribute::ChannelNumber(c)) => c.number(),
            _ => return Err(Refuse(400, "Bad Request")),
        };
        if !(channeldata::CHANNEL_MIN..=self.cfg.channel_max).contains(&number) {
            return Err(Refuse(400, "Bad Request"));
        }
        let peer = match msg.get::<XorPeerAddress>() {
            Some(StunAttribute::XorPeerAddress(p)) => *p.socket_address(),
            _ => return Err(Refuse(400, "Bad Request")),
        };
        let relayed = match self.slots.get(i) {
            Some(Some(a)) => a.relayed,
            _ => return Err(Refuse(437, "Allocation Mismatch")),
        };
        let (peer, own) = self.peer_policy(relayed, peer, false)?;
        let ip = peer.ip();
        let max_ch = self.cfg.max_channels;
        let max_perm = self.cfg.max_permissions;
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return Err(Refuse(437, "Allocation Mismatch"));
        };
        a.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
        // The number and the peer must each be unbound, or bound to each other (a refresh),
        // including during the cool-down after expiry (RFC 8656 §12).
        let by_number = a.channels.iter().position(|c| c.number == number);
        let by_peer = a.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(x), Some(y)) if x == y => {
                a.channels[x].expires = now + CHANNEL_LIFETIME;
            }
            (None, None) => {
                if a.channels.len() >= max_ch {
                    return Err(Refuse(508, "Insufficient Capacity"));
                }
                a.perms.retain(|(_, e)| *e > now);
                if a.perms.len() >= max_perm && !a.perms.iter().any(|(p, _)| *p == ip) {
                    return Err(Refuse(508, "Insufficient Capacity"));
                }
                a.channels.push(Channel {
                    number,
                    peer,
                    own,
                    expires: now + CHANNEL_LIFETIME,
                });
                self.stats.channels_bound += 1;
            }
            _ => return Err(Refuse(400, "Bad Request")),
        }
        self.stats.permissions_created += install_permission(a, ip, now);
        Ok(Vec::new())
    }
}

/// Attributes of an Allocate success response.
fn allocate_success(
    relayed: SocketAddr,
    lifetime: u32,
    mapped: SocketAddr,
    token: Option<[u8; RESERVATION_TOKEN_LEN]>,
) -> Vec<StunAttribute> {
    let mut v: Vec<StunAttribute> = vec![
        XorRelayedAddress::from(relayed).into(),
        LifeTime::new(lifetime).into(),
    ];
    if let Some(t) = token {
        v.push(ReservationToken::from(t).into());
    }
    v.push(XorMappedAddress::from(mapped).into());
    v
}

fn install_permission(a: &mut Allocation, ip: IpAddr, now: Instant) -> u64 {
    match a.perms.iter_mut().find(|(p, _)| *p == ip) {
        Some((_, e)) => {
            *e = now + PERMISSION_LIFETIME;
            0
        }
        None => {
            a.perms.push((ip, now + PERMISSION_LIFETIME));
            1
        }
    }
}

struct ReplyCtx {
    method: stun_rs::MessageMethod,
    txid: [u8; 12],
    key: HMACKey,
    integrity: Integrity,
    fingerprint: bool,
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
