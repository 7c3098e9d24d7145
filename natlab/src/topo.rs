//! Topologies: an "internet", a server host, and sites behind NAT routers of each behaviour.
//!
//! ```text
//!                         ┌──────── srv ────────┐  203.0.113.10 rendezvous + STUN
//!                         │ eth0                │  203.0.113.11 STUN alternate (RFC 5780)
//!                         └──────────┬──────────┘  203.0.113.20 relay
//!                      (shaper: delay/loss on this link)
//!   ┌────────────────────────── inet (router) ───────────────────────────┐
//!   d-a 198.51.100.1/30     d-b 198.51.100.5/30      d-o … (open host)
//!    │                        │
//!   wan .2 [NAT a]           wan .6 [carrier NAT bcg] — cpe 100.64.1.1 ─ wan 100.64.1.2 [NAT b]
//!   lan 192.168.1.1/24       …
//!   ├─ a1 192.168.1.10
//!   └─ a2 192.168.1.11   (the café: two hosts on one LAN behind one NAT)
//! ```
//!
//! Addresses are documentation ranges (RFC 5737), CGNAT space (RFC 6598) and private LANs,
//! and exist only inside the lab's namespaces. Every site has its own LAN subnet
//! `192.168.<k>.0/24`, so no two hosts of the lab share an address.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::lab::Lab;
use crate::Error;

/// Address of the internet router on the server link.
pub const SERVER_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Server address for the rendezvous (QUIC) and STUN.
pub const SERVER_PRIMARY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Second server address: the STUN alternate address of RFC 5780 (OTHER-ADDRESS).
pub const SERVER_ALTERNATE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// Server address for the TURN relay.
pub const SERVER_RELAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The server subnet as routed by the internet router.
pub const SERVER_NET: &str = "203.0.113.0/24";

/// Internet links of port-mapping routers: miniupnpd treats RFC 5737 documentation ranges as
/// reserved ("port forwarding is impossible"), so these links use 100.128.0.0/24, outside the
/// CGNAT block and public for meshpunch's address classes. It exists only inside the lab.
pub const PORTMAP_WAN_NET: [u8; 3] = [100, 128, 0];
/// The lifetime cap miniupnpd grants in the lab (`max_lifetime`), seconds: short, so renewals
/// and a router restart show within seconds.
pub const PORTMAP_MAX_LIFETIME: u32 = 20;

/// How a site reaches the internet (RFC 4787 terms in the docs of each variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Nat {
    /// No NAT: the host has a public address.
    Open,
    /// Endpoint-independent mapping, address-and-port-dependent filtering
    /// (port-restricted cone): nftables `masquerade`, which keeps the source port.
    PortRestricted,
    /// Endpoint-independent mapping and filtering (full cone): `masquerade` plus a prerouting
    /// `dnat` of every inbound UDP port to the first host.
    FullCone,
    /// Address-and-port-dependent mapping with random ports (symmetric):
    /// `masquerade random,fully-random`.
    Symmetric,
    /// Carrier-grade NAT (`masquerade` in 100.64.0.0/10) in front of a home `masquerade`.
    DoubleNat,
    /// Port-restricted NAT that also drops all UDP except to and from the servers.
    UdpBlocked,
    /// A network that drops **every** UDP packet, both ways (servers included), and lets TCP
    /// out only to the servers' ports 443 and 80 (corporate or hotel networks). Not in
    /// [`Nat::ALL`]: the matrix row `udp-blocked` keeps its meaning until the client relays
    /// over TURN-over-TLS; tests of the TCP fallback name this site type themselves.
    UdpBlockedAll,
}

impl Nat {
    /// Every behaviour, in table order.
    pub const ALL: [Nat; 6] = [
        Nat::Open,
        Nat::PortRestricted,
        Nat::FullCone,
        Nat::Symmetric,
        Nat::DoubleNat,
        Nat::UdpBlocked,
    ];

