//! STUN helpers on top of `stun-rs`: Binding server logic (RFC 8489) with RFC 5780
//! attributes, and Binding client helpers.
//!
//! # Server
//! [`BindingServer`] is sans-IO: the driver owns up to four UDP sockets and calls
//! [`BindingServer::handle`] with the index of the socket a datagram arrived on; the answer
//! says which socket to send the reply from. Socket indexes ([`SocketIndex`]):
//!
//! | index | address                      |
//! |-------|------------------------------|
//! | 0     | primary IP, primary port     |
//! | 1     | primary IP, alternate port   |
//! | 2     | alternate IP, primary port   |
//! | 3     | alternate IP, alternate port |
//!
//! Without an alternate address only socket 0 exists: answers carry no OTHER-ADDRESS and a
//! CHANGE-REQUEST asking for a change gets 420 Unknown Attribute (RFC 5780 §6.1). With one,
//! answers carry RESPONSE-ORIGIN and OTHER-ADDRESS (RFC 5780 §7.3) and CHANGE-REQUEST picks the
//! socket to answer from.

use std::net::SocketAddr;

use stun_rs::attributes::discovery::{
    ChangeRequest, ChangeRequestFlags, OtherAddress, ResponseOrigin,
};
use stun_rs::attributes::stun::{
    ErrorCode as ErrorCodeAttr, Fingerprint, MappedAddress, Software, UnknownAttributes,
    XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessage,
    StunMessageBuilder, TransactionId,
};

/// STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Size of the STUN header (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;

/// Attribute type of CHANGE-REQUEST (RFC 5780 §7.2).
pub const ATTR_CHANGE_REQUEST: u16 = 0x0003;

/// Attribute type of RESPONSE-PORT (RFC 5780 §7.5).
pub const ATTR_RESPONSE_PORT: u16 = 0x0027;

/// 420 Unknown Attribute (RFC 8489 §14.8).
pub const ERROR_UNKNOWN_ATTRIBUTE: u16 = 420;

/// 400 Bad Request (RFC 8489 §14.8).
pub const ERROR_BAD_REQUEST: u16 = 400;

/// Largest STUN answer we produce.
const MAX_RESPONSE: usize = 512;

/// Which of the four server sockets (see the module docs).
pub type SocketIndex = usize;

/// Whether `packet` starts like a STUN message (RFC 8489 §5: two zero bits, magic cookie),
/// used to tell STUN from other traffic on a shared socket (RFC 7983 style).
pub fn looks_like_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN
        && packet[0] & 0xC0 == 0
        && packet[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// The transaction id of any STUN message (to match it against pending transactions).
pub fn peek_transaction_id(packet: &[u8]) -> Option<[u8; 12]> {
    if !looks_like_stun(packet) {
        return None;
    }
    packet.get(8..HEADER_LEN)?.try_into().ok()
}

/// The transaction id of a Binding *request* (the hairpin test receives its own request back).
pub fn peek_binding_request_tx(packet: &[u8]) -> Option<[u8; 12]> {
    // Message type 0x0001: method Binding, class request (RFC 8489 §5).
    if packet.get(..2)? != [0x00, 0x01] {
        return None;
    }
    peek_transaction_id(packet)
}

/// Sans-IO STUN Binding server.
#[derive(Debug, Clone)]
pub struct BindingServer {
    software: String,
    sockets: [Option<SocketAddr>; 4],
}

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Socket to send from.
    pub via: SocketIndex,
    /// Destination: the request's source, or its IP with the RESPONSE-PORT port.
    pub to: SocketAddr,
    /// Encoded STUN message.
    pub bytes: Vec<u8>,
    /// What kind of answer it is.
    pub outcome: Outcome,
}

/// The kind of answer, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A Binding success response from the receiving socket.
    Ok,
    /// A Binding success response from another socket (CHANGE-REQUEST).
    Changed,
    /// An error response.
    Error(u16),
}

impl BindingServer {
    /// `addrs` are the bound socket addresses by [`SocketIndex`]: `[primary]` alone, or all
    /// four for RFC 5780 (index 1 and 3 may be `None` when the alternate port equals the
    /// primary port).
    pub fn new(software: impl Into<String>, addrs: [Option<SocketAddr>; 4]) -> Self {
        BindingServer {
            software: software.into(),
            sockets: addrs,
        }
    }

