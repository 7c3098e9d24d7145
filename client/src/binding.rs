//! STUN Binding requests and responses as the client needs them (RFC 8489 §6, RFC 5780 §7):
//! a request with an optional CHANGE-REQUEST, and a response reduced to the addresses it
//! carries. Bounds-checked; never panics on hostile bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_RESPONSE_ORIGIN: u16 = 0x802B;
const ATTR_OTHER_ADDRESS: u16 = 0x802C;
/// CHANGE-REQUEST flag "change IP" (RFC 5780 §7.2).
const CHANGE_IP: u32 = 0x04;
/// CHANGE-REQUEST flag "change port" (RFC 5780 §7.2).
const CHANGE_PORT: u32 = 0x02;

/// A Binding request with transaction id `tx`; `change` = (change IP, change port).
pub fn request(tx: [u8; 12], change: Option<(bool, bool)>) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    let len: u16 = if change.is_some() { 8 } else { 0 };
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    v.extend_from_slice(&tx);
    if let Some((ip, port)) = change {
        let mut flags = 0u32;
        if ip {
            flags |= CHANGE_IP;
        }
        if port {
            flags |= CHANGE_PORT;
        }
        v.extend_from_slice(&ATTR_CHANGE_REQUEST.to_be_bytes());
        v.extend_from_slice(&4u16.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// The interesting parts of a Binding response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Transaction id.
    pub tx: [u8; 12],
    /// XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS).
    pub mapped: Option<SocketAddr>,
    /// OTHER-ADDRESS: the server's alternate address (RFC 5780).
    pub other: Option<SocketAddr>,
    /// RESPONSE-ORIGIN.
    pub origin: Option<SocketAddr>,
    /// ERROR-CODE of an error response (e.g. 420 when CHANGE-REQUEST is unsupported).
    pub error: Option<u16>,
}

fn header(bytes: &[u8]) -> Option<(u16, usize, [u8; 12])> {
    if bytes.len() < 20 {
        return None;
    }
    let ty = u16::from_be_bytes([bytes[0], bytes[1]]);
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != MAGIC_COOKIE {
        return None;
    }
    if bytes.len() < 20 + len {
        return None;
    }
    let tx: [u8; 12] = bytes[8..20].try_into().ok()?;
    Some((ty, len, tx))
}

/// The transaction id of a Binding *request* (used by the hairpin test, which receives its
/// own request back).
pub fn request_tx(bytes: &[u8]) -> Option<[u8; 12]> {
    match header(bytes)? {
        (BINDING_REQUEST, _, tx) => Some(tx),
        _ => None,
    }
}

/// The transaction id of any STUN message (to match it against pending transactions).
pub fn any_tx(bytes: &[u8]) -> Option<[u8; 12]> {
    header(bytes).map(|h| h.2)
}

fn parse_addr(v: &[u8], xor: Option<&[u8; 12]>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let family = v[1];
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match family {
        1 if v.len() >= 8 => {
            let mut a = [v[4], v[5], v[6], v[7]];
            if xor.is_some() {
                for (b, c) in a.iter_mut().zip(cookie) {
                    *b ^= c;
                }
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        2 if v.len() >= 20 => {
            let mut a: [u8; 16] = v[4..20].try_into().ok()?;
            if let Some(tx) = xor {
                let mut k = [0u8; 16];
                k[..4].copy_from_slice(&cookie);
                k[4..].copy_from_slice(tx);
                for (b, c) in a.iter_mut().zip(k) {
                    *b ^= c;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => None,
    }
}

/// Parses a Binding success or error response.
pub fn parse_response(bytes: &[u8]) -> Option<Response> {
    let (ty, len, tx) = header(bytes)?;
    if ty != BINDING_SUCCESS && ty != BINDING_ERROR {
        return None;
    }
    let mut r = Response {
        tx,
        mapped: None,
        other: None,
        origin: None,
        error: None,
    };
    let mut attrs = &bytes[20..20 + len];
    let mut plain_mapped = None;
    while attrs.len() >= 4 {
        let at = u16::from_be_bytes([attrs[0], attrs[1]]);
        let al = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let Some(v) = attrs.get(4..4 + al) else {
            break;
        };
        match at {
            ATTR_XOR_MAPPED_ADDRESS => r.mapped = parse_addr(v, Some(&tx)),
            ATTR_MAPPED_ADDRESS => plain_mapped = parse_addr(v, None),
            ATTR_OTHER_ADDRESS => r.other = parse_addr(v, None),
            ATTR_RESPONSE_ORIGIN => r.origin = parse_addr(v, None),
            ATTR_ERROR_CODE if v.len() >= 4 => {
                r.error = Some(u16::from(v[2] & 0x07) * 100 + u16::from(v[3]));
            }
            _ => {}
        }
        let padded = (al + 3) & !3;
        attrs = attrs.get(4 + padded..).unwrap_or_default();
    }
    if r.mapped.is_none() {
        r.mapped = plain_mapped;
    }
    if ty == BINDING_ERROR && r.error.is_none() {
        r.error = Some(0);
    }
    Some(r)
}

/// A random transaction id.
pub fn new_tx() -> [u8; 12] {
    let mut t = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut t);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc5769_ipv4_response() {
        // RFC 5769 §2.2 sample IPv4 response (mapped 192.0.2.1:32853).
        let mut b = hex::decode("0101003c2112a442b7e7a701bc34d686fa87dfae").unwrap();
        b.extend(hex::decode("8022000b7465737420766563746f7220").unwrap());
        b.extend(hex::decode("002000080001a147e112a643").unwrap());
        b.extend(hex::decode("000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7").unwrap());
        b.extend(hex::decode("80280004c07d4c96").unwrap());
        let r = parse_response(&b).unwrap();
        assert_eq!(r.mapped, Some("192.0.2.1:32853".parse().unwrap()));
        assert_eq!(r.error, None);
    }

    #[test]
    fn request_has_change_request() {
        let tx = [3u8; 12];
        let r = request(tx, Some((true, true)));
        assert_eq!(r.len(), 28);
        assert_eq!(request_tx(&r), Some(tx));
        assert_eq!(&r[20..28], &[0, 3, 0, 4, 0, 0, 0, 6]);
        assert!(parse_response(&r).is_none());
    }

    #[test]
    fn hostile_bytes_never_panic() {
        for n in 0..64 {
            let mut b = vec![0x01, 0x01, 0, 44, 0x21, 0x12, 0xA4, 0x42];
            b.resize(20 + n, 0xFF);
            let _ = parse_response(&b);
        }
    }
}
