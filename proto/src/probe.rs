//! Peer probe format: authenticated, replay-proof UDP probes sent between peers while punching
//! and as keepalives, plus the first-byte demultiplexer of the client's one data socket.
//!
//! The data socket carries four kinds of datagrams, told apart by their first bytes
//! (the same idea as RFC 7983 §7):
//!
//! | first byte | what |
//! |---|---|
//! | `0x00..=0x03` with the magic cookie at 4..8 | STUN (RFC 8489 §6) |
//! | `0x01..=0x04` followed by three zero bytes | WireGuard message (types 1–4) |
//! | `0x40..=0x4F` | TURN ChannelData (RFC 8656 §12) |
//! | [`PROBE_MAGIC`] (`0xE1`) | meshpunch probe (this module) |
//!
//! A probe on the wire (all integers big-endian):
//!
//! ```text
//!  0      1        2      3       4..8     8..16     16..24        24..36   36..        last 16
//! magic  version  kind  reserved  key id   counter   unix time ms  tx id    [observed]  HMAC tag
//! ```
//!
//! `observed` is present in a pong only: one family byte (4 or 6), the port and the address
//! from which the answered ping was received.
//!
//! Path MTU probing (as Tailscale's disco does it) adds two kinds: a **sized ping** (kind 3)
//! carries after the header the total datagram length it was built to (2 bytes) and zero
//! padding up to that length, all inside the authenticated part, so the padding can neither
//! be stripped nor forged; a **sized pong** (kind 4) is a small pong (kind 2's `observed`)
//! followed by the 2-byte length of the sized ping it answers. A peer that predates these kinds
//! refuses them as malformed and never answers, which the MTU search reads as "unknown"; it
//! still answers plain pings, and it is never sent a sized pong (those only answer sized
//! pings). The version byte stays 1. The tag is HMAC-SHA256 truncated to 16 bytes over
//! everything before it, keyed with a per-sender key derived from the session secret the
//! rendezvous handed to both peers ([`ProbeKey::derive`]). Because each direction has its own
//! key, a probe reflected back to its sender fails authentication. The counter is checked
//! against a sliding [`ReplayWindow`] and the timestamp against a maximum clock skew, so a
//! captured probe can never be accepted twice.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First byte of every probe: outside STUN (0–3), WireGuard (1–4), DTLS (20–63),
/// ChannelData (64–79) and RTP (128–191) ranges of RFC 7983.
pub const PROBE_MAGIC: u8 = 0xE1;
/// Probe format version.
pub const PROBE_VERSION: u8 = 1;
/// Length of the fixed header before the optional observed address.
pub const HEADER_LEN: usize = 36;
/// Length of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;
/// Largest encoded unpadded probe (a sized pong carrying an IPv6 address).
pub const MAX_PROBE_LEN: usize = HEADER_LEN + 1 + 2 + 16 + 2 + TAG_LEN;
/// Smallest sized ping: header, length field, tag.
pub const MIN_SIZED_PING: usize = HEADER_LEN + 2 + TAG_LEN;
/// Largest sized ping (the largest UDP payload over IPv4).
pub const MAX_SIZED_PING: usize = 65_507;
/// Number of counters the replay window remembers below the highest one seen.
pub const REPLAY_WINDOW: u64 = 128;
/// Default largest accepted difference between the sender's and our clock (milliseconds).
pub const DEFAULT_MAX_SKEW_MS: u64 = 120_000;
/// STUN magic cookie (RFC 8489 §5).
/// Domain separation label of the probe key derivation.
const KDF_LABEL: &[u8] = b"meshpunch probe key v1";

type HmacSha256 = Hmac<Sha256>;

/// What a datagram arriving on the data socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// A STUN message (Binding response, TURN response or indication).
    Stun,
    /// A TURN ChannelData message.
    ChannelData,
    /// A meshpunch probe.
    Probe,
    /// A WireGuard message (handshake initiation/response, cookie reply, transport data).
    WireGuard,
    /// None of the above; dropped.
    Unknown,
}