    /// Short name used in CLI arguments and tables.
    pub fn name(self) -> &'static str {
        match self {
            Nat::Open => "open",
            Nat::PortRestricted => "port-restricted",
            Nat::FullCone => "full-cone",
            Nat::Symmetric => "symmetric",
            Nat::DoubleNat => "double-nat",
            Nat::UdpBlocked => "udp-blocked",
            Nat::UdpBlockedAll => "udp-blocked-all",
        }
    }

    /// Parses [`Nat::name`].
    pub fn parse(s: &str) -> Option<Nat> {
        Nat::ALL
            .into_iter()
            .chain([Nat::UdpBlockedAll])
            .find(|n| n.name() == s)
    }

    /// True when the mapping does not depend on the destination (a peer can reach the address
    /// the servers observed).
    pub fn endpoint_independent_mapping(self) -> bool {
        !matches!(self, Nat::Symmetric)
    }

    /// The `mapping` value `meshpunch netcheck --json` should report behind this NAT
    /// (`none`: no translation).
    pub fn expected_mapping(self) -> &'static str {
        match self {
            Nat::Open => "none",
            Nat::Symmetric => "address-and-port-dependent",
            _ => "endpoint-independent",
        }
    }

    /// The `filtering` value netcheck should report (RFC 5780 test with CHANGE-REQUEST).
    pub fn expected_filtering(self) -> &'static str {
        match self {
            Nat::Open | Nat::FullCone => "endpoint-independent",
            _ => "address-and-port-dependent",
        }
    }
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One site to build: a NAT router with hosts behind it (or open hosts).
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Site name: 1–8 lowercase letters/digits. Hosts are `<name>1`, `<name>2`, ….
    pub name: String,
    /// Behaviour of the site's NAT.
    pub nat: Nat,
    /// Number of hosts on the site's LAN (each open host gets its own public link).
    pub hosts: usize,
    /// The router runs Debian's `miniupnpd` (nftables backend) offering UPnP IGD, NAT-PMP and
    /// PCP to its LAN ([`TopologySpec::with_port_mapping`]).
    pub port_mapping: bool,
    /// The router's internet side accepts unsolicited UDP to the router itself (no
    /// `ct state new drop` in its input hook), like a plain Linux masquerade router with an
    /// accepting input policy ([`TopologySpec::accepting`]).
    pub accepting: bool,
}

/// What to build: sites, and the delay/loss between everything and the servers.
#[derive(Debug, Clone, Default)]
pub struct TopologySpec {
    /// Sites in build order.
    pub sites: Vec<SiteSpec>,
    /// One-way delay added on the server link (each direction).
    pub server_delay: Duration,
    /// Loss probability on the server link (each direction).
    pub server_loss: f64,
}

impl TopologySpec {
    /// An empty topology: internet router and server host only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a site.
    pub fn site(mut self, name: &str, nat: Nat, hosts: usize) -> Self {
        self.sites.push(SiteSpec {
            name: name.to_string(),
            nat,
            hosts,
            port_mapping: false,
            accepting: false,
        });
        self
    }

    /// Makes the router of the last site added accept unsolicited UDP from the internet (its
    /// input hook has no `ct state new drop`): every datagram to the router's public address
    /// makes a conntrack entry, which then collides with the mapping a host's own first packet
    /// to that address and port needs (masquerade picks another source port). The router of a
    /// double NAT (the home router, behind the carrier NAT) is the one that accepts.
    pub fn accepting(mut self) -> Self {
        if let Some(s) = self.sites.last_mut() {
            s.accepting = true;
        }
        self
    }

    /// Makes the router of the last site added offer port mapping (UPnP IGD, NAT-PMP, PCP)
    /// with `miniupnpd`. Its internet link is numbered from [`PORTMAP_WAN_NET`] instead of the
    /// documentation range, which miniupnpd refuses as an external address.
    pub fn with_port_mapping(mut self) -> Self {
        if let Some(s) = self.sites.last_mut() {
            s.port_mapping = true;
        }
        self
    }

    /// Sets the one-way delay between the internet and the servers.
    pub fn server_delay(mut self, delay: Duration) -> Self {
        self.server_delay = delay;
        self
    }

    /// Sets the loss probability between the internet and the servers.
    pub fn server_loss(mut self, loss: f64) -> Self {
        self.server_loss = loss;
        self
    }

    /// The named topologies `natlab up NAME` knows, with a one-line description.
    pub fn catalogue() -> Vec<(&'static str, &'static str)> {
        vec![
            ("cafe", "two hosts on one LAN behind one NAT (cafe1, cafe2), a remote host (home1), servers 50 ms away"),
            ("pair", "two hosts behind two port-restricted NATs (a1, b1), servers 25 ms away"),
            ("matrix", "two sites of each NAT behaviour (hosts op1 opb1, pr1 prb1, fc1 fcb1, sy1 syb1, dn1 dnb1), UDP-blocked ub1, xb1, and routers that accept unsolicited UDP (pra1, fca1, sya1)"),
            ("symmetric", "two hosts behind two symmetric NATs (s1, t1)"),
        ]
    }

