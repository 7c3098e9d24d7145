//! TURN client state machine (RFC 8656 over UDP): allocate with long-term credentials,
//! refresh, permissions, channel binds, Send/Data indications and ChannelData.
//!
//! One [`TurnClient`] holds one allocation on one server. It owns no socket and no clock:
//!
//! 1. call [`TurnClient::allocate`] (and later [`TurnClient::bind_channel`],
//!    [`TurnClient::create_permission`], [`TurnClient::release`]);
//! 2. after every call, drain [`TurnClient::poll_transmit`] (send each datagram to
//!    `Transmit::dst`) and [`TurnClient::poll_event`];
//! 3. feed every datagram that arrives from the server to [`TurnClient::handle_input`]: relayed
//!    data comes back as a range of the input buffer (no copy);
//! 4. arm a timer for [`TurnClient::poll_timeout`] and call [`TurnClient::handle_timeout`]
//!    when it fires (retransmissions, refreshes).
//!
//! Outgoing relayed data is framed by [`TurnClient::encode_send`] into the caller's buffer
//! (ChannelData once a channel to the peer is bound, a Send indication before): no allocation
//! per packet. A 401 challenge or 438 stale nonce is answered by resending the request with
//! the new REALM/NONCE, so callers only see success or a final [`TurnEvent::Failed`].
//! An Allocate refused with 437 (Allocation Mismatch) means an allocation left by an earlier
//! run of this host (a crash, a restart behind a NAT that gave the same mapping) still holds
//! the 5-tuple (RFC 8656 §7.3): the client deletes it once with a Refresh of lifetime 0 under
//! its own credentials and allocates again, instead of waiting out the stale allocation's
//! lifetime. A server accepts that Refresh when the credentials name the same user (as
//! meshpunch-relay does for a REST-API username with a newer expiry).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stun_rs::attributes::stun::{
    ErrorCode, MessageIntegrity, MessageIntegritySha256, Nonce, Realm, UserName, XorMappedAddress,
};
use stun_rs::attributes::turn::{
    ChannelNumber, LifeTime, RequestedAddressFamily, RequestedTrasport, XorPeerAddress,
    XorRelayedAddress,
};
use stun_rs::methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMMISSION, REFRESH};
use stun_rs::{
    AddressFamily, Algorithm, AlgorithmId, HMACKey, MessageClass, MessageDecoder, MessageEncoder,
    MessageMethod, StunAttribute, StunMessage, StunMessageBuilder, TransactionId,
};

use crate::addr::canonical_ip;
use crate::channeldata;
use crate::turn::{self, Family, Integrity, RawAttrs};

/// First retransmission timeout (RFC 8489 §6.2.1).
pub const INITIAL_RTO: Duration = Duration::from_millis(500);
/// Longest wait between retransmissions.
pub const MAX_RTO: Duration = Duration::from_secs(8);
/// Transmissions of one request before giving up (RFC 8489 Rc).
pub const MAX_TRANSMISSIONS: u32 = 7;
/// Permissions are refreshed this often (they live 300 s on the server).
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// Channels are re-bound this often: a re-bind also refreshes the peer's permission, which
/// lives only 300 s, so channel data keeps flowing.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(240);
/// Lifetime asked for in Allocate and Refresh.
pub const REQUESTED_LIFETIME: u32 = 600;
/// Challenges (401/438) answered per request before giving up.
const MAX_AUTH_RETRIES: u32 = 3;

/// Long-term credentials (e.g. REST-API credentials minted by the rendezvous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredentials {
    /// Username (`"<expiry>:<user>"` for REST-API credentials).
    pub username: String,
    /// Password.
    pub password: String,
}

/// Which operation an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnOp {
    /// Allocate.
    Allocate,
    /// Refresh (including release).
    Refresh,
    /// CreatePermission.
    Permission,
    /// ChannelBind.
    ChannelBind,
}

