//! Sans-IO core of meshpunch: every codec and protocol state machine, with no sockets,
//! no async runtime and no clock of its own. Functions take bytes, addresses and
//! [`std::time::Instant`]s and return bytes to send, timers to arm and events.
//!
//! The binaries (`meshpunch-rendezvous`, `meshpunch-relay`, `meshpunch`,
//! `meshpunch-loadtest`) are thin drivers around these modules, so everything here is
//! unit-, property- and fuzz-testable without a network.

#![forbid(unsafe_code)]

pub mod addr;
pub mod channeldata;
pub mod clock;
pub mod connect;
pub mod creds;
pub mod lifetime;
pub mod mtu;
pub mod nat;
pub mod node;
pub mod path;
pub mod portmap;
pub mod probe;
mod rng;
pub mod session;
pub mod stun;
pub mod token;
pub mod turn;
pub mod turn_client;
pub mod wire;
pub mod x509;
