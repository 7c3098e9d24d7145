//! TURN server core (RFC 8656): message handling, allocations, permissions and channels, without sockets.
