//! ChannelData framing (RFC 8656 §12.4): the 4-byte header that `stun-rs` does not provide.
