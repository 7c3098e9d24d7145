//! The meshpunch client library: the rendezvous client, netcheck, the data socket,
//! the per-peer path manager driver and the WireGuard integration behind the `meshpunch`
//! binary.

pub mod rendezvous;
