//! NAT-PMP (RFC 6886) messages: the external address request and the UDP mapping request,
//! and their responses. Requests are built into fixed-size arrays; responses are parsed with
//! every length checked first, so arbitrary bytes give a [`PmpError`], never a panic.

use std::net::Ipv4Addr;

/// NAT-PMP version (RFC 6886 §3.2).
pub const VERSION: u8 = 0;
/// Opcode of the external address request (RFC 6886 §3.2).
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of a UDP mapping request (RFC 6886 §3.3).
pub const OP_MAP_UDP: u8 = 1;
/// Added to the request opcode in a response (RFC 6886 §3.2).
pub const RESPONSE_BIT: u8 = 128;
/// Length of an external address response (RFC 6886 §3.2).
pub const EXTERNAL_ADDRESS_RESPONSE_LEN: usize = 12;
/// Length of a mapping request and of the responses' common part (RFC 6886 §3.3).
pub const MAP_REQUEST_LEN: usize = 12;
/// Length of a mapping response (RFC 6886 §3.3).
pub const MAP_RESPONSE_LEN: usize = 16;

/// Result codes (RFC 6886 §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    /// 0: success.
    Success,
    /// 1: unsupported version (what a PCP-only or NAT-PMP-only server answers to the other).
    UnsupportedVersion,
    /// 2: not authorized / refused (mapping disabled by the user).
    NotAuthorized,
    /// 3: network failure (the gateway has no external address yet).
    NetworkFailure,
    /// 4: out of resources.
    OutOfResources,
    /// 5: unsupported opcode.
    UnsupportedOpcode,
    /// Any other value.
    Other(u16),
}

impl ResultCode {
    /// The code from its wire value.
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => ResultCode::Success,
            1 => ResultCode::UnsupportedVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::NetworkFailure,
            4 => ResultCode::OutOfResources,
            5 => ResultCode::UnsupportedOpcode,
            v => ResultCode::Other(v),
        }
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::NetworkFailure => 3,
            ResultCode::OutOfResources => 4,
            ResultCode::UnsupportedOpcode => 5,
            ResultCode::Other(v) => v,
        }
    }
}

/// Why a datagram is not a NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PmpError {
    /// Fewer bytes than the message needs.
    #[error("NAT-PMP message too short: {0} bytes")]
    TooShort(usize),
    /// Not version 0.
    #[error("NAT-PMP version {0} (expected 0)")]
    Version(u8),
    /// A request opcode (no response bit) or an unknown one.
    #[error("NAT-PMP opcode {0} is not a response we understand")]
    Opcode(u8),
}

/// A parsed NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Answer to the external address request (the address is meaningful on success only).
    ExternalAddress {
        /// Result code.
        result: ResultCode,
        /// Seconds since the gateway's port-mapping table was initialised.
        epoch: u32,
        /// The gateway's external IPv4 address.
        external: Ipv4Addr,
    },
    /// Answer to a UDP mapping request.
    MapUdp {
        /// Result code.
        result: ResultCode,
        /// Seconds since the gateway's port-mapping table was initialised.
        epoch: u32,
        /// The internal port the mapping is for.
        internal_port: u16,
        /// The external port granted.
        external_port: u16,
        /// Lifetime granted, seconds (0 = deleted).
        lifetime: u32,
    },
    /// A result-only answer: an error response shorter than the full message (RFC 6886 §3.5
    /// lets a server that does not understand the request answer with just the header, e.g.
    /// "unsupported version" to a PCP request).
    Error {
        /// The request opcode answered.
        opcode: u8,
        /// Result code (never success).
        result: ResultCode,
    },
}

/// The external address request (RFC 6886 §3.2).
pub fn external_address_request() -> [u8; 2] {
    [VERSION, OP_EXTERNAL_ADDRESS]
}

