//! The meshpunch rendezvous service: QUIC (and TLS-over-TCP fallback) signalling (register, key proof, observed address,
//! presence, offers), STUN Binding server, relay map and TURN credentials, admin HTTP.
//!
//! `main.rs` only parses the command line; everything else lives here so integration tests
//! can run several servers in one process.

#![forbid(unsafe_code)]

mod admin;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod stun_server;
mod tcp;
pub mod tls;

pub use config::Config;
pub use server::Server;