/// Classifies a datagram by its first bytes. Never panics.
pub fn classify(bytes: &[u8]) -> PacketKind {
    let Some(&first) = bytes.first() else {
        return PacketKind::Unknown;
    };
    if bytes.len() >= 20
        && first & 0xC0 == 0
        && bytes.get(4..8) == Some(&crate::stun::MAGIC_COOKIE.to_be_bytes()[..])
    {
        return PacketKind::Stun;
    }
    if (1..=4).contains(&first) && bytes.len() >= 4 && bytes[1..4] == [0, 0, 0] {
        return PacketKind::WireGuard;
    }
    if (0x40..=0x4F).contains(&first) && bytes.len() >= 4 {
        return PacketKind::ChannelData;
    }
    if first == PROBE_MAGIC && bytes.len() >= HEADER_LEN + TAG_LEN {
        return PacketKind::Probe;
    }
    PacketKind::Unknown
}

/// Transaction id of a ping, echoed by its pong.
pub type TxId = [u8; 12];

/// The body of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeBody {
    /// A request: "are you there, and how long does it take?"
    Ping {
        /// Random transaction id the pong echoes.
        tx: TxId,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's transaction id.
        tx: TxId,
        /// The address the ping arrived from (the sender's mapping as the peer sees it).
        observed: SocketAddr,
    },
    /// A path MTU probe: a ping padded to `size` bytes in all (clamped to
    /// [`MIN_SIZED_PING`]..=[`MAX_SIZED_PING`]). Decoded, `size` is the length received.
    SizedPing {
        /// Random transaction id the pong echoes.
        tx: TxId,
        /// Total datagram length.
        size: u16,
    },
    /// The answer to a sized ping: small, it reports the size it answers.
    SizedPong {
        /// The ping's transaction id.
        tx: TxId,
        /// The address the ping arrived from.
        observed: SocketAddr,
        /// The length of the sized ping received.
        size: u16,
    },
}

impl ProbeBody {
    /// The transaction id of the ping or pong.
    pub fn tx(&self) -> TxId {
        match self {
            ProbeBody::Ping { tx }
            | ProbeBody::Pong { tx, .. }
            | ProbeBody::SizedPing { tx, .. }
            | ProbeBody::SizedPong { tx, .. } => *tx,
        }
    }
    fn kind_byte(&self) -> u8 {
        match self {
            ProbeBody::Ping { .. } => 1,
            ProbeBody::Pong { .. } => 2,
            ProbeBody::SizedPing { .. } => 3,
            ProbeBody::SizedPong { .. } => 4,
        }
    }
}

fn put_addr(out: &mut Vec<u8>, observed: &SocketAddr) {
    match observed.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&observed.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&observed.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// Parses `family, port, address` (exactly) into a socket address.
fn get_addr(rest: &[u8]) -> Option<SocketAddr> {
    match rest {
        [4, p0, p1, a @ ..] if a.len() == 4 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            u16::from_be_bytes([*p0, *p1]),
        )),
        [6, p0, p1, a @ ..] if a.len() == 16 => {
            let oct: [u8; 16] = a.try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(oct)),
                u16::from_be_bytes([*p0, *p1]),
            ))
        }
        _ => None,
    }
}

/// A decoded, authenticated probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Key id of the sender.
    pub key_id: u32,
    /// Sender's per-key counter.
    pub counter: u64,
    /// Sender's unix time in milliseconds when it sent the probe.
    pub timestamp_ms: u64,
    /// Ping or pong.
    pub body: ProbeBody,
}

/// Why a probe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// Too short, wrong magic, version, kind or length.
    #[error("malformed probe")]
    Malformed,
    /// The key id belongs to no session we know.
    #[error("unknown probe key id {0:#010x}")]
    UnknownKey(u32),
    /// The HMAC tag does not match.
    #[error("probe authentication failed")]
    BadTag,
    /// The counter was seen before or fell out of the replay window.
    #[error("replayed probe (counter {0})")]
    Replayed(u64),
    /// The timestamp is further from our clock than the allowed skew.
    #[error("probe timestamp off by more than the allowed skew")]
    Stale,
}

/// A per-sender probe key: the HMAC key and its public 32-bit id.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeKey {
    key: [u8; 32],
    id: u32,
}

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeKey")
            .field("id", &format_args!("{:#010x}", self.id))
            .finish_non_exhaustive()
    }
}

