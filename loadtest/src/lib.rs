//! `meshpunch-loadtest`: drives TURN servers (ours, coturn, any RFC 8656 server), a bare UDP
//! forwarder (the upper bound), rendezvous nodes and hole punching with many simulated
//! clients, and reports rates, loss, latency percentiles and memory.
//!
//! - [`udp`]: batched `sendmmsg`/`recvmmsg` I/O over preallocated buffers.
//! - [`engine`]: paced sender, receivers, per-packet sequence and timestamp, HDR histograms,
//!   maximum-rate search.
//! - [`forwarder`]: the bare recvmmsg/sendmmsg forwarder.
//! - [`turn`]: TURN allocations and channels for the load (through `proto::turn_client`).
//! - [`stream`]: TURN over TCP and TLS for the load (proto's stream framing).
//! - [`load`]: the relay / bare / direct load modes and their report.
//! - [`rendezvous`]: many lean QUIC clients registering, watching and exchanging offers.
//! - [`punch`]: time from "connect to peer" to the first authenticated direct reply.
//! - [`sys`]: RSS and CPU of a process from `/proc`.
//! - [`progress`]: progress bar on long runs when stderr is a terminal.

pub mod engine;
pub mod forwarder;
pub mod load;
pub mod progress;
pub mod punch;
pub mod rendezvous;
pub mod stream;
pub mod sys;
pub mod turn;
pub mod udp;