    /// Whether RFC 5780 (an alternate IP) is available.
    pub fn has_alternate(&self) -> bool {
        self.sockets[2].is_some()
    }

    /// Handles a datagram `packet` from `from` received on socket `local`. `None` means drop
    /// (not a STUN request we answer).
    pub fn handle(&self, local: SocketIndex, from: SocketAddr, packet: &[u8]) -> Option<Reply> {
        if !looks_like_stun(packet) || local >= 4 {
            return None;
        }
        let decoder = MessageDecoderBuilder::default().build();
        let msg = match decoder.decode(packet) {
            Ok((msg, _)) => msg,
            Err(_) => {
                // A request we cannot parse still gets a 400 when its header is intact.
                let tx: [u8; 12] = packet.get(8..20)?.try_into().ok()?;
                let class = u16::from_be_bytes([packet[0], packet[1]]) & 0x0110;
                if class != 0 {
                    return None;
                }
                return self.error(local, from, TransactionId::from(tx), ERROR_BAD_REQUEST, &[]);
            }
        };
        if msg.class() != MessageClass::Request {
            return None;
        }
        let tx = *msg.transaction_id();
        if msg.method() != BINDING {
            return self.error(local, from, tx, ERROR_BAD_REQUEST, &[]);
        }
        let mut unknown = Vec::new();
        let mut change_ip = false;
        let mut change_port = false;
        let mut to = from;
        for attr in msg.attributes() {
            match attr {
                StunAttribute::ChangeRequest(cr) => {
                    change_ip = cr.flags().contains(ChangeRequestFlags::ChangeIp);
                    change_port = cr.flags().contains(ChangeRequestFlags::ChangePort);
                }
                StunAttribute::Unknown(u) if u.attribute_type().is_comprehension_required() => {
                    unknown.push(u.attribute_type().as_u16());
                }
                // RESPONSE-PORT (RFC 5780 §7.5): answer the same IP on another port. Only the
                // port can change, so the server cannot be aimed at a third host.
                StunAttribute::ResponsePort(p) if self.has_alternate() => {
                    to = SocketAddr::new(from.ip(), p.as_u16());
                }
                StunAttribute::ResponsePort(_) => unknown.push(ATTR_RESPONSE_PORT),
                _ => {}
            }
        }
        if !unknown.is_empty() {
            return self.error(local, from, tx, ERROR_UNKNOWN_ATTRIBUTE, &unknown);
        }
        let mut via = local;
        if change_ip {
            via ^= 2;
        }
        if change_port {
            via ^= 1;
        }
        let Some(origin) = self.sockets.get(via).copied().flatten() else {
            return self.error(
                local,
                from,
                tx,
                ERROR_UNKNOWN_ATTRIBUTE,
                &[ATTR_CHANGE_REQUEST],
            );
        };
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(tx)
            .with_attribute(XorMappedAddress::from(from))
            .with_attribute(MappedAddress::from(from));
        if self.has_alternate() {
            b = b.with_attribute(ResponseOrigin::from(origin));
            if let Some(other) = self.sockets.get(local ^ 3).copied().flatten() {
                b = b.with_attribute(OtherAddress::from(other));
            }
        }
        if let Ok(sw) = Software::new(self.software.as_str()) {
            b = b.with_attribute(sw);
        }
        let bytes = encode(&b.with_attribute(Fingerprint::default()).build())?;
        Some(Reply {
            via,
            to,
            bytes,
            outcome: if via == local {
                Outcome::Ok
            } else {
                Outcome::Changed
            },
        })
    }

    fn error(
        &self,
        local: SocketIndex,
        from: SocketAddr,
        tx: TransactionId,
        code: u16,
        unknown: &[u16],
    ) -> Option<Reply> {
        let reason = match code {
            ERROR_UNKNOWN_ATTRIBUTE => "Unknown Attribute",
            _ => "Bad Request",
        };
        let ec = stun_rs::ErrorCode::new(code, reason).ok()?;
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
            .with_transaction_id(tx)
            .with_attribute(ErrorCodeAttr::from(ec));
        if !unknown.is_empty() {
            b = b.with_attribute(UnknownAttributes::from(unknown));
        }
        if let Ok(sw) = Software::new(self.software.as_str()) {
            b = b.with_attribute(sw);
        }
        let bytes = encode(&b.with_attribute(Fingerprint::default()).build())?;
        Some(Reply {
            via: local,
            to: from,
            bytes,
            outcome: Outcome::Error(code),
        })
    }
}

