//! The meshpunch rendezvous service: QUIC signalling (register, key proof, observed address,
//! presence, offers), STUN Binding server, relay map and TURN credentials, admin HTTP.
//!
//! `main.rs` only parses the command line; everything else lives here so integration tests
//! can run several servers in one process.

pub mod registry;