/// A UDP mapping request (RFC 6886 §3.3): `lifetime` 0 with `suggested_external` 0 deletes
/// the mapping of `internal_port`.
pub fn map_udp_request(internal_port: u16, suggested_external: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; MAP_REQUEST_LEN];
    b[0] = VERSION;
    b[1] = OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&suggested_external.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a NAT-PMP response (extra trailing bytes are ignored, as RFC 6886 §3.2 allows
/// future extensions).
pub fn parse_response(b: &[u8]) -> Result<Response, PmpError> {
    let too_short = PmpError::TooShort(b.len());
    let (&version, &op) = match b {
        [v, o, ..] => (v, o),
        _ => return Err(too_short),
    };
    if version != VERSION {
        return Err(PmpError::Version(version));
    }
    if op & RESPONSE_BIT == 0 {
        return Err(PmpError::Opcode(op));
    }
    let result = ResultCode::from_u16(be16(b, 2).ok_or(too_short)?);
    let req = op & !RESPONSE_BIT;
    if result != ResultCode::Success && b.len() < 8 {
        return Ok(Response::Error {
            opcode: req,
            result,
        });
    }
    let epoch = be32(b, 4).ok_or(too_short)?;
    match req {
        OP_EXTERNAL_ADDRESS => {
            let ip = b.get(8..12).ok_or(too_short)?;
            Ok(Response::ExternalAddress {
                result,
                epoch,
                external: Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
            })
        }
        OP_MAP_UDP => {
            if b.len() < MAP_RESPONSE_LEN {
                if result != ResultCode::Success {
                    return Ok(Response::Error {
                        opcode: req,
                        result,
                    });
                }
                return Err(too_short);
            }
            Ok(Response::MapUdp {
                result,
                epoch,
                internal_port: be16(b, 8).ok_or(too_short)?,
                external_port: be16(b, 10).ok_or(too_short)?,
                lifetime: be32(b, 12).ok_or(too_short)?,
            })
        }
        _ => Err(PmpError::Opcode(op)),
    }
}

/// Encodes a response (used by tests and the simulated gateway; a gateway would send these).
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut b = vec![VERSION];
    match *r {
        Response::ExternalAddress {
            result,
            epoch,
            external,
        } => {
            b.push(RESPONSE_BIT | OP_EXTERNAL_ADDRESS);
            b.extend_from_slice(&result.to_u16().to_be_bytes());
            b.extend_from_slice(&epoch.to_be_bytes());
            b.extend_from_slice(&external.octets());
        }
        Response::MapUdp {
            result,
            epoch,
            internal_port,
            external_port,
            lifetime,
        } => {
            b.push(RESPONSE_BIT | OP_MAP_UDP);
            b.extend_from_slice(&result.to_u16().to_be_bytes());
            b.extend_from_slice(&epoch.to_be_bytes());
            b.extend_from_slice(&internal_port.to_be_bytes());
            b.extend_from_slice(&external_port.to_be_bytes());
            b.extend_from_slice(&lifetime.to_be_bytes());
        }
        Response::Error { opcode, result } => {
            b.push(RESPONSE_BIT | opcode);
            b.extend_from_slice(&result.to_u16().to_be_bytes());
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_have_the_rfc_6886_layout() {
        assert_eq!(external_address_request(), [0, 0]);
        assert_eq!(
            map_udp_request(41641, 41641, 7200),
            [0, 1, 0, 0, 0xa2, 0xa9, 0xa2, 0xa9, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn a_real_external_address_response_parses() {
        // version 0, op 128, result 0, epoch 1000, 198.51.100.2
        let b = [0, 128, 0, 0, 0, 0, 3, 0xe8, 198, 51, 100, 2];
        assert_eq!(
            parse_response(&b),
            Ok(Response::ExternalAddress {
                result: ResultCode::Success,
                epoch: 1000,
                external: Ipv4Addr::new(198, 51, 100, 2)
            })
        );
    }

    #[test]
    fn requests_truncations_and_other_versions_are_refused() {
        assert_eq!(parse_response(&[0, 0]), Err(PmpError::Opcode(0)));
        assert_eq!(parse_response(&[2, 129]), Err(PmpError::Version(2)));
        assert_eq!(
            parse_response(&[0, 129, 0, 0, 0]),
            Err(PmpError::TooShort(5))
        );
        assert_eq!(parse_response(&[0]), Err(PmpError::TooShort(1)));
        let short_map = [0, 129, 0, 0, 0, 0, 0, 1, 0, 1, 0, 2];
        assert_eq!(parse_response(&short_map), Err(PmpError::TooShort(12)));
        assert_eq!(
            parse_response(&[0, 130, 0, 0, 0, 0, 0, 0]),
            Err(PmpError::Opcode(130))
        );
        // A result-only "unsupported version" answer.
        assert_eq!(
            parse_response(&[0, 128, 0, 1]),
            Ok(Response::Error {
                opcode: 0,
                result: ResultCode::UnsupportedVersion
            })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_response(&b);
        }

        #[test]
        fn map_responses_round_trip(res in 0u16..8, epoch: u32, ip: u16, ep: u16, life: u32) {
            let r = Response::MapUdp {
                result: ResultCode::from_u16(res),
                epoch,
                internal_port: ip,
                external_port: ep,
                lifetime: life,
            };
            prop_assert_eq!(parse_response(&encode_response(&r)), Ok(r));
        }

        #[test]
        fn external_address_responses_round_trip(res in 0u16..8, epoch: u32, ip: [u8; 4]) {
            let r = Response::ExternalAddress {
                result: ResultCode::from_u16(res),
                epoch,
                external: Ipv4Addr::from(ip),
            };
            prop_assert_eq!(parse_response(&encode_response(&r)), Ok(r));
        }
    }
}
