//! The rendezvous protocol: framing, versioning and messages exchanged over QUIC between
//! client and rendezvous.
//!
//! # Framing
//! Every message travels as one frame on the control stream (a bidirectional QUIC stream the
//! client opens right after the handshake):
//!
//! ```text
//! +----------------+---------+------+----------------------+
//! | length: u32 BE | version | kind | body (postcard)      |
//! +----------------+---------+------+----------------------+
//!   bytes that follow  u8       u8     length - 2 bytes
//! ```
//!
//! `length` counts version, kind and body, and is capped by the reader's limit
//! ([`MAX_FRAME_LEN`] by default). A frame with an unknown version or kind is still
//! well-delimited, so the receiver skips it and answers with a typed [`Message::Error`]
//! ([`ErrorCode::Unsupported`]) instead of tearing the connection down: old servers keep
//! working with new clients and the other way round.
//!
//! # Session
//! ```text
//! client                                   server
//!   Hello{token, key}            ──►
//!                                ◄──  Challenge{server_ephemeral, nonce}
//!   KeyProof{mac}                ──►        (see [`key_proof`])
//!                                ◄──  Registered{observed, relays, turn}
//!   Watch{keys}                  ──►
//!                                ◄──  Presence{key, online}   (now and on every change)
//!   Offer{id, peer, candidates}  ──►  ──► IncomingOffer at the peer
//!                                     ◄── Answer from the peer
//!                                ◄──  PunchStart (both sides, same session secret)
//!                                ◄──  ObservedAddr{addr}      (whenever it changes)
//!                                ◄──  GoAway{reason}          (drain / superseded)
//!                                ◄──  Challenge{fresh ephemeral, fresh nonce}  (re-authentication,
//!   KeyProof{mac}                ──►        every reauth_interval; see crate::session)
//!                                ◄──  Error{Unauthorized, reason}  (token expired / revoked; closes)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// ALPN protocol id of the rendezvous QUIC connection.
pub const ALPN: &[u8] = b"meshpunch/1";

/// Protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

/// Default maximum length of a frame (version + kind + body), in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Bytes of version + kind that follow the length prefix.
pub const HEADER_LEN: usize = 2;

/// TLS exporter label (RFC 5705) the key proof is bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshpunch-key-proof";

/// Length of the TLS exporter output used in the key proof.
pub const EXPORTER_LEN: usize = 32;

/// Domain separation prefix of the key-proof MAC.
const KEY_PROOF_DOMAIN: &[u8] = b"meshpunch key proof v1";

/// Most candidates accepted in one offer or answer.
pub const MAX_CANDIDATES: usize = 64;

/// Most keys accepted in one [`Message::Watch`].
pub const MAX_WATCH_KEYS: usize = 1024;

/// The transport a signalling connection runs over. The frames, ALPN and key proof are the
/// same on both; QUIC (UDP) is preferred, TLS 1.3 over TCP is the fallback where UDP is
/// blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// QUIC over UDP.
    #[default]
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}

impl Transport {
    /// The spelling in metrics, logs and `status` (`quic` | `tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }

    /// Whether an address observed on a connection of this transport is a UDP mapping (a
    /// server-reflexive candidate). A TCP connection's source port is a TCP mapping of the
    /// NAT, unrelated to any UDP one: it is never a UDP candidate. (Its IP is still the
    /// host's public IP.)
    pub fn observed_is_udp_mapping(self) -> bool {
        matches!(self, Transport::Quic)
    }
}

/// A WireGuard (Curve25519) public key: 32 bytes, written as standard base64 (44 chars) the way
/// `wg pubkey` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

/// A string that is not a base64 WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key (44 base64 characters of 32 bytes)")]
pub struct BadKey;

impl FromStr for PeerKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| BadKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadKey)?;
        Ok(PeerKey(arr))
    }
}

impl From<x25519_dalek::PublicKey> for PeerKey {
    fn from(k: x25519_dalek::PublicKey) -> Self {
        PeerKey(k.to_bytes())
    }
}

/// How a candidate address was learned (RFC 8445 §5.1.1 candidate types, plus predicted ports
/// for symmetric NATs). Unknown kinds from newer peers decode to [`CandidateKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum CandidateKind {
    /// An address of a local interface.
    Host,
    /// The address a STUN server (or the rendezvous) saw.
    ServerReflexive,
    /// A guessed mapping of a symmetric NAT (port prediction).
    Predicted,
    /// A TURN relayed address.
    Relayed,
    /// The server-reflexive address of an endpoint-dependent mapping (symmetric NAT): the
    /// port differs per destination, so this marks the sender as the "hard" side of birthday
    /// probing. Sent beside a plain [`CandidateKind::ServerReflexive`] of the same address, so
    /// older peers (which ignore unknown kinds) lose nothing.
    ServerReflexiveDependent,
    /// A public address the sender's gateway forwards to its data socket (a PCP / NAT-PMP /
    /// UPnP IGD port mapping). Older peers ignore it (as any unknown kind).
    PortMapped,
    /// A kind this version does not know.
    Other(u8),
}