fn encode(msg: &StunMessage) -> Option<Vec<u8>> {
    let mut buf = [0u8; MAX_RESPONSE];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, msg)
        .ok()?;
    buf.get(..n).map(<[u8]>::to_vec)
}

/// Encodes a Binding request with transaction id `tx`, optionally with CHANGE-REQUEST flags
/// (RFC 5780 §7.2) and a FINGERPRINT.
pub fn binding_request(tx: [u8; 12], change_ip: bool, change_port: bool) -> Vec<u8> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(tx));
    if change_ip || change_port {
        let flags = match (change_ip, change_port) {
            (true, true) => ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort,
            (true, false) => ChangeRequestFlags::ChangeIp.into(),
            _ => ChangeRequestFlags::ChangePort.into(),
        };
        b = b.with_attribute(ChangeRequest::new(Some(flags)));
    }
    encode(&b.with_attribute(Fingerprint::default()).build()).unwrap_or_default()
}

/// Encodes a Binding request asking the server to answer to our IP on `port` instead of the
/// request's source port (RESPONSE-PORT, RFC 5780 §7.5), with a FINGERPRINT. Used by the
/// binding-lifetime test ([`crate::lifetime`]).
pub fn binding_request_with_response_port(tx: [u8; 12], port: u16) -> Vec<u8> {
    let b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(tx))
        .with_attribute(stun_rs::attributes::discovery::ResponsePort::new(port));
    encode(&b.with_attribute(Fingerprint::default()).build()).unwrap_or_default()
}

/// The useful content of a Binding response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingResponse {
    /// Transaction id (match it to the request).
    pub transaction_id: [u8; 12],
    /// XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS from an RFC 3489 server).
    pub mapped: Option<SocketAddr>,
    /// OTHER-ADDRESS (RFC 5780).
    pub other_address: Option<SocketAddr>,
    /// RESPONSE-ORIGIN (RFC 5780).
    pub response_origin: Option<SocketAddr>,
    /// ERROR-CODE of an error response.
    pub error_code: Option<u16>,
    /// SOFTWARE.
    pub software: Option<String>,
}

/// Why a STUN response could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunParseError {
    /// Not a STUN message or malformed.
    #[error("not a valid STUN message")]
    Malformed,
    /// A STUN message, but not a Binding response.
    #[error("not a Binding response")]
    NotBindingResponse,
}

