//! NAT classification (RFC 4787 / RFC 5780 terms) from the results of STUN probes, the
//! `meshpunch netcheck` report, and the choice of the home relay region.
//!
//! Everything here is pure: the client sends the Binding requests from its data socket and
//! feeds the results in; these functions decide what they mean.
//!
//! * **Mapping** (RFC 5780 §4.3): the client asks servers at different addresses for its
//!   mapped address. Same mapping towards every destination → endpoint-independent; a mapping
//!   that changes with the destination IP only → address-dependent; one that also changes with
//!   the destination port → address-and-port-dependent ("symmetric").
//! * **Filtering** (RFC 5780 §4.4): with CHANGE-REQUEST the server answers from its other IP
//!   and port (test II) or other port only (test III). An answer to II → endpoint-independent;
//!   to III only → address-dependent; neither → address-and-port-dependent. A server without a
//!   second address (no OTHER-ADDRESS, or error 420) leaves filtering `unknown`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the NAT maps an internal address to external ones (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No translation seen (the mapped address is our own), or no UDP answer at all.
    None,
    /// The same external address whatever the destination (easy to punch).
    EndpointIndependent,
    /// The external address changes with the destination IP.
    AddressDependent,
    /// The external address changes with destination IP and port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound packets the NAT lets through to a mapping (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// From anyone ("full cone").
    EndpointIndependent,
    /// From any port of an IP we sent to.
    AddressDependent,
    /// Only from the exact IP and port we sent to.
    AddressAndPortDependent,
    /// Not measurable (the server has no second address).
    Unknown,
}

/// One Binding request result: which server address we asked and what it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingObservation {
    /// The server address the request went to.
    pub server: SocketAddr,
    /// XOR-MAPPED-ADDRESS of the answer.
    pub mapped: SocketAddr,
}

/// Classifies the mapping behaviour from Binding results sent from ONE local socket whose
/// address(es) are `local` (every interface address with the socket's port).
///
/// With two server IPs and, for one of them, two ports, the three RFC 5780 cases are told
/// apart. With only two different IPs and different mappings, address-dependent and
/// address-and-port-dependent cannot be separated: the result is the more conservative
/// address-and-port-dependent.
pub fn classify_mapping(local: &[SocketAddr], obs: &[MappingObservation]) -> Mapping {
    let Some(first) = obs.first() else {
        return Mapping::None;
    };
    if obs.iter().all(|o| o.mapped == first.mapped) {
        if local.contains(&first.mapped) {
            return Mapping::None;
        }
        return Mapping::EndpointIndependent;
    }
    // Different mappings somewhere. Same server IP, different port, different mapping → APD.
    let mut same_ip_pair_equal = false;
    for (i, a) in obs.iter().enumerate() {
        for b in &obs[i + 1..] {
            if a.server.ip() == b.server.ip() && a.server.port() != b.server.port() {
                if a.mapped != b.mapped {
                    return Mapping::AddressAndPortDependent;
                }
                same_ip_pair_equal = true;
            }
        }
    }
    if same_ip_pair_equal {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    }
}

/// Classifies filtering from the RFC 5780 CHANGE-REQUEST tests: `change_ip_port` is whether
/// an answer came back to a request with change-IP and change-port set (test II),
/// `change_port` whether one came back to change-port only (test III). `None` means the test
/// could not be run (the server has no alternate address).
pub fn classify_filtering(change_ip_port: Option<bool>, change_port: Option<bool>) -> Filtering {
    match (change_ip_port, change_port) {
        (Some(true), _) => Filtering::EndpointIndependent,
        (Some(false), Some(true)) => Filtering::AddressDependent,
        (Some(false), Some(false)) => Filtering::AddressAndPortDependent,
        (None, Some(true)) => Filtering::AddressDependent,
        _ => Filtering::Unknown,
    }
}

/// Whether the NAT kept the local port for its mapping (RFC 4787 §4.2.1).
pub fn port_preserving(local_port: u16, obs: &[MappingObservation]) -> Option<bool> {
    let first = obs.first()?;
    Some(first.mapped.port() == local_port)
}