/// Something the caller may want to react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// The allocation exists.
    Allocated {
        /// Relayed transport address (give this to peers).
        relayed: SocketAddr,
        /// Our address as the server saw it (server-reflexive), if it said.
        mapped: Option<SocketAddr>,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// A permission for `peer_ip` was installed (first time only, not on refresh).
    PermissionCreated {
        /// Peer IP.
        peer_ip: IpAddr,
    },
    /// A channel to `peer` was bound (first time only, not on refresh).
    ChannelBound {
        /// Peer transport address.
        peer: SocketAddr,
        /// Channel number.
        channel: u16,
    },
    /// The allocation was refreshed.
    Refreshed {
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// An operation failed for good.
    Failed {
        /// Operation.
        op: TurnOp,
        /// STUN error code, or `None` when the server never answered.
        code: Option<u16>,
        /// Reason phrase (or "timeout").
        reason: String,
    },
    /// The allocation was released (Refresh with lifetime 0 answered).
    Released,
}

/// A datagram to send to the TURN server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination (the server).
    pub dst: SocketAddr,
    /// Bytes.
    pub payload: Vec<u8>,
}

/// What an input datagram was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Data relayed from `peer`; the payload is `packet[range]`.
    Data {
        /// The peer that sent it to our relayed address.
        peer: SocketAddr,
        /// Payload within the input datagram.
        range: Range<usize>,
    },
    /// A TURN message the client consumed (response, stray indication).
    Consumed,
    /// Not from the server or not TURN: the caller's own traffic.
    NotTurn,
}

/// Errors of the local API (never of peer input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnClientError {
    /// No allocation (yet, or any more).
    #[error("no TURN allocation")]
    NotAllocated,
    /// All 4096 channel numbers are in use.
    #[error("no channel number left")]
    NoChannelLeft,
    /// The output buffer is too small or the payload too large.
    #[error("buffer too small for the frame")]
    BufferTooSmall,
    /// Peer address family differs from the relayed address family.
    #[error("peer address family differs from the relayed address")]
    FamilyMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Allocate,
    Refresh { lifetime: u32 },
    Permission { ips: Vec<IpAddr> },
    ChannelBind { peer: SocketAddr, channel: u16 },
}

impl Op {
    fn kind(&self) -> TurnOp {
        match self {
            Op::Allocate => TurnOp::Allocate,
            Op::Refresh { .. } => TurnOp::Refresh,
            Op::Permission { .. } => TurnOp::Permission,
            Op::ChannelBind { .. } => TurnOp::ChannelBind,
        }
    }
}

#[derive(Debug)]
struct Pending {
    txid: [u8; 12],
    op: Op,
    packet: Vec<u8>,
    sends: u32,
    rto: Duration,
    next_at: Instant,
    auth_retries: u32,
}

#[derive(Debug, Clone)]
struct Auth {
    realm: String,
    nonce: String,
    key: HMACKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Allocating,
    Allocated,
    Releasing,
}

#[derive(Debug, Clone, Copy)]
struct PermState {
    refresh_at: Instant,
    confirmed: bool,
}

#[derive(Debug, Clone, Copy)]
struct ChanState {
    number: u16,
    refresh_at: Instant,
    confirmed: bool,
}

/// Sans-IO TURN client for one allocation. See the module docs for the call order.
#[derive(Debug)]
pub struct TurnClient {
    server: SocketAddr,
    creds: TurnCredentials,
    sha256: bool,
    family: Option<Family>,
    state: State,
    auth: Option<Auth>,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    refresh_at: Option<Instant>,
    pending: Vec<Pending>,
    permissions: HashMap<IpAddr, PermState>,
    channels: HashMap<SocketAddr, ChanState>,
    by_number: HashMap<u16, SocketAddr>,
    next_channel: u16,
    transmits: VecDeque<Transmit>,
    events: VecDeque<TurnEvent>,
    decoder: MessageDecoder,
    encoder: MessageEncoder,
    /// Transaction ids of requests (RFC 8489 §6: uniformly random; ChaCha from a seed the
    /// driver gives, so a simulation replays exactly).
    rng: rand::rngs::StdRng,
    /// A 437 to Allocate made us delete a stale allocation on our 5-tuple in this attempt to
    /// allocate: while `Releasing`, the Refresh of lifetime 0 answering starts the Allocate
    /// again (`clearing_stale`); a second 437 is final (someone else holds
    /// the 5-tuple).
    stale_cleared: bool,
    /// Transaction ids of Send indications (no answer ever matches them: only spread, so a
    /// counter stepped through xorshift from the seeded generator, usable from `&self`).
    indication_rng: std::cell::Cell<u64>,
}

impl TurnClient {
    /// A client for the TURN server at `server`, its transaction ids drawn from OS entropy.
    pub fn new(server: SocketAddr, creds: TurnCredentials, now: Instant) -> Self {
        Self::with_rng(server, creds, now, rand::rngs::StdRng::from_entropy())
    }

