//! TURN server core (RFC 8656 over UDP, RFC 8489 underneath): message handling, allocations,
//! permissions and channels, without sockets.
//!
//! [`TurnServer`] is a state machine. The driver (the `meshpunch-relay` binary, or a test)
//! feeds it datagrams and time and does what it answers:
//!
//! * [`TurnServer::handle_client`] — a datagram arrived on the listening socket from a client.
//!   The answer is nothing, a reply written into the caller's buffer, or "send bytes
//!   `packet[range]` from relayed address R to peer P" (ChannelData / Send indication payload,
//!   relayed without copying).
//! * [`TurnServer::handle_peer`] — a datagram arrived on relayed address R from peer P. The
//!   answer is "send it to client C as ChannelData on channel N" (the caller writes the 4-byte
//!   header in front of the payload it received at offset 4) or "send the Data indication written
//!   into your buffer".
//! * [`TurnServer::poll_timeout`] / [`TurnServer::handle_timeout`] — expiry of allocations,
//!   permissions, channels and rate-limit entries.
//!
//! Relayed transport addresses come from a [`RelayAllocator`] the driver supplies: it binds the
//! socket, enforces the per-user quota (486) and reports exhaustion (508). The server calls
//! [`RelayAllocator::release`] whenever an allocation ends (Refresh 0, expiry), so sockets and
//! quota are returned without the driver having to track lifetimes.
//!
//! Nothing on the relaying paths (ChannelData, Send, peer data) allocates; control requests
//! (Allocate, Refresh, CreatePermission, ChannelBind) go through `stun-rs`.
//!
//! Authentication is the long-term credential mechanism (RFC 8489 §9.2) with stateless nonces
//! (an HMAC over issue time and client IP: nothing to store per unauthenticated source) and
//! either static users or the TURN REST-API shared secret (coturn's `use-auth-secret`). Requests
//! protected with MESSAGE-INTEGRITY-SHA256 are answered with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MessageIntegrity, MessageIntegritySha256, Nonce, PasswordAlgorithm,
    Realm, UnknownAttributes, UserName, XorMappedAddress,
};
use stun_rs::attributes::turn::{
    ChannelNumber, LifeTime, RequestedAddressFamily, RequestedTrasport, XorPeerAddress,
    XorRelayedAddress,
};
use stun_rs::methods::{ALLOCATE, BINDING, CHANNEL_BIND, CREATE_PERMMISSION, REFRESH};
use stun_rs::{
    AddressFamily, Algorithm, AlgorithmId, HMACKey, MessageClass, MessageDecoder, MessageEncoder,
    StunAttribute, StunMessage, StunMessageBuilder, TransactionId,
};

use crate::addr::{DenyReason, PeerPolicy};
use crate::channeldata;
use crate::creds;

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
/// Largest datagram the relay handles (UDP payload).
pub const MAX_DATAGRAM: usize = 65_535;
/// Size of the STUN header.
pub const STUN_HEADER_LEN: usize = 20;
/// The STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// STUN attribute types used by the raw (zero-copy) paths.
pub(crate) mod attr {
    pub(crate) const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub(crate) const DATA: u16 = 0x0013;
    pub(crate) const DONT_FRAGMENT: u16 = 0x001A;
    pub(crate) const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
}

/// STUN message types (method + class) used by the raw paths.
pub(crate) mod msgtype {
    pub(crate) const SEND_INDICATION: u16 = 0x0016;
    pub(crate) const DATA_INDICATION: u16 = 0x0017;
}

/// A token bucket rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained units per second (0 disables the limit).
    pub per_sec: u64,
    /// Burst size in units.
    pub burst: u64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        burst: 0,
    };
}

/// How the server authenticates requests.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// TURN REST-API shared secrets (coturn `static-auth-secret`); several allow rotation.
    pub secrets: Vec<Vec<u8>>,
    /// Static long-term users (username → password).
    pub users: HashMap<String, String>,
}

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
    /// Per-allocation bandwidth limit in bytes per second, both directions together.
    pub bandwidth: Rate,
    /// Requests per second per source IP (all STUN requests and indications).
    pub request_rate: Rate,
    /// Unauthenticated answers (401, Binding responses, pre-auth errors) per source IP.
    pub unauth_rate: Rate,
    /// Entries per rate-limit table (oldest idle entries are evicted first).
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
    /// one server, as coturn allows). Every other port of an own address stays refused (the
    /// listening port, services on the host). `None` refuses own addresses entirely.
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
            bandwidth: Rate::UNLIMITED,
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

/// Address family of a relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Why a relayed address could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocateError {
    /// The user holds as many allocations as allowed (486).
    #[error("allocation quota reached")]
    Quota,
    /// No relayed port is free (508).
    #[error("no relayed port free")]
    Capacity,
    /// The relay has no address of the requested family (440).
    #[error("address family not supported")]
    Family,
}

/// Reserves relayed transport addresses; implemented by the driver (which binds sockets).
pub trait RelayAllocator {
    /// Reserves a relayed address of `family` for `user` (quota key) asked for by `client`;
    /// `even_port` asks for an even port number (EVEN-PORT without reservation, RFC 8656 §14.6).
    fn allocate(
        &mut self,
        client: SocketAddr,
        user: &str,
        family: Family,
        even_port: bool,
    ) -> Result<SocketAddr, AllocateError>;
    /// Returns an address reserved by [`RelayAllocator::allocate`].
    fn release(&mut self, relayed: SocketAddr, user: &str);
}

/// A reusable port pool + per-user quota: the decision logic a driver's allocator wraps.
#[derive(Debug, Clone)]
pub struct PortPool {
    ips: Vec<IpAddr>,
    lo: u16,
    hi: u16,
    next: usize,
    in_use: std::collections::HashSet<SocketAddr>,
    per_user: HashMap<String, u32>,
    /// Allocations one user may hold at once (0 = unlimited).
    pub user_quota: u32,
}

impl PortPool {
    /// A pool over `ips` × `lo..=hi`.
    pub fn new(ips: Vec<IpAddr>, lo: u16, hi: u16, user_quota: u32) -> Self {
        PortPool {
            ips,
            lo: lo.min(hi),
            hi: hi.max(lo),
            next: 0,
            in_use: Default::default(),
            per_user: HashMap::new(),
            user_quota,
        }
    }

    /// Number of relayed addresses the pool can hand out (its capacity limit).
    pub fn capacity(&self) -> usize {
        self.ips.len() * (usize::from(self.hi - self.lo) + 1)
    }

    /// Addresses currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Checks the quota of `user` and yields candidate addresses of `family` in round-robin
    /// order; `try_bind` returns true when the address was usable (e.g. the socket bound).
    pub fn reserve(
        &mut self,
        user: &str,
        family: Family,
        even_port: bool,
        mut try_bind: impl FnMut(SocketAddr) -> bool,
    ) -> Result<SocketAddr, AllocateError> {
        if self.user_quota > 0 && self.per_user.get(user).copied().unwrap_or(0) >= self.user_quota {
            return Err(AllocateError::Quota);
        }
        let ips: Vec<IpAddr> = self
            .ips
            .iter()
            .copied()
            .filter(|ip| Family::of(*ip) == family)
            .collect();
        if ips.is_empty() {
            return Err(AllocateError::Family);
        }
        let ports = usize::from(self.hi - self.lo) + 1;
        let total = ports * ips.len();
        // Bounded scan: at most `total` candidates, and at most 64 failed binds in a row
        // (ports taken by other programs) before reporting capacity.
        let mut failed_binds = 0;
        for _ in 0..total {
            let i = self.next % total;
            self.next = self.next.wrapping_add(1);
            let port = self.lo + (i % ports) as u16;
            let addr = SocketAddr::new(ips[i / ports], port);
            if self.in_use.contains(&addr) || (even_port && port % 2 == 1) {
                continue;
            }
            if try_bind(addr) {
                self.in_use.insert(addr);
                *self.per_user.entry(user.to_owned()).or_insert(0) += 1;
                return Ok(addr);
            }
            failed_binds += 1;
            if failed_binds >= 64 {
                break;
            }
        }
        Err(AllocateError::Capacity)
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, relayed: SocketAddr, user: &str) {
        if self.in_use.remove(&relayed) {
            if let Some(n) = self.per_user.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(user);
                }
            }
        }
    }
}

impl RelayAllocator for PortPool {
    fn allocate(
        &mut self,
        _client: SocketAddr,
        user: &str,
        family: Family,
        even_port: bool,
    ) -> Result<SocketAddr, AllocateError> {
        self.reserve(user, family, even_port, |_| true)
    }
    fn release(&mut self, relayed: SocketAddr, user: &str) {
        PortPool::release(self, relayed, user)
    }
}

/// Fixed labels of [`Stats::denied`] (peer-address denials by reason).
pub const DENY_LABELS: [&str; 11] = [
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
    pub denied: [u64; 11],
    /// Requests refused for bad credentials (401 after an integrity check, 441).
    pub auth_failures: u64,
    /// Challenges sent (401 without credentials).
    pub challenges: u64,
    /// 438 answers.
    pub stale_nonces: u64,
    /// 486 answers.
    pub quota_hits: u64,
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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            last: now,
        }
    }
    /// Takes `n` tokens if available.
    #[inline]
    fn take(&mut self, rate: Rate, n: u64, now: Instant) -> bool {
        if rate.per_sec == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() as u64 / 1000).saturating_mul(rate.per_sec) / 1_000_000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(rate.burst.max(1));
            self.last = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Per-source-IP token buckets with a bounded table.