/// Parses a Binding success or error response.
pub fn parse_binding_response(packet: &[u8]) -> Result<BindingResponse, StunParseError> {
    if !looks_like_stun(packet) {
        return Err(StunParseError::Malformed);
    }
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(packet)
        .map_err(|_| StunParseError::Malformed)?;
    if msg.method() != BINDING
        || !matches!(
            msg.class(),
            MessageClass::SuccessResponse | MessageClass::ErrorResponse
        )
    {
        return Err(StunParseError::NotBindingResponse);
    }
    let mut r = BindingResponse {
        transaction_id: *msg.transaction_id().as_bytes(),
        mapped: None,
        other_address: None,
        response_origin: None,
        error_code: None,
        software: None,
    };
    let mut plain_mapped = None;
    for attr in msg.attributes() {
        match attr {
            StunAttribute::XorMappedAddress(a) => r.mapped = Some(*a.socket_address()),
            StunAttribute::MappedAddress(a) => plain_mapped = Some(*a.socket_address()),
            StunAttribute::OtherAddress(a) => r.other_address = Some(*a.socket_address()),
            StunAttribute::ResponseOrigin(a) => r.response_origin = Some(*a.socket_address()),
            StunAttribute::ErrorCode(e) => r.error_code = Some(e.error_code().error_code()),
            StunAttribute::Software(s) => r.software = Some(s.as_str().to_string()),
            _ => {}
        }
    }
    if r.mapped.is_none() {
        r.mapped = plain_mapped;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rfc5780() -> BindingServer {
        BindingServer::new(
            "test",
            [
                Some(addr("127.0.0.1:3478")),
                Some(addr("127.0.0.1:3479")),
                Some(addr("127.0.0.2:3478")),
                Some(addr("127.0.0.2:3479")),
            ],
        )
    }

    #[test]
    fn binding_answers_with_mapped_address() {
        let s = BindingServer::new("sw", [Some(addr("127.0.0.1:3478")), None, None, None]);
        let req = binding_request([1; 12], false, false);
        let from = addr("192.0.2.7:5555");
        let reply = s.handle(0, from, &req).unwrap();
        assert_eq!(reply.via, 0);
        let r = parse_binding_response(&reply.bytes).unwrap();
        assert_eq!(r.transaction_id, [1; 12]);
        assert_eq!(r.mapped, Some(from));
        assert_eq!(r.other_address, None);
        assert_eq!(r.software.as_deref(), Some("sw"));
        // Without an alternate, CHANGE-REQUEST is refused with 420.
        let reply = s
            .handle(0, from, &binding_request([2; 12], true, false))
            .unwrap();
        assert_eq!(reply.outcome, Outcome::Error(420));
        assert_eq!(
            parse_binding_response(&reply.bytes).unwrap().error_code,
            Some(420)
        );
    }

    #[test]
    fn change_request_picks_the_socket() {
        let s = rfc5780();
        let from = addr("192.0.2.7:5555");
        for (ip, port, via) in [
            (false, false, 0),
            (false, true, 1),
            (true, false, 2),
            (true, true, 3),
        ] {
            let reply = s
                .handle(0, from, &binding_request([3; 12], ip, port))
                .unwrap();
            assert_eq!(reply.via, via);
            let r = parse_binding_response(&reply.bytes).unwrap();
            assert_eq!(r.mapped, Some(from));
            assert_eq!(r.other_address, Some(addr("127.0.0.2:3479")));
            assert_eq!(r.response_origin, s.sockets[via]);
        }
        // RESPONSE-PORT redirects to another port of the same IP.
        let mut req = binding_request([6; 12], true, true);
        req = with_response_port(&req, 40000);
        let reply = s.handle(0, from, &req).unwrap();
        assert_eq!(reply.to, addr("192.0.2.7:40000"));
        assert_eq!(reply.via, 3);
        // Received on the alternate socket: OTHER-ADDRESS is the primary.
        let reply = s
            .handle(3, from, &binding_request([4; 12], false, false))
            .unwrap();
        let r = parse_binding_response(&reply.bytes).unwrap();
        assert_eq!(r.other_address, Some(addr("127.0.0.1:3478")));
    }

    #[test]
    fn responses_and_garbage_are_dropped() {
        let s = rfc5780();
        let from = addr("192.0.2.7:5555");
        let reply = s
            .handle(0, from, &binding_request([5; 12], false, false))
            .unwrap();
        assert!(s.handle(0, from, &reply.bytes).is_none());
        assert!(s.handle(0, from, b"hello world, not stun at all").is_none());
    }

    fn with_response_port(req: &[u8], port: u16) -> Vec<u8> {
        // Append RESPONSE-PORT (type 0x0027, 4 bytes: port + 2 reserved) before FINGERPRINT by
        // rebuilding without fingerprint: simplest is to decode and re-encode.
        let (msg, _) = MessageDecoderBuilder::default()
            .build()
            .decode(req)
            .unwrap();
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
            .with_transaction_id(*msg.transaction_id());
        for a in msg.attributes() {
            if let StunAttribute::ChangeRequest(cr) = a {
                b = b.with_attribute(ChangeRequest::new(Some(cr.flags())));
            }
        }
        let b = b.with_attribute(stun_rs::attributes::discovery::ResponsePort::new(port));
        encode(&b.build()).unwrap()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300), idx in 0usize..5) {
            let s = rfc5780();
            let _ = s.handle(idx, addr("192.0.2.1:1"), &data);
            let _ = parse_binding_response(&data);
        }

        #[test]
        fn stun_shaped_bytes_never_panic(mut data in prop::collection::vec(any::<u8>(), 20..300)) {
            data[0] &= 0x3f;
            data[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            let len = (data.len() - 20) as u16;
            data[2..4].copy_from_slice(&len.to_be_bytes());
            let _ = rfc5780().handle(0, addr("192.0.2.1:1"), &data);
            let _ = parse_binding_response(&data);
        }

        #[test]
        fn request_round_trip(tx in any::<[u8; 12]>(), ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let from = SocketAddr::from((ip, port));
            let reply = rfc5780().handle(0, from, &binding_request(tx, false, false)).unwrap();
            let r = parse_binding_response(&reply.bytes).unwrap();
            prop_assert_eq!(r.transaction_id, tx);
            prop_assert_eq!(r.mapped, Some(from));
        }
    }
}
