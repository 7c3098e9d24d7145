//! TURN client state machine (RFC 8656): allocate with long-term credentials, refresh, permissions, channel binds.