/// Whether two peers with these NAT behaviours can expect a punched direct path.
/// Symmetric on both sides, or symmetric against port-restricted, generally needs the relay
/// (or luck with port prediction).
pub fn direct_likely(a: (Mapping, Filtering), b: (Mapping, Filtering)) -> bool {
    let hard = |m: Mapping| {
        matches!(
            m,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    };
    match (hard(a.0), hard(b.0)) {
        (false, false) => true,
        (true, true) => false,
        (true, false) => b.1 != Filtering::AddressAndPortDependent,
        (false, true) => a.1 != Filtering::AddressAndPortDependent,
    }
}

/// Latency measured to one relay region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayLatency {
    /// Region name from the relay map.
    pub region: String,
    /// Address of the relay that was measured (`host:port`).
    pub addr: String,
    /// Round-trip time of a STUN Binding to it, milliseconds; `null` if it did not answer.
    pub latency_ms: Option<f64>,
}

/// Relative improvement a new region needs before the home relay moves (hysteresis).
pub const RELAY_SWITCH_FACTOR: f64 = 0.7;
/// Absolute improvement (ms) a new region needs before the home relay moves.
pub const RELAY_SWITCH_MIN_GAIN_MS: f64 = 10.0;

/// Picks the home relay region: the lowest latency, but the current one is kept unless the best
/// is at least 30 % and 10 ms faster, so the home relay does not flap between close regions.
pub fn choose_relay(current: Option<&str>, latencies: &[RelayLatency]) -> Option<String> {
    let best = latencies
        .iter()
        .filter_map(|r| r.latency_ms.map(|l| (r, l)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    if let Some(cur) = current {
        if let Some(cur_lat) = latencies
            .iter()
            .find(|r| r.region == cur)
            .and_then(|r| r.latency_ms)
        {
            let better = best.1 < cur_lat * RELAY_SWITCH_FACTOR
                && cur_lat - best.1 >= RELAY_SWITCH_MIN_GAIN_MS;
            if !better {
                return Some(cur.to_string());
            }
        }
    }
    Some(best.0.region.clone())
}

/// Estimate of how long the NAT keeps an idle UDP mapping (`netcheck --long`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingLifetime {
    /// The mapping survived this many idle seconds.
    pub at_least_s: u64,
    /// The mapping was gone after this many idle seconds (`null` if it never expired within
    /// the test).
    pub at_most_s: Option<u64>,
}

/// Idle periods tried by the binding-lifetime test, shortest first (seconds).
pub const LIFETIME_STEPS_S: [u64; 6] = [5, 15, 30, 60, 120, 180];

/// The binding-lifetime search (`netcheck --long`): after each idle period the client sends a
/// Binding request from the same socket; a changed mapped address means the old mapping
/// expired. (A port-preserving NAT may re-create the same mapping, so the result is a lower
/// bound on how long a mapping is *usable*, which is what keepalives need.)
#[derive(Debug, Clone)]
pub struct LifetimeSearch {
    step: usize,
    at_least: u64,
    at_most: Option<u64>,
    max_s: u64,
}

impl LifetimeSearch {
    /// A search that idles no longer than `max` in one step.
    pub fn new(max: Duration) -> Self {
        LifetimeSearch {
            step: 0,
            at_least: 0,
            at_most: None,
            max_s: max.as_secs(),
        }
    }
    /// How long to stay idle before the next request, or `None` when done.
    pub fn next_idle(&self) -> Option<Duration> {
        if self.at_most.is_some() {
            return None;
        }
        LIFETIME_STEPS_S
            .get(self.step)
            .filter(|s| **s <= self.max_s)
            .map(|s| Duration::from_secs(*s))
    }
    /// Feeds the result of the request after the idle period: `same_mapping` = the mapped
    /// address did not change.
    pub fn record(&mut self, same_mapping: bool) {
        let Some(s) = LIFETIME_STEPS_S.get(self.step).copied() else {
            return;
        };
        if same_mapping {
            self.at_least = s;
            self.step += 1;
        } else {
            self.at_most = Some(s);
        }
    }
    /// The estimate so far.
    pub fn result(&self) -> BindingLifetime {
        BindingLifetime {
            at_least_s: self.at_least,
            at_most_s: self.at_most,
        }
    }
}

/// Default keepalive interval when the binding lifetime is unknown (the value WireGuard's
/// `PersistentKeepalive` and Tailscale use).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(25);

/// Keepalive interval for a measured binding lifetime: half the shortest lifetime seen (and
/// never more than the longest idle period the mapping is known to survive), between 2 s and
/// [`DEFAULT_KEEPALIVE`]. Half, so that one lost keepalive does not cost the mapping.
pub fn keepalive_interval(lifetime: Option<BindingLifetime>) -> Duration {
    match lifetime {
        Some(BindingLifetime {
            at_least_s,
            at_most_s: Some(s),
        }) => {
            let mut k = s / 2;
            if at_least_s > 0 {
                k = k.min(at_least_s);
            }
            Duration::from_secs(k).clamp(Duration::from_secs(2), DEFAULT_KEEPALIVE)
        }
        _ => DEFAULT_KEEPALIVE,
    }
}

/// The `meshpunch netcheck --json` report. Keys are stable; new keys may be added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// Any STUN answer over UDP arrived.
    pub udp: bool,
    /// An IPv4 STUN answer arrived.
    pub ipv4: bool,
    /// An IPv6 STUN answer arrived.
    pub ipv6: bool,
    /// Our IPv4 (or, without IPv4, IPv6) address as the STUN server saw it.
    pub public_addr: Option<SocketAddr>,
    /// Our IPv6 address as a STUN server saw it.
    pub public_addr_v6: Option<SocketAddr>,
    /// Global IPv6 addresses of this host's interfaces (not unique-local, not link-local):
    /// offered to peers as direct host candidates, reachable without NAT where the path and
    /// the firewalls allow (a stateful firewall is opened by simultaneous probing).
    #[serde(default)]
    pub ipv6_host_addrs: Vec<IpAddr>,
    /// The local address of the socket the tests ran from.
    pub local_addr: Option<SocketAddr>,
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// The NAT kept our local port.
    pub port_preserving: Option<bool>,
    /// A packet sent to our own public address came back (`null` = not tested).
    pub hairpin: Option<bool>,
    /// Latency to every relay region.
    pub relays: Vec<RelayLatency>,
    /// Region with the lowest latency.
    pub preferred_relay: Option<String>,
    /// Binding lifetime estimate (`--long` only).
    pub binding_lifetime: Option<BindingLifetime>,
    /// Every Binding result used (server → mapped), for debugging.
    pub observations: Vec<ObservationJson>,
    /// What the gateway offers for port mapping and the address it mapped (`null` when port
    /// mapping was not tried: `--no-port-mapping`, or no default gateway).
    #[serde(default)]
    pub portmap: Option<crate::portmap::Report>,
    /// Which transports reach the rendezvous (`null` without `--connect`).
    #[serde(default)]
    pub tcp_fallback: Option<TcpFallback>,
    /// One line for a person: what paths to expect ([`NetcheckReport::verdict_line`]), filled
    /// in once the report is complete.
    #[serde(default)]
    pub verdict: String,
}