    /// The topology called `name` in [`TopologySpec::catalogue`].
    pub fn named(name: &str) -> Option<TopologySpec> {
        let t = TopologySpec::new();
        Some(match name {
            "cafe" => t
                .site("cafe", Nat::PortRestricted, 2)
                .site("home", Nat::PortRestricted, 1)
                .server_delay(Duration::from_millis(50)),
            "pair" => t
                .site("a", Nat::PortRestricted, 1)
                .site("b", Nat::PortRestricted, 1)
                .server_delay(Duration::from_millis(25)),
            "matrix" => matrix_spec(),
            "symmetric" => t.site("s", Nat::Symmetric, 1).site("t", Nat::Symmetric, 1),
            _ => return None,
        })
    }

    /// Builds the topology in a fresh test lab.
    pub fn build(self) -> Result<Topology, Error> {
        let lab = Lab::new()?;
        self.build_in(lab)
    }

    /// Builds the topology into `lab` (fresh or persistent).
    pub fn build_in(self, lab: Lab) -> Result<Topology, Error> {
        build(self, lab)
    }
}

/// Two sites of every behaviour but UDP-blocked (one of that), plus port-restricted, full-cone
/// and symmetric routers that accept unsolicited UDP (`pra`, `fca`, `sya`), for the NAT-pair
/// matrix. The host of site `x` is `x1`.
pub fn matrix_spec() -> TopologySpec {
    TopologySpec::new()
        .site("op", Nat::Open, 1)
        .site("opb", Nat::Open, 1)
        .site("pr", Nat::PortRestricted, 1)
        .site("prb", Nat::PortRestricted, 1)
        .site("fc", Nat::FullCone, 1)
        .site("fcb", Nat::FullCone, 1)
        .site("sy", Nat::Symmetric, 1)
        .site("syb", Nat::Symmetric, 1)
        .site("dn", Nat::DoubleNat, 1)
        .site("dnb", Nat::DoubleNat, 1)
        .site("ub", Nat::UdpBlocked, 1)
        .site("xb", Nat::UdpBlockedAll, 1)
        .site("pra", Nat::PortRestricted, 1)
        .accepting()
        .site("fca", Nat::FullCone, 1)
        .accepting()
        .site("sya", Nat::Symmetric, 1)
        .accepting()
        .server_delay(Duration::from_millis(10))
}

/// A host: where processes of a scenario run.
#[derive(Debug, Clone)]
pub struct Host {
    /// Node name (`<site><i>`); the namespace is `Lab::ns(name)`.
    pub name: String,
    /// Site the host belongs to.
    pub site: String,
    /// Behaviour of the NAT in front of it.
    pub nat: Nat,
    /// The host's own address.
    pub ip: Ipv4Addr,
    /// The outermost public address its traffic leaves from (its own for an open host).
    pub public_ip: Ipv4Addr,
}

/// A built topology. Dropping it tears the lab down (unless it is persistent).
#[derive(Debug)]
pub struct Topology {
    /// The lab holding namespaces and processes.
    pub lab: Lab,
    hosts: BTreeMap<String, Host>,
    /// Node name of the server host.
    pub server: String,
    /// Node name of the internet router.
    pub internet: String,
    /// Sites as built.
    pub sites: Vec<SiteSpec>,
}

impl Topology {
    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&Host, Error> {
        self.hosts
            .get(name)
            .ok_or_else(|| Error::Setup(format!("no host {name:?} in topology")))
    }

