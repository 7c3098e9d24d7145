//! STUN helpers on top of `stun-rs`: Binding server logic (RFC 8489) with RFC 5780 attributes, and Binding client helpers.
