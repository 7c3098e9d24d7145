//! IPv6 on top of a built topology, the way ISPs deliver it: no NAT, a global /64 per site
//! (documentation space 2001:db8::/32), and on each home router a stateful firewall that lets
//! replies in and drops unsolicited inbound traffic, like home routers do.
//!
//! ```text
//!   srv      2001:db8:ffff::10/64  (inet 2001:db8:ffff::1)
//!   site k   wan link 2001:db8:0:<16k>::/64 (inet ::1, router ::2)
//!            LAN      2001:db8:<k>::/64     (router ::1, host i ::<9+i>)
//!   open host i of site k: link 2001:db8:0:<16k+i>::/64 (inet ::1, host ::2)
//! ```
//!
//! The IPv4 side (NAT behaviours) is untouched. Double-NAT sites are not supported (their
//! router is behind a carrier node). Addresses are added with `nodad` so they are usable at
//! once.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use crate::topo::{Nat, Topology};
use crate::Error;

/// The server host's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
/// The internet router's address on the server link.
pub const SERVER_V6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// The nftables ruleset of a home router's stateful IPv6 firewall (internet side `wan`):
/// forwarded traffic from the internet passes only as part of a flow a LAN host started.
pub fn firewall6_ruleset() -> String {
    "table ip6 natlab6 {\n  chain inbound { type filter hook forward priority filter; policy accept;\n    \
     iifname \"wan\" ct state established,related accept\n    \
     iifname \"wan\" drop\n  }\n}\n"
        .to_string()
}

fn enable(topo: &Topology, node: &str, forward: bool, ifaces: &[&str]) -> Result<(), Error> {
    // Duplicate address detection off first: addresses (link-local ones too) are usable at
    // once instead of "tentative" for a second or two.
    let mut args: Vec<String> = vec![
        "-qw".into(),
        "net.ipv6.conf.all.accept_dad=0".into(),
        "net.ipv6.conf.default.accept_dad=0".into(),
    ];
    args.extend(
        ifaces
            .iter()
            .map(|i| format!("net.ipv6.conf.{i}.accept_dad=0")),
    );
    args.extend([
        "net.ipv6.conf.all.disable_ipv6=0".into(),
        "net.ipv6.conf.default.disable_ipv6=0".into(),
        "net.ipv6.conf.lo.disable_ipv6=0".into(),
        format!("net.ipv6.conf.all.forwarding={}", u8::from(forward)),
    ]);
    for i in ifaces {
        args.push(format!("net.ipv6.conf.{i}.disable_ipv6=0"));
        // No router advertisements or autoconfiguration: every address and route is static.
        args.push(format!("net.ipv6.conf.{i}.accept_ra=0"));
        args.push(format!("net.ipv6.conf.{i}.autoconf=0"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    topo.lab.exec(node, "sysctl", &refs)?;
    Ok(())
}

fn addr(topo: &Topology, node: &str, a: Ipv6Addr, dev: &str) -> Result<(), Error> {
    topo.lab.ip(
        node,
        &["-6", "addr", "add", &format!("{a}/64"), "dev", dev, "nodad"],
    )?;
    Ok(())
}

fn route(topo: &Topology, node: &str, dest: &str, via: Ipv6Addr) -> Result<(), Error> {
    topo.lab
        .ip(node, &["-6", "route", "add", dest, "via", &via.to_string()])?;
    Ok(())
}

fn net(prefix: [u16; 4], host: u16) -> Ipv6Addr {
    Ipv6Addr::new(prefix[0], prefix[1], prefix[2], prefix[3], 0, 0, 0, host)
}

impl Topology {
    /// Gives the servers, every router and every host a global IPv6 address (no NAT); with
    /// `firewall`, each NAT site's router gets a stateful IPv6 firewall
    /// ([`firewall6_ruleset`]). Returns each host's IPv6 address by host name.
    pub fn enable_ipv6(&self, firewall: bool) -> Result<BTreeMap<String, Ipv6Addr>, Error> {
        let inet = self.internet.clone();
        let srv = self.server.clone();
        let mut inet_ifaces = vec!["d-srv".to_string()];
        let mut out = BTreeMap::new();
        for site in &self.sites {
            match site.nat {
                Nat::DoubleNat => {
                    return Err(Error::Setup(format!(
                        "site {}: IPv6 on a double-NAT site is not supported",
                        site.name
                    )))
                }
                Nat::Open => {
                    for i in 1..=site.hosts {
                        inet_ifaces.push(format!("d-{}{i}", site.name));
                    }
                }
                _ => inet_ifaces.push(format!("d-{}", site.name)),
            }
        }
        let refs: Vec<&str> = inet_ifaces.iter().map(String::as_str).collect();
        enable(self, &inet, true, &refs)?;
        enable(self, &srv, false, &["eth0"])?;
        addr(self, &inet, SERVER_V6_GATEWAY, "d-srv")?;
        addr(self, &srv, SERVER_V6, "eth0")?;
        route(self, &srv, "default", SERVER_V6_GATEWAY)?;
        for (k, site) in self.sites.iter().enumerate() {
            let k = u16::try_from(k + 1).map_err(|_| Error::Setup("too many sites".into()))?;
            let hosts: Vec<_> = self.hosts().filter(|h| h.site == site.name).collect();
            if site.nat == Nat::Open {
                for (i, h) in hosts.iter().enumerate() {
                    let i = u16::try_from(i + 1).unwrap_or(1);
                    let p = [0x2001, 0xdb8, 0, k * 16 + i];
                    enable(self, &h.name, false, &["eth0"])?;
                    addr(self, &inet, net(p, 1), &format!("d-{}", h.name))?;
                    addr(self, &h.name, net(p, 2), "eth0")?;
                    route(self, &h.name, "default", net(p, 1))?;
                    out.insert(h.name.clone(), net(p, 2));
                }
                continue;
            }
            let router = site.name.clone();
            let wan = [0x2001, 0xdb8, 0, k * 16];
            let lan = [0x2001, 0xdb8, k, 0];
            let mut ifaces: Vec<String> = vec!["wan".into(), "lan".into()];
            ifaces.extend((1..=hosts.len()).map(|i| format!("p{i}")));
            let refs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
            enable(self, &router, true, &refs)?;
            addr(self, &inet, net(wan, 1), &format!("d-{router}"))?;
            addr(self, &router, net(wan, 2), "wan")?;
            addr(self, &router, net(lan, 1), "lan")?;
            route(self, &router, "default", net(wan, 1))?;
            route(self, &inet, &format!("{}/64", net(lan, 0)), net(wan, 2))?;
            for h in hosts {
                // Same host number as its IPv4 LAN address (192.168.k.<9+i>).
                let host_no = u16::from(h.ip.octets()[3]);
                enable(self, &h.name, false, &["eth0"])?;
                let a = net(lan, host_no);
                addr(self, &h.name, a, "eth0")?;
                route(self, &h.name, "default", net(lan, 1))?;
                out.insert(h.name.clone(), a);
            }
            if firewall {
                self.lab.nft(&router, &firewall6_ruleset())?;
            }
        }
        Ok(out)
    }
}