/// Whether the rendezvous answers over QUIC (UDP) and over its TLS-over-TCP fallback: a
/// network that blocks UDP shows `quic_ok: false, tcp_ok: true`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpFallback {
    /// A QUIC handshake with the rendezvous completed.
    pub quic_ok: bool,
    /// A TLS handshake over TCP with the rendezvous completed.
    pub tcp_ok: bool,
    /// Time the QUIC handshake took, ms.
    pub quic_ms: Option<u32>,
    /// Time the TCP connect and TLS handshake took, ms.
    pub tcp_ms: Option<u32>,
    /// The rendezvous address tried over QUIC.
    pub quic_addr: Option<SocketAddr>,
    /// The rendezvous address tried over TCP.
    pub tcp_addr: Option<SocketAddr>,
    /// Why QUIC failed.
    pub quic_error: Option<String>,
    /// Why TCP failed.
    pub tcp_error: Option<String>,
}

/// One Binding result in the JSON report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationJson {
    /// Server address asked.
    pub server: SocketAddr,
    /// Mapped address it saw.
    pub mapped: SocketAddr,
}

impl From<MappingObservation> for ObservationJson {
    fn from(o: MappingObservation) -> Self {
        ObservationJson {
            server: o.server,
            mapped: o.mapped,
        }
    }
}