impl From<u8> for CandidateKind {
    fn from(v: u8) -> Self {
        match v {
            0 => CandidateKind::Host,
            1 => CandidateKind::ServerReflexive,
            2 => CandidateKind::Predicted,
            3 => CandidateKind::Relayed,
            4 => CandidateKind::ServerReflexiveDependent,
            5 => CandidateKind::PortMapped,
            x => CandidateKind::Other(x),
        }
    }
}

impl From<CandidateKind> for u8 {
    fn from(k: CandidateKind) -> u8 {
        match k {
            CandidateKind::Host => 0,
            CandidateKind::ServerReflexive => 1,
            CandidateKind::Predicted => 2,
            CandidateKind::Relayed => 3,
            CandidateKind::ServerReflexiveDependent => 4,
            CandidateKind::PortMapped => 5,
            CandidateKind::Other(x) => x,
        }
    }
}

/// One transport address a peer may be reached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// The UDP address.
    pub addr: SocketAddr,
    /// How it was learned.
    pub kind: CandidateKind,
    /// Higher is tried first (RFC 8445 §5.1.2 style).
    pub priority: u32,
}

/// Why the server refused something. Unknown codes from newer servers decode to
/// [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// Unknown peer, or a peer of another network (deliberately indistinguishable).
    NotFound,
    /// Bad, expired or revoked token, or a failed key proof.
    Unauthorized,
    /// A message that is malformed or out of order.
    BadRequest,
    /// A limit was hit; retry later.
    RateLimited,
    /// Unknown protocol version or message kind.
    Unsupported,
    /// An offer addressed to the sender's own key.
    SelfOffer,
    /// A frame over the size limit.
    TooLarge,
    /// The server failed internally (registry unavailable, ...).
    Internal,
    /// The peer did not answer the offer in time.
    Timeout,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        match v {
            404 => ErrorCode::NotFound,
            401 => ErrorCode::Unauthorized,
            400 => ErrorCode::BadRequest,
            429 => ErrorCode::RateLimited,
            505 => ErrorCode::Unsupported,
            409 => ErrorCode::SelfOffer,
            413 => ErrorCode::TooLarge,
            500 => ErrorCode::Internal,
            408 => ErrorCode::Timeout,
            x => ErrorCode::Other(x),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        match c {
            ErrorCode::NotFound => 404,
            ErrorCode::Unauthorized => 401,
            ErrorCode::BadRequest => 400,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unsupported => 505,
            ErrorCode::SelfOffer => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::Timeout => 408,
            ErrorCode::Other(x) => x,
        }
    }
}

impl ErrorCode {
    /// Short lowercase name, used as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::SelfOffer => "self_offer",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Other(_) => "other",
        }
    }
}

/// Why the server asks the client to go away. Unknown reasons decode to
/// [`GoAwayReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum GoAwayReason {
    /// The server is shutting down; reconnect (possibly to another node).
    Draining,
    /// A newer connection registered the same key; do not reconnect automatically.
    Superseded,
    /// The connection was idle or misbehaved.
    Closed,
    /// A reason this version does not know.
    Other(u8),
}

impl From<u8> for GoAwayReason {
    fn from(v: u8) -> Self {
        match v {
            0 => GoAwayReason::Draining,
            1 => GoAwayReason::Superseded,
            2 => GoAwayReason::Closed,
            x => GoAwayReason::Other(x),
        }
    }
}

impl From<GoAwayReason> for u8 {
    fn from(r: GoAwayReason) -> u8 {
        match r {
            GoAwayReason::Draining => 0,
            GoAwayReason::Superseded => 1,
            GoAwayReason::Closed => 2,
            GoAwayReason::Other(x) => x,
        }
    }
}

/// One relay region of the relay map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRegion {
    /// Region name (`"eu-west"`).
    pub region: String,
    /// TURN URIs (`"turn:relay.example.com:3478"`, RFC 7065).
    pub urls: Vec<String>,
    /// REST-API credentials for this region's relays (coturn `use-auth-secret`).
    pub username: String,
    /// Password matching `username`.
    pub password: String,
    /// Unix time the credentials expire.
    pub expires_unix: u64,
}

/// First message of the client: who it is and where it belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Network token (`mpt1.…`).
    pub token: String,
    /// The WireGuard public key being registered.
    pub key: PeerKey,
    /// Free-form software name and version of the client.
    pub software: String,
}

/// The server's challenge for the key proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Ephemeral X25519 public key of the server, fresh per connection.
    pub server_ephemeral: [u8; 32],
    /// Random nonce.
    pub nonce: [u8; 32],
}