impl ProbeKey {
    /// Derives the key with which the holder of `sender_public_key` signs its probes in the
    /// session with `session_secret`: `HMAC-SHA256(secret, label || sender_public_key)`.
    /// The id is the first four bytes of `HMAC-SHA256(key, "id")`.
    pub fn derive(session_secret: &[u8; 32], sender_public_key: &[u8; 32]) -> Self {
        let key: [u8; 32] = hmac_parts(session_secret, &[KDF_LABEL, sender_public_key]);
        let idb = hmac_parts(&key, &[b"id"]);
        let id = u32::from_be_bytes([idb[0], idb[1], idb[2], idb[3]]);
        ProbeKey { key, id }
    }

    /// The key id carried in each probe signed with this key.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this never fails; fall back to an empty key
        // rather than panic.
        HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()))
    }
}

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Reads the key id of a probe without authenticating it (to find the session).
pub fn peek_key_id(bytes: &[u8]) -> Result<u32, ProbeError> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes[0] != PROBE_MAGIC || bytes[1] != PROBE_VERSION {
        return Err(ProbeError::Malformed);
    }
    Ok(u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]))
}

/// Encodes and signs a probe into `out` (cleared first). Returns the encoded length.
pub fn encode(
    key: &ProbeKey,
    counter: u64,
    timestamp_ms: u64,
    body: &ProbeBody,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    out.extend_from_slice(&[PROBE_MAGIC, PROBE_VERSION, body.kind_byte(), 0]);
    out.extend_from_slice(&key.id.to_be_bytes());
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(&body.tx());
    match body {
        ProbeBody::Ping { .. } => {}
        ProbeBody::Pong { observed, .. } => put_addr(out, observed),
        ProbeBody::SizedPong { observed, size, .. } => {
            put_addr(out, observed);
            out.extend_from_slice(&size.to_be_bytes());
        }
        ProbeBody::SizedPing { size, .. } => {
            let total = usize::from(*size).clamp(MIN_SIZED_PING, MAX_SIZED_PING);
            out.extend_from_slice(&(total as u16).to_be_bytes());
            out.resize(total - TAG_LEN, 0);
        }
    }
    let mut mac = key.mac();
    mac.update(out);
    let tag = mac.finalize().into_bytes();
    out.extend_from_slice(&tag[..TAG_LEN]);
    out.len()
}

/// Decodes a probe and checks its tag with `key`. Does not check replay or time: see
/// [`ProbeReceiver`].
pub fn decode(key: &ProbeKey, bytes: &[u8]) -> Result<Probe, ProbeError> {
    let key_id = peek_key_id(bytes)?;
    if key_id != key.id {
        return Err(ProbeError::UnknownKey(key_id));
    }
    let body_len = bytes.len() - TAG_LEN;
    let (signed, tag) = bytes.split_at(body_len);
    let mut mac = key.mac();
    mac.update(signed);
    mac.verify_truncated_left(tag)
        .map_err(|_| ProbeError::BadTag)?;
    let counter = u64::from_be_bytes(
        signed[8..16]
            .try_into()
            .map_err(|_| ProbeError::Malformed)?,
    );
    let timestamp_ms = u64::from_be_bytes(
        signed[16..24]
            .try_into()
            .map_err(|_| ProbeError::Malformed)?,
    );
    let tx: TxId = signed[24..36]
        .try_into()
        .map_err(|_| ProbeError::Malformed)?;
    let rest = &signed[HEADER_LEN..];
    let body = match (signed[2], rest) {
        (1, []) => ProbeBody::Ping { tx },
        (2, rest) => ProbeBody::Pong {
            tx,
            observed: get_addr(rest).ok_or(ProbeError::Malformed)?,
        },
        (3, [l0, l1, pad @ ..]) => {
            // The declared length must be the received length: a ping cut short on the way
            // (or re-padded) is refused even before the tag would fail.
            let size = u16::from_be_bytes([*l0, *l1]);
            if usize::from(size) != bytes.len() || pad.iter().any(|b| *b != 0) {
                return Err(ProbeError::Malformed);
            }
            ProbeBody::SizedPing { tx, size }
        }
        (4, rest) if rest.len() >= 2 => {
            let (a, l) = rest.split_at(rest.len() - 2);
            ProbeBody::SizedPong {
                tx,
                observed: get_addr(a).ok_or(ProbeError::Malformed)?,
                size: u16::from_be_bytes([l[0], l[1]]),
            }
        }
        _ => return Err(ProbeError::Malformed),
    };
    Ok(Probe {
        key_id,
        counter,
        timestamp_ms,
        body,
    })
}