    /// Every host, by name.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    /// Pings `dst` from node `from` `count` times, 0.2 s apart; returns min/avg/max RTT.
    pub fn ping(&self, from: &str, dst: Ipv4Addr, count: u32) -> Result<RttStats, Error> {
        let out = self.lab.exec(
            from,
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &dst.to_string(),
            ],
        )?;
        RttStats::parse_ping(&out)
            .ok_or_else(|| Error::Setup(format!("no RTT in ping output: {out}")))
    }

    /// Cuts every UDP and ICMP packet between host `a` and host `b` (both directions, LAN and
    /// public addresses of `b`), in `a`'s namespace. Traffic with the servers is untouched,
    /// so the relay path keeps working. Undo with [`Topology::restore`].
    pub fn cut(&self, a: &str, b: &str) -> Result<(), Error> {
        let hb = self.host(b)?.clone();
        let table = cut_table(b);
        let set = if hb.ip == hb.public_ip {
            format!("{}", hb.ip)
        } else {
            format!("{}, {}", hb.ip, hb.public_ip)
        };
        let rules = format!(
            "table inet {table} {{\n\
             chain cut_out {{ type filter hook output priority -10; policy accept;\n\
               ip daddr {{ {set} }} meta l4proto {{ udp, icmp }} drop\n\
             }}\n\
             chain cut_in {{ type filter hook input priority -10; policy accept;\n\
               ip saddr {{ {set} }} meta l4proto {{ udp, icmp }} drop\n\
             }}\n\
             }}\n"
        );
        self.lab.nft(a, &rules)
    }

    /// Undoes [`Topology::cut`]`(a, b)`.
    pub fn restore(&self, a: &str, b: &str) -> Result<(), Error> {
        self.lab
            .nft(a, &format!("delete table inet {}\n", cut_table(b)))
    }

    /// Cuts both directions between two hosts (rules in both namespaces).
    pub fn cut_both(&self, a: &str, b: &str) -> Result<(), Error> {
        self.cut(a, b)?;
        self.cut(b, a)
    }

    /// Undoes [`Topology::cut_both`].
    pub fn restore_both(&self, a: &str, b: &str) -> Result<(), Error> {
        let r1 = self.restore(a, b);
        let r2 = self.restore(b, a);
        r1.and(r2)
    }

    /// Sets how long every NAT router (carrier NATs included) keeps an idle UDP mapping:
    /// `nf_conntrack_udp_timeout` and `nf_conntrack_udp_timeout_stream` in its namespace
    /// (per-namespace sysctls; Linux defaults are 30 s and 120 s). Returns an error if the
    /// kernel does not take them per namespace.
    pub fn set_nat_udp_timeout(&self, secs: u64) -> Result<(), Error> {
        let mut routers = Vec::new();
        for site in &self.sites {
            match site.nat {
                Nat::Open => {}
                Nat::DoubleNat => {
                    routers.push(site.name.clone());
                    routers.push(format!("{}cg", site.name));
                }
                _ => routers.push(site.name.clone()),
            }
        }
        for r in routers {
            self.lab.exec(
                &r,
                "sysctl",
                &[
                    "-qw",
                    &format!("net.netfilter.nf_conntrack_udp_timeout={secs}"),
                    &format!("net.netfilter.nf_conntrack_udp_timeout_stream={secs}"),
                ],
            )?;
            let got = self.lab.exec(
                &r,
                "sysctl",
                &["-n", "net.netfilter.nf_conntrack_udp_timeout_stream"],
            )?;
            if got.trim() != secs.to_string() {
                return Err(Error::Setup(format!(
                    "{r}: nf_conntrack_udp_timeout_stream is {} after setting {secs}",
                    got.trim()
                )));
            }
        }
        Ok(())
    }

    /// Restarts miniupnpd on router `site` (it forgets every mapping, as a rebooted home router
    /// does; its PCP / NAT-PMP epoch starts again at 0).
    pub fn restart_port_mapping(&mut self, site: &str) -> Result<(), Error> {
        let k = self
            .sites
            .iter()
            .position(|s| s.name == site && s.port_mapping)
            .ok_or_else(|| Error::Setup(format!("site {site} has no port mapping")))?;
        let lan_octet = u8::try_from(k + 1).map_err(|_| Error::Setup("too many sites".into()))?;
        self.lab.stop(&miniupnpd_name(site));
        // A rebooted router has no mappings left, whatever miniupnpd cleaned up on SIGTERM.
        for chain in [
            "prerouting_miniupnpd",
            "postrouting_miniupnpd",
            "forward_miniupnpd",
        ] {
            self.lab
                .nft(site, &format!("flush chain inet miniupnpd {chain}\n"))?;
        }
        self.lab.exec(site, "conntrack", &["-F"]).map(|_| ())?;
        start_miniupnpd(&mut self.lab, site, lan_octet)
    }

    /// The port mappings router `site` holds now: the rules of miniupnpd's prerouting chain
    /// (`nft list chain`), e.g. `iif "wan" ... udp dport 60001 dnat ip to 192.168.1.10:41641`.
    pub fn port_mappings(&self, site: &str) -> Result<String, Error> {
        self.lab.exec(
            site,
            "nft",
            &["list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"],
        )
    }

    /// Human instructions: how to get a shell in every node.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("lab {} — shells:\n", self.lab.prefix()));
        s.push_str(&format!(
            "  server   ip netns exec {} bash   # {SERVER_PRIMARY} rendezvous+STUN, {SERVER_ALTERNATE} STUN alternate, {SERVER_RELAY} relay\n",
            self.lab.ns(&self.server)
        ));
        s.push_str(&format!(
            "  internet ip netns exec {} bash\n",
            self.lab.ns(&self.internet)
        ));
        for h in self.hosts.values() {
            s.push_str(&format!(
                "  {:<8} ip netns exec {} bash   # {} behind {} (public {})\n",
                h.name,
                self.lab.ns(&h.name),
                h.ip,
                h.nat,
                h.public_ip
            ));
        }
        for site in &self.sites {
            if site.nat != Nat::Open {
                s.push_str(&format!(
                    "  router {:<8} ip netns exec {} nft list ruleset\n",
                    site.name,
                    self.lab.ns(&site.name)
                ));
            }
        }
        s.push_str(&format!("process logs: {}\n", self.lab.log_dir().display()));
        s
    }
}