impl NetcheckReport {
    /// Builds the report from raw test results.
    #[allow(clippy::too_many_arguments)]
    pub fn from_results(
        local: &[SocketAddr],
        local_port: u16,
        obs: &[MappingObservation],
        change_ip_port: Option<bool>,
        change_port: Option<bool>,
        hairpin: Option<bool>,
        relays: Vec<RelayLatency>,
        binding_lifetime: Option<BindingLifetime>,
    ) -> Self {
        let v4: Vec<MappingObservation> =
            obs.iter().filter(|o| o.mapped.is_ipv4()).copied().collect();
        let v6: Vec<MappingObservation> =
            obs.iter().filter(|o| o.mapped.is_ipv6()).copied().collect();
        let main = if v4.is_empty() { &v6 } else { &v4 };
        let udp = !obs.is_empty();
        let preferred_relay = choose_relay(None, &relays);
        NetcheckReport {
            udp,
            ipv4: !v4.is_empty(),
            ipv6: !v6.is_empty(),
            public_addr: main.first().map(|o| o.mapped),
            public_addr_v6: v6.first().map(|o| o.mapped),
            ipv6_host_addrs: Vec::new(),
            local_addr: local.first().copied(),
            mapping: classify_mapping(local, main),
            filtering: if udp {
                classify_filtering(change_ip_port, change_port)
            } else {
                Filtering::Unknown
            },
            port_preserving: port_preserving(local_port, main),
            hairpin,
            relays,
            preferred_relay,
            binding_lifetime,
            observations: obs.iter().map(|o| (*o).into()).collect(),
            portmap: None,
            tcp_fallback: None,
            verdict: String::new(),
        }
    }

    /// What paths this host should expect, in one line: the NAT's mapping behaviour decides
    /// whether a punched hole works with most peers (endpoint-independent, RFC 4787 §4.1) or
    /// needs birthday punching or the relay (endpoint-dependent, "symmetric"); a port mapping
    /// from the gateway makes a symmetric NAT easy again; no UDP at all leaves the relay (over
    /// TLS/TCP when the rendezvous answers there).
    pub fn verdict_line(&self) -> String {
        let mapped = self.portmap.as_ref().and_then(|p| p.mapped);
        if !self.udp {
            return match &self.tcp_fallback {
                Some(t) if t.tcp_ok => {
                    "UDP blocked: expect the relay over TLS/TCP for every peer".to_string()
                }
                _ => "no UDP answer: expect no path unless UDP is allowed".to_string(),
            };
        }
        match self.mapping {
            Mapping::None | Mapping::EndpointIndependent => {
                "direct paths likely with most peers".to_string()
            }
            Mapping::AddressDependent | Mapping::AddressAndPortDependent => match mapped {
                Some(m) => format!(
                    "symmetric NAT, but the gateway maps {m}: direct paths likely with most peers"
                ),
                None => "symmetric NAT: expect birthday punching or relay".to_string(),
            },
        }
    }

