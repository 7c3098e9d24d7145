//! The meshpunch client library: the rendezvous client, netcheck, the data socket,
//! the per-peer path manager driver and the WireGuard integration behind the `meshpunch`
//! binary.

pub mod config;
pub mod control;
pub mod daemon;
pub mod fwmark;
mod hops;
pub mod keys;
pub mod lifetime;
pub mod metrics;
pub mod netcheck;
mod pool;
pub mod portmap;
pub mod rdvinfo;
pub mod rendezvous;
pub mod shared_socket;
pub mod signal;
pub mod tls;
pub mod tun;
pub mod wg;