fn cut_table(b: &str) -> String {
    format!("natlab_cut_{b}")
}

/// Round-trip statistics in the form `ping` prints them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RttStats {
    /// Probes sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Fastest reply, milliseconds.
    pub min_ms: f64,
    /// Mean, milliseconds.
    pub avg_ms: f64,
    /// Slowest reply, milliseconds.
    pub max_ms: f64,
}

impl RttStats {
    /// Statistics of a set of RTT samples (ms) out of `sent` probes; `None` if no samples.
    pub fn from_samples(sent: u32, samples: &[f64]) -> Option<RttStats> {
        if samples.is_empty() {
            return None;
        }
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        let avg = samples.iter().sum::<f64>() / samples.len() as f64;
        Some(RttStats {
            sent,
            received: u32::try_from(samples.len()).unwrap_or(u32::MAX),
            min_ms: min,
            avg_ms: avg,
            max_ms: max,
        })
    }

    /// Parses the summary lines of iputils `ping -q`.
    pub fn parse_ping(out: &str) -> Option<RttStats> {
        let stats_line = out.lines().find(|l| l.contains("packets transmitted"))?;
        let mut nums = stats_line
            .split(',')
            .map(|p| p.trim().split(' ').next().unwrap_or(""));
        let sent = nums.next()?.parse().ok()?;
        let received = nums.next()?.parse().ok()?;
        let rtt = out
            .lines()
            .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))?;
        let values = rtt.split('=').nth(1)?.trim().split(' ').next()?;
        let mut v = values.split('/').map(|x| x.parse::<f64>());
        Some(RttStats {
            sent,
            received,
            min_ms: v.next()?.ok()?,
            avg_ms: v.next()?.ok()?,
            max_ms: v.next()?.ok()?,
        })
    }
}

impl fmt::Display for RttStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loss = if self.sent == 0 {
            0.0
        } else {
            100.0 * f64::from(self.sent - self.received.min(self.sent)) / f64::from(self.sent)
        };
        write!(
            f,
            "{} sent, {} received, {loss:.0}% loss, rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
            self.sent, self.received, self.min_ms, self.avg_ms, self.max_ms
        )
    }
}

/// The natlab binary (for the shaper): this executable if it is natlab, else `natlab` next to
/// the test executable's directory (`target/<profile>/deps/x` → `target/<profile>/natlab`).
pub fn natlab_binary() -> Result<PathBuf, Error> {
    crate::bins::find("natlab", "natlab")
}

fn link_addr(index: usize) -> Result<(Ipv4Addr, Ipv4Addr), Error> {
    let base = u8::try_from(index * 4)
        .map_err(|_| Error::Setup("too many internet links (max 64)".into()))?;
    Ok((
        Ipv4Addr::new(198, 51, 100, base + 1),
        Ipv4Addr::new(198, 51, 100, base + 2),
    ))
}

fn portmap_link_addr(index: usize) -> Result<(Ipv4Addr, Ipv4Addr), Error> {
    let base = u8::try_from(index * 4)
        .map_err(|_| Error::Setup("too many internet links (max 64)".into()))?;
    let [a, b, c] = PORTMAP_WAN_NET;
    Ok((
        Ipv4Addr::new(a, b, c, base + 1),
        Ipv4Addr::new(a, b, c, base + 2),
    ))
}

/// Name of the miniupnpd process of router `site` in the lab.
pub fn miniupnpd_name(site: &str) -> String {
    format!("miniupnpd-{site}")
}

/// The nftables table and chains miniupnpd fills (`upnp_*_chain` in its config): jumped to
/// from base chains that accept by default, so everything the NAT ruleset does still applies.
fn miniupnpd_ruleset() -> &'static str {
    "table inet miniupnpd {\n\
       chain forward { type filter hook forward priority filter; policy accept;\n jump forward_miniupnpd\n }\n\
       chain forward_miniupnpd {\n }\n\
       chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n jump prerouting_miniupnpd\n }\n\
       chain prerouting_miniupnpd {\n }\n\
       chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n jump postrouting_miniupnpd\n }\n\
       chain postrouting_miniupnpd {\n }\n\
     }\n"
}

