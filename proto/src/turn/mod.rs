//! TURN server core (RFC 8656, RFC 8489 underneath): message handling, allocations,
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
//! socket, enforces the tenant quotas per username and per network (486) and reports
//! exhaustion (508). The server calls [`RelayAllocator::release`] whenever an allocation ends
//! (Refresh 0, expiry), so sockets and quota are returned without the driver having to track
//! lifetimes. Every peer address a client names goes through one peer-policy decision
//! (`TurnServer::peer_policy`, see docs/relay.md).
//!
//! Nothing on the relaying paths (ChannelData, Send, peer data) allocates; control requests
//! (Allocate, Refresh, CreatePermission, ChannelBind) go through `stun-rs`.
//!
//! Authentication is the long-term credential mechanism (RFC 8489 §9.2) with stateless nonces
//! (an HMAC over issue time and client IP: nothing to store per unauthenticated source) and
//! either static users or the TURN REST-API shared secret (coturn's `use-auth-secret`). Requests
//! protected with MESSAGE-INTEGRITY-SHA256 are answered with it.
//!
//! Layout: `server.rs` holds the state machine, `ports.rs` the relayed-port pool and the
//! allocator trait, `limits.rs` the token buckets and rate tables, `auth.rs` credentials and
//! nonces, `stream.rs` the framing of TURN over TCP/TLS, `uri.rs` TURN URIs (RFC 7065), `codec.rs` the zero-copy STUN/TURN helpers the client ([`crate::turn_client`]) uses
//! too.

use std::net::IpAddr;

mod auth;
mod codec;
mod limits;
mod ports;
mod server;
pub mod stream;
pub mod uri;

pub use auth::Auth;
pub(crate) use auth::{verify_hmac, Integrity};
pub(crate) use codec::msgtype as msg_type;
pub(crate) use codec::{attr, decode_xor_addr, encode_peer_data_message, parse_header, RawAttrs};
pub use codec::{encode_data_indication, MAGIC_COOKIE, MAX_DATAGRAM, STUN_HEADER_LEN};
pub use limits::{
    Rate, RateTable, SharedLimits, SharedRate, SourceKey, DEFAULT_ALLOCATION_BANDWIDTH,
    DEFAULT_NETWORK_BANDWIDTH, DEFAULT_NETWORK_QUOTA, DEFAULT_USER_QUOTA, EVICTION_SAMPLE,
    RATE_SHARDS,
};
pub use ports::{
    AllocateError, PortPool, PortRequest, RelayAllocator, Reservation, BUSY_RETRY,
    RESERVATION_LIFETIME, RESERVATION_TOKEN_LEN,
};
pub use server::{
    ClientAction, Gauges, PeerAction, ServerConfig, Stats, TurnServer, CHANNEL_COOLDOWN,
    CHANNEL_LIFETIME, DEFAULT_ALLOCATION_LIFETIME, DEFAULT_NONCE_LIFETIME, DENY_LABELS,
    MAX_ALLOCATION_LIFETIME, PERMISSION_LIFETIME, SWEEP_INTERVAL,
};

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