/// The client's answer to [`Challenge`], see [`key_proof`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProof {
    /// HMAC-SHA256 proof.
    pub mac: [u8; 32],
}

/// Registration succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The UDP address the server sees the client's QUIC connection from.
    pub observed: SocketAddr,
    /// Network name of the token.
    pub network: String,
    /// Relay map with TURN credentials.
    pub relays: Vec<RelayRegion>,
    /// STUN server addresses (primary, and the RFC 5780 alternate when configured).
    pub stun: Vec<SocketAddr>,
    /// Server wall clock, unix milliseconds.
    pub server_time_unix_ms: u64,
}

/// A request to reach `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Client-chosen id; echoed in the [`PunchStart`] or [`ErrorMsg`] that ends the offer.
    pub id: u64,
    /// Peer to reach (same network only).
    pub peer: PeerKey,
    /// The offerer's candidates.
    pub candidates: Vec<Candidate>,
}

/// An offer from another peer, delivered to its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingOffer {
    /// Server-assigned id to put in the [`Answer`].
    pub offer_id: u64,
    /// Who offers.
    pub from: PeerKey,
    /// Their candidates.
    pub candidates: Vec<Candidate>,
}

/// The target's answer to an [`IncomingOffer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The `offer_id` of the [`IncomingOffer`].
    pub offer_id: u64,
    /// The answerer's candidates.
    pub candidates: Vec<Candidate>,
}

/// Both sides start punching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchStart {
    /// The offer id: the client's [`Offer::id`] on the offering side, the
    /// [`IncomingOffer::offer_id`] on the answering side.
    pub id: u64,
    /// The other peer.
    pub peer: PeerKey,
    /// The other peer's candidates.
    pub peer_candidates: Vec<Candidate>,
    /// Fresh secret shared by both sides, keys the punch probes.
    pub session_secret: [u8; 32],
    /// Start punching this many milliseconds after receiving this message (corrected by half
    /// the measured RTT of this side's connection, so both sides start together).
    pub start_in_ms: u32,
    /// True on the side that sent the offer.
    pub initiator: bool,
    /// The UDP address the rendezvous itself sees the other peer's connection from. The only
    /// IP a client's birthday search may target, whatever candidates the peer claims. Appended
    /// in a later version: `None` from an older server (see [`decode_punch_start`]).
    pub peer_observed: Option<SocketAddr>,
}

/// [`PunchStart`] as servers before `peer_observed` send it.
#[derive(Deserialize)]
struct PunchStartV1 {
    id: u64,
    peer: PeerKey,
    peer_candidates: Vec<Candidate>,
    session_secret: [u8; 32],
    start_in_ms: u32,
    initiator: bool,
}

/// Decodes a [`PunchStart`] body with or without the appended `peer_observed`.
fn decode_punch_start(k: u8, body: &[u8]) -> Result<PunchStart, WireError> {
    if let Ok(p) = de::<PunchStart>(k, body) {
        return Ok(p);
    }
    let v1: PunchStartV1 = de(k, body)?;
    Ok(PunchStart {
        id: v1.id,
        peer: v1.peer,
        peer_candidates: v1.peer_candidates,
        session_secret: v1.session_secret,
        start_in_ms: v1.start_in_ms,
        initiator: v1.initiator,
        peer_observed: None,
    })
}

/// Why an [`ErrorCode::Unauthorized`] was sent, so a client can tell "fix your token" from
/// "fix your key" without parsing text. Carried after the [`ErrorMsg`] body: older peers skip
/// it (trailing bytes are tolerated) and messages from older peers decode with `reason: None`.
/// Unknown reasons from newer servers decode to [`ErrorReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum ErrorReason {
    /// The token's expiry time passed (at registration or on the live connection).
    TokenExpired,
    /// The token is on the revocation list.
    TokenRevoked,
    /// The token is malformed or its signature does not verify.
    BadToken,
    /// The key proof did not verify (wrong private key, or a proof of another session).
    BadProof,
    /// A member-scoped token was presented with another WireGuard key.
    KeyNotAllowed,
    /// The client did not answer a re-authentication challenge in time.
    ReauthTimeout,
    /// A reason this version does not know.
    Other(u8),
}

impl From<u8> for ErrorReason {
    fn from(v: u8) -> Self {
        match v {
            1 => ErrorReason::TokenExpired,
            2 => ErrorReason::TokenRevoked,
            3 => ErrorReason::BadToken,
            4 => ErrorReason::BadProof,
            5 => ErrorReason::KeyNotAllowed,
            6 => ErrorReason::ReauthTimeout,
            x => ErrorReason::Other(x),
        }
    }
}

