//! STUN discovery from the data socket: the periodic Binding requests to the rendezvous'
//! STUN servers (our server-reflexive address and, from two servers, our NAT's mapping
//! behaviour), the latency Binding requests to relay servers, and the table of pending
//! transactions that tells our answers apart from everything else on the data socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::addr::unmap;
use crate::nat::{classify_mapping, Mapping, MappingObservation};
use crate::path::MappingBehaviour;
use crate::stun;

/// How often the data socket re-asks STUN servers for its mapping (never slower than the
/// keepalive).
pub const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// How long a STUN transaction waits for its answer.
pub const STUN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Binding request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Our server-reflexive address.
    Srflx,
    /// Latency of relay probe `.0` (home region choice).
    RelayLatency(usize),
}

/// An answer to one of our requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Why it was asked.
    pub purpose: Purpose,
    /// Who answered.
    pub server: SocketAddr,
    /// What the server saw (canonical form).
    pub mapped: Option<SocketAddr>,
    /// Round trip.
    pub rtt: Duration,
}

/// Our STUN transactions and the mapping they measured (see the module docs).
#[derive(Debug, Clone)]
pub struct Discovery {
    servers: Vec<SocketAddr>,
    pending: HashMap<[u8; 12], (Purpose, Instant)>,
    next: Instant,
    mappings: StunMappings,
    rng: u64,
}

impl Discovery {
    /// No servers yet; transaction ids from `seed`.
    pub fn new(now: Instant, seed: u64) -> Self {
        Discovery {
            servers: Vec::new(),
            pending: HashMap::new(),
            next: now,
            mappings: StunMappings::default(),
            rng: seed | 1,
        }
    }

    /// The STUN servers to use (the first is the primary); asks them at once.
    pub fn set_servers(&mut self, now: Instant, servers: Vec<SocketAddr>) {
        let servers: Vec<SocketAddr> = servers.into_iter().map(unmap).collect();
        self.mappings.set_servers(&servers);
        self.servers = servers;
        self.next = now;
    }

    /// Ask again at once (our mapping may have changed).
    pub fn refresh(&mut self, now: Instant) {
        self.next = now;
    }

    /// The STUN servers.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// A Binding request for `purpose`: the bytes to send from the data socket.
    pub fn request(&mut self, now: Instant, purpose: Purpose) -> Vec<u8> {
        let hi = crate::rng::xorshift64star(&mut self.rng);
        let lo = crate::rng::xorshift64star(&mut self.rng);
        let mut tx = [0u8; 12];
        tx[..8].copy_from_slice(&hi.to_be_bytes());
        tx[8..].copy_from_slice(&lo.to_be_bytes()[..4]);
        self.pending.insert(tx, (purpose, now));
        stun::binding_request(tx, false, false)
    }

    /// The periodic requests due at `now` (server, bytes); `keepalive` caps the interval.
    pub fn due(&mut self, now: Instant, keepalive: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        self.pending
            .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < STUN_TIMEOUT);
        if self.next > now {
            return Vec::new();
        }
        // Never slower than the keepalive: the data socket's own mapping (our server-
        // reflexive candidate) must outlive a NAT that forgets idle mappings quickly.
        self.next = now + STUN_INTERVAL.min(keepalive);
        let servers = self.servers.clone();
        servers
            .into_iter()
            .map(|s| (s, self.request(now, Purpose::Srflx)))
            .collect()
    }

    /// Whether `pkt` answers one of our pending requests.
    pub fn is_ours(&self, pkt: &[u8]) -> bool {
        stun::peek_transaction_id(pkt).is_some_and(|tx| self.pending.contains_key(&tx))
    }

    /// An answer from `from` (None: not one of ours, or malformed).
    pub fn on_response(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) -> Option<Answer> {
        let r = stun::parse_binding_response(pkt).ok()?;
        let (purpose, sent) = self.pending.remove(&r.transaction_id)?;
        Some(Answer {
            purpose,
            server: unmap(from),
            mapped: r.mapped.map(unmap),
            rtt: now.saturating_duration_since(sent),
        })
    }

    /// Records a server's view of the data socket: (whether this answer sets our server-
    /// reflexive address, whether the mapping behaviour changed).
    pub fn note_mapping(&mut self, server: SocketAddr, mapped: SocketAddr) -> (bool, bool) {
        let before = self.mappings.behaviour();
        let use_it = self.mappings.record(server, mapped);
        (use_it, self.mappings.behaviour() != before)
    }

    /// Our NAT's mapping behaviour as measured so far.
    pub fn behaviour(&self) -> MappingBehaviour {
        self.mappings.behaviour()
    }

    /// When [`Discovery::due`] or a transaction expiry wants to run.
    pub fn poll_timeout(&self) -> Instant {
        self.pending
            .values()
            .map(|(_, sent)| *sent + STUN_TIMEOUT)
            .fold(self.next, Instant::min)
    }
}

