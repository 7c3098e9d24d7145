//! PCP (RFC 6887) messages: the ANNOUNCE and MAP requests and their responses. Only what a
//! client mapping its own UDP port needs (no PEER opcode, no THIRD_PARTY option); options in
//! a response are skipped with their lengths checked. Arbitrary bytes give a [`PcpError`],
//! never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// PCP version (RFC 6887 §7).
pub const VERSION: u8 = 2;
/// ANNOUNCE opcode (RFC 6887 §14.1).
pub const OP_ANNOUNCE: u8 = 0;
/// MAP opcode (RFC 6887 §11).
pub const OP_MAP: u8 = 1;
/// The R bit: set in responses (RFC 6887 §7.2).
pub const RESPONSE_BIT: u8 = 0x80;
/// Length of the common header (RFC 6887 §7.1, §7.2).
pub const HEADER_LEN: usize = 24;
/// Length of the MAP opcode-specific data (RFC 6887 §11.1).
pub const MAP_LEN: usize = 36;
/// Largest PCP message (RFC 6887 §7).
pub const MAX_LEN: usize = 1100;
/// IANA protocol number of UDP, the only protocol we map.
pub const PROTO_UDP: u8 = 17;

/// A MAP nonce (RFC 6887 §11.1): 96 random bits tying responses to our request.
pub type Nonce = [u8; 12];

/// Result codes (RFC 6887 §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    /// 0 SUCCESS.
    Success,
    /// 1 UNSUPP_VERSION (a NAT-PMP-only gateway answers this way too, in NAT-PMP format).
    UnsupportedVersion,
    /// 2 NOT_AUTHORIZED.
    NotAuthorized,
    /// 3 MALFORMED_REQUEST.
    MalformedRequest,
    /// 4 UNSUPP_OPCODE.
    UnsupportedOpcode,
    /// 5 UNSUPP_OPTION.
    UnsupportedOption,
    /// 6 MALFORMED_OPTION.
    MalformedOption,
    /// 7 NETWORK_FAILURE.
    NetworkFailure,
    /// 8 NO_RESOURCES.
    NoResources,
    /// 9 UNSUPP_PROTOCOL.
    UnsupportedProtocol,
    /// 10 USER_EX_QUOTA.
    UserExceededQuota,
    /// 11 CANNOT_PROVIDE_EXTERNAL.
    CannotProvideExternal,
    /// 12 ADDRESS_MISMATCH (the client address field is not the source the server saw).
    AddressMismatch,
    /// 13 EXCESSIVE_REMOTE_PEERS.
    ExcessiveRemotePeers,
    /// Any other value.
    Other(u8),
}

impl ResultCode {
    /// The code from its wire value.
    pub fn from_u8(v: u8) -> Self {
        use ResultCode::*;
        match v {
            0 => Success,
            1 => UnsupportedVersion,
            2 => NotAuthorized,
            3 => MalformedRequest,
            4 => UnsupportedOpcode,
            5 => UnsupportedOption,
            6 => MalformedOption,
            7 => NetworkFailure,
            8 => NoResources,
            9 => UnsupportedProtocol,
            10 => UserExceededQuota,
            11 => CannotProvideExternal,
            12 => AddressMismatch,
            13 => ExcessiveRemotePeers,
            v => Other(v),
        }
    }

    /// The wire value.
    pub fn to_u8(self) -> u8 {
        use ResultCode::*;
        match self {
            Success => 0,
            UnsupportedVersion => 1,
            NotAuthorized => 2,
            MalformedRequest => 3,
            UnsupportedOpcode => 4,
            UnsupportedOption => 5,
            MalformedOption => 6,
            NetworkFailure => 7,
            NoResources => 8,
            UnsupportedProtocol => 9,
            UserExceededQuota => 10,
            CannotProvideExternal => 11,
            AddressMismatch => 12,
            ExcessiveRemotePeers => 13,
            Other(v) => v,
        }
    }
}

/// Why a datagram is not a PCP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PcpError {
    /// Fewer bytes than the message needs.
    #[error("PCP message too short: {0} bytes")]
    TooShort(usize),
    /// Longer than 1100 bytes or not a multiple of 4 (RFC 6887 §7).
    #[error("PCP message length {0} is not a multiple of 4 up to 1100")]
    Length(usize),
    /// Not version 2.
    #[error("PCP version {0} (expected 2)")]
    Version(u8),
    /// A request (R bit clear).
    #[error("PCP request, not a response")]
    NotResponse,
    /// An opcode we never send.
    #[error("PCP opcode {0} is not one we use")]
    Opcode(u8),
    /// An option's length runs past the end of the message.
    #[error("PCP option runs past the end of the message")]
    Option,
}