    /// Human-readable multi-line summary (what `meshpunch netcheck` prints without `--json`).
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let opt = |o: Option<bool>| match o {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        let _ = writeln!(s, "Report:");
        let _ = writeln!(s, "\t* UDP: {}", self.udp);
        let _ = writeln!(s, "\t* IPv4: {}, IPv6: {}", self.ipv4, self.ipv6);
        if let Some(a) = self.public_addr {
            let _ = writeln!(s, "\t* Public address: {a}");
        }
        if let Some(a) = self.public_addr_v6 {
            let _ = writeln!(s, "\t* Public IPv6 address: {a}");
        }
        if !self.ipv6_host_addrs.is_empty() {
            let list: Vec<String> = self.ipv6_host_addrs.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(s, "\t* Global IPv6 host addresses: {}", list.join(", "));
        }
        let _ = writeln!(s, "\t* Mapping: {}", mapping_str(self.mapping));
        let _ = writeln!(s, "\t* Filtering: {}", filtering_str(self.filtering));
        let _ = writeln!(s, "\t* Port preserving: {}", opt(self.port_preserving));
        let _ = writeln!(s, "\t* Hairpinning: {}", opt(self.hairpin));
        if let Some(l) = self.binding_lifetime {
            match l.at_most_s {
                Some(m) => {
                    let _ = writeln!(s, "\t* Binding lifetime: {}-{} s", l.at_least_s, m);
                }
                None => {
                    let _ = writeln!(s, "\t* Binding lifetime: > {} s", l.at_least_s);
                }
            }
        }
        if let Some(p) = &self.portmap {
            let _ = writeln!(s, "\t* Port mapping: {}", p.to_line());
        }
        let _ = writeln!(
            s,
            "\t* Preferred relay: {}",
            self.preferred_relay.as_deref().unwrap_or("none")
        );
        if let Some(t) = &self.tcp_fallback {
            let ok = |ok: bool, ms: Option<u32>, err: &Option<String>| match (ok, ms) {
                (true, Some(ms)) => format!("yes ({ms} ms)"),
                (true, None) => "yes".to_string(),
                (false, _) => format!("no ({})", err.as_deref().unwrap_or("no answer")),
            };
            let _ = writeln!(
                s,
                "\t* Rendezvous over QUIC: {}; over TLS/TCP: {}",
                ok(t.quic_ok, t.quic_ms, &t.quic_error),
                ok(t.tcp_ok, t.tcp_ms, &t.tcp_error)
            );
        }
        let _ = writeln!(s, "\t* Relay latencies:");
        for r in &self.relays {
            match r.latency_ms {
                Some(l) => {
                    let _ = writeln!(s, "\t\t- {}: {:.1} ms ({})", r.region, l, r.addr);
                }
                None => {
                    let _ = writeln!(s, "\t\t- {}: no answer ({})", r.region, r.addr);
                }
            }
        }
        let _ = writeln!(s, "Verdict: {}", self.verdict_line());
        s
    }
}

/// The JSON/CLI spelling of a mapping behaviour.
pub fn mapping_str(m: Mapping) -> &'static str {
    match m {
        Mapping::None => "none",
        Mapping::EndpointIndependent => "endpoint-independent",
        Mapping::AddressDependent => "address-dependent",
        Mapping::AddressAndPortDependent => "address-and-port-dependent",
    }
}

/// The JSON/CLI spelling of a filtering behaviour.
pub fn filtering_str(f: Filtering) -> &'static str {
    match f {
        Filtering::EndpointIndependent => "endpoint-independent",
        Filtering::AddressDependent => "address-dependent",
        Filtering::AddressAndPortDependent => "address-and-port-dependent",
        Filtering::Unknown => "unknown",
    }
}