impl From<ErrorReason> for u8 {
    fn from(r: ErrorReason) -> u8 {
        match r {
            ErrorReason::TokenExpired => 1,
            ErrorReason::TokenRevoked => 2,
            ErrorReason::BadToken => 3,
            ErrorReason::BadProof => 4,
            ErrorReason::KeyNotAllowed => 5,
            ErrorReason::ReauthTimeout => 6,
            ErrorReason::Other(x) => x,
        }
    }
}

impl ErrorReason {
    /// Short lowercase name (metric label, `status --json`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorReason::TokenExpired => "expired",
            ErrorReason::TokenRevoked => "revoked",
            ErrorReason::BadToken => "bad_token",
            ErrorReason::BadProof => "bad_proof",
            ErrorReason::KeyNotAllowed => "key_not_allowed",
            ErrorReason::ReauthTimeout => "reauth_timeout",
            ErrorReason::Other(_) => "other",
        }
    }

    /// Whether retrying with the same token can succeed (false: the operator must act).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ErrorReason::TokenExpired
                | ErrorReason::TokenRevoked
                | ErrorReason::BadToken
                | ErrorReason::KeyNotAllowed
        )
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// What went wrong.
    pub code: ErrorCode,
    /// Id of the request this answers (an [`Offer::id`] / offer id), 0 if none.
    pub id: u64,
    /// Human-readable detail.
    pub message: String,
    /// Typed reason (with [`ErrorCode::Unauthorized`]); `None` from older servers.
    pub reason: Option<ErrorReason>,
}

/// The [`ErrorMsg`] body as protocol version 1 first defined it; the reason byte follows.
#[derive(Serialize, Deserialize)]
struct ErrorBody {
    code: ErrorCode,
    id: u64,
    message: String,
}

/// Every rendezvous message. The discriminant on the wire is [`Message::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// C→S: token and key to register.
    Hello(Hello),
    /// S→C: key-proof challenge.
    Challenge(Challenge),
    /// C→S: key proof.
    KeyProof(KeyProof),
    /// S→C: registration done.
    Registered(Registered),
    /// S→C: the observed address changed.
    ObservedAddr(SocketAddr),
    /// S→C: fresh relay map and TURN credentials (sent before the old ones expire).
    RelayUpdate(Vec<RelayRegion>),
    /// C→S: replace the set of watched keys.
    Watch(Vec<PeerKey>),
    /// S→C: a watched key came online or went away.
    Presence {
        /// The watched key.
        key: PeerKey,
        /// Whether it is connected now.
        online: bool,
    },
    /// C→S: offer to a peer.
    Offer(Offer),
    /// S→C: an offer from a peer.
    IncomingOffer(IncomingOffer),
    /// C→S: answer to an incoming offer.
    Answer(Answer),
    /// S→C: start punching.
    PunchStart(PunchStart),
    /// Either way: typed error.
    Error(ErrorMsg),
    /// S→C: the server closes this connection.
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// Detail.
        message: String,
    },
}

/// Message kinds (second header byte).
pub mod kind {
    /// [`super::Message::Hello`]
    pub const HELLO: u8 = 1;
    /// [`super::Message::Challenge`]
    pub const CHALLENGE: u8 = 2;
    /// [`super::Message::KeyProof`]
    pub const KEY_PROOF: u8 = 3;
    /// [`super::Message::Registered`]
    pub const REGISTERED: u8 = 4;
    /// [`super::Message::ObservedAddr`]
    pub const OBSERVED_ADDR: u8 = 5;
    /// [`super::Message::RelayUpdate`]
    pub const RELAY_UPDATE: u8 = 6;
    /// [`super::Message::Watch`]
    pub const WATCH: u8 = 7;
    /// [`super::Message::Presence`]
    pub const PRESENCE: u8 = 8;
    /// [`super::Message::Offer`]
    pub const OFFER: u8 = 9;
    /// [`super::Message::IncomingOffer`]
    pub const INCOMING_OFFER: u8 = 10;
    /// [`super::Message::Answer`]
    pub const ANSWER: u8 = 11;
    /// [`super::Message::PunchStart`]
    pub const PUNCH_START: u8 = 12;
    /// [`super::Message::Error`]
    pub const ERROR: u8 = 13;
    /// [`super::Message::GoAway`]
    pub const GO_AWAY: u8 = 14;
}

#[derive(Serialize, Deserialize)]
struct PresenceBody {
    key: PeerKey,
    online: bool,
}

#[derive(Serialize, Deserialize)]
struct GoAwayBody {
    reason: GoAwayReason,
    message: String,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame is shorter than its header.
    #[error("frame shorter than its header")]
    Truncated,
    /// The version byte is not one this side speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte is not one this side knows.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The body does not decode as the kind says.
    #[error("malformed body of message kind {kind}")]
    Malformed {
        /// The message kind.
        kind: u8,
    },
}