#[derive(Debug)]
struct RateLimiter {
    rate: Rate,
    cap: usize,
    map: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    fn new(rate: Rate, cap: usize) -> Self {
        RateLimiter {
            rate,
            cap: cap.max(1),
            map: HashMap::new(),
        }
    }
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate.per_sec == 0 {
            return true;
        }
        if let Some(b) = self.map.get_mut(&ip) {
            return b.take(self.rate, 1, now);
        }
        if self.map.len() >= self.cap {
            self.sweep(now);
            if self.map.len() >= self.cap {
                return false;
            }
        }
        let mut b = Bucket::new(self.rate, now);
        let ok = b.take(self.rate, 1, now);
        self.map.insert(ip, b);
        ok
    }
    /// Forgets buckets idle long enough to be full again.
    fn sweep(&mut self, now: Instant) {
        let rate = self.rate;
        if rate.per_sec == 0 {
            self.map.clear();
            return;
        }
        let refill = Duration::from_secs(rate.burst / rate.per_sec + 1);
        self.map
            .retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }
}

#[derive(Debug, Clone)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    /// Binding valid until.
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    client: SocketAddr,
    relayed: SocketAddr,
    /// Quota key (REST-API user id, or the static username).
    user: String,
    username: String,
    expires: Instant,
    created_by: TransactionId,
    granted: u32,
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

/// Which integrity attribute protected a request (and therefore its response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Integrity {
    Sha1,
    Sha256,
}

/// The TURN server state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct TurnServer<A: RelayAllocator> {
    cfg: ServerConfig,
    allocator: A,
    epoch: Instant,
    epoch_unix: u64,
    slots: Vec<Option<Allocation>>,
    free_slots: Vec<usize>,
    by_client: HashMap<SocketAddr, usize>,
    by_relay: HashMap<SocketAddr, usize>,
    request_limit: RateLimiter,
    unauth_limit: RateLimiter,
    stats: Stats,
    next_sweep: Instant,
    rng: u64,
    decoder: MessageDecoder,
    encoder: MessageEncoder,
}

/// Outcome of authenticating a request.
enum AuthOutcome {
    Ok {
        username: String,
        user: String,
        key: HMACKey,
        integrity: Integrity,
    },
    /// Error response already written.
    Replied(usize),
    /// Drop silently.
    Drop,
}