    /// A client whose transaction ids come from `seed` (deterministic simulations).
    pub fn with_seed(server: SocketAddr, creds: TurnCredentials, now: Instant, seed: u64) -> Self {
        Self::with_rng(server, creds, now, rand::rngs::StdRng::seed_from_u64(seed))
    }

    fn with_rng(
        server: SocketAddr,
        creds: TurnCredentials,
        _now: Instant,
        mut rng: rand::rngs::StdRng,
    ) -> Self {
        let indication_rng = std::cell::Cell::new(rng.gen::<u64>() | 1);
        TurnClient {
            rng,
            indication_rng,
            server,
            creds,
            sha256: false,
            family: None,
            state: State::Idle,
            stale_cleared: false,
            auth: None,
            relayed: None,
            mapped: None,
            refresh_at: None,
            pending: Vec::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            by_number: HashMap::new(),
            next_channel: channeldata::CHANNEL_MIN,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            decoder: MessageDecoder::default(),
            encoder: MessageEncoder::default(),
        }
    }

    /// Protect requests with MESSAGE-INTEGRITY-SHA256 instead of MESSAGE-INTEGRITY (only for
    /// servers known to support it; meshpunch-relay does).
    pub fn set_integrity_sha256(&mut self, on: bool) {
        self.sha256 = on;
    }

    /// Ask for a relayed address of `family` (REQUESTED-ADDRESS-FAMILY); default: the
    /// server's choice (IPv4).
    pub fn set_requested_family(&mut self, family: Option<Family>) {
        self.family = family;
    }

