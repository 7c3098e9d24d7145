//! NAT classification (RFC 4787 / RFC 5780 terms) from the results of STUN probes.