/// Our mapping behaviour from the data socket's STUN answers: two servers (the rendezvous
/// announces its primary and its RFC 5780 other-IP address) that see different mapped
/// addresses mean an endpoint-dependent mapping.
#[derive(Debug, Clone, Default)]
pub struct StunMappings {
    servers: Vec<SocketAddr>,
    seen: HashMap<SocketAddr, SocketAddr>,
}

impl StunMappings {
    /// The STUN servers in use (the first is the primary); forgets answers of others.
    pub fn set_servers(&mut self, servers: &[SocketAddr]) {
        if self.servers != servers {
            self.servers = servers.to_vec();
            self.seen.retain(|s, _| servers.contains(s));
        }
    }

    /// Records that `server` saw us as `mapped`. Returns whether this answer is the one our
    /// server-reflexive candidate comes from (the primary's, or any while the primary has not
    /// answered): with a symmetric NAT every server sees another port.
    pub fn record(&mut self, server: SocketAddr, mapped: SocketAddr) -> bool {
        if !self.servers.contains(&server) {
            return true;
        }
        self.seen.insert(server, mapped);
        let primary = self.servers.first();
        primary == Some(&server) || primary.is_none_or(|p| !self.seen.contains_key(p))
    }

    /// What the answers so far say (RFC 4787 classification by [`classify_mapping`], reduced
    /// to what birthday probing needs: does the port depend on the destination).
    pub fn behaviour(&self) -> MappingBehaviour {
        if self.seen.len() < 2 {
            return MappingBehaviour::Unknown;
        }
        let obs: Vec<MappingObservation> = self
            .seen
            .iter()
            .map(|(&server, &mapped)| MappingObservation { server, mapped })
            .collect();
        // No local addresses given: "no NAT" is endpoint-independent here.
        match classify_mapping(&[], &obs) {
            Mapping::None | Mapping::EndpointIndependent => MappingBehaviour::EndpointIndependent,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent => {
                MappingBehaviour::EndpointDependent
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn two_servers_seeing_different_ports_mean_endpoint_dependent() {
        let a = sa("203.0.113.10:3478");
        let b = sa("203.0.113.11:3479");
        let mut m = StunMappings::default();
        m.set_servers(&[a, b]);
        assert_eq!(m.behaviour(), MappingBehaviour::Unknown);
        // The other server answered first: used until the primary answers.
        assert!(m.record(b, sa("198.51.100.1:2000")));
        assert_eq!(m.behaviour(), MappingBehaviour::Unknown);
        assert!(m.record(a, sa("198.51.100.1:1000")));
        assert_eq!(m.behaviour(), MappingBehaviour::EndpointDependent);
        // From now on only the primary's answer is our srflx.
        assert!(!m.record(b, sa("198.51.100.1:2000")));
        assert!(m.record(a, sa("198.51.100.1:1000")));
        m.record(b, sa("198.51.100.1:1000"));
        assert_eq!(m.behaviour(), MappingBehaviour::EndpointIndependent);
        // An answer from an unknown server changes nothing.
        assert!(m.record(sa("192.0.2.1:1"), sa("198.51.100.1:5")));
        assert_eq!(m.behaviour(), MappingBehaviour::EndpointIndependent);
    }

    #[test]
    fn only_answers_to_pending_requests_are_ours_and_they_expire() {
        let t0 = Instant::now();
        let mut d = Discovery::new(t0, 7);
        d.set_servers(t0, vec![sa("203.0.113.10:3478")]);
        let reqs = d.due(t0, Duration::from_secs(25));
        assert_eq!(reqs.len(), 1);
        assert!(d.due(t0, Duration::from_secs(25)).is_empty());
        let server = stun::BindingServer::new("test", [Some(reqs[0].0), None, None, None]);
        let resp = server
            .handle(0, sa("198.51.100.1:4000"), &reqs[0].1)
            .map(|r| r.bytes)
            .unwrap_or_default();
        assert!(d.is_ours(&resp));
        let a = d.on_response(t0 + Duration::from_millis(30), reqs[0].0, &resp);
        assert_eq!(
            a.map(|a| (a.purpose, a.mapped, a.rtt)),
            Some((
                Purpose::Srflx,
                Some(sa("198.51.100.1:4000")),
                Duration::from_millis(30)
            ))
        );
        // Answered once: a replay is not ours any more.
        assert!(!d.is_ours(&resp));
        // An unanswered request expires after STUN_TIMEOUT.
        let _ = d.request(t0, Purpose::RelayLatency(0));
        assert_eq!(d.poll_timeout(), t0 + STUN_TIMEOUT);
        let _ = d.due(t0 + STUN_TIMEOUT, Duration::from_secs(25));
        assert_eq!(d.pending.len(), 0);
    }
}