impl WireError {
    /// The error code to answer the peer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::TooLarge,
            WireError::UnsupportedVersion(_) | WireError::UnknownKind(_) => ErrorCode::Unsupported,
            WireError::Truncated | WireError::Malformed { .. } => ErrorCode::BadRequest,
        }
    }

    /// Whether the stream can go on after this error (the frame was well delimited).
    pub fn recoverable(&self) -> bool {
        !matches!(self, WireError::TooLarge { .. })
    }
}

fn ser<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard serialization into a Vec only fails on types serde cannot represent (maps with
    // unknown length); none of ours are such.
    postcard::to_allocvec(v).unwrap_or_default()
}

fn de<'a, T: Deserialize<'a>>(kind: u8, body: &'a [u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes::<T>(body) {
        // Trailing bytes are tolerated: newer versions may append fields.
        Ok((v, _rest)) => Ok(v),
        Err(_) => Err(WireError::Malformed { kind }),
    }
}

impl Message {
    /// The kind byte of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Challenge(_) => kind::CHALLENGE,
            Message::KeyProof(_) => kind::KEY_PROOF,
            Message::Registered(_) => kind::REGISTERED,
            Message::ObservedAddr(_) => kind::OBSERVED_ADDR,
            Message::RelayUpdate(_) => kind::RELAY_UPDATE,
            Message::Watch(_) => kind::WATCH,
            Message::Presence { .. } => kind::PRESENCE,
            Message::Offer(_) => kind::OFFER,
            Message::IncomingOffer(_) => kind::INCOMING_OFFER,
            Message::Answer(_) => kind::ANSWER,
            Message::PunchStart(_) => kind::PUNCH_START,
            Message::Error(_) => kind::ERROR,
            Message::GoAway { .. } => kind::GO_AWAY,
        }
    }

    /// Short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Challenge(_) => "challenge",
            Message::KeyProof(_) => "key_proof",
            Message::Registered(_) => "registered",
            Message::ObservedAddr(_) => "observed_addr",
            Message::RelayUpdate(_) => "relay_update",
            Message::Watch(_) => "watch",
            Message::Presence { .. } => "presence",
            Message::Offer(_) => "offer",
            Message::IncomingOffer(_) => "incoming_offer",
            Message::Answer(_) => "answer",
            Message::PunchStart(_) => "punch_start",
            Message::Error(_) => "error",
            Message::GoAway { .. } => "go_away",
        }
    }

    /// Shorthand for an [`Message::Error`].
    pub fn error(code: ErrorCode, id: u64, message: impl Into<String>) -> Message {
        Message::Error(ErrorMsg {
            code,
            id,
            message: message.into(),
            reason: None,
        })
    }

    /// An [`ErrorCode::Unauthorized`] with its typed reason.
    pub fn unauthorized(reason: ErrorReason, message: impl Into<String>) -> Message {
        Message::Error(ErrorMsg {
            code: ErrorCode::Unauthorized,
            id: 0,
            message: message.into(),
            reason: Some(reason),
        })
    }

    fn body(&self) -> Vec<u8> {
        match self {
            Message::Hello(m) => ser(m),
            Message::Challenge(m) => ser(m),
            Message::KeyProof(m) => ser(m),
            Message::Registered(m) => ser(m),
            Message::ObservedAddr(m) => ser(m),
            Message::RelayUpdate(m) => ser(m),
            Message::Watch(m) => ser(m),
            Message::Presence { key, online } => ser(&PresenceBody {
                key: *key,
                online: *online,
            }),
            Message::Offer(m) => ser(m),
            Message::IncomingOffer(m) => ser(m),
            Message::Answer(m) => ser(m),
            Message::PunchStart(m) => ser(m),
            Message::Error(m) => {
                let mut b = ser(&ErrorBody {
                    code: m.code,
                    id: m.id,
                    message: m.message.clone(),
                });
                if let Some(r) = m.reason {
                    b.push(u8::from(r));
                }
                b
            }
            Message::GoAway { reason, message } => ser(&GoAwayBody {
                reason: *reason,
                message: message.clone(),
            }),
        }
    }

    /// Encodes the message as one complete frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let body = self.body();
        let len = (HEADER_LEN + body.len()) as u32;
        let mut out = Vec::with_capacity(LEN_PREFIX + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(PROTOCOL_VERSION);
        out.push(self.kind());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a frame payload (version, kind and body; no length prefix).
    pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
        let (&version, rest) = payload.split_first().ok_or(WireError::Truncated)?;
        let (&k, body) = rest.split_first().ok_or(WireError::Truncated)?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        Ok(match k {
            kind::HELLO => Message::Hello(de(k, body)?),
            kind::CHALLENGE => Message::Challenge(de(k, body)?),
            kind::KEY_PROOF => Message::KeyProof(de(k, body)?),
            kind::REGISTERED => Message::Registered(de(k, body)?),
            kind::OBSERVED_ADDR => Message::ObservedAddr(de(k, body)?),
            kind::RELAY_UPDATE => Message::RelayUpdate(de(k, body)?),
            kind::WATCH => Message::Watch(de(k, body)?),
            kind::PRESENCE => {
                let b: PresenceBody = de(k, body)?;
                Message::Presence {
                    key: b.key,
                    online: b.online,
                }
            }
            kind::OFFER => Message::Offer(de(k, body)?),
            kind::INCOMING_OFFER => Message::IncomingOffer(de(k, body)?),
            kind::ANSWER => Message::Answer(de(k, body)?),
            kind::PUNCH_START => Message::PunchStart(decode_punch_start(k, body)?),
            kind::ERROR => {
                let (b, rest) = postcard::take_from_bytes::<ErrorBody>(body)
                    .map_err(|_| WireError::Malformed { kind: k })?;
                Message::Error(ErrorMsg {
                    code: b.code,
                    id: b.id,
                    message: b.message,
                    reason: rest.first().map(|&r| ErrorReason::from(r)),
                })
            }
            kind::GO_AWAY => {
                let b: GoAwayBody = de(k, body)?;
                Message::GoAway {
                    reason: b.reason,
                    message: b.message,
                }
            }
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// Reads the length prefix: `Ok(Some(len))` when 4 bytes are available and `len` is within
/// `max`, `Ok(None)` when more bytes are needed.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut b = [0u8; LEN_PREFIX];
    b.copy_from_slice(prefix);
    let len = u32::from_be_bytes(b) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if len < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    Ok(Some(len))
}

/// Incremental frame decoder for a byte stream: push bytes in, take messages out.
///
/// Decoding errors of well-delimited frames (unknown version or kind, malformed body) are
/// returned once and the decoder moves on to the next frame; an oversized length prefix is
/// fatal (the stream cannot be resynchronised) and is returned on every call.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    fatal: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max` bytes (version + kind + body).
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
            fatal: None,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.fatal.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.fatal {
            return Err(e.clone());
        }
        let len = match frame_len(&self.buf, self.max) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.buf = Vec::new();
                self.fatal = Some(e.clone());
                return Err(e);
            }
        };
        let Some(payload) = self.buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
            return Ok(None);
        };
        let result = Message::decode_payload(payload);
        self.buf.drain(..LEN_PREFIX + len);
        result.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// The key proof: `HMAC-SHA256(key = X25519(client static, server ephemeral),
