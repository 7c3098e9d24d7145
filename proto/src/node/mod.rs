//! The client node: the pieces of the client's brain that live outside one peer's
//! [`crate::path::PeerPath`], as sans-IO parts the daemon drives.
//!
//! Today the node is assembled by the daemon (`client/src/daemon/`): it owns the sockets,
//! the per-peer [`crate::path::PeerPath`]s, the [`crate::turn_client::TurnClient`] and the
//! parts in this module, and moves datagrams, timer wake-ups, WireGuard packets and control
//! requests between them. The parts report changes as values (events, a new version) rather
//! than calling each other:
//!
//! * [`candidates`]: our local candidates, assembled from independent candidate sources
//!   (interfaces, STUN / the rendezvous' observed address, the TURN allocation — and the
//!   place where a port mapper joins), with a version number the signalling side echoes.
//! * [`offers`]: when to (re-)offer to each peer — who goes first, minimum gap, retries.
//! * [`srflx`]: which server-reflexive address we have — STUN's, or the rendezvous'
//!   observed address of a connection that rides the data socket.
//!
//! See `docs/design/client-node.md` for the whole shape and what is still in the daemon.

pub mod candidates;
pub mod offers;
pub mod srflx;
