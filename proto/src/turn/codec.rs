//! Zero-copy STUN/TURN codec helpers shared by the server core and the client
//! ([`crate::turn_client`]): header check, attribute walk, XOR addresses, Data/Send
//! indications, and the comprehension-required check.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

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

/// Comprehension-required attribute types in `packet` that this server does not implement.
pub(crate) fn unknown_required(packet: &[u8]) -> Vec<u16> {
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
    encode_peer_data_message(msgtype::DATA_INDICATION, txid, peer, payload, out)
}
