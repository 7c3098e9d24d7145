//! Our local candidates, assembled from candidate sources.
//!
//! Each source reports what it knows, independently of the others, with
//! [`LocalCandidates::set`]: interface addresses ([`Source::Hosts`]), the server-reflexive
//! address and our NAT's mapping behaviour ([`Source::ServerReflexive`], from STUN or the
//! rendezvous' observed address), the TURN relayed address ([`Source::Relayed`]), the port
//! mapping our gateway holds for the data socket ([`Source::PortMapped`]). The list is
//! rebuilt in one fixed order; when it changes its version goes up and [`LocalCandidates::set`]
//! says so — the driver then hands the list to signalling, which echoes the version with each
//! punch so a session knows whether the peer has our newest candidates.
//!
//! A new kind of candidate (a NAT-PMP / PCP / UPnP port mapping, say) is one new
//! [`Source`] variant and one arm in [`LocalCandidates::rebuild`]: nothing else in the
//! client changes.

use std::net::{IpAddr, SocketAddr};

use crate::path::{Candidate, CandidateKind, MappingBehaviour};

/// What one candidate source knows now (each replaces that source's previous report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Interface addresses to offer (host candidates), on the data socket's port.
    Hosts(Vec<IpAddr>),
    /// The data socket's server-reflexive address and our NAT's mapping behaviour
    /// (`EndpointDependent` marks us as the hard side of birthday probing).
    ServerReflexive(Option<SocketAddr>, MappingBehaviour),
    /// Our TURN allocation's relayed address.
    Relayed(Option<SocketAddr>),
    /// The public address our gateway maps to the data socket (PCP / NAT-PMP / UPnP IGD,
    /// [`crate::portmap::Mapper`]).
    PortMapped(Option<SocketAddr>),
}

/// Our candidates and their version (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct LocalCandidates {
    port: u16,
    hosts: Vec<IpAddr>,
    srflx: Option<SocketAddr>,
    mapping: MappingBehaviour,
    relayed: Option<SocketAddr>,
    portmap: Option<SocketAddr>,
    list: Vec<Candidate>,
    version: u64,
}

impl LocalCandidates {
    /// Candidates of the data socket bound on `port`.
    pub fn new(port: u16) -> Self {
        LocalCandidates {
            port,
            ..Default::default()
        }
    }

    /// A source reports; returns whether the candidate list changed (its version went up).
    pub fn set(&mut self, source: Source) -> bool {
        match source {
            Source::Hosts(h) => self.hosts = h,
            Source::ServerReflexive(a, m) => {
                self.srflx = a;
                self.mapping = m;
            }
            Source::Relayed(r) => self.relayed = r,
            Source::PortMapped(m) => self.portmap = m,
        }
        let list = self.rebuild();
        if list == self.list {
            return false;
        }
        self.list = list;
        self.version += 1;
        true
    }

    fn rebuild(&self) -> Vec<Candidate> {
        let mut c: Vec<Candidate> = self
            .hosts
            .iter()
            .map(|ip| Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::new(*ip, self.port),
            })
            .collect();
        if let Some(s) = self.srflx {
            if !c.iter().any(|x| x.addr == s) {
                c.push(Candidate {
                    kind: CandidateKind::Srflx,
                    addr: s,
                });
            }
            // Marks us as the hard side of birthday probing (old peers ignore the kind).
            if self.mapping == MappingBehaviour::EndpointDependent {
                c.push(Candidate {
                    kind: CandidateKind::SrflxDependent,
                    addr: s,
                });
            }
        }
        // A mapping equal to an address already listed (a cone NAT that kept the port, a
        // public host) adds nothing.
        if let Some(m) = self.portmap {
            if !c.iter().any(|x| x.addr == m) {
                c.push(Candidate {
                    kind: CandidateKind::Portmap,
                    addr: m,
                });
            }
        }
        if let Some(r) = self.relayed {
            c.push(Candidate {
                kind: CandidateKind::Relayed,
                addr: r,
            });
        }
        c
    }

    /// The current list.
    pub fn list(&self) -> &[Candidate] {
        &self.list
    }

    /// Its version (0 until the first candidate; +1 per change).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The server-reflexive address last reported.
    pub fn srflx(&self) -> Option<SocketAddr> {
        self.srflx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn sources_combine_in_one_order_and_only_changes_bump_the_version() {
        let mut c = LocalCandidates::new(41641);
        assert!(!c.set(Source::Relayed(None)));
        assert_eq!(c.version(), 0);
        assert!(c.set(Source::Relayed(Some(sa("203.0.113.9:50000")))));
        assert!(c.set(Source::Hosts(vec!["192.168.1.10"
            .parse()
            .unwrap_or_else(|_| unreachable!())])));
        assert!(c.set(Source::ServerReflexive(
            Some(sa("198.51.100.1:41641")),
            MappingBehaviour::EndpointDependent
        )));
        let kinds: Vec<_> = c.list().iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                CandidateKind::Host,
                CandidateKind::Srflx,
                CandidateKind::SrflxDependent,
                CandidateKind::Relayed
            ]
        );
        assert_eq!(c.list()[0].addr, sa("192.168.1.10:41641"));
        assert_eq!(c.version(), 3);
        // The same report again: no change.
        assert!(!c.set(Source::Relayed(Some(sa("203.0.113.9:50000")))));
        assert_eq!(c.version(), 3);
    }

    #[test]
    fn a_port_mapping_is_a_candidate_of_its_own_kind_unless_already_listed() {
        let mut c = LocalCandidates::new(41641);
        c.set(Source::ServerReflexive(
            Some(sa("198.51.100.2:3000")),
            MappingBehaviour::EndpointDependent,
        ));
        c.set(Source::Relayed(Some(sa("203.0.113.20:50000"))));
        let v = c.version();
        assert!(c.set(Source::PortMapped(Some(sa("198.51.100.2:41641")))));
        assert_eq!(c.version(), v + 1);
        let kinds: Vec<_> = c.list().iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                CandidateKind::Srflx,
                CandidateKind::SrflxDependent,
                CandidateKind::Portmap,
                CandidateKind::Relayed
            ]
        );
        assert!(
            c.set(Source::PortMapped(None)),
            "a lost mapping is withdrawn"
        );
        assert!(!c.list().iter().any(|x| x.kind == CandidateKind::Portmap));
        // The same address as the server-reflexive one: not repeated.
        c.set(Source::ServerReflexive(
            Some(sa("198.51.100.2:41641")),
            MappingBehaviour::EndpointIndependent,
        ));
        c.set(Source::PortMapped(Some(sa("198.51.100.2:41641"))));
        assert!(!c.list().iter().any(|x| x.kind == CandidateKind::Portmap));
    }

    #[test]
    fn a_public_host_address_is_not_repeated_as_server_reflexive() {
        let mut c = LocalCandidates::new(5000);
        c.set(Source::Hosts(vec!["198.51.100.7"
            .parse()
            .unwrap_or_else(|_| unreachable!())]));
        c.set(Source::ServerReflexive(
            Some(sa("198.51.100.7:5000")),
            MappingBehaviour::EndpointIndependent,
        ));
        assert_eq!(c.list().len(), 1);
        assert_eq!(c.list()[0].kind, CandidateKind::Host);
    }
}