/// An error response to send: code + reason.
struct Refuse(u16, &'static str);

impl<A: RelayAllocator> TurnServer<A> {
    /// A server with `cfg` and `allocator`; `now`/`unix_now` anchor the clock (REST-API
    /// usernames carry Unix expiry times).
    pub fn new(cfg: ServerConfig, allocator: A, now: Instant, unix_now: u64) -> Self {
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
            request_limit: RateLimiter::new(cfg.request_rate, cfg.max_rate_entries),
            unauth_limit: RateLimiter::new(cfg.unauth_rate, cfg.max_rate_entries),
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

    fn unix_now(&self, now: Instant) -> u64 {
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
        self.request_limit.sweep(now);
        self.unauth_limit.sweep(now);
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
            self.allocator.release(a.relayed, &a.user);
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
        let bw = self.cfg.bandwidth;
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return ClientAction::None;
        };
        let Some(ch) = a.channel_by_number(cd.channel, now) else {
            self.stats.unbound_channel += 1;
            return ClientAction::None;
        };
        let peer = ch.peer;
        if !a.permitted(crate::addr::canonical_ip(peer.ip()), now) {
            self.stats.no_permission += 1;
            return ClientAction::None;
        }
        let len = cd.data.len();
        if !a.bucket.take(bw, len as u64, now) {
            self.stats.bandwidth_dropped += 1;
            return ClientAction::None;
        }
        self.stats.packets_to_peer += 1;
        self.stats.bytes_to_peer += len as u64;
        ClientAction::Relay {
            relayed: a.relayed,
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
        let bw = self.cfg.bandwidth;
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return ClientAction::None;
        };
        let canon = crate::addr::canonical_ip(peer.ip());
        if !a.permitted(canon, now) {
            self.stats.no_permission += 1;
            return ClientAction::None;
        }
        let peer = SocketAddr::new(canon, peer.port());
        if Family::of(peer.ip()) != Family::of(a.relayed.ip()) {
            self.stats.malformed += 1;
            return ClientAction::None;
        }
        let relayed = a.relayed;
        // A permission for an own address (TURN to TURN on this relay) covers only the relayed
        // port range: the port of a Send indication is the real destination.
        if self.cfg.policy.check(canon) == Err(DenyReason::RelaySelf)
            && !self.self_peer_ok(peer.port(), true)
        {
            self.stats.denied[deny_index(DenyReason::RelaySelf)] += 1;
            return ClientAction::None;
        }
        let Some(Some(a)) = self.slots.get_mut(i) else {
            return ClientAction::None;
        };
        debug_assert_eq!(a.relayed, relayed);
        let len = range.len() as u64;
        if !a.bucket.take(bw, len, now) {
            self.stats.bandwidth_dropped += 1;
            return ClientAction::None;
        }
        self.stats.packets_to_peer += 1;
        self.stats.bytes_to_peer += len;
        ClientAction::Relay {
            relayed: a.relayed,
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
        let bw = self.cfg.bandwidth;
        let Some(Some(a)) = self.slots.get_mut(i) else {
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
        if !a.bucket.take(bw, len, now) {
            self.stats.bandwidth_dropped += 1;
            return PeerAction::Drop;
        }
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
        let (username, user, key, integrity) = match self.authenticate(now, from, packet, msg, out)
        {
            AuthOutcome::Ok {
                username,
                user,
                key,
                integrity,
            } => (username, user, key, integrity),
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
                if a.username != username {
                    self.stats.auth_failures += 1;
                    return self.reply_error(&ctx, Refuse(441, "Wrong Credentials"), out);
                }
            }
        }
        let result = if method == ALLOCATE {
            self.allocate(now, from, msg, existing, username, user)
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
                    486 => self.stats.quota_hits += 1,
                    508 => self.stats.capacity_hits += 1,
                    403 => {}
                    _ => self.stats.errors += 1,
                }
                self.reply_error(&ctx, refuse, out)
            }
        }
    }

    fn authenticate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        msg: &StunMessage,
        out: &mut [u8],
    ) -> AuthOutcome {
        let txid = *msg.transaction_id().as_bytes();
        let has_sha256 = msg.get::<MessageIntegritySha256>().is_some();
        let has_sha1 = msg.get::<MessageIntegrity>().is_some();
        if !has_sha1 && !has_sha256 {
            self.stats.challenges += 1;
            return self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out);
        }
        let username = msg
            .get::<UserName>()
            .and_then(|a| a.as_user_name().ok())
            .map(|u| u.as_str().to_owned());
        let realm = msg
            .get::<Realm>()
            .and_then(|a| a.as_realm().ok())
            .map(|r| r.as_str().to_owned());
        let nonce = msg
            .get::<Nonce>()
            .and_then(|a| a.as_nonce().ok())
            .map(|n| n.as_str().to_owned());
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            self.stats.errors += 1;
            return match self.unauth_error(
                now,
                from,
                msg.method(),
                &txid,
                Refuse(400, "Bad Request"),
                out,
            ) {
                ClientAction::Reply(n) => AuthOutcome::Replied(n),
                _ => AuthOutcome::Drop,
            };
        };
        if !self.nonce_valid(&nonce, from.ip(), now) {
            self.stats.stale_nonces += 1;
            return self.challenge(now, from, msg.method(), &txid, 438, "Stale Nonce", out);
        }
        if realm != self.cfg.realm {
            self.stats.auth_failures += 1;
            return self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out);
        }
        let algorithm = match msg.get::<PasswordAlgorithm>() {
            Some(StunAttribute::PasswordAlgorithm(pa)) if pa.algorithm() == AlgorithmId::SHA256 => {
                AlgorithmId::SHA256
            }
            _ => AlgorithmId::MD5,
        };
        let (integrity, input) = if has_sha256 {
            (
                Integrity::Sha256,
                stun_rs::get_input_text::<MessageIntegritySha256>(packet),
            )
        } else {
            (
                Integrity::Sha1,
                stun_rs::get_input_text::<MessageIntegrity>(packet),
            )
        };
        let received: Option<Vec<u8>> = packet_integrity(packet, integrity);
        let (Some(input), Some(received)) = (input, received) else {
            self.stats.malformed += 1;
            return AuthOutcome::Drop;
        };
        let unix_now = self.unix_now(now);
        for password in self.passwords(&username, unix_now) {
            let Ok(key) =
                HMACKey::new_long_term(&username, &realm, &password, Algorithm::from(algorithm))
            else {
                continue;
            };
            if verify_hmac(integrity, key.as_bytes(), &input, &received) {
                let user = quota_user(&username, !self.cfg.auth.users.contains_key(&username));
                return AuthOutcome::Ok {
                    username,
                    user,
                    key,
                    integrity,
                };
            }
        }
        self.stats.auth_failures += 1;
        self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out)
    }

    /// Candidate passwords for `username`: the static one, or one per REST-API secret if the
    /// username has not expired.
    fn passwords(&self, username: &str, unix_now: u64) -> Vec<String> {
        if let Some(p) = self.cfg.auth.users.get(username) {
            return vec![p.clone()];
        }
        if creds::check_rest_username(username, unix_now).is_err() {
            return Vec::new();
        }
        self.cfg
            .auth
            .secrets
            .iter()
            .map(|s| creds::rest_password(s, username))
            .collect()
    }

    fn make_nonce(&self, ip: IpAddr, now: Instant) -> String {
        // 8 hex digits of issue time (u32 seconds: good until 2106) + 16 of MAC.
        let issued = (now.saturating_duration_since(self.epoch).as_secs() + self.epoch_unix) as u32;
        format!(
            "{issued:08x}{}",
            nonce_mac(&self.cfg.nonce_key, u64::from(issued), ip)
        )
    }

    fn nonce_valid(&self, nonce: &str, ip: IpAddr, now: Instant) -> bool {
        if nonce.len() != 24 || !nonce.is_ascii() {
            return false;
        }
        let Ok(issued) = u64::from_str_radix(&nonce[..8], 16) else {
            return false;
        };
        let expected = nonce_mac(&self.cfg.nonce_key, issued, ip);
        if !constant_time_eq(expected.as_bytes(), &nonce.as_bytes()[8..]) {
            return false;
        }
        let unix_now = self.unix_now(now);
        unix_now >= issued && unix_now - issued < self.cfg.nonce_lifetime.as_secs()
    }

    #[allow(clippy::too_many_arguments)]
    fn challenge(
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

    fn unauth_error(
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
        username: String,
        user: String,
    ) -> Result<Vec<StunAttribute>, Refuse> {
        if let Some(i) = existing {
            let Some(Some(a)) = self.slots.get(i) else {
                return Err(Refuse(437, "Allocation Mismatch"));
            };
            // A retransmitted Allocate gets the original success again (RFC 8656 §7.2).
            if a.created_by == *msg.transaction_id() {
                return Ok(vec![
                    XorRelayedAddress::from(self.advertised(a.relayed)).into(),
                    LifeTime::new(a.granted).into(),
                    XorMappedAddress::from(from).into(),
                ]);
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
        // EVEN-PORT: an even port is easy; reserving the next one (R bit) and
        // RESERVATION-TOKEN are not offered and refused cleanly with 508 (RFC 8656 §7.2).
        let mut even_port = false;
        for a in msg.attributes() {
            match a {
                StunAttribute::EvenPort(e) if e.reserve() => {
                    return Err(Refuse(508, "Insufficient Capacity"))
                }
                StunAttribute::EvenPort(_) => even_port = true,
                StunAttribute::ReservationToken(_) => {
                    return Err(Refuse(508, "Insufficient Capacity"))
                }
                _ => {}
            }
        }
        let relayed = match self.allocator.allocate(from, &user, family, even_port) {
            Ok(r) => r,
            Err(AllocateError::Quota) => return Err(Refuse(486, "Allocation Quota Reached")),
            Err(AllocateError::Capacity) => return Err(Refuse(508, "Insufficient Capacity")),
            Err(AllocateError::Family) => return Err(Refuse(440, "Address Family not Supported")),
        };
        let alloc = Allocation {
            client: from,
            relayed,
            user,
            username,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            created_by: *msg.transaction_id(),
            granted: lifetime,
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
        Ok(vec![
            XorRelayedAddress::from(self.advertised(relayed)).into(),
            LifeTime::new(lifetime).into(),
            XorMappedAddress::from(from).into(),
        ])
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

    /// Policy first (a denied address is 403 in any spelling), then the family (443).
    ///
    /// `port_matters`: the port is the real destination (ChannelBind) rather than ignored
    /// (CreatePermission), which decides whether an own relay address is acceptable.
    fn check_peer(
        &mut self,
        relayed: SocketAddr,
        peer: SocketAddr,
        port_matters: bool,
    ) -> Result<IpAddr, Refuse> {
        let ip = match self.cfg.policy.check(peer.ip()) {
            Ok(ip) => ip,
            Err(DenyReason::RelaySelf) if self.self_peer_ok(peer.port(), port_matters) => {
                crate::addr::canonical_ip(peer.ip())
            }
            Err(reason) => {
                self.stats.denied[deny_index(reason)] += 1;
                return Err(Refuse(403, "Forbidden"));
            }
        };
        if Family::of(ip) != Family::of(relayed.ip()) {
            return Err(Refuse(443, "Peer Address Family Mismatch"));
        }
        Ok(ip)
    }

    /// Whether an own relay address is an acceptable peer on `port`.
    fn self_peer_ok(&self, port: u16, port_matters: bool) -> bool {
        match self.cfg.self_relay_ports {
            Some((lo, hi)) => !port_matters || (lo..=hi).contains(&port),
            None => false,
        }
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
            ips.push(self.check_peer(relayed, p, false)?);
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
        let ip = self.check_peer(relayed, peer, true)?;
        let peer = SocketAddr::new(ip, peer.port());
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

/// Quota key: the user id part of a REST-API username (`expiry:user`), else the username.
fn quota_user(username: &str, rest: bool) -> String {
    if rest {
        if let Some((_, user)) = username.split_once(creds::REST_USERNAME_SEPARATOR) {
            return user.to_owned();
        }
    }
    username.to_owned()
}

fn nonce_mac(key: &[u8; 32], issued: u64, ip: IpAddr) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(&issued.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => mac.update(&v4.octets()),
        IpAddr::V6(v6) => mac.update(&v6.octets()),
    }
    hex::encode(&mac.finalize().into_bytes()[..8])
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The integrity value carried in `packet` (raw bytes of the attribute).
fn packet_integrity(packet: &[u8], integrity: Integrity) -> Option<Vec<u8>> {
    let want = match integrity {
        Integrity::Sha1 => 0x0008,
        Integrity::Sha256 => 0x001C,
    };
    RawAttrs::new(packet)
        .find(|(t, _)| *t == want)
        .and_then(|(_, r)| packet.get(r).map(<[u8]>::to_vec))
}

/// Verifies an HMAC in constant time. MESSAGE-INTEGRITY-SHA256 may be truncated to 16+ bytes.
pub(crate) fn verify_hmac(integrity: Integrity, key: &[u8], input: &[u8], received: &[u8]) -> bool {
    match integrity {
        Integrity::Sha1 => {
            let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
                return false;
            };
            mac.update(input);
            received.len() == 20 && mac.verify_slice(received).is_ok()
        }
        Integrity::Sha256 => {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                return false;
            };
            mac.update(input);
            (16..=32).contains(&received.len()) && mac.verify_truncated_left(received).is_ok()
        }
    }
}

/// Comprehension-required attribute types in `packet` that this server does not implement.
fn unknown_required(packet: &[u8]) -> Vec<u16> {
    const KNOWN: [u16; 18] = [
        0x0018, // EVEN-PORT (even port only; R bit refused with 508)
        0x0022, // RESERVATION-TOKEN (refused with 508)
        0x0006, // USERNAME
        0x0008, // MESSAGE-INTEGRITY
        0x0009, // ERROR-CODE
        0x000C, // CHANNEL-NUMBER
        0x000D, // LIFETIME
        0x0012, // XOR-PEER-ADDRESS
        0x0013, // DATA
        0x0014, // REALM
        0x0015, // NONCE
        0x0016, // XOR-RELAYED-ADDRESS
        0x0017, // REQUESTED-ADDRESS-FAMILY
        0x0019, // REQUESTED-TRANSPORT
        0x001C, // MESSAGE-INTEGRITY-SHA256
        0x001D, // PASSWORD-ALGORITHM
        0x001E, // USERHASH
        0x0020, // XOR-MAPPED-ADDRESS
    ];
    let mut v = Vec::new();
    for (t, _) in RawAttrs::new(packet) {
        let refused = t == attr::DONT_FRAGMENT;
        let unknown =
            (t < 0x8000 && !KNOWN.contains(&t)) || refused || t == attr::ADDITIONAL_ADDRESS_FAMILY;
        if unknown && !v.contains(&t) {
            v.push(t);
        }
    }
    v
}

/// A parsed STUN header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) msg_type: u16,
    pub(crate) txid: [u8; 12],
}

/// Parses and sanity-checks a STUN header: top bits 00, magic cookie, length a multiple of 4
/// that fits the datagram.
pub(crate) fn parse_header(packet: &[u8]) -> Option<Header> {
    if packet.len() < STUN_HEADER_LEN || packet[0] & 0xC0 != 0 {
        return None;
    }
    let msg_type = u16::from_be_bytes([packet[0], packet[1]]);
    let len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let cookie = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    if cookie != MAGIC_COOKIE || len % 4 != 0 || STUN_HEADER_LEN + len > packet.len() {
        return None;
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&packet[8..20]);
    Some(Header { msg_type, txid })
}

/// Zero-copy iterator over the attributes of a STUN message: `(type, value range)`. Stops at
/// the first malformed attribute.
pub(crate) struct RawAttrs<'a> {
    packet: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> RawAttrs<'a> {
    pub(crate) fn new(packet: &'a [u8]) -> Self {
        let end = if packet.len() >= STUN_HEADER_LEN {
            (STUN_HEADER_LEN + usize::from(u16::from_be_bytes([packet[2], packet[3]])))
                .min(packet.len())
        } else {
            0
        };
        RawAttrs {
            packet,
            pos: STUN_HEADER_LEN,
            end,
        }
    }
}

impl Iterator for RawAttrs<'_> {
    type Item = (u16, Range<usize>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos + 4 > self.end {
            return None;
        }
        let p = self.packet;
        let typ = u16::from_be_bytes([p[self.pos], p[self.pos + 1]]);
        let len = usize::from(u16::from_be_bytes([p[self.pos + 2], p[self.pos + 3]]));
        let start = self.pos + 4;
        if start + len > self.end {
            self.pos = self.end;
            return None;
        }
        self.pos = start + len.div_ceil(4) * 4;
        Some((typ, start..start + len))
    }
}

/// Decodes an XOR-*-ADDRESS value.
pub(crate) fn decode_xor_addr(v: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        0x01 if v.len() == 8 => {
            let mut o = [0u8; 4];
            for k in 0..4 {
                o[k] = v[4 + k] ^ cookie[k];
            }
            Some(SocketAddr::new(IpAddr::from(o), port))
        }
        0x02 if v.len() == 20 => {
            let mut o = [0u8; 16];
            for k in 0..16 {
                let x = if k < 4 { cookie[k] } else { txid[k - 4] };
                o[k] = v[4 + k] ^ x;
            }
            Some(SocketAddr::new(IpAddr::from(o), port))
        }
        _ => None,
    }
}