/// Sliding anti-replay window over 64-bit counters (as in RFC 6479 / WireGuard): accepts each
/// counter at most once, and nothing more than [`REPLAY_WINDOW`] below the highest seen.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest counter accepted plus one (0 = nothing accepted yet).
    top: u64,
    /// Bit i set = counter `top - 1 - i` was accepted.
    bits: u128,
}

impl ReplayWindow {
    /// Whether `counter` would be accepted (no state change).
    pub fn check(&self, counter: u64) -> bool {
        if counter == u64::MAX {
            return false;
        }
        if counter >= self.top {
            return true;
        }
        let back = self.top - 1 - counter;
        back < REPLAY_WINDOW && self.bits & (1u128 << back) == 0
    }

    /// Records `counter` as seen; call only after [`check`](Self::check) and authentication.
    pub fn update(&mut self, counter: u64) {
        if counter == u64::MAX {
            return;
        }
        if counter >= self.top {
            let shift = counter + 1 - self.top;
            self.bits = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = counter + 1;
        } else {
            let back = self.top - 1 - counter;
            if back < REPLAY_WINDOW {
                self.bits |= 1u128 << back;
            }
        }
    }
}

/// Signs outgoing probes with one key and a strictly increasing counter.
#[derive(Debug, Clone)]
pub struct ProbeSender {
    key: ProbeKey,
    counter: u64,
}

impl ProbeSender {
    /// A sender with the given key, counting from 0.
    pub fn new(key: ProbeKey) -> Self {
        ProbeSender { key, counter: 0 }
    }
    /// A sender whose counter starts at `counter` (e.g. derived from the wall clock, so a
    /// restarted daemon that re-derives the same key is not taken for a replay).
    pub fn with_counter(key: ProbeKey, counter: u64) -> Self {
        ProbeSender { key, counter }
    }
    /// The key id of this sender.
    pub fn key_id(&self) -> u32 {
        self.key.id
    }
    /// Encodes `body` into `out` with the next counter.
    pub fn seal(&mut self, now_unix_ms: u64, body: &ProbeBody, out: &mut Vec<u8>) -> usize {
        let c = self.counter;
        self.counter = self.counter.saturating_add(1);
        encode(&self.key, c, now_unix_ms, body, out)
    }
}

/// Authenticates incoming probes from one peer: tag, replay window and clock skew.
#[derive(Debug, Clone)]
pub struct ProbeReceiver {
    key: ProbeKey,
    window: ReplayWindow,
    max_skew_ms: u64,
}