/// "meshpunch key proof v1" || exporter || nonce || client public || server ephemeral public)`.
///
/// `exporter` is [`EXPORTER_LEN`] bytes of the TLS exporter (RFC 5705 / RFC 8446 §7.5) with
/// label [`EXPORTER_LABEL`] and empty context, so a proof recorded on one TLS session is
/// worthless on any other; only the holder of the static secret can compute the DH value.
pub fn key_proof(
    dh_shared: &[u8; 32],
    exporter: &[u8],
    nonce: &[u8; 32],
    client_public: &PeerKey,
    server_ephemeral: &[u8; 32],
) -> [u8; 32] {
    let mut mac = match Hmac::<Sha256>::new_from_slice(dh_shared) {
        Ok(m) => m,
        // HMAC accepts keys of any length.
        Err(_) => return [0u8; 32],
    };
    mac.update(KEY_PROOF_DOMAIN);
    mac.update(exporter);
    mac.update(nonce);
    mac.update(client_public.as_bytes());
    mac.update(server_ephemeral);
    mac.finalize().into_bytes().into()
}

/// Constant-time check of a key proof against the expected value.
pub fn verify_key_proof(
    dh_shared: &[u8; 32],
    exporter: &[u8],
    nonce: &[u8; 32],
    client_public: &PeerKey,
    server_ephemeral: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    let Ok(mut h) = Hmac::<Sha256>::new_from_slice(dh_shared) else {
        return false;
    };
    h.update(KEY_PROOF_DOMAIN);
    h.update(exporter);
    h.update(nonce);
    h.update(client_public.as_bytes());
    h.update(server_ephemeral);
    // An all-zero DH result means a low-order point: refuse.
    dh_shared.iter().any(|&b| b != 0) && h.verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key() -> impl Strategy<Value = PeerKey> {
        any::<[u8; 32]>().prop_map(PeerKey)
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    fn arb_cand() -> impl Strategy<Value = Candidate> {
        (arb_addr(), any::<u8>(), any::<u32>()).prop_map(|(addr, k, priority)| Candidate {
            addr,
            kind: CandidateKind::from(k),
            priority,
        })
    }

    fn arb_region() -> impl Strategy<Value = RelayRegion> {
        (
            ".{0,12}",
            prop::collection::vec(".{0,20}", 0..3),
            ".{0,12}",
            ".{0,12}",
            any::<u64>(),
        )
            .prop_map(
                |(region, urls, username, password, expires_unix)| RelayRegion {
                    region,
                    urls,
                    username,
                    password,
                    expires_unix,
                },
            )
    }

    fn arb_msg() -> impl Strategy<Value = Message> {
        let cands = || prop::collection::vec(arb_cand(), 0..5);
        prop_oneof![
            (".{0,40}", arb_key(), ".{0,10}").prop_map(|(token, key, software)| {
                Message::Hello(Hello {
                    token,
                    key,
                    software,
                })
            }),
            (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(server_ephemeral, nonce)| {
                Message::Challenge(Challenge {
                    server_ephemeral,
                    nonce,
                })
            }),
            any::<[u8; 32]>().prop_map(|mac| Message::KeyProof(KeyProof { mac })),
            (
                arb_addr(),
                ".{0,10}",
                prop::collection::vec(arb_region(), 0..3),
                prop::collection::vec(arb_addr(), 0..3),
                any::<u64>()
            )
                .prop_map(|(observed, network, relays, stun, t)| {
                    Message::Registered(Registered {
                        observed,
                        network,
                        relays,
                        stun,
                        server_time_unix_ms: t,
                    })
                }),
            arb_addr().prop_map(Message::ObservedAddr),
            prop::collection::vec(arb_region(), 0..3).prop_map(Message::RelayUpdate),
            prop::collection::vec(arb_key(), 0..5).prop_map(Message::Watch),
            (arb_key(), any::<bool>()).prop_map(|(key, online)| Message::Presence { key, online }),
            (any::<u64>(), arb_key(), cands()).prop_map(|(id, peer, candidates)| Message::Offer(
                Offer {
                    id,
                    peer,
                    candidates
                }
            )),
            (any::<u64>(), arb_key(), cands()).prop_map(|(offer_id, from, candidates)| {
                Message::IncomingOffer(IncomingOffer {
                    offer_id,
                    from,
                    candidates,
                })
            }),
            (any::<u64>(), cands()).prop_map(|(offer_id, candidates)| Message::Answer(Answer {
                offer_id,
                candidates
            })),
            (
                any::<u64>(),
                arb_key(),
                cands(),
                any::<[u8; 32]>(),
                any::<u32>(),
                any::<bool>(),
                proptest::option::of(arb_addr())
            )
                .prop_map(
                    |(
                        id,
                        peer,
                        peer_candidates,
                        session_secret,
                        start_in_ms,
                        initiator,
                        peer_observed,
                    )| {
                        Message::PunchStart(PunchStart {
                            id,
                            peer,
                            peer_candidates,
                            session_secret,
                            start_in_ms,
                            initiator,
                            peer_observed,
                        })
                    }
                ),
            (
                any::<u16>(),
                any::<u64>(),
                ".{0,20}",
                prop::option::of(any::<u8>())
            )
                .prop_map(|(c, id, message, r)| Message::Error(ErrorMsg {
                    code: ErrorCode::from(c),
                    id,
                    message,
                    reason: r.map(ErrorReason::from),
                })),
            (any::<u8>(), ".{0,20}").prop_map(|(r, message)| Message::GoAway {
                reason: GoAwayReason::from(r),
                message
            }),
        ]
    }

    #[test]
    fn punch_start_from_an_older_server_decodes_without_peer_observed() {
        #[derive(Serialize)]
        struct V1 {
            id: u64,
            peer: PeerKey,
            peer_candidates: Vec<Candidate>,
            session_secret: [u8; 32],
            start_in_ms: u32,
            initiator: bool,
        }
        let body = ser(&V1 {
            id: 7,
            peer: PeerKey([3; 32]),
            peer_candidates: vec![],
            session_secret: [4; 32],
            start_in_ms: 100,
            initiator: true,
        });
        let mut payload = vec![PROTOCOL_VERSION, kind::PUNCH_START];
        payload.extend_from_slice(&body);
        match Message::decode_payload(&payload) {
            Ok(Message::PunchStart(p)) => {
                assert_eq!((p.id, p.start_in_ms, p.peer_observed), (7, 100, None))
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_msg()) {
            let frame = msg.encode();
            let mut d = FrameDecoder::new(MAX_FRAME_LEN * 4);
            // Feed two halves to exercise partial reads.
            let (a, b) = frame.split_at(frame.len() / 2);
            d.push(a);
            prop_assert_eq!(d.next_message(), Ok(None));
            d.push(b);
            prop_assert_eq!(d.next_message(), Ok(Some(msg)));
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode_payload(&data);
            let mut d = FrameDecoder::new(256);
            d.push(&data);
            for _ in 0..64 {
                match d.next_message() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) if e.recoverable() => {}
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn unknown_kind_and_version_are_typed_and_skippable() {
        let mut frame = Message::Watch(vec![]).encode();
        frame[5] = 200;
        let mut second = Message::Watch(vec![PeerKey([1; 32])]).encode();
        second[4] = 9;
        let good = Message::Watch(vec![PeerKey([2; 32])]);
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        d.push(&frame);
        d.push(&second);
        d.push(&good.encode());
        assert_eq!(d.next_message(), Err(WireError::UnknownKind(200)));
        assert_eq!(d.next_message(), Err(WireError::UnsupportedVersion(9)));
        assert_eq!(d.next_message(), Ok(Some(good)));
        assert_eq!(WireError::UnknownKind(1).code(), ErrorCode::Unsupported);
    }

    #[test]
    fn oversized_frame_is_fatal() {
        let mut d = FrameDecoder::new(100);
        d.push(&1000u32.to_be_bytes());
        assert!(matches!(
            d.next_message(),
            Err(WireError::TooLarge { len: 1000, .. })
        ));
        assert!(matches!(d.next_message(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn unknown_enum_values_survive() {
        let msg = Message::error(ErrorCode::Other(777), 5, "x");
        let frame = msg.encode();
        assert_eq!(Message::decode_payload(&frame[4..]), Ok(msg));
        assert_eq!(
            ErrorCode::from(u16::from(ErrorCode::SelfOffer)),
            ErrorCode::SelfOffer
        );
    }

    #[test]
    fn error_reason_is_invisible_to_old_peers_and_optional_from_them() {
        let new = Message::unauthorized(ErrorReason::TokenExpired, "token expired");
        let frame = new.encode();
        // An old peer decodes the version-1 body and ignores the trailing reason byte.
        let (old, rest): (ErrorBody, &[u8]) =
            postcard::take_from_bytes(&frame[LEN_PREFIX + HEADER_LEN..]).unwrap();
        assert_eq!(old.code, ErrorCode::Unauthorized);
        assert_eq!(old.message, "token expired");
        assert_eq!(rest, &[1u8]);
        // A frame from an old peer (no reason byte) decodes with `reason: None`.
        let old_frame = Message::error(ErrorCode::Unauthorized, 0, "x").encode();
        match Message::decode_payload(&old_frame[LEN_PREFIX..]) {
            Ok(Message::Error(e)) => assert_eq!(e.reason, None),
            other => panic!("{other:?}"),
        }
        for r in 0..=255u8 {
            assert_eq!(u8::from(ErrorReason::from(r)), r);
        }
    }

    #[test]
    fn candidate_kinds_keep_their_numbers() {
        for (k, v) in [
            (CandidateKind::Host, 0u8),
            (CandidateKind::ServerReflexive, 1),
            (CandidateKind::Predicted, 2),
            (CandidateKind::Relayed, 3),
            (CandidateKind::ServerReflexiveDependent, 4),
            (CandidateKind::Other(9), 9),
        ] {
            assert_eq!(u8::from(k), v);
            assert_eq!(CandidateKind::from(v), k);
        }
    }

    #[test]
    fn key_proof_needs_the_secret_and_the_session() {
        use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
        let client = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let client_pub = PeerKey::from(PublicKey::from(&client));
        let eph = EphemeralSecret::random_from_rng(rand::rngs::OsRng);
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let nonce = [7u8; 32];
        let exporter = [9u8; 32];
        let dh_client = client.diffie_hellman(&PublicKey::from(eph_pub)).to_bytes();
        let mac = key_proof(&dh_client, &exporter, &nonce, &client_pub, &eph_pub);
        let dh_server = eph
            .diffie_hellman(&PublicKey::from(client_pub.0))
            .to_bytes();
        assert!(verify_key_proof(
            &dh_server,
            &exporter,
            &nonce,
            &client_pub,
            &eph_pub,
            &mac
        ));
        // Another TLS session (exporter) or another key fails.
        assert!(!verify_key_proof(
            &dh_server,
            &[8u8; 32],
            &nonce,
            &client_pub,
            &eph_pub,
            &mac
        ));
        let other = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let forged = key_proof(
            &other.diffie_hellman(&PublicKey::from(eph_pub)).to_bytes(),
            &exporter,
            &nonce,
            &client_pub,
            &eph_pub,
        );
        assert!(!verify_key_proof(
            &dh_server,
            &exporter,
            &nonce,
            &client_pub,
            &eph_pub,
            &forged
        ));
    }

    #[test]
    fn peer_key_parses_wg_format() {
        let k = PeerKey([3; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<PeerKey>(), Ok(k));
        assert_eq!("abc".parse::<PeerKey>(), Err(BadKey));
    }
}
