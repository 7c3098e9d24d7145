//! Which server-reflexive address the data socket has: from STUN, or from the address the
//! rendezvous observed when its QUIC connection rides the data socket.
//!
//! Rules (the daemon follows them on every STUN answer and every observed-address report):
//! * a STUN answer (one the mapping tracker accepted) always sets the address;
//! * the rendezvous' observed address is the data socket's mapping only when the connection
//!   shares the data socket (and so runs over QUIC: an address observed over the TCP
//!   fallback is a TCP mapping, never a UDP candidate); it is used at once while STUN has not answered (slow or absent),
//!   or when it moves on from an address STUN agreed with;
//! * a STUN answer that differs from the observed address keeps precedence: behind a
//!   symmetric NAT every destination has its own mapping, and STUN is what tells them apart.

use std::net::SocketAddr;

use crate::addr::unmap;

/// Where the address came from (`meshpunch status`: `public_addr_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrflxSource {
    /// A STUN Binding answer on the data socket.
    Stun,
    /// The rendezvous' observed address of a connection on the data socket.
    Rendezvous,
}

impl SrflxSource {
    /// The status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SrflxSource::Stun => "stun",
            SrflxSource::Rendezvous => "rendezvous",
        }
    }
}

/// The data socket's server-reflexive address (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerReflexive {
    addr: Option<SocketAddr>,
    source: Option<SrflxSource>,
}

impl ServerReflexive {
    /// The address, if known.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Where it came from.
    pub fn source(&self) -> Option<SrflxSource> {
        self.source
    }

    /// A STUN server mapped the data socket to `mapped`. Returns whether the address changed.
    pub fn on_stun(&mut self, mapped: SocketAddr) -> bool {
        let mapped = unmap(mapped);
        self.source = Some(SrflxSource::Stun);
        if self.addr == Some(mapped) {
            return false;
        }
        self.addr = Some(mapped);
        true
    }

    /// [`ServerReflexive::on_observed`] for a connection over `via`: an address observed over
    /// TCP is never used ([`crate::wire::Transport::observed_is_udp_mapping`]).
    pub fn on_observed_via(
        &mut self,
        via: crate::wire::Transport,
        shares: bool,
        before: Option<SocketAddr>,
        observed: SocketAddr,
    ) -> bool {
        via.observed_is_udp_mapping() && self.on_observed(shares, before, observed)
    }

    /// The rendezvous observed `observed` (it observed `before` until now); `shares` = its
    /// connection rides the data socket (a QUIC connection). Returns whether the address
    /// changed.
    pub fn on_observed(
        &mut self,
        shares: bool,
        before: Option<SocketAddr>,
        observed: SocketAddr,
    ) -> bool {
        if !shares {
            return false;
        }
        let observed = unmap(observed);
        let agreed = before.map(unmap).is_some_and(|b| self.addr == Some(b));
        if self.source == Some(SrflxSource::Stun) && !agreed {
            return false;
        }
        if self.addr == Some(observed) {
            return false;
        }
        self.addr = Some(observed);
        self.source = Some(SrflxSource::Rendezvous);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_observed_over_tcp_is_never_srflx() {
        use crate::wire::Transport;
        let mut s = ServerReflexive::default();
        assert!(!s.on_observed_via(Transport::Tcp, true, None, sa("198.51.100.1:4000")));
        assert_eq!((s.addr(), s.source()), (None, None));
        assert!(s.on_observed_via(Transport::Quic, true, None, sa("198.51.100.1:4000")));
        assert_eq!(s.addr(), Some(sa("198.51.100.1:4000")));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn observed_address_is_used_until_stun_answers_differently() {
        let mut s = ServerReflexive::default();
        // Not on the data socket: ignored.
        assert!(!s.on_observed(false, None, sa("198.51.100.1:4000")));
        assert_eq!(s.addr(), None);
        // On the data socket, STUN silent: used at once (IPv4-mapped spelling unmapped).
        assert!(s.on_observed(true, None, sa("[::ffff:198.51.100.1]:4000")));
        assert_eq!(s.addr(), Some(sa("198.51.100.1:4000")));
        assert_eq!(s.source(), Some(SrflxSource::Rendezvous));
        // STUN sees another port (symmetric NAT): STUN wins ...
        assert!(s.on_stun(sa("198.51.100.1:5000")));
        assert_eq!(s.source(), Some(SrflxSource::Stun));
        // ... and a later observed report that STUN never agreed with does not override it.
        assert!(!s.on_observed(true, Some(sa("198.51.100.1:4000")), sa("198.51.100.1:4001")));
        assert_eq!(s.addr(), Some(sa("198.51.100.1:5000")));
    }

    #[test]
    fn observed_address_follows_a_mapping_stun_agreed_with() {
        let mut s = ServerReflexive::default();
        assert!(s.on_stun(sa("198.51.100.1:4000")));
        assert!(!s.on_stun(sa("198.51.100.1:4000")));
        // The NAT rebinds: the rendezvous sees it first; STUN had agreed with the old one.
        assert!(s.on_observed(true, Some(sa("198.51.100.1:4000")), sa("198.51.100.1:6000")));
        assert_eq!(s.addr(), Some(sa("198.51.100.1:6000")));
        assert_eq!(s.source(), Some(SrflxSource::Rendezvous));
    }
}