/// Starts (or restarts) miniupnpd on router `site` whose LAN is 192.168.`lan_octet`.0/24:
/// UPnP IGD, NAT-PMP and PCP on the LAN, mappings only for LAN hosts to their own address
/// (secure mode), lifetimes capped at [`PORTMAP_MAX_LIFETIME`].
fn start_miniupnpd(lab: &mut Lab, site: &str, lan_octet: u8) -> Result<(), Error> {
    let bin = crate::testenv::which("miniupnpd").ok_or_else(|| {
        Error::Setup("miniupnpd is not installed (apt-get install miniupnpd-nftables)".into())
    })?;
    let name = miniupnpd_name(site);
    let conf = lab.log_dir().join(format!("{name}.conf"));
    let pid = lab.log_dir().join(format!("{name}.pid"));
    let text = format!(
        "ext_ifname=wan\n\
         listening_ip=lan\n\
         port=0\n\
         enable_natpmp=yes\n\
         enable_upnp=yes\n\
         secure_mode=yes\n\
         system_uptime=no\n\
         min_lifetime=10\n\
         max_lifetime={PORTMAP_MAX_LIFETIME}\n\
         upnp_table_name=miniupnpd\n\
         upnp_nat_table_name=miniupnpd\n\
         upnp_forward_chain=forward_miniupnpd\n\
         upnp_nat_chain=prerouting_miniupnpd\n\
         upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
         uuid=3d3cec3a-8cf0-11e0-98ee-00000000{lan_octet:04x}\n\
         allow 1024-65535 192.168.{lan_octet}.0/24 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n"
    );
    std::fs::write(&conf, text)?;
    if !lab.is_running(&name) {
        let _ = lab.nft(site, "delete table inet miniupnpd\n");
        lab.nft(site, miniupnpd_ruleset())?;
    }
    let args = vec![
        "-f".to_string(),
        conf.display().to_string(),
        "-d".to_string(),
        "-P".to_string(),
        pid.display().to_string(),
    ];
    let _ = std::fs::remove_file(&pid);
    lab.spawn(site, &name, &bin, &args)?;
    // Ready when it listens for NAT-PMP/PCP (it logs the line after binding 5351).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if lab.log(&name).contains("Listening for NAT-PMP/PCP") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline || !lab.is_running(&name) {
            return Err(Error::Setup(format!(
                "miniupnpd on {site} did not start: {}",
                lab.log(&name)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn validate(spec: &TopologySpec) -> Result<(), Error> {
    let mut seen = std::collections::BTreeSet::new();
    for s in &spec.sites {
        let ok = !s.name.is_empty()
            && s.name.len() <= 8
            && s.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.name.as_bytes()[0].is_ascii_lowercase();
        if !ok {
            return Err(Error::Setup(format!(
                "site name {:?}: use 1-8 lowercase letters/digits",
                s.name
            )));
        }
        if s.port_mapping && s.nat == Nat::Open {
            return Err(Error::Setup(format!(
                "site {}: an open site has no router to run miniupnpd",
                s.name
            )));
        }
        if s.accepting && s.nat == Nat::Open {
            return Err(Error::Setup(format!(
                "site {}: an open site has no router to accept or drop unsolicited UDP",
                s.name
            )));
        }
        if s.hosts == 0 || s.hosts > 9 {
            return Err(Error::Setup(format!("site {}: 1-9 hosts", s.name)));
        }
        if s.nat == Nat::FullCone && s.hosts != 1 {
            return Err(Error::Setup(format!(
                "site {}: a full-cone site forwards to exactly one host",
                s.name
            )));
        }
        let mut names = vec![s.name.clone(), format!("{}cg", s.name)];
        names.extend((1..=s.hosts).map(|i| format!("{}{i}", s.name)));
        for n in names {
            if n == "inet" || n == "srv" || !seen.insert(n.clone()) {
                return Err(Error::Setup(format!("node name {n:?} is used twice")));
            }
        }
    }
    if spec.sites.len() > 60 {
        return Err(Error::Setup("at most 60 sites".into()));
    }
    Ok(())
}

fn build(spec: TopologySpec, mut lab: Lab) -> Result<Topology, Error> {
    validate(&spec)?;
    let inet = "inet".to_string();
    let srv = "srv".to_string();
    lab.add_node(&inet, true)?;
    lab.add_node(&srv, false)?;

    // Server link.
    lab.link(&inet, "d-srv", &srv, "eth0")?;
    lab.ip(
        &inet,
        &[
            "addr",
            "add",
            &format!("{SERVER_GATEWAY}/24"),
            "dev",
            "d-srv",
        ],
    )?;
    for a in [SERVER_PRIMARY, SERVER_ALTERNATE, SERVER_RELAY] {
        lab.ip(&srv, &["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
    }
    lab.ip(
        &srv,
        &[
            "route",
            "add",
            "default",
            "via",
            &SERVER_GATEWAY.to_string(),
        ],
    )?;

    let mut hosts = BTreeMap::new();
    let mut link_index = 0usize;
    for (k, site) in spec.sites.iter().enumerate() {
        let lan_octet = u8::try_from(k + 1).map_err(|_| Error::Setup("too many sites".into()))?;
        if site.nat == Nat::Open {
            for i in 1..=site.hosts {
                let host = format!("{}{i}", site.name);
                let (gw, addr) = link_addr(link_index)?;
                link_index += 1;
                lab.add_node(&host, false)?;
                let dif = format!("d-{host}");
                lab.link(&inet, &dif, &host, "eth0")?;
                lab.ip(&inet, &["addr", "add", &format!("{gw}/30"), "dev", &dif])?;
                lab.ip(
                    &host,
                    &["addr", "add", &format!("{addr}/30"), "dev", "eth0"],
                )?;
                lab.ip(&host, &["route", "add", "default", "via", &gw.to_string()])?;
                hosts.insert(
                    host.clone(),
                    Host {
                        name: host,
                        site: site.name.clone(),
                        nat: site.nat,
                        ip: addr,
                        public_ip: addr,
                    },
                );
            }
            continue;
        }

        let (gw, wan) = if site.port_mapping && site.nat != Nat::DoubleNat {
            portmap_link_addr(link_index)?
        } else {
            link_addr(link_index)?
        };
        link_index += 1;
        let router = site.name.clone();
        let dif = format!("d-{router}");
        // The node facing the internet: the carrier NAT for a double NAT, else the router.
        let edge = if site.nat == Nat::DoubleNat {
            format!("{router}cg")
        } else {
            router.clone()
        };
        lab.add_node(&edge, true)?;
        lab.link(&inet, &dif, &edge, "wan")?;
        lab.ip(&inet, &["addr", "add", &format!("{gw}/30"), "dev", &dif])?;
        lab.ip(&edge, &["addr", "add", &format!("{wan}/30"), "dev", "wan"])?;
        lab.ip(&edge, &["route", "add", "default", "via", &gw.to_string()])?;

        if site.nat == Nat::DoubleNat {
            // Carrier-grade NAT in 100.64.0.0/10, then the home router behind it.
            let cg_in = Ipv4Addr::new(100, 64, lan_octet, 1);
            let home_wan = Ipv4Addr::new(100, 64, lan_octet, 2);
            lab.add_node(&router, true)?;
            lab.link(&edge, "cpe", &router, "wan")?;
            lab.ip(
                &edge,
                &["addr", "add", &format!("{cg_in}/24"), "dev", "cpe"],
            )?;
            lab.ip(
                &router,
                &["addr", "add", &format!("{home_wan}/24"), "dev", "wan"],
            )?;
            lab.ip(
                &router,
                &["route", "add", "default", "via", &cg_in.to_string()],
            )?;
            let lan_net = format!("192.168.{lan_octet}.0/24");
            lab.ip(
                &edge,
                &["route", "add", &lan_net, "via", &home_wan.to_string()],
            )?;
            lab.nft(&edge, &nat_ruleset(Nat::PortRestricted, None))?;
        }

        // LAN: a bridge on the router, one veth per host.
        lab.ip(&router, &["link", "add", "lan", "type", "bridge"])?;
        lab.ip(&router, &["link", "set", "lan", "up"])?;
        let router_lan = Ipv4Addr::new(192, 168, lan_octet, 1);
        lab.ip(
            &router,
            &["addr", "add", &format!("{router_lan}/24"), "dev", "lan"],
        )?;
        let mut first_host = None;
        for i in 1..=site.hosts {
            let host = format!("{}{i}", site.name);
            let ip = Ipv4Addr::new(192, 168, lan_octet, 9 + u8::try_from(i).unwrap_or(1));
            lab.add_node(&host, false)?;
            let port = format!("p{i}");
            lab.link(&router, &port, &host, "eth0")?;
            lab.ip(&router, &["link", "set", &port, "master", "lan"])?;
            lab.ip(&host, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            lab.ip(
                &host,
                &["route", "add", "default", "via", &router_lan.to_string()],
            )?;
            first_host.get_or_insert(ip);
            hosts.insert(
                host.clone(),
                Host {
                    name: host,
                    site: site.name.clone(),
                    nat: site.nat,
                    ip,
                    public_ip: wan,
                },
            );
        }
        lab.nft(
            &router,
            &router_ruleset(site.nat, first_host, site.accepting),
        )?;
        if site.port_mapping {
            start_miniupnpd(&mut lab, &router, lan_octet)?;
        }
    }

    // Latency/loss to the servers through the user-space shaper.
    if spec.server_delay > Duration::ZERO || spec.server_loss > 0.0 {
        shape_link(
            &mut lab,
            &inet,
            "d-srv",
            &[SERVER_NET],
            0,
            spec.server_delay,
            spec.server_loss,
        )?;
    }

    Ok(Topology {
        lab,
        hosts,
        server: srv,
        internet: inet,
        sites: spec.sites,
    })
}

/// The nftables ruleset of a NAT router whose internet side is interface `wan` (one that
/// drops unsolicited UDP to itself).
pub fn nat_ruleset(nat: Nat, first_host: Option<Ipv4Addr>) -> String {
    router_ruleset(nat, first_host, false)
}

/// [`nat_ruleset`], or with `accepting` one whose input hook accepts unsolicited UDP from the
/// internet ([`SiteSpec::accepting`]).
pub fn router_ruleset(nat: Nat, first_host: Option<Ipv4Addr>, accepting: bool) -> String {
    let masq = match nat {
        Nat::Symmetric => "masquerade random,fully-random",
        _ => "masquerade",
    };
    let mut r = String::from("table ip natlab {\n");
    r.push_str(&format!(
        "  chain post {{ type nat hook postrouting priority srcnat; policy accept;\n    oifname \"wan\" {masq}\n  }}\n"
    ));
    // Unsolicited UDP to the router itself is dropped in the input hook, before conntrack
    // confirms an entry for it. Otherwise that entry (peer:port -> wan:port) would clash with
    // the mapping the host's own first packet to that peer needs, and masquerade would pick
    // another source port: a hole-punching race Linux loses but home routers do not.
    if !accepting {
        r.push_str(
            "  chain input { type filter hook input priority filter; policy accept;\n    \
             iifname \"wan\" meta l4proto udp ct state new drop\n  }\n",
        );
    }
    if let (Nat::FullCone, Some(h)) = (nat, first_host) {
        r.push_str(&format!(
            "  chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n    iifname \"wan\" udp dport 1024-65535 dnat to {h}\n  }}\n"
        ));
    }
    if nat == Nat::UdpBlocked {
        r.push_str(&format!(
            "  chain udp_filter {{ type filter hook forward priority filter; policy accept;\n    \
             oifname \"wan\" meta l4proto udp ip daddr != {SERVER_NET} drop\n    \
             iifname \"wan\" meta l4proto udp ip saddr != {SERVER_NET} drop\n  }}\n"
        ));
    }
    if nat == Nat::UdpBlockedAll {
        r.push_str(&format!(
            "  chain udp_filter {{ type filter hook forward priority filter; policy accept;\n    \
             meta l4proto udp drop\n    \
             oifname \"wan\" meta l4proto tcp ip daddr != {SERVER_NET} drop\n    \
             oifname \"wan\" tcp dport != {{ 80, 443 }} drop\n  }}\n"
        ));
    }
    r.push_str("}\n");
    r
}

/// Routes traffic entering `node` from interface `dev`, or going to `prefixes`, through a TUN
/// device served by a `natlab shape` process that adds `delay` and `loss` each way.
pub fn shape_link(
    lab: &mut Lab,
    node: &str,
    dev: &str,
    prefixes: &[&str],
    index: u32,
    delay: Duration,
    loss: f64,
) -> Result<(), Error> {
    let tun = format!("shp{index}");
    let table = (100 + index).to_string();
    lab.ip(node, &["tuntap", "add", "dev", &tun, "mode", "tun"])?;
    lab.ip(node, &["link", "set", &tun, "up"])?;
    lab.ip(
        node,
        &["route", "add", "default", "dev", &tun, "table", &table],
    )?;
    lab.ip(
        node,
        &["rule", "add", "pref", "100", "iif", &tun, "lookup", "main"],
    )?;
    lab.ip(
        node,
        &["rule", "add", "pref", "200", "iif", dev, "lookup", &table],
    )?;
    for p in prefixes {
        lab.ip(
            node,
            &["rule", "add", "pref", "200", "to", p, "lookup", &table],
        )?;
    }
    let bin = natlab_binary()?;
    let args = vec![
        "shape".to_string(),
        "--tun".to_string(),
        tun.clone(),
        "--delay".to_string(),
        format!("{}us", delay.as_micros()),
        "--loss".to_string(),
        loss.to_string(),
    ];
    lab.spawn(node, &format!("shaper-{tun}"), &bin, &args)?;
    // Wait until the shaper attached (the TUN device reports carrier).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.ip(node, &["link", "show", &tun])?;
        if !out.contains("NO-CARRIER") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline || !lab.is_running(&format!("shaper-{tun}")) {
            return Err(Error::Setup(format!(
                "shaper on {tun} did not start: {}",
                lab.log(&format!("shaper-{tun}"))
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
