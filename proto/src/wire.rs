//! The rendezvous protocol: framing, versioning and messages exchanged over QUIC between client and rendezvous.