impl ProbeReceiver {
    /// A receiver for probes signed with `key`, accepting [`DEFAULT_MAX_SKEW_MS`] of skew.
    pub fn new(key: ProbeKey) -> Self {
        ProbeReceiver {
            key,
            window: ReplayWindow::default(),
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
        }
    }
    /// Changes the accepted clock skew.
    pub fn with_max_skew_ms(mut self, ms: u64) -> Self {
        self.max_skew_ms = ms;
        self
    }
    /// The key id this receiver accepts.
    pub fn key_id(&self) -> u32 {
        self.key.id
    }
    /// Authenticates `bytes`; on success the counter is consumed and can never be accepted
    /// again.
    pub fn open(&mut self, now_unix_ms: u64, bytes: &[u8]) -> Result<Probe, ProbeError> {
        let p = decode(&self.key, bytes)?;
        if !self.window.check(p.counter) {
            return Err(ProbeError::Replayed(p.counter));
        }
        if now_unix_ms.abs_diff(p.timestamp_ms) > self.max_skew_ms {
            return Err(ProbeError::Stale);
        }
        self.window.update(p.counter);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> (ProbeKey, ProbeKey) {
        let secret = [7u8; 32];
        (
            ProbeKey::derive(&secret, &[1u8; 32]),
            ProbeKey::derive(&secret, &[2u8; 32]),
        )
    }

    #[test]
    fn ping_and_pong_round_trip() {
        let (a, _) = keys();
        let mut s = ProbeSender::new(a.clone());
        let mut r = ProbeReceiver::new(a);
        let mut buf = Vec::new();
        let ping = ProbeBody::Ping { tx: [9; 12] };
        s.seal(1000, &ping, &mut buf);
        assert_eq!(classify(&buf), PacketKind::Probe);
        assert_eq!(r.open(1000, &buf).map(|p| p.body), Ok(ping));
        for observed in ["1.2.3.4:5", "[2001:db8::1]:65535"] {
            let pong = ProbeBody::Pong {
                tx: [3; 12],
                observed: observed.parse().unwrap_or_else(|_| unreachable!()),
            };
            let n = s.seal(1001, &pong, &mut buf);
            assert!(n <= MAX_PROBE_LEN);
            assert_eq!(r.open(1001, &buf).map(|p| p.body), Ok(pong));
        }
    }

    #[test]
    fn sized_ping_is_padded_to_its_size_and_pong_reports_it() {
        let (a, _) = keys();
        let mut s = ProbeSender::new(a.clone());
        let mut r = ProbeReceiver::new(a);
        let mut buf = Vec::new();
        for size in [1452u16, 1280, 60, MIN_SIZED_PING as u16] {
            let n = s.seal(7, &ProbeBody::SizedPing { tx: [1; 12], size }, &mut buf);
            assert_eq!(n, usize::from(size));
            assert_eq!(classify(&buf), PacketKind::Probe);
            assert_eq!(
                r.open(7, &buf).map(|p| p.body),
                Ok(ProbeBody::SizedPing { tx: [1; 12], size })
            );
        }
        // Too small a request is clamped to the smallest sized ping.
        let n = s.seal(
            7,
            &ProbeBody::SizedPing {
                tx: [1; 12],
                size: 3,
            },
            &mut buf,
        );
        assert_eq!(n, MIN_SIZED_PING);
        let pong = ProbeBody::SizedPong {
            tx: [1; 12],
            observed: "[2001:db8::1]:9".parse().unwrap_or_else(|_| unreachable!()),
            size: 1452,
        };
        let n = s.seal(8, &pong, &mut buf);
        assert!(n <= MAX_PROBE_LEN);
        assert_eq!(r.open(8, &buf).map(|p| p.body), Ok(pong));
    }

    #[test]
    fn sized_ping_cut_short_or_padded_out_is_refused() {
        let (a, _) = keys();
        let mut buf = Vec::new();
        encode(
            &a,
            0,
            0,
            &ProbeBody::SizedPing {
                tx: [0; 12],
                size: 1000,
            },
            &mut buf,
        );
        // Strip 100 bytes of padding and re-append the tag: the length field disagrees.
        let tag = buf[buf.len() - TAG_LEN..].to_vec();
        let mut short = buf[..buf.len() - TAG_LEN - 100].to_vec();
        short.extend_from_slice(&tag);
        assert_eq!(decode(&a, &short), Err(ProbeError::BadTag));
        let mut long = buf.clone();
        long.insert(HEADER_LEN + 2, 0);
        assert!(decode(&a, &long).is_err());
    }

    #[test]
    fn replayed_probe_is_refused() {
        let (a, _) = keys();
        let mut s = ProbeSender::new(a.clone());
        let mut r = ProbeReceiver::new(a);
        let mut buf = Vec::new();
        s.seal(5, &ProbeBody::Ping { tx: [0; 12] }, &mut buf);
        assert!(r.open(5, &buf).is_ok());
        assert_eq!(r.open(5, &buf), Err(ProbeError::Replayed(0)));
    }

    #[test]
    fn reflected_probe_fails_with_other_direction_key() {
        let (a, b) = keys();
        assert_ne!(a.id(), b.id());
        let mut buf = Vec::new();
        encode(&a, 0, 0, &ProbeBody::Ping { tx: [0; 12] }, &mut buf);
        assert_eq!(decode(&b, &buf), Err(ProbeError::UnknownKey(a.id())));
    }

    #[test]
    fn tampered_probe_fails_tag() {
        let (a, _) = keys();
        let mut buf = Vec::new();
        encode(&a, 0, 0, &ProbeBody::Ping { tx: [0; 12] }, &mut buf);
        buf[30] ^= 1;
        assert_eq!(decode(&a, &buf), Err(ProbeError::BadTag));
    }

    #[test]
    fn stale_probe_is_refused() {
        let (a, _) = keys();
        let mut s = ProbeSender::new(a.clone());
        let mut r = ProbeReceiver::new(a).with_max_skew_ms(1000);
        let mut buf = Vec::new();
        s.seal(0, &ProbeBody::Ping { tx: [0; 12] }, &mut buf);
        assert_eq!(r.open(5000, &buf), Err(ProbeError::Stale));
    }

    #[test]
    fn classify_tells_apart_wireguard_stun_channeldata() {
        assert_eq!(classify(&[1, 0, 0, 0, 9, 9]), PacketKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), PacketKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), PacketKind::Unknown);
        let mut stun = vec![0x01, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        stun.resize(20, 0);
        assert_eq!(classify(&stun), PacketKind::Stun);
        assert_eq!(
            classify(&[0x40, 0x01, 0, 4, 1, 2, 3, 4]),
            PacketKind::ChannelData
        );
        assert_eq!(classify(&[]), PacketKind::Unknown);
    }