/// The MAP-specific part of a response (RFC 6887 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapData {
    /// The nonce of the request answered.
    pub nonce: Nonce,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub internal_port: u16,
    /// External port assigned.
    pub external_port: u16,
    /// External address assigned (IPv4 addresses are un-mapped from `::ffff:a.b.c.d`).
    pub external_ip: IpAddr,
}

/// A parsed PCP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The opcode answered.
    pub opcode: u8,
    /// Result code.
    pub result: ResultCode,
    /// Lifetime granted, seconds (on errors: how long the error is likely to last).
    pub lifetime: u32,
    /// Seconds since the server's mapping state was initialised (RFC 6887 §8.5).
    pub epoch: u32,
    /// The MAP data (MAP responses of full length only).
    pub map: Option<MapData>,
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn header(opcode: u8, lifetime: u32, client: IpAddr) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0] = VERSION;
    b[1] = opcode & !RESPONSE_BIT;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&ip16(client));
    b
}

/// An ANNOUNCE request (RFC 6887 §14.1): asks whether a PCP server is there, maps nothing.
pub fn announce_request(client: IpAddr) -> [u8; HEADER_LEN] {
    header(OP_ANNOUNCE, 0, client)
}

/// A MAP request for UDP `internal_port` of `client` (RFC 6887 §11.1), suggesting the same
/// external port and any external address. `lifetime` 0 deletes the mapping (same nonce).
pub fn map_request(
    client: IpAddr,
    nonce: Nonce,
    internal_port: u16,
    suggested_external: u16,
    lifetime: u32,
) -> [u8; HEADER_LEN + MAP_LEN] {
    let mut b = [0u8; HEADER_LEN + MAP_LEN];
    b[..HEADER_LEN].copy_from_slice(&header(OP_MAP, lifetime, client));
    let m = &mut b[HEADER_LEN..];
    m[..12].copy_from_slice(&nonce);
    m[12] = PROTO_UDP;
    m[16..18].copy_from_slice(&internal_port.to_be_bytes());
    m[18..20].copy_from_slice(&suggested_external.to_be_bytes());
    // Suggested external address: "any" of the client's family (RFC 6887 §11.1).
    let any = match client {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    m[20..36].copy_from_slice(&ip16(any));
    b
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ip_from16(b: &[u8]) -> Option<IpAddr> {
    let a: [u8; 16] = b.try_into().ok()?;
    let v6 = Ipv6Addr::from(a);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// Parses a PCP response.
pub fn parse_response(b: &[u8]) -> Result<Response, PcpError> {
    let n = b.len();
    if n < HEADER_LEN {
        return Err(PcpError::TooShort(n));
    }
    if n > MAX_LEN || !n.is_multiple_of(4) {
        return Err(PcpError::Length(n));
    }
    let version = b.first().copied().ok_or(PcpError::TooShort(n))?;
    if version != VERSION {
        return Err(PcpError::Version(version));
    }
    let op = b.get(1).copied().ok_or(PcpError::TooShort(n))?;
    if op & RESPONSE_BIT == 0 {
        return Err(PcpError::NotResponse);
    }
    let opcode = op & !RESPONSE_BIT;
    let result = ResultCode::from_u8(b.get(3).copied().ok_or(PcpError::TooShort(n))?);
    let lifetime = be32(b, 4).ok_or(PcpError::TooShort(n))?;
    let epoch = be32(b, 8).ok_or(PcpError::TooShort(n))?;
    let body = b.get(HEADER_LEN..).ok_or(PcpError::TooShort(n))?;
    let (map, options) = match opcode {
        OP_ANNOUNCE => (None, body),
        OP_MAP if body.len() >= MAP_LEN => {
            let nonce: Nonce = body
                .get(..12)
                .and_then(|s| s.try_into().ok())
                .ok_or(PcpError::TooShort(n))?;
            let map = MapData {
                nonce,
                protocol: body.get(12).copied().ok_or(PcpError::TooShort(n))?,
                internal_port: be16(body, 16).ok_or(PcpError::TooShort(n))?,
                external_port: be16(body, 18).ok_or(PcpError::TooShort(n))?,
                external_ip: body
                    .get(20..36)
                    .and_then(ip_from16)
                    .ok_or(PcpError::TooShort(n))?,
            };
            (Some(map), body.get(MAP_LEN..).unwrap_or_default())
        }
        // An error answer may omit the opcode data (RFC 6887 §7.2 copies what it can).
        OP_MAP if result != ResultCode::Success => (None, &[][..]),
        OP_MAP => return Err(PcpError::TooShort(n)),
        _ => return Err(PcpError::Opcode(opcode)),
    };
    // Options (RFC 6887 §7.3): code, reserved, 16-bit length, data padded to 4 bytes.
    let mut rest = options;
    while !rest.is_empty() {
        let len = usize::from(be16(rest, 2).ok_or(PcpError::Option)?);
        let padded = 4 + len.div_ceil(4) * 4;
        rest = rest.get(padded..).ok_or(PcpError::Option)?;
    }
    Ok(Response {
        opcode,
        result,
        lifetime,
        epoch,
        map,
    })
}

/// Encodes a response (used by tests and the simulated gateway).
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0] = VERSION;
    b[1] = RESPONSE_BIT | r.opcode;
    b[3] = r.result.to_u8();
    b[4..8].copy_from_slice(&r.lifetime.to_be_bytes());
    b[8..12].copy_from_slice(&r.epoch.to_be_bytes());
    if let Some(m) = &r.map {
        let mut d = [0u8; MAP_LEN];
        d[..12].copy_from_slice(&m.nonce);
        d[12] = m.protocol;
        d[16..18].copy_from_slice(&m.internal_port.to_be_bytes());
        d[18..20].copy_from_slice(&m.external_port.to_be_bytes());
        d[20..36].copy_from_slice(&ip16(m.external_ip));
        b.extend_from_slice(&d);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_map_request_has_the_rfc_6887_layout() {
        let client: IpAddr = "192.168.1.10".parse().unwrap_or_else(|_| unreachable!());
        let b = map_request(client, [7; 12], 41641, 41641, 7200);
        assert_eq!(b.len(), 60);
        assert_eq!(&b[..4], &[2, 1, 0, 0]);
        assert_eq!(&b[4..8], &7200u32.to_be_bytes());
        assert_eq!(&b[8..24], &ip16(client));
        assert_eq!(&b[20..24], &[192, 168, 1, 10]);
        assert_eq!(&b[24..36], &[7; 12]);
        assert_eq!(b[36], 17);
        assert_eq!(&b[40..44], &[0xa2, 0xa9, 0xa2, 0xa9]);
        // Suggested external address: ::ffff:0.0.0.0.
        assert_eq!(&b[44..60], &ip16(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        assert_eq!(announce_request(client)[1], OP_ANNOUNCE);
    }

    #[test]
    fn bad_lengths_versions_requests_and_options_are_refused() {
        assert_eq!(parse_response(&[2; 10]), Err(PcpError::TooShort(10)));
        assert_eq!(parse_response(&[2; 26]), Err(PcpError::Length(26)));
        assert_eq!(parse_response(&[2; 1104]), Err(PcpError::Length(1104)));
        let mut a = vec![0u8; 24];
        a[0] = 1;
        assert_eq!(parse_response(&a), Err(PcpError::Version(1)));
        a[0] = 2;
        assert_eq!(parse_response(&a), Err(PcpError::NotResponse));
        a[1] = 0x80 | 2;
        assert_eq!(parse_response(&a), Err(PcpError::Opcode(2)));
        // An ANNOUNCE answer with an option whose length runs past the end.
        a[1] = 0x80;
        a.extend_from_slice(&[1, 0, 0, 8, 0, 0, 0, 0]);
        assert_eq!(parse_response(&a), Err(PcpError::Option));
        // A successful MAP answer without its MAP data.
        a.truncate(24);
        a[1] = 0x81;
        assert_eq!(parse_response(&a), Err(PcpError::TooShort(24)));
    }

    #[test]
    fn an_answer_with_a_well_formed_option_parses() {
        let r = Response {
            opcode: OP_MAP,
            result: ResultCode::Success,
            lifetime: 120,
            epoch: 5,
            map: Some(MapData {
                nonce: [1; 12],
                protocol: PROTO_UDP,
                internal_port: 1,
                external_port: 2,
                external_ip: "198.51.100.2".parse().unwrap_or_else(|_| unreachable!()),
            }),
        };
        let mut b = encode_response(&r);
        b.extend_from_slice(&[0x80, 0, 0, 3, 9, 9, 9, 0]);
        assert_eq!(parse_response(&b), Ok(r));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_response(&b);
        }

        #[test]
        fn map_responses_round_trip(
            res: u8, life: u32, epoch: u32, nonce: [u8; 12], proto: u8,
            ip: u16, ep: u16, v4: [u8; 4], v6: [u8; 16], use_v6: bool,
        ) {
            let external_ip = if use_v6 {
                let a = Ipv6Addr::from(v6);
                prop_assume!(a.to_ipv4_mapped().is_none());
                IpAddr::V6(a)
            } else {
                IpAddr::V4(Ipv4Addr::from(v4))
            };
            let r = Response {
                opcode: OP_MAP,
                result: ResultCode::from_u8(res),
                lifetime: life,
                epoch,
                map: Some(MapData { nonce, protocol: proto, internal_port: ip, external_port: ep, external_ip }),
            };
            prop_assert_eq!(parse_response(&encode_response(&r)), Ok(r));
        }
    }
}
