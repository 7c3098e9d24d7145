//! natlab: real NAT topologies in Linux network namespaces (nftables NAT, veth, bridges)
//! and a user-space latency/loss shaper, used by meshpunch's end-to-end tests and runnable
//! by hand.
//!
//! [`testenv`] is also used by every other crate's tests to decide whether a test that
//! needs root or a system package runs or skips.

pub mod testenv;