/// Whether an address is one a LAN peer would use (private, link-local, CGNAT shared space or
/// unique-local IPv6) rather than a public one.
pub fn is_lan_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_link_local()
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }
    fn o(server: &str, mapped: &str) -> MappingObservation {
        MappingObservation {
            server: sa(server),
            mapped: sa(mapped),
        }
    }

    #[test]
    fn same_mapping_everywhere_is_endpoint_independent() {
        let obs = [
            o("1.1.1.1:3478", "5.5.5.5:4000"),
            o("2.2.2.2:3478", "5.5.5.5:4000"),
            o("2.2.2.2:3479", "5.5.5.5:4000"),
        ];
        assert_eq!(
            classify_mapping(&[sa("10.0.0.2:4000")], &obs),
            Mapping::EndpointIndependent
        );
    }

    #[test]
    fn own_address_is_no_nat() {
        let obs = [o("1.1.1.1:3478", "5.5.5.5:4000")];
        assert_eq!(classify_mapping(&[sa("5.5.5.5:4000")], &obs), Mapping::None);
        assert_eq!(classify_mapping(&[], &[]), Mapping::None);
    }

    #[test]
    fn mapping_per_ip_is_address_dependent() {
        let obs = [
            o("1.1.1.1:3478", "5.5.5.5:4000"),
            o("2.2.2.2:3478", "5.5.5.5:4001"),
            o("2.2.2.2:3479", "5.5.5.5:4001"),
        ];
        assert_eq!(classify_mapping(&[], &obs), Mapping::AddressDependent);
    }

    #[test]
    fn mapping_per_port_is_symmetric() {
        let obs = [
            o("1.1.1.1:3478", "5.5.5.5:4000"),
            o("2.2.2.2:3478", "5.5.5.5:4001"),
            o("2.2.2.2:3479", "5.5.5.5:4002"),
        ];
        assert_eq!(
            classify_mapping(&[], &obs),
            Mapping::AddressAndPortDependent
        );
        // Two IPs only: conservative.
        assert_eq!(
            classify_mapping(&[], &obs[..2]),
            Mapping::AddressAndPortDependent
        );
    }

    #[test]
    fn filtering_from_change_request_results() {
        assert_eq!(
            classify_filtering(Some(true), None),
            Filtering::EndpointIndependent
        );
        assert_eq!(
            classify_filtering(Some(false), Some(true)),
            Filtering::AddressDependent
        );
        assert_eq!(
            classify_filtering(Some(false), Some(false)),
            Filtering::AddressAndPortDependent
        );
        assert_eq!(classify_filtering(None, None), Filtering::Unknown);
    }

    #[test]
    fn home_relay_has_hysteresis() {
        let l = |r: &str, ms: f64| RelayLatency {
            region: r.into(),
            addr: "x".into(),
            latency_ms: Some(ms),
        };
        let lat = [l("eu", 40.0), l("us", 35.0)];
        assert_eq!(choose_relay(None, &lat).as_deref(), Some("us"));
        assert_eq!(choose_relay(Some("eu"), &lat).as_deref(), Some("eu"));
        let lat = [l("eu", 40.0), l("us", 20.0)];
        assert_eq!(choose_relay(Some("eu"), &lat).as_deref(), Some("us"));
        assert_eq!(choose_relay(None, &[]), None);
    }

    #[test]
    fn lifetime_search_stops_at_first_expiry() {
        let mut s = LifetimeSearch::new(Duration::from_secs(60));
        assert_eq!(s.next_idle(), Some(Duration::from_secs(5)));
        s.record(true);
        s.record(true);
        assert_eq!(s.next_idle(), Some(Duration::from_secs(30)));
        s.record(false);
        assert_eq!(s.next_idle(), None);
        assert_eq!(
            s.result(),
            BindingLifetime {
                at_least_s: 15,
                at_most_s: Some(30)
            }
        );
        assert_eq!(
            keepalive_interval(Some(s.result())),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn report_from_results_classifies() {
        let r = NetcheckReport::from_results(
            &[sa("10.0.0.2:4000")],
            4000,
            &[o("1.1.1.1:3478", "5.5.5.5:4000")],
            None,
            None,
            Some(false),
            vec![],
            None,
        );
        assert_eq!(r.mapping, Mapping::EndpointIndependent);
        assert_eq!(r.filtering, Filtering::Unknown);
        assert_eq!(r.public_addr, Some(sa("5.5.5.5:4000")));
        assert!(r.to_text().contains("Mapping: endpoint-independent"));
    }

    #[test]
    fn the_verdict_follows_mapping_port_mapping_and_udp() {
        let mut r = NetcheckReport::from_results(
            &[sa("10.0.0.2:4000")],
            4000,
            &[o("1.1.1.1:3478", "5.5.5.5:4000")],
            None,
            None,
            None,
            vec![],
            None,
        );
        assert_eq!(r.verdict_line(), "direct paths likely with most peers");
        assert!(r
            .to_text()
            .ends_with("Verdict: direct paths likely with most peers\n"));
        r.mapping = Mapping::AddressAndPortDependent;
        assert_eq!(
            r.verdict_line(),
            "symmetric NAT: expect birthday punching or relay"
        );
        r.portmap = Some(crate::portmap::Report {
            upnp: false,
            pmp: true,
            pcp: false,
            mapped: Some(sa("5.5.5.5:41641")),
        });
        assert!(r
            .verdict_line()
            .contains("gateway maps 5.5.5.5:41641: direct paths likely"));
        r.udp = false;
        assert!(r.verdict_line().starts_with("no UDP answer"));
    }

    #[test]
    fn direct_likely_matrix() {
        let eim = (
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
        );
        let sym = (
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
        );
        assert!(direct_likely(eim, eim));
        assert!(!direct_likely(sym, sym));
        assert!(!direct_likely(sym, eim));
        assert!(direct_likely(
            sym,
            (Mapping::EndpointIndependent, Filtering::EndpointIndependent)
        ));
    }
}
