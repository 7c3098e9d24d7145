//! Peer probe format: authenticated, replay-proof UDP probes sent between peers while punching and as keepalives.
