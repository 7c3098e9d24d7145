//! natlab: real NAT topologies in Linux network namespaces (nftables NAT, veth, bridges)
//! and a user-space latency/loss shaper, used by meshpunch's end-to-end tests and runnable
//! by hand (`natlab up cafe`).
//!
//! - [`lab`]: namespaces, links, processes in namespaces, teardown on drop / panic / death.
//! - [`topo`]: an internet router, a server host with two public addresses plus a relay
//!   address, and sites behind NATs of every behaviour ([`topo::Nat`]).
//! - [`ipv6`]: global IPv6 without NAT on a built topology, stateful firewalls on the routers.
//! - [`shaper`]: delay and loss through a TUN device (this kernel has no netem).
//! - [`mesh`]: meshpunch (rendezvous, relay, daemons) running inside a topology.
//! - [`probe`]: a UDP reflector proving NAT mapping/filtering without meshpunch.
//! - [`traffic`]: constant-rate UDP flows and the gaps their receiver saw.
//! - [`wg`]: userspace WireGuard (boringtun + wg) in lab hosts.
//! - [`bins`]: where the workspace binaries a scenario needs are.
//! - [`testenv`] is also used by every other crate's tests to decide whether a test that
//!   needs root or a system package runs or skips.

pub mod bins;
pub mod ipv6;
pub mod lab;
pub mod mesh;
pub mod probe;
pub mod sh;
pub mod shaper;
pub mod testenv;
pub mod topo;
pub mod traffic;
pub mod wg;

pub use lab::Lab;
pub use topo::{Host, Nat, RttStats, Topology, TopologySpec};

/// What can go wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system command failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// I/O on a file, socket or device.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A lab set-up or scenario step that is not one command.
    #[error("{0}")]
    Setup(String),
}