    /// The TURN server address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Relayed transport address once allocated.
    pub fn relayed_addr(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.state == State::Allocated)
    }

    /// Our server-reflexive address as seen by the TURN server.
    pub fn mapped_addr(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// True once the allocation exists.
    pub fn is_allocated(&self) -> bool {
        self.state == State::Allocated
    }

    /// The channel number bound to `peer`, once the server confirmed it.
    pub fn channel_for(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .get(&peer)
            .filter(|c| c.confirmed)
            .map(|c| c.number)
    }

    /// True once a permission for `ip` (explicit or through a channel) is confirmed.
    pub fn has_permission(&self, ip: IpAddr) -> bool {
        self.permissions.get(&ip).is_some_and(|p| p.confirmed)
            || self
                .channels
                .iter()
                .any(|(p, c)| p.ip() == ip && c.confirmed)
    }

    /// Starts an allocation (no-op when one exists or is being made).
    pub fn allocate(&mut self, now: Instant) {
        if matches!(self.state, State::Allocating | State::Allocated) || self.clearing_stale() {
            return;
        }
        self.state = State::Allocating;
        self.start(Op::Allocate, now);
    }

    /// Installs (and keeps refreshing) a permission for `peer_ip`.
    pub fn create_permission(
        &mut self,
        peer_ip: IpAddr,
        now: Instant,
    ) -> Result<(), TurnClientError> {
        self.require_allocated()?;
        self.check_family(peer_ip)?;
        self.permissions.entry(peer_ip).or_insert(PermState {
            refresh_at: now + PERMISSION_REFRESH,
            confirmed: false,
        });
        self.start(Op::Permission { ips: vec![peer_ip] }, now);
        Ok(())
    }

    /// Binds a channel to `peer` (and keeps it bound); returns its number. The channel is
    /// usable once [`TurnEvent::ChannelBound`] arrives; until then [`TurnClient::encode_send`]
    /// uses Send indications (which need the permission the bind installs).
    pub fn bind_channel(&mut self, peer: SocketAddr, now: Instant) -> Result<u16, TurnClientError> {
        self.require_allocated()?;
        self.check_family(peer.ip())?;
        if let Some(c) = self.channels.get(&peer) {
            return Ok(c.number);
        }
        if self.by_number.len() > usize::from(channeldata::CHANNEL_MAX - channeldata::CHANNEL_MIN) {
            return Err(TurnClientError::NoChannelLeft);
        }
        let mut number = self.next_channel;
        while self.by_number.contains_key(&number) {
            number = if number >= channeldata::CHANNEL_MAX {
                channeldata::CHANNEL_MIN
            } else {
                number + 1
            };
        }
        self.next_channel = if number >= channeldata::CHANNEL_MAX {
            channeldata::CHANNEL_MIN
        } else {
            number + 1
        };
        self.channels.insert(
            peer,
            ChanState {
                number,
                refresh_at: now + CHANNEL_REFRESH,
                confirmed: false,
            },
        );
        self.by_number.insert(number, peer);
        self.start(
            Op::ChannelBind {
                peer,
                channel: number,
            },
            now,
        );
        Ok(number)
    }

    /// Releases the allocation (Refresh with LIFETIME 0).
    pub fn release(&mut self, now: Instant) {
        self.stale_cleared = false;
        if self.state != State::Allocated {
            self.reset();
            return;
        }
        self.state = State::Releasing;
        self.pending.clear();
        self.start(Op::Refresh { lifetime: 0 }, now);
    }

    /// Frames `data` for `peer` into `out` (ChannelData if a channel is bound, else a Send
    /// indication); send `out[..n]` to [`TurnClient::server`].
    pub fn encode_send(
        &self,
        peer: SocketAddr,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, TurnClientError> {
        self.require_allocated()?;
        if let Some(ch) = self.channel_for(peer) {
            return channeldata::encode(ch, data, out).map_err(|_| TurnClientError::BufferTooSmall);
        }
        let mut state = self.indication_rng.get();
        let hi = crate::rng::xorshift64star(&mut state);
        let lo = crate::rng::xorshift64star(&mut state);
        self.indication_rng.set(state);
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&hi.to_be_bytes());
        txid[8..].copy_from_slice(&lo.to_be_bytes()[..4]);
        turn::encode_peer_data_message(turn::msg_type::SEND_INDICATION, &txid, peer, data, out)
            .ok_or(TurnClientError::BufferTooSmall)
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// When [`TurnClient::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = self.pending.iter().map(|p| p.next_at).min();
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if self.state == State::Allocated {
            if let Some(r) = self.refresh_at {
                consider(r);
            }
            for p in self.permissions.values().filter(|p| p.confirmed) {
                consider(p.refresh_at);
            }
            for c in self.channels.values().filter(|c| c.confirmed) {
                consider(c.refresh_at);
            }
        }
        t
    }

    /// Retransmits and refreshes what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut failed = Vec::new();
        for (i, p) in self.pending.iter_mut().enumerate() {
            if p.next_at > now {
                continue;
            }
            if p.sends >= MAX_TRANSMISSIONS {
                failed.push(i);
                continue;
            }
            p.sends += 1;
            p.rto = (p.rto * 2).min(MAX_RTO);
            p.next_at = now + p.rto;
            self.transmits.push_back(Transmit {
                dst: self.server,
                payload: p.packet.clone(),
            });
        }
        for i in failed.into_iter().rev() {
            let p = self.pending.remove(i);
            self.fail(p.op, None, "timeout".into(), now);
        }
        if self.state != State::Allocated {
            return;
        }
        if self.refresh_at.is_some_and(|r| r <= now) {
            self.refresh_at = None;
            self.start(
                Op::Refresh {
                    lifetime: REQUESTED_LIFETIME,
                },
                now,
            );
        }
        let due: Vec<IpAddr> = self
            .permissions
            .iter_mut()
            .filter(|(_, p)| p.confirmed && p.refresh_at <= now)
            .map(|(ip, p)| {
                p.refresh_at = now + PERMISSION_REFRESH;
                *ip
            })
            .collect();
        // Several addresses per CreatePermission, in requests that stay well under the MTU.
        for ips in due.chunks(32) {
            self.start(Op::Permission { ips: ips.to_vec() }, now);
        }
        let due: Vec<(SocketAddr, u16)> = self
            .channels
            .iter_mut()
            .filter(|(_, c)| c.confirmed && c.refresh_at <= now)
            .map(|(peer, c)| {
                c.refresh_at = now + CHANNEL_REFRESH;
                (*peer, c.number)
            })
            .collect();
        for (peer, channel) in due {
            self.start(Op::ChannelBind { peer, channel }, now);
        }
    }

    /// Feeds a datagram received from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, packet: &[u8]) -> Input {
        if from != self.server {
            return Input::NotTurn;
        }
        if channeldata::is_channel_data(packet) {
            let Ok(cd) = channeldata::parse(packet) else {
                return Input::Consumed;
            };
            return match self.by_number.get(&cd.channel) {
                Some(peer) => Input::Data {
                    peer: *peer,
                    range: channeldata::HEADER_LEN..channeldata::HEADER_LEN + cd.data.len(),
                },
                None => Input::Consumed,
            };
        }
        let Some(hdr) = turn::parse_header(packet) else {
            return Input::NotTurn;
        };
        if hdr.msg_type == turn::msg_type::DATA_INDICATION {
            let mut peer = None;
            let mut data = None;
            for (t, r) in RawAttrs::new(packet) {
                match t {
                    turn::attr::XOR_PEER_ADDRESS if peer.is_none() => {
                        peer = turn::decode_xor_addr(&packet[r.clone()], &hdr.txid)
                    }
                    turn::attr::DATA if data.is_none() => data = Some(r),
                    _ => {}
                }
            }
            return match (peer, data) {
                (Some(peer), Some(range)) => Input::Data { peer, range },
                _ => Input::Consumed,
            };
        }
        let Some(idx) = self.pending.iter().position(|p| p.txid == hdr.txid) else {
            return Input::Consumed;
        };
        let Ok((msg, _)) = self.decoder.decode(packet) else {
            return Input::Consumed;
        };
        match msg.class() {
            MessageClass::SuccessResponse => {
                if !self.response_authentic(packet) {
                    return Input::Consumed;
                }
                let p = self.pending.remove(idx);
                self.on_success(p.op, &msg, now);
            }
            MessageClass::ErrorResponse => {
                let (code, reason) = match msg.get::<ErrorCode>() {
                    Some(StunAttribute::ErrorCode(e)) => (
                        e.error_code().error_code(),
                        e.error_code().reason().to_owned(),
                    ),
                    _ => (0, String::new()),
                };
                let p = self.pending.remove(idx);
                if (code == 401 || code == 438) && p.auth_retries < MAX_AUTH_RETRIES {
                    let realm = match msg.get::<Realm>() {
                        Some(StunAttribute::Realm(r)) => Some(r.as_str().to_owned()),
                        _ => self.auth.as_ref().map(|a| a.realm.clone()),
                    };
                    let nonce = match msg.get::<Nonce>() {
                        Some(StunAttribute::Nonce(n)) => Some(n.as_str().to_owned()),
                        _ => None,
                    };
                    if let (Some(realm), Some(nonce)) = (realm, nonce) {
                        if let Ok(key) = HMACKey::new_long_term(
                            &self.creds.username,
                            &realm,
                            &self.creds.password,
                            Algorithm::from(AlgorithmId::MD5),
                        ) {
                            let fresh_realm = self.auth.as_ref().is_none_or(|a| a.realm != realm);
                            // 401 with credentials we already used for this realm and nonce means
                            // the password is wrong: give up.
                            let repeated = code == 401
                                && !fresh_realm
                                && self.auth.as_ref().is_some_and(|a| a.nonce == nonce)
                                && p.auth_retries > 0;
                            if !repeated {
                                self.auth = Some(Auth { realm, nonce, key });
                                self.send_op(p.op, now, p.auth_retries + 1);
                                return Input::Consumed;
                            }
                        }
                    }
                }
                self.fail(p.op, Some(code), reason, now);
            }
            _ => {}
        }
        Input::Consumed
    }

    fn response_authentic(&self, packet: &[u8]) -> bool {
        let Some(auth) = &self.auth else {
            return true;
        };
        let sha256 = RawAttrs::new(packet).find(|(t, _)| *t == 0x001C);
        let sha1 = RawAttrs::new(packet).find(|(t, _)| *t == 0x0008);
        let (integrity, range, input) = match (sha256, sha1) {
            (Some((_, r)), _) => (
                Integrity::Sha256,
                r,
                stun_rs::get_input_text::<MessageIntegritySha256>(packet),
            ),
            (None, Some((_, r))) => (
                Integrity::Sha1,
                r,
                stun_rs::get_input_text::<MessageIntegrity>(packet),
            ),
            // Servers must protect responses to authenticated requests.
            (None, None) => return false,
        };
        match (input, packet.get(range)) {
            (Some(input), Some(received)) => {
                turn::verify_hmac(integrity, auth.key.as_bytes(), &input, received)
            }
            _ => false,
        }
    }

    fn on_success(&mut self, op: Op, msg: &StunMessage, now: Instant) {
        let lifetime = match msg.get::<LifeTime>() {
            Some(StunAttribute::LifeTime(l)) => l.as_u32(),
            _ => REQUESTED_LIFETIME,
        };
        match op {
            Op::Allocate => {
                let relayed = match msg.get::<XorRelayedAddress>() {
                    Some(StunAttribute::XorRelayedAddress(a)) => *a.socket_address(),
                    _ => {
                        self.fail(Op::Allocate, None, "no XOR-RELAYED-ADDRESS".into(), now);
                        return;
                    }
                };
                self.mapped = match msg.get::<XorMappedAddress>() {
                    Some(StunAttribute::XorMappedAddress(a)) => Some(*a.socket_address()),
                    _ => None,
                };
                self.relayed = Some(relayed);
                self.state = State::Allocated;
                self.stale_cleared = false;
                self.refresh_at = Some(now + refresh_delay(lifetime));
                self.events.push_back(TurnEvent::Allocated {
                    relayed,
                    mapped: self.mapped,
                    lifetime: Duration::from_secs(u64::from(lifetime)),
                });
            }
            Op::Refresh { lifetime: 0 } if self.clearing_stale() => {
                self.reset();
                self.state = State::Allocating;
                self.start(Op::Allocate, now);
            }
            Op::Refresh { lifetime: 0 } => {
                self.reset();
                self.events.push_back(TurnEvent::Released);
            }
            Op::Refresh { .. } => {
                self.refresh_at = Some(now + refresh_delay(lifetime));
                self.events.push_back(TurnEvent::Refreshed {
                    lifetime: Duration::from_secs(u64::from(lifetime)),
                });
            }
            Op::Permission { ips } => {
                for ip in ips {
                    if let Some(p) = self.permissions.get_mut(&ip) {
                        if !p.confirmed {
                            p.confirmed = true;
                            self.events
                                .push_back(TurnEvent::PermissionCreated { peer_ip: ip });
                        }
                    }
                }
            }
            Op::ChannelBind { peer, channel } => {
                if let Some(c) = self.channels.get_mut(&peer) {
                    if !c.confirmed {
                        c.confirmed = true;
                        self.events
                            .push_back(TurnEvent::ChannelBound { peer, channel });
                    }
                }
            }
        }
    }

    fn fail(&mut self, op: Op, code: Option<u16>, mut reason: String, now: Instant) {
        let mut kind = op.kind();
        let mut code = code;
        match op {
            Op::Allocate if code == Some(437) && !self.stale_cleared => {
                // A stale allocation of ours holds the 5-tuple: delete it, then allocate again
                // (no event: the caller sees the final outcome of the Allocate).
                self.reset();
                self.stale_cleared = true;
                self.state = State::Releasing;
                self.start(Op::Refresh { lifetime: 0 }, now);
                return;
            }
            Op::Allocate => {
                self.reset();
                self.stale_cleared = false;
            }
            Op::Refresh { lifetime: 0 } if self.clearing_stale() => {
                // The stale allocation could not be deleted (another user's, or a server that
                // wants the old username): the Allocate fails with the original 437.
                self.stale_cleared = false;
                self.reset();
                kind = TurnOp::Allocate;
                reason = format!(
                    "Allocation Mismatch (an earlier allocation holds this address; deleting it failed: {} {reason})",
                    code.map_or_else(|| "no answer".to_owned(), |c| c.to_string())
                );
                code = Some(437);
            }
            Op::Refresh { lifetime: 0 } => {
                self.reset();
                self.events.push_back(TurnEvent::Released);
            }
            Op::Refresh { .. } => {
                // The allocation is gone (437) or unreachable: start over cleanly.
                self.reset();
            }
            Op::Permission { ips } => {
                for ip in ips {
                    if self.permissions.get(&ip).is_some_and(|p| !p.confirmed) {
                        self.permissions.remove(&ip);
                    }
                }
            }
            Op::ChannelBind { peer, channel } => {
                if self.channels.get(&peer).is_some_and(|c| !c.confirmed) {
                    self.channels.remove(&peer);
                    self.by_number.remove(&channel);
                }
            }
        }
        self.events.push_back(TurnEvent::Failed {
            op: kind,
            code,
            reason,
        });
    }

    /// A Refresh of lifetime 0 is deleting a stale allocation (not releasing our own): only
    /// after a 437 does the client release before it ever allocated in this attempt.
    fn clearing_stale(&self) -> bool {
        self.state == State::Releasing && self.stale_cleared
    }

    fn reset(&mut self) {
        self.state = State::Idle;
        self.relayed = None;
        self.refresh_at = None;
        self.pending.clear();
        self.permissions.clear();
        self.channels.clear();
        self.by_number.clear();
    }

    fn require_allocated(&self) -> Result<(), TurnClientError> {
        if self.state == State::Allocated {
            Ok(())
        } else {
            Err(TurnClientError::NotAllocated)
        }
    }

    fn check_family(&self, ip: IpAddr) -> Result<(), TurnClientError> {
        match self.relayed {
            Some(r) if r.is_ipv4() != canonical_ip(ip).is_ipv4() => {
                Err(TurnClientError::FamilyMismatch)
            }
            _ => Ok(()),
        }
    }

    fn start(&mut self, op: Op, now: Instant) {
        self.send_op(op, now, 0);
    }

    fn send_op(&mut self, op: Op, now: Instant, auth_retries: u32) {
        let txid: [u8; 12] = self.rng.gen();
        let Some(packet) = self.build(&op, &txid) else {
            self.fail(op, None, "could not encode request".into(), now);
            return;
        };
        self.transmits.push_back(Transmit {
            dst: self.server,
            payload: packet.clone(),
        });
        self.pending.push(Pending {
            txid,
            op,
            packet,
            sends: 1,
            rto: INITIAL_RTO,
            next_at: now + INITIAL_RTO,
            auth_retries,
        });
    }

    fn build(&self, op: &Op, txid: &[u8; 12]) -> Option<Vec<u8>> {
        let method: MessageMethod = match op {
            Op::Allocate => ALLOCATE,
            Op::Refresh { .. } => REFRESH,
            Op::Permission { .. } => CREATE_PERMMISSION,
            Op::ChannelBind { .. } => CHANNEL_BIND,
        };
        let mut b = StunMessageBuilder::new(method, MessageClass::Request)
            .with_transaction_id(TransactionId::from(*txid));
        match op {
            Op::Allocate => {
                b = b
                    .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
                    .with_attribute(LifeTime::new(REQUESTED_LIFETIME));
                if let Some(f) = self.family {
                    b = b.with_attribute(RequestedAddressFamily::new(match f {
                        Family::V4 => AddressFamily::IPv4,
                        Family::V6 => AddressFamily::IPv6,
                    }));
                }
            }
            Op::Refresh { lifetime } => b = b.with_attribute(LifeTime::new(*lifetime)),
            Op::Permission { ips } => {
                for ip in ips {
                    b = b.with_attribute(XorPeerAddress::from(SocketAddr::new(*ip, 0)));
                }
            }
            Op::ChannelBind { peer, channel } => {
                b = b
                    .with_attribute(ChannelNumber::new(*channel))
                    .with_attribute(XorPeerAddress::from(*peer));
            }
        }
        if let Some(auth) = &self.auth {
            b = b
                .with_attribute(UserName::new(&self.creds.username).ok()?)
                .with_attribute(Realm::new(&auth.realm).ok()?)
                .with_attribute(Nonce::new(&auth.nonce).ok()?);
            b = if self.sha256 {
                b.with_attribute(MessageIntegritySha256::new(auth.key.clone()))
            } else {
                b.with_attribute(MessageIntegrity::new(auth.key.clone()))
            };
        }
        let mut buf = vec![0u8; 2048];
        let n = self.encoder.encode(&mut buf, &b.build()).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

/// Refresh a minute before expiry (half-way for short lifetimes).
fn refresh_delay(lifetime: u32) -> Duration {
    let l = u64::from(lifetime.max(2));
    Duration::from_secs(if l > 120 { l - 60 } else { l / 2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> TurnCredentials {
        TurnCredentials {
            username: "1700000000:alice".into(),
            password: "secret".into(),
        }
    }

    #[test]
    fn a_seeded_client_replays_its_transaction_ids() {
        let server: SocketAddr = "203.0.113.20:3478"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let peer: SocketAddr = "198.51.100.2:4000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let now = Instant::now();
        let run = |seed| {
            let mut c = TurnClient::with_seed(server, creds(), now, seed);
            c.allocate(now);
            let mut out = Vec::new();
            while let Some(t) = c.poll_transmit() {
                out.push(t.payload);
            }
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Send indications too (they need an allocation; same seed, same refusal path).
        let c = TurnClient::with_seed(server, creds(), now, 7);
        let mut buf = [0u8; 256];
        assert!(c.encode_send(peer, b"x", &mut buf).is_err());
    }
}