    #[test]
    fn replay_window_accepts_out_of_order_within_window() {
        let mut w = ReplayWindow::default();
        for c in [5u64, 3, 4, 200, 100, 73] {
            assert!(w.check(c), "{c}");
            w.update(c);
        }
        assert!(!w.check(5)); // fell out of the window
        assert!(!w.check(100));
        assert!(!w.check(72)); // 200 - 72 = 128 > window
        assert!(w.check(150));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let (a, _) = keys();
            let _ = classify(&bytes);
            let _ = peek_key_id(&bytes);
            let _ = decode(&a, &bytes);
            let mut r = ProbeReceiver::new(a);
            let _ = r.open(0, &bytes);
        }

        #[test]
        fn encode_decode_round_trip(counter in any::<u64>(), ts in any::<u64>(), tx in any::<[u8; 12]>(),
                                    pong in any::<bool>(), v6 in any::<bool>(), port in any::<u16>(), oct in any::<[u8; 16]>(),
                                    size in any::<u16>()) {
            let (a, _) = keys();
            let observed = if v6 {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(oct)), port)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(oct[0], oct[1], oct[2], oct[3])), port)
            };
            let body = match (pong, size % 3) {
                (true, 0) => ProbeBody::Pong { tx, observed },
                (true, _) => ProbeBody::SizedPong { tx, observed, size },
                (false, 0) => ProbeBody::Ping { tx },
                (false, _) => ProbeBody::SizedPing { tx, size: size.clamp(MIN_SIZED_PING as u16, 3000) },
            };
            let mut buf = Vec::new();
            encode(&a, counter, ts, &body, &mut buf);
            prop_assert_eq!(classify(&buf), PacketKind::Probe);
            let p = decode(&a, &buf);
            prop_assert_eq!(p, Ok(Probe { key_id: a.id(), counter, timestamp_ms: ts, body }));
        }

        #[test]
        fn any_bit_flip_is_detected(flip in 0usize..52, bit in 0u8..8) {
            let (a, _) = keys();
            let mut buf = Vec::new();
            encode(&a, 1, 2, &ProbeBody::Ping { tx: [4; 12] }, &mut buf);
            buf[flip] ^= 1 << bit;
            prop_assert!(decode(&a, &buf).is_err());
        }

        #[test]
        fn replay_window_never_accepts_twice(seq in proptest::collection::vec(0u64..400, 1..200)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            for c in seq {
                if w.check(c) {
                    prop_assert!(seen.insert(c));
                    w.update(c);
                }
            }
        }
    }
}