/// Writes an XOR-*-ADDRESS value into `out`; returns its length (8 or 20).
pub(crate) fn encode_xor_addr(addr: SocketAddr, txid: &[u8; 12], out: &mut [u8]) -> Option<usize> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(v4) => {
            let o = out.get_mut(..8)?;
            o[0] = 0;
            o[1] = 0x01;
            o[2..4].copy_from_slice(&port.to_be_bytes());
            for (k, b) in v4.octets().iter().enumerate() {
                o[4 + k] = b ^ cookie[k];
            }
            Some(8)
        }
        IpAddr::V6(v6) => {
            let o = out.get_mut(..20)?;
            o[0] = 0;
            o[1] = 0x02;
            o[2..4].copy_from_slice(&port.to_be_bytes());
            for (k, b) in v6.octets().iter().enumerate() {
                let x = if k < 4 { cookie[k] } else { txid[k - 4] };
                o[4 + k] = b ^ x;
            }
            Some(20)
        }
    }
}

/// Writes a STUN message of type `msg_type` with XOR-PEER-ADDRESS and DATA into `out`, without
/// allocating. Used for Data indications (server) and Send indications (client).
pub(crate) fn encode_peer_data_message(
    msg_type: u16,
    txid: &[u8; 12],
    peer: SocketAddr,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let addr_len = if peer.is_ipv4() { 8 } else { 20 };
    let padded = payload.len().div_ceil(4) * 4;
    let body = 4 + addr_len + 4 + padded;
    let total = STUN_HEADER_LEN + body;
    if out.len() < total || body > usize::from(u16::MAX) {
        return None;
    }
    out[0..2].copy_from_slice(&msg_type.to_be_bytes());
    out[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(txid);
    let mut p = STUN_HEADER_LEN;
    out[p..p + 2].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    out[p + 2..p + 4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    encode_xor_addr(peer, txid, &mut out[p + 4..])?;
    p += 4 + addr_len;
    out[p..p + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    out[p + 2..p + 4].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p += 4;
    out[p..p + payload.len()].copy_from_slice(payload);
    out[p + payload.len()..p + padded].fill(0);
    Some(total)
}

/// Writes a Data indication (RFC 8656 §11.4) into `out`.
pub fn encode_data_indication(
    txid: &[u8; 12],
    peer: SocketAddr,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    encode_peer_data_message(msg_type::DATA_INDICATION, txid, peer, payload, out)
}

/// `msgtype` spelled as a path for callers outside this module.
pub(crate) use msgtype as msg_type;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent, TurnOp};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SECRET: &[u8] = b"north-secret";
    const UNIX0: u64 = 1_800_000_000;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct Net {
        server: TurnServer<PortPool>,
        server_addr: SocketAddr,
        now: Instant,
        out: Vec<u8>,
    }

    fn config(policy: PeerPolicy) -> ServerConfig {
        let mut cfg = ServerConfig::new(
            "meshpunch.test",
            Auth {
                secrets: vec![SECRET.to_vec()],
                users: HashMap::from([("static".to_owned(), "pw".to_owned())]),
            },
            [7u8; 32],
        );
        cfg.policy = policy;
        cfg
    }

    impl Net {
        fn new() -> Self {
            Self::with(
                config(PeerPolicy::default()),
                PortPool::new(
                    vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                    50000,
                    50009,
                    0,
                ),
            )
        }
        fn with(cfg: ServerConfig, pool: PortPool) -> Self {
            let now = Instant::now();
            Net {
                server: TurnServer::new(cfg, pool, now, UNIX0),
                server_addr: sa("203.0.113.1:3478"),
                now,
                out: vec![0u8; 2048],
            }
        }
        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.server.handle_timeout(self.now);
        }
        fn client(&self, user: &str) -> TurnClient {
            let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
            TurnClient::new(
                self.server_addr,
                TurnCredentials {
                    username: c.username,
                    password: c.password,
                },
                self.now,
            )
        }
        /// Delivers everything the client wants to send, and the answers back, until quiet.
        fn drive(&mut self, c: &mut TurnClient, from: SocketAddr) -> Vec<TurnEvent> {
            for _ in 0..20 {
                let Some(t) = c.poll_transmit() else { break };
                if let ClientAction::Reply(n) =
                    self.server
                        .handle_client(self.now, from, &t.payload, &mut self.out)
                {
                    let reply = self.out[..n].to_vec();
                    assert_eq!(
                        c.handle_input(self.now, self.server_addr, &reply),
                        Input::Consumed
                    );
                }
            }
            std::iter::from_fn(|| c.poll_event()).collect()
        }
        fn allocated(&mut self, user: &str, from: SocketAddr) -> TurnClient {
            let mut c = self.client(user);
            c.allocate(self.now);
            let ev = self.drive(&mut c, from);
            assert!(
                matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
                "{ev:?}"
            );
            c
        }
        fn raw(&mut self, from: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
            match self
                .server
                .handle_client(self.now, from, packet, &mut self.out)
            {
                ClientAction::Reply(n) => Some(self.out[..n].to_vec()),
                _ => None,
            }
        }
    }

    fn error_code(reply: &[u8]) -> Option<u16> {
        let (msg, _) = MessageDecoder::default().decode(reply).ok()?;
        match msg.get::<ErrorCode>() {
            Some(StunAttribute::ErrorCode(e)) => Some(e.error_code().error_code()),
            _ => None,
        }
    }

    /// An authenticated request built by hand (for what the client never sends).
    fn signed_request(
        net: &mut Net,
        from: SocketAddr,
        method: stun_rs::MessageMethod,
        attrs: Vec<StunAttribute>,
        user: &str,
    ) -> Vec<u8> {
        let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
        let nonce = net.server.make_nonce(from.ip(), net.now);
        let key = HMACKey::new_long_term(
            &c.username,
            "meshpunch.test",
            &c.password,
            Algorithm::from(AlgorithmId::MD5),
        )
        .unwrap();
        let mut b = StunMessageBuilder::new(method, MessageClass::Request);
        for a in attrs {
            b = b.with_attribute(a);
        }
        let msg = b
            .with_attribute(UserName::new(&c.username).unwrap())
            .with_attribute(Realm::new("meshpunch.test").unwrap())
            .with_attribute(Nonce::new(nonce).unwrap())
            .with_attribute(MessageIntegrity::new(key))
            .build();
        let mut buf = vec![0u8; 1024];
        let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
        buf.truncate(n);
        buf
    }

    /// Recomputes MESSAGE-INTEGRITY after a test patched a signed request.
    fn resign(req: &mut [u8], user: &str) {
        let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
        let key = HMACKey::new_long_term(
            &c.username,
            "meshpunch.test",
            &c.password,
            Algorithm::from(AlgorithmId::MD5),
        )
        .unwrap();
        let input = stun_rs::get_input_text::<MessageIntegrity>(req).unwrap();
        let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(&input);
        let (_, r) = RawAttrs::new(req).find(|(t, _)| *t == 0x0008).unwrap();
        req[r].copy_from_slice(&mac.finalize().into_bytes());
    }

    #[test]
    fn allocate_bind_and_relay_both_directions_over_channels() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40000");
        let peer = sa("192.0.2.10:5000");
        let mut c = net.allocated("alice", me);
        let relayed = c.relayed_addr().unwrap();
        assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!(c.mapped_addr(), Some(me));
        let ch = c.bind_channel(peer, net.now).unwrap();
        let ev = net.drive(&mut c, me);
        assert_eq!(ev, vec![TurnEvent::ChannelBound { peer, channel: ch }]);

        let mut buf = [0u8; 256];
        let n = c.encode_send(peer, b"wireguard", &mut buf).unwrap();
        assert_eq!(n, 4 + 9, "ChannelData once bound");
        match net
            .server
            .handle_client(net.now, me, &buf[..n], &mut net.out)
        {
            ClientAction::Relay {
                relayed: r,
                peer: p,
                range,
            } => {
                assert_eq!((r, p), (relayed, peer));
                assert_eq!(&buf[range], b"wireguard");
            }
            other => panic!("{other:?}"),
        }
        // Peer answers: ChannelData header goes in front of the payload.
        let mut pkt = [0u8; 64];
        pkt[4..9].copy_from_slice(b"reply");
        match net
            .server
            .handle_peer(net.now, relayed, peer, &pkt[4..9], &mut net.out)
        {
            PeerAction::ChannelData { client, channel } => {
                assert_eq!((client, channel), (me, ch));
                channeldata::write_header(channel, 5, &mut pkt).unwrap();
            }
            other => panic!("{other:?}"),
        }
        match c.handle_input(net.now, net.server_addr, &pkt[..9]) {
            Input::Data { peer: p, range } => {
                assert_eq!(p, peer);
                assert_eq!(&pkt[range], b"reply");
            }
            other => panic!("{other:?}"),
        }
        // A peer without permission is dropped.
        assert_eq!(
            net.server
                .handle_peer(net.now, relayed, sa("192.0.2.99:5000"), b"x", &mut net.out),
            PeerAction::Drop
        );
        let s = net.server.stats();
        assert_eq!(
            (s.packets_to_peer, s.packets_to_client, s.no_permission),
            (1, 1, 1)
        );
        assert_eq!(
            net.server.gauges(net.now),
            Gauges {
                allocations: 1,
                permissions: 1,
                channels: 1
            }
        );
    }

    #[test]
    fn send_and_data_indications_with_a_plain_permission() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40001");
        let peer = sa("192.0.2.20:6000");
        let mut c = net.allocated("bob", me);
        let relayed = c.relayed_addr().unwrap();
        let mut buf = [0u8; 256];
        // Without permission the Send indication is dropped.
        let n = c.encode_send(peer, b"early", &mut buf).unwrap();
        assert_eq!(
            net.server
                .handle_client(net.now, me, &buf[..n], &mut net.out),
            ClientAction::None
        );
        c.create_permission(peer.ip(), net.now).unwrap();
        assert_eq!(
            net.drive(&mut c, me),
            vec![TurnEvent::PermissionCreated { peer_ip: peer.ip() }]
        );
        let n = c.encode_send(peer, b"hello peer", &mut buf).unwrap();
        match net
            .server
            .handle_client(net.now, me, &buf[..n], &mut net.out)
        {
            ClientAction::Relay {
                relayed: r,
                peer: p,
                range,
            } => {
                assert_eq!((r, p), (relayed, peer));
                assert_eq!(&buf[range], b"hello peer");
            }
            other => panic!("{other:?}"),
        }
        // Any port of a permitted IP may answer; it arrives as a Data indication.
        let other_port = sa("192.0.2.20:6001");
        let PeerAction::Indication { client, len } =
            net.server
                .handle_peer(net.now, relayed, other_port, b"back at you", &mut net.out)
        else {
            panic!("expected Data indication")
        };
        assert_eq!(client, me);
        let ind = net.out[..len].to_vec();
        match c.handle_input(net.now, net.server_addr, &ind) {
            Input::Data { peer: p, range } => {
                assert_eq!(p, other_port);
                assert_eq!(&ind[range], b"back at you");
            }
            other => panic!("{other:?}"),
        }
    }

    fn permission_result(
        net: &mut Net,
        c: &mut TurnClient,
        me: SocketAddr,
        ip: &str,
    ) -> Vec<TurnEvent> {
        c.create_permission(ip.parse().unwrap(), net.now).unwrap();
        net.drive(c, me)
    }

    #[test]
    fn security_defaults_refuse_dangerous_peers_with_403() {
        let mut net = Net::with(
            config(PeerPolicy {
                own_addrs: vec!["203.0.113.1".parse().unwrap()],
                ..Default::default()
            }),
            PortPool::new(
                vec![
                    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                ],
                50000,
                50009,
                0,
            ),
        );
        let me = sa("198.51.100.7:40002");
        let mut c = net.allocated("carol", me);
        for ip in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "10.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "203.0.113.1",
            "::ffff:203.0.113.1",
        ] {
            let ev = permission_result(&mut net, &mut c, me, ip);
            assert!(
                matches!(
                    ev.as_slice(),
                    [TurnEvent::Failed {
                        op: TurnOp::Permission,
                        code: Some(403),
                        ..
                    }]
                ),
                "{ip}: {ev:?}"
            );
        }
        // ChannelBind is refused the same way.
        c.bind_channel(sa("127.0.0.1:9"), net.now).unwrap();
        let ev = net.drive(&mut c, me);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    op: TurnOp::ChannelBind,
                    code: Some(403),
                    ..
                }]
            ),
            "{ev:?}"
        );
        // IPv6 allocation: ::1, ::, fe80::1, fc00::1 refused too.
        let me6 = sa("[2001:db8::99]:40000");
        let mut c6 = net.client("carol6");
        c6.set_requested_family(Some(Family::V6));
        c6.allocate(net.now);
        let ev = net.drive(&mut c6, me6);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::Allocated { relayed, .. }] if relayed.is_ipv6()),
            "{ev:?}"
        );
        for ip in ["::1", "::", "fe80::1", "fc00::1", "ff02::1"] {
            let ev = permission_result(&mut net, &mut c6, me6, ip);
            assert!(
                matches!(
                    ev.as_slice(),
                    [TurnEvent::Failed {
                        code: Some(403),
                        ..
                    }]
                ),
                "{ip}: {ev:?}"
            );
        }
        assert!(net.server.stats().denied.iter().sum::<u64>() >= 16);
        assert_eq!(
            net.server.stats().denied[deny_index(DenyReason::RelaySelf)],
            2
        );
        // A public peer is fine.
        let ev = permission_result(&mut net, &mut c, me, "192.0.2.1");
        assert!(
            matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }]),
            "{ev:?}"
        );
    }

    #[test]
    fn two_clients_of_one_relay_reach_each_other_allocation_to_allocation() {
        let mut cfg = config(PeerPolicy {
            own_addrs: vec!["203.0.113.1".parse().unwrap()],
            ..Default::default()
        });
        cfg.self_relay_ports = Some((50000, 50009));
        let mut net = Net::with(
            cfg,
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50009,
                0,
            ),
        );
        let (ma, mb) = (sa("198.51.100.7:1"), sa("198.51.100.8:1"));
        let mut a = net.allocated("a", ma);
        let mut b = net.allocated("b", mb);
        let (ra, rb) = (a.relayed_addr().unwrap(), b.relayed_addr().unwrap());
        // Permission for the relay's own IP (ports ignored) and channels to the other's relayed
        // address are fine ...
        b.create_permission(ra.ip(), net.now).unwrap();
        assert!(matches!(
            net.drive(&mut b, mb).as_slice(),
            [TurnEvent::PermissionCreated { .. }]
        ));
        let ch = a.bind_channel(rb, net.now).unwrap();
        assert!(matches!(
            net.drive(&mut a, ma).as_slice(),
            [TurnEvent::ChannelBound { .. }]
        ));
        let mut buf = [0u8; 64];
        let n = a.encode_send(rb, b"a to b", &mut buf).unwrap();
        assert_eq!(buf[..2], ch.to_be_bytes());
        let ClientAction::Relay {
            relayed,
            peer,
            range,
        } = net
            .server
            .handle_client(net.now, ma, &buf[..n], &mut net.out)
        else {
            panic!("not relayed")
        };
        assert_eq!((relayed, peer), (ra, rb));
        // ... and B's relayed socket hands it to B.
        let payload = buf[range].to_vec();
        let PeerAction::Indication { client, len } =
            net.server
                .handle_peer(net.now, rb, ra, &payload, &mut net.out)
        else {
            panic!("not delivered to b")
        };
        assert_eq!(client, mb);
        let ind = net.out[..len].to_vec();
        assert!(
            matches!(b.handle_input(net.now, net.server_addr, &ind), Input::Data { peer, .. } if peer == ra)
        );
        // Other ports of the relay's own address stay closed: the listening port, SSH.
        for port in [3478, 22] {
            a.bind_channel(SocketAddr::new(ra.ip(), port), net.now)
                .unwrap();
            let ev = net.drive(&mut a, ma);
            assert!(
                matches!(
                    ev.as_slice(),
                    [TurnEvent::Failed {
                        code: Some(403),
                        ..
                    }]
                ),
                "{port}: {ev:?}"
            );
        }
        b.create_permission(ra.ip(), net.now).unwrap();
        net.drive(&mut b, mb);
        let n = b
            .encode_send(SocketAddr::new(ra.ip(), 22), b"ssh?", &mut buf)
            .unwrap();
        assert_eq!(
            net.server
                .handle_client(net.now, mb, &buf[..n], &mut net.out),
            ClientAction::None
        );
    }

    #[test]
    fn allowed_classes_open_when_configured() {
        let policy = PeerPolicy {
            allow_loopback: true,
            allow_private: true,
            own_addrs: vec![],
        };
        let mut net = Net::with(
            config(policy),
            PortPool::new(
                vec![
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
                50000,
                50009,
                0,
            ),
        );
        let me = sa("127.0.0.1:40003");
        let mut c = net.allocated("dave", me);
        for ip in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "100.64.0.1",
        ] {
            let ev = permission_result(&mut net, &mut c, me, ip);
            assert!(
                matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }] | []),
                "{ip}: {ev:?}"
            );
        }
        // Unspecified, link-local, multicast stay refused whatever the flags.
        for ip in ["0.0.0.0", "169.254.1.1", "224.0.0.1"] {
            let ev = permission_result(&mut net, &mut c, me, ip);
            assert!(
                matches!(
                    ev.as_slice(),
                    [TurnEvent::Failed {
                        code: Some(403),
                        ..
                    }]
                ),
                "{ip}: {ev:?}"
            );
        }
        let me6 = sa("[::1]:40000");
        let mut c6 = net.client("dave6");
        c6.set_requested_family(Some(Family::V6));
        c6.allocate(net.now);
        assert!(matches!(
            net.drive(&mut c6, me6).as_slice(),
            [TurnEvent::Allocated { .. }]
        ));
        let ev = permission_result(&mut net, &mut c6, me6, "::1");
        assert!(
            matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }]),
            "{ev:?}"
        );
        // ::1 on an IPv4 allocation: allowed by policy but the wrong family (443).
        assert_eq!(
            c.create_permission("::1".parse().unwrap(), net.now),
            Err(crate::turn_client::TurnClientError::FamilyMismatch)
        );
    }

    #[test]
    fn permissions_expire_after_300_seconds() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40004");
        let peer = sa("192.0.2.30:7000");
        let mut c = net.allocated("erin", me);
        let relayed = c.relayed_addr().unwrap();
        c.create_permission(peer.ip(), net.now).unwrap();
        net.drive(&mut c, me);
        net.advance(Duration::from_secs(299));
        assert!(matches!(
            net.server
                .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
            PeerAction::Indication { .. }
        ));
        net.advance(Duration::from_secs(2));
        assert_eq!(
            net.server
                .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
            PeerAction::Drop
        );
        assert_eq!(net.server.gauges(net.now).permissions, 0);
        // The client's own timer refreshes it before expiry.
        let mut net = Net::new();
        let mut c = net.allocated("erin", me);
        let relayed = c.relayed_addr().unwrap();
        c.create_permission(peer.ip(), net.now).unwrap();
        net.drive(&mut c, me);
        for _ in 0..4 {
            let t = c.poll_timeout().unwrap();
            net.now = net.now.max(t);
            net.server.handle_timeout(net.now);
            c.handle_timeout(net.now);
            net.drive(&mut c, me);
        }
        assert!(net.now > net.server.epoch + Duration::from_secs(400));
        assert!(matches!(
            net.server
                .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
            PeerAction::Indication { .. }
        ));
    }

    #[test]
    fn channels_expire_and_cool_down_before_rebinding() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40005");
        let peer = sa("192.0.2.40:7000");
        let other = sa("192.0.2.41:7000");
        let mut c = net.allocated("frank", me);
        let ch = c.bind_channel(peer, net.now).unwrap();
        net.drive(&mut c, me);
        let mut cd = [0u8; 16];
        let n = channeldata::encode(ch, b"hi", &mut cd).unwrap();
        // Keep the permission alive separately so only the channel ages.
        let keep_perm = |net: &mut Net| {
            let req = signed_request(
                net,
                me,
                CREATE_PERMMISSION,
                vec![XorPeerAddress::from(peer).into()],
                "frank",
            );
            assert!(error_code(&net.raw(me, &req).unwrap()).is_none());
            let req = signed_request(net, me, REFRESH, vec![LifeTime::new(3600).into()], "frank");
            assert!(error_code(&net.raw(me, &req).unwrap()).is_none());
        };
        net.advance(Duration::from_secs(250));
        keep_perm(&mut net);
        net.advance(Duration::from_secs(250));
        keep_perm(&mut net);
        net.advance(Duration::from_secs(99));
        assert!(matches!(
            net.server
                .handle_client(net.now, me, &cd[..n], &mut net.out),
            ClientAction::Relay { .. }
        ));
        net.advance(Duration::from_secs(2));
        assert_eq!(
            net.server
                .handle_client(net.now, me, &cd[..n], &mut net.out),
            ClientAction::None,
            "channel expired"
        );
        assert!(net.server.stats().unbound_channel >= 1);
        // Within 5 minutes of expiry the number cannot go to another peer, nor the peer to
        // another number.
        let bind = |net: &mut Net, number: u16, p: SocketAddr| {
            let req = signed_request(
                net,
                me,
                CHANNEL_BIND,
                vec![
                    ChannelNumber::new(number).into(),
                    XorPeerAddress::from(p).into(),
                ],
                "frank",
            );
            error_code(&net.raw(me, &req).unwrap())
        };
        assert_eq!(bind(&mut net, ch, other), Some(400));
        assert_eq!(bind(&mut net, ch + 1, peer), Some(400));
        net.advance(Duration::from_secs(300));
        assert_eq!(
            bind(&mut net, ch, other),
            None,
            "free again after the cool-down"
        );
        // Same pair rebinding (refresh) is always fine.
        assert_eq!(bind(&mut net, ch, other), None);
    }

    #[test]
    fn allocations_expire_and_refresh_zero_frees() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40006");
        let c = net.allocated("gina", me);
        let relayed = c.relayed_addr().unwrap();
        assert_eq!(net.server.allocator().in_use(), 1);
        net.advance(Duration::from_secs(599));
        assert_eq!(net.server.relayed_addr(me, net.now), Some(relayed));
        net.advance(Duration::from_secs(2));
        assert_eq!(net.server.relayed_addr(me, net.now), None);
        assert_eq!(
            net.server.allocator().in_use(),
            0,
            "port returned on expiry"
        );
        assert_eq!(net.server.stats().allocations_expired, 1);
        assert!(net.server.is_idle());

        let mut c = net.allocated("gina", me);
        // The client refreshes on its own before expiry.
        let t = c.poll_timeout().unwrap();
        net.now = t;
        c.handle_timeout(net.now);
        let ev = net.drive(&mut c, me);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::Refreshed { .. }]),
            "{ev:?}"
        );
        c.release(net.now);
        assert_eq!(net.drive(&mut c, me), vec![TurnEvent::Released]);
        assert_eq!(net.server.allocator().in_use(), 0);
        assert_eq!(net.server.stats().allocations_released, 1);
    }

    #[test]
    fn external_ip_is_advertised_for_a_relay_behind_nat() {
        let mut cfg = config(PeerPolicy::default());
        cfg.external_ips = vec![("10.0.0.5".parse().unwrap(), "203.0.113.50".parse().unwrap())];
        let mut net = Net::with(
            cfg,
            PortPool::new(vec!["10.0.0.5".parse().unwrap()], 50000, 50009, 0),
        );
        let c = net.allocated("nat", sa("198.51.100.7:40020"));
        assert_eq!(
            c.relayed_addr().unwrap().ip(),
            "203.0.113.50".parse::<IpAddr>().unwrap()
        );
        // The driver still talks about the bound address.
        assert_eq!(
            net.server
                .relayed_addr(sa("198.51.100.7:40020"), net.now)
                .unwrap()
                .ip(),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn client_retransmits_then_gives_up_when_nothing_answers() {
        let net = Net::new();
        let start = net.now;
        let mut c = net.client("silent");
        c.allocate(start);
        let mut sends = 0;
        let mut t = start;
        let failure = loop {
            while c.poll_transmit().is_some() {
                sends += 1;
            }
            if let Some(ev) = c.poll_event() {
                break ev;
            }
            t = c.poll_timeout().unwrap();
            c.handle_timeout(t);
        };
        assert!(
            matches!(
                failure,
                TurnEvent::Failed {
                    op: TurnOp::Allocate,
                    code: None,
                    ..
                }
            ),
            "{failure:?}"
        );
        assert_eq!(sends, crate::turn_client::MAX_TRANSMISSIONS);
        assert!(t - start >= Duration::from_secs(30), "{:?}", t - start);
        assert!(!c.is_allocated());
    }

    #[test]
    fn lost_answers_are_recovered_by_retransmission() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40021");
        let mut c = net.client("lossy");
        c.allocate(net.now);
        // Drop the first answer of every request once.
        let mut dropped = 0;
        for _ in 0..50 {
            while let Some(t) = c.poll_transmit() {
                if let ClientAction::Reply(n) =
                    net.server
                        .handle_client(net.now, me, &t.payload, &mut net.out)
                {
                    if dropped < 2 {
                        dropped += 1;
                        continue;
                    }
                    let reply = net.out[..n].to_vec();
                    c.handle_input(net.now, net.server_addr, &reply);
                }
            }
            if c.is_allocated() {
                break;
            }
            net.now = c.poll_timeout().unwrap();
            c.handle_timeout(net.now);
        }
        assert!(c.is_allocated());
        assert_eq!(
            net.server.stats().allocations_created,
            1,
            "the retransmission reused it"
        );
    }

    #[test]
    fn lifetime_is_clamped_to_the_maximum() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40007");
        let _c = net.allocated("hal", me);
        let req = signed_request(
            &mut net,
            me,
            REFRESH,
            vec![LifeTime::new(100_000).into()],
            "hal",
        );
        let reply = net.raw(me, &req).unwrap();
        let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
        match msg.get::<LifeTime>() {
            Some(StunAttribute::LifeTime(l)) => assert_eq!(l.as_u32(), 3600),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn second_allocation_on_a_five_tuple_gets_437_and_other_user_441() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40008");
        let _c = net.allocated("ivan", me);
        let mut again = net.client("ivan");
        again.allocate(net.now);
        let ev = net.drive(&mut again, me);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    op: TurnOp::Allocate,
                    code: Some(437),
                    ..
                }]
            ),
            "{ev:?}"
        );
        let mut other = net.client("mallory");
        other.allocate(net.now);
        let ev = net.drive(&mut other, me);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(441),
                    ..
                }]
            ),
            "{ev:?}"
        );
        // Refresh without an allocation: 437.
        let stranger = sa("198.51.100.8:1");
        let req = signed_request(&mut net, stranger, REFRESH, vec![], "ivan");
        assert_eq!(error_code(&net.raw(stranger, &req).unwrap()), Some(437));
    }

    #[test]
    fn retransmitted_allocate_gets_the_same_answer() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40009");
        let req = signed_request(
            &mut net,
            me,
            ALLOCATE,
            vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
            "judy",
        );
        let first = net.raw(me, &req).unwrap();
        let second = net.raw(me, &req).unwrap();
        assert_eq!(error_code(&first), None);
        assert_eq!(first, second);
        assert_eq!(net.server.stats().allocations_created, 1);
    }

    #[test]
    fn quota_and_capacity_are_enforced() {
        let mut net = Net::with(
            config(PeerPolicy::default()),
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50001,
                1,
            ),
        );
        let _a = net.allocated("kim", sa("198.51.100.7:1"));
        let mut again = net.client("kim");
        again.allocate(net.now);
        let ev = net.drive(&mut again, sa("198.51.100.7:2"));
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(486),
                    ..
                }]
            ),
            "{ev:?}"
        );
        let _b = net.allocated("lea", sa("198.51.100.7:3"));
        let mut third = net.client("max");
        third.allocate(net.now);
        let ev = net.drive(&mut third, sa("198.51.100.7:4"));
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(508),
                    ..
                }]
            ),
            "{ev:?}"
        );
        assert_eq!(
            (
                net.server.stats().quota_hits,
                net.server.stats().capacity_hits
            ),
            (1, 1)
        );
    }

    #[test]
    fn wrong_integrity_is_401_and_stale_nonce_is_438() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40010");
        let mut bad = TurnClient::new(
            net.server_addr,
            TurnCredentials {
                username: format!("{}:x", UNIX0 + 999),
                password: "wrong".into(),
            },
            net.now,
        );
        bad.allocate(net.now);
        let ev = net.drive(&mut bad, me);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(401),
                    ..
                }]
            ),
            "{ev:?}"
        );
        assert!(net.server.stats().auth_failures >= 1);
        // Expired REST credentials: 401 too.
        let old = creds::rest_credentials(SECRET, UNIX0 - 1, "old");
        let mut expired = TurnClient::new(
            net.server_addr,
            TurnCredentials {
                username: old.username,
                password: old.password,
            },
            net.now,
        );
        expired.allocate(net.now);
        let ev = net.drive(&mut expired, me);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(401),
                    ..
                }]
            ),
            "{ev:?}"
        );
        // Tampered byte after signing: 401.
        let mut req = signed_request(
            &mut net,
            me,
            ALLOCATE,
            vec![
                RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                LifeTime::new(700).into(),
            ],
            "nick",
        );
        let (_, r) = RawAttrs::new(&req).find(|(t, _)| *t == 0x000D).unwrap();
        req[r.start + 3] ^= 1;
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(401));
        // Stale nonce: the request signed now is refused after the nonce lifetime.
        let req = signed_request(
            &mut net,
            me,
            ALLOCATE,
            vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
            "nick",
        );
        net.advance(Duration::from_secs(601));
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(438));
        assert_eq!(net.server.stats().stale_nonces, 1);
        // The client recovers from 438 by itself.
        let mut c = net.allocated("nick", me);
        let req = signed_request(
            &mut net,
            me,
            REFRESH,
            vec![LifeTime::new(3600).into()],
            "nick",
        );
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), None);
        net.advance(Duration::from_secs(700));
        c.bind_channel(sa("192.0.2.50:1"), net.now).unwrap();
        let ev = net.drive(&mut c, me);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::ChannelBound { .. }]),
            "{ev:?}"
        );
        assert_eq!(net.server.stats().stale_nonces, 2);
    }

    #[test]
    fn sha256_integrity_is_accepted_and_answered_in_kind() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40011");
        let mut c = net.client("olga");
        c.set_integrity_sha256(true);
        c.allocate(net.now);
        let ev = net.drive(&mut c, me);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
            "{ev:?}"
        );
        c.bind_channel(sa("192.0.2.60:1"), net.now).unwrap();
        assert!(matches!(
            net.drive(&mut c, me).as_slice(),
            [TurnEvent::ChannelBound { .. }]
        ));
    }

    #[test]
    fn static_users_authenticate() {
        let mut net = Net::new();
        let mut c = TurnClient::new(
            net.server_addr,
            TurnCredentials {
                username: "static".into(),
                password: "pw".into(),
            },
            net.now,
        );
        c.allocate(net.now);
        assert!(matches!(
            net.drive(&mut c, sa("198.51.100.7:40012")).as_slice(),
            [TurnEvent::Allocated { .. }]
        ));
    }

    #[test]
    fn bad_requests_get_400_420_442() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40013");
        let mut c = net.allocated("pat", me);
        // Channel number outside 0x4000-0x7FFF (the default accepts RFC 5766's range).
        for number in [0x3FFF, 0x8000, 0xFFFF] {
            let req = signed_request(
                &mut net,
                me,
                CHANNEL_BIND,
                vec![
                    ChannelNumber::new(number).into(),
                    XorPeerAddress::from(sa("192.0.2.1:1")).into(),
                ],
                "pat",
            );
            assert_eq!(
                error_code(&net.raw(me, &req).unwrap()),
                Some(400),
                "{number:#x}"
            );
        }
        // ChannelBind without a peer, CreatePermission without any.
        let req = signed_request(
            &mut net,
            me,
            CHANNEL_BIND,
            vec![ChannelNumber::new(0x4000).into()],
            "pat",
        );
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(400));
        let req = signed_request(&mut net, me, CREATE_PERMMISSION, vec![], "pat");
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(400));
        // EVEN-PORT with the R bit / RESERVATION-TOKEN: refused cleanly with 508; DONT-FRAGMENT
        // (which we cannot honour) with 420.
        let other = sa("198.51.100.7:40014");
        let req = signed_request(
            &mut net,
            other,
            ALLOCATE,
            vec![
                RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                stun_rs::attributes::turn::EvenPort::new(true).into(),
            ],
            "pat",
        );
        assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(508));
        let req = signed_request(
            &mut net,
            other,
            ALLOCATE,
            vec![
                RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                stun_rs::attributes::turn::ReservationToken::from([1u8; 8]).into(),
            ],
            "pat",
        );
        assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(508));
        let req = signed_request(
            &mut net,
            other,
            ALLOCATE,
            vec![
                RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                stun_rs::attributes::turn::DontFragment::default().into(),
            ],
            "pat",
        );
        assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(420));
        // EVEN-PORT without R: an even port.
        for k in 0..3u16 {
            let from = SocketAddr::new(other.ip(), 41000 + k);
            let req = signed_request(
                &mut net,
                from,
                ALLOCATE,
                vec![
                    RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                    stun_rs::attributes::turn::EvenPort::new(false).into(),
                ],
                "pat",
            );
            let reply = net.raw(from, &req).unwrap();
            let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
            match msg.get::<XorRelayedAddress>() {
                Some(StunAttribute::XorRelayedAddress(a)) => {
                    assert_eq!(a.socket_address().port() % 2, 0)
                }
                other => panic!("{other:?}"),
            }
        }
        // TCP relaying is not offered.
        let mut req = signed_request(
            &mut net,
            other,
            ALLOCATE,
            vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
            "pat",
        );
        let (_, r) = RawAttrs::new(&req).find(|(t, _)| *t == 0x0019).unwrap();
        req[r.start] = 6; // TCP
        resign(&mut req, "pat");
        assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(442));
        // No REQUESTED-TRANSPORT.
        let req = signed_request(&mut net, other, ALLOCATE, vec![], "pat");
        assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(400));
        // ChannelData on a channel never bound, and from a stranger: silently dropped.
        let mut cd = [0u8; 8];
        let n = channeldata::encode(0x4321, b"zz", &mut cd).unwrap();
        assert_eq!(
            net.server
                .handle_client(net.now, me, &cd[..n], &mut net.out),
            ClientAction::None
        );
        assert_eq!(
            net.server
                .handle_client(net.now, other, &cd[..n], &mut net.out),
            ClientAction::None
        );
        assert_eq!(net.server.stats().unbound_channel, 2);
        // The allocation still works afterwards.
        c.bind_channel(sa("192.0.2.1:1"), net.now).unwrap();
        assert!(matches!(
            net.drive(&mut c, me).as_slice(),
            [TurnEvent::ChannelBound { .. }]
        ));
    }

    #[test]
    fn strict_rfc8656_channel_range_refuses_0x5000() {
        let mut cfg = config(PeerPolicy::default());
        cfg.channel_max = channeldata::CHANNEL_MAX;
        let mut net = Net::with(
            cfg,
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50009,
                0,
            ),
        );
        let me = sa("198.51.100.7:40019");
        let _c = net.allocated("strict", me);
        for (number, code) in [(0x4FFF, None), (0x5000, Some(400)), (0x7FFF, Some(400))] {
            let req = signed_request(
                &mut net,
                me,
                CHANNEL_BIND,
                vec![
                    ChannelNumber::new(number).into(),
                    XorPeerAddress::from(SocketAddr::new("192.0.2.1".parse().unwrap(), number))
                        .into(),
                ],
                "strict",
            );
            assert_eq!(error_code(&net.raw(me, &req).unwrap()), code, "{number:#x}");
        }
        let mut cd = [0u8; 8];
        cd[..4].copy_from_slice(&[0x50, 0x00, 0x00, 0x01]);
        assert_eq!(
            net.server
                .handle_client(net.now, me, &cd[..5], &mut net.out),
            ClientAction::None
        );
        assert_eq!(net.server.stats().malformed, 1);
    }

    #[test]
    fn truncated_oversized_and_garbage_datagrams_are_dropped() {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40015");
        let _c = net.allocated("quinn", me);
        let valid = signed_request(
            &mut net,
            me,
            REFRESH,
            vec![LifeTime::new(600).into()],
            "quinn",
        );
        for cut in [0, 1, 19, 20, 21, valid.len() - 1] {
            let _ = net
                .server
                .handle_client(net.now, me, &valid[..cut], &mut net.out);
        }
        let mut huge = vec![0u8; MAX_DATAGRAM];
        huge[..valid.len()].copy_from_slice(&valid);
        let _ = net.server.handle_client(net.now, me, &huge, &mut net.out);
        for garbage in [
            &b"\xff\xff\xff\xff\xff"[..],
            &[0x40, 0x00, 0xff, 0xff],
            &[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xa4, 0x42],
        ] {
            let _ = net.server.handle_client(net.now, me, garbage, &mut net.out);
        }
        assert!(net.server.stats().malformed >= 4);
        assert_eq!(net.server.gauges(net.now).allocations, 1);
    }

    #[test]
    fn binding_is_answered_with_the_reflexive_address() {
        let mut net = Net::new();
        let me = sa("198.51.100.9:1234");
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).build();
        let mut buf = [0u8; 64];
        let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
        let reply = net.raw(me, &buf[..n]).unwrap();
        let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
        match msg.get::<XorMappedAddress>() {
            Some(StunAttribute::XorMappedAddress(a)) => assert_eq!(*a.socket_address(), me),
            other => panic!("{other:?}"),
        }
        assert!(reply.len() <= 32, "small answer");
    }

    #[test]
    fn unauthenticated_answers_are_rate_limited_per_source() {
        let mut net = Net::new();
        let me = sa("198.51.100.10:1");
        let msg = StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
            .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
            .build();
        let mut buf = [0u8; 64];
        let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
        let mut answered = 0;
        for _ in 0..1000 {
            if let Some(r) = net.raw(me, &buf[..n]) {
                assert_eq!(error_code(&r), Some(401));
                assert!(r.len() <= 90, "401 stays small: {}", r.len());
                answered += 1;
            }
        }
        assert_eq!(answered, 400, "burst of the unauthenticated limit");
        assert!(net.server.stats().rate_limited >= 600);
        // Another source is unaffected; the first recovers with time.
        assert!(net.raw(sa("198.51.100.11:1"), &buf[..n]).is_some());
        net.advance(Duration::from_secs(1));
        assert!(net.raw(me, &buf[..n]).is_some());
    }

    #[test]
    fn request_rate_limit_is_per_source_and_spares_relayed_data() {
        let mut cfg = config(PeerPolicy::default());
        cfg.request_rate = Rate {
            per_sec: 5,
            burst: 5,
        };
        cfg.unauth_rate = Rate::UNLIMITED;
        let mut net = Net::with(
            cfg,
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50009,
                0,
            ),
        );
        let me = sa("198.51.100.12:1");
        let peer = sa("192.0.2.80:1");
        let mut c = net.client("busy");
        c.allocate(net.now);
        net.drive(&mut c, me); // 2 requests (401 round trip)
        let ch = c.bind_channel(peer, net.now).unwrap();
        net.drive(&mut c, me); // 3rd request
        assert!(c.channel_for(peer).is_some());
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).build();
        let mut buf = [0u8; 64];
        let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
        let answered = (0..10).filter(|_| net.raw(me, &buf[..n]).is_some()).count();
        assert_eq!(answered, 2, "burst of 5 minus the 3 TURN requests");
        assert!(net.server.stats().rate_limited >= 8);
        // Relayed data is not a request: it still flows.
        let mut cd = [0u8; 16];
        let n = channeldata::encode(ch, b"data", &mut cd).unwrap();
        for _ in 0..20 {
            assert!(matches!(
                net.server
                    .handle_client(net.now, me, &cd[..n], &mut net.out),
                ClientAction::Relay { .. }
            ));
        }
        // Other sources are unaffected.
        assert!(net.raw(sa("198.51.100.13:1"), &buf[..20]).is_some());
    }

    #[test]
    fn bandwidth_limit_drops_excess() {
        let mut cfg = config(PeerPolicy::default());
        cfg.bandwidth = Rate {
            per_sec: 10_000,
            burst: 10_000,
        };
        let mut net = Net::with(
            cfg,
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50009,
                0,
            ),
        );
        let me = sa("198.51.100.7:40016");
        let peer = sa("192.0.2.70:1");
        let mut c = net.allocated("rob", me);
        let ch = c.bind_channel(peer, net.now).unwrap();
        net.drive(&mut c, me);
        let mut cd = [0u8; 1100];
        let n = channeldata::encode(ch, &[0u8; 1000], &mut cd).unwrap();
        let relayed = (0..20)
            .filter(|_| {
                matches!(
                    net.server
                        .handle_client(net.now, me, &cd[..n], &mut net.out),
                    ClientAction::Relay { .. }
                )
            })
            .count();
        assert_eq!(relayed, 10);
        assert_eq!(net.server.stats().bandwidth_dropped, 10);
    }

    #[test]
    fn release_all_returns_every_port() {
        let mut net = Net::new();
        let _a = net.allocated("s1", sa("198.51.100.7:1"));
        let _b = net.allocated("s2", sa("198.51.100.7:2"));
        assert_eq!(net.server.allocator().in_use(), 2);
        net.server.release_all();
        assert_eq!(net.server.allocator().in_use(), 0);
        assert!(net.server.is_idle());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut net = Net::new();
            let me = sa("198.51.100.7:40017");
            let _ = net.server.handle_client(net.now, me, &bytes, &mut net.out);
            let relayed = sa("203.0.113.1:50000");
            let _ = net.server.handle_peer(net.now, relayed, sa("192.0.2.1:1"), &bytes, &mut net.out);
            let mut c = net.client("fuzz");
            let _ = c.handle_input(net.now, net.server_addr, &bytes);
        }

        #[test]
        fn mutated_requests_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            let mut net = Net::new();
            let me = sa("198.51.100.7:40018");
            let _c = net.allocated("mut", me);
            let mut req = signed_request(&mut net, me, CHANNEL_BIND, vec![ChannelNumber::new(0x4000).into(), XorPeerAddress::from(sa("192.0.2.1:1")).into()], "mut");
            let p = pos % req.len();
            req[p] = val;
            let end = req.len() - cut % req.len();
            let _ = net.server.handle_client(net.now, me, &req[..end], &mut net.out);
        }

        #[test]
        fn xor_address_round_trip(v6 in any::<bool>(), a in any::<u128>(), port in any::<u16>(), txid in any::<[u8; 12]>()) {
            let ip = if v6 { IpAddr::V6(Ipv6Addr::from(a)) } else { IpAddr::V4(Ipv4Addr::from(a as u32)) };
            let addr = SocketAddr::new(ip, port);
            let mut buf = [0u8; 20];
            let n = encode_xor_addr(addr, &txid, &mut buf).unwrap();
            prop_assert_eq!(decode_xor_addr(&buf[..n], &txid), Some(addr));
        }
    }
}
