//! Address policy shared by the relay and the client: canonicalising IPv6 spellings of IPv4
//! addresses and classifying addresses (loopback, private, link-local, …) so that a relay
//! refuses to forward to them unless allowed.
//!
//! A TURN relay that forwards to any address a client names is an open proxy into its own
//! network. Other TURN servers were bypassed with alternative spellings of a denied address
//! (`::ffff:127.0.0.1`, `::127.0.0.1`, `2002:7f00:1::`, `64:ff9b::7f00:1`), so every address is
//! first reduced to its canonical form ([`canonical_ip`]) and only then classified
//! ([`classify`]) and checked against the policy ([`PeerPolicy::check`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address an IP is, after canonicalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// Globally routable (documentation ranges count as public: they route nowhere).
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 0.0.0.0/8 ("this network"), ::.
    Unspecified,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), site-local fec0::/10, local-use NAT64 64:ff9b:1::/48.
    Private,
    /// Carrier-grade NAT shared space 100.64.0.0/10 (RFC 6598).
    SharedCgnat,
    /// Unique local fc00::/7 (RFC 4193).
    UniqueLocal,
    /// 240.0.0.0/4, 192.0.0.0/24, 198.18.0.0/15, 100::/64 and other special-purpose blocks.
    Reserved,
}

impl AddrClass {
    /// Short, fixed label (used in metrics and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Unspecified => "unspecified",
            AddrClass::LinkLocal => "link_local",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "cgnat",
            AddrClass::UniqueLocal => "unique_local",
            AddrClass::Reserved => "reserved",
        }
    }
}

/// Why a peer address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DenyReason {
    /// The address belongs to a class the policy does not allow.
    #[error("peer address is {}", .0.as_str())]
    Class(AddrClass),
    /// The address is one of the relay's own addresses.
    #[error("peer address is the relay itself")]
    RelaySelf,
    /// The address is in the operator's `denied_peers` list.
    #[error("peer address is in denied_peers")]
    Denied,
}

impl DenyReason {
    /// Short, fixed label (metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Class(c) => c.as_str(),
            DenyReason::RelaySelf => "relay_self",
            DenyReason::Denied => "denied",
        }
    }
}

/// Reduces IPv6 spellings that embed an IPv4 address to that IPv4 address.
///
/// Handled: IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d` (but `::` and `::1` stay IPv6), 6to4 `2002:AABB:CCDD::/48`, well-known NAT64
/// `64:ff9b::/96` (RFC 6052), local-use NAT64 `64:ff9b:1::/48` (RFC 8215) in its /96 layout
/// `64:ff9b:1::a.b.c.d` (other layouts stay IPv6 and classify as private), and Teredo
/// `2001:0::/32` (the client's obfuscated address).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // ::ffff:a.b.c.d (mapped)
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // ::ffff:0:a.b.c.d (SIIT translated)
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(tail),
        // ::a.b.c.d (compatible); :: and ::1 are genuine IPv6 addresses.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(tail),
        // 6to4: 2002:V4ADDR::/48
        [0x2002, _, _, _, _, _, _, _] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        // NAT64 well-known prefix 64:ff9b::/96
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215), as a /96 translator prefix.
        [0x0064, 0xff9b, 1, 0, 0, 0, _, _] => Some(tail),
        // Teredo 2001:0000::/32: client address is the last 32 bits inverted.
        [0x2001, 0, _, _, _, _, _, _] => Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])),
        _ => None,
    }
}

/// Classifies an address (canonicalising it first).
pub fn classify(ip: IpAddr) -> AddrClass {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let o = ip.octets();
    match o {
        [0, ..] => AddrClass::Unspecified,
        [127, ..] => AddrClass::Loopback,
        [10, ..] => AddrClass::Private,
        [172, b, ..] if (16..32).contains(&b) => AddrClass::Private,
        [192, 168, ..] => AddrClass::Private,
        [100, b, ..] if (64..128).contains(&b) => AddrClass::SharedCgnat,
        [169, 254, ..] => AddrClass::LinkLocal,
        [255, 255, 255, 255] => AddrClass::Broadcast,
        [a, ..] if (224..240).contains(&a) => AddrClass::Multicast,
        [a, ..] if a >= 240 => AddrClass::Reserved,
        [192, 0, 0, _] => AddrClass::Reserved,
        [198, b, ..] if b == 18 || b == 19 => AddrClass::Reserved,
        _ => AddrClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let s = ip.segments();
    if ip.is_unspecified() {
        AddrClass::Unspecified
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if s[0] & 0xff00 == 0xff00 {
        AddrClass::Multicast
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if s[0] & 0xffc0 == 0xfec0 {
        AddrClass::Private
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddrClass::UniqueLocal
    } else if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 1 {
        AddrClass::Private
    } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
        AddrClass::Reserved
    } else if s[0] == 0 {
        // Anything else in ::/16 that did not canonicalise (e.g. ::ffff:ffff:…) is special.
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

/// Which peer addresses a relay may forward to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Allow loopback peers (tests and single-host setups only).
    pub allow_loopback: bool,
    /// Allow private (RFC 1918), CGNAT and unique-local peers (relays inside a private network).
    pub allow_private: bool,
    /// The relay's own addresses (listening and relayed IPs): denied unless their class is allowed.
    pub own_addrs: Vec<IpAddr>,
    /// Operator deny list (`denied_peers`, like coturn's `denied-peer-ip`): refused whatever the
    /// class, matched against the canonical address and against the address as spelled.
    pub denied: Vec<Cidr>,
}

impl PeerPolicy {
    /// Checks `ip` and returns its canonical form if the relay may forward to it.
    pub fn check(&self, ip: IpAddr) -> Result<IpAddr, DenyReason> {
        let canon = canonical_ip(ip);
        if self
            .denied
            .iter()
            .any(|c| c.contains(canon) || c.contains(ip))
        {
            return Err(DenyReason::Denied);
        }
        let class = classify(canon);
        let class_allowed = match class {
            AddrClass::Public => true,
            AddrClass::Loopback => self.allow_loopback,
            AddrClass::Private | AddrClass::SharedCgnat | AddrClass::UniqueLocal => {
                self.allow_private
            }
            AddrClass::Unspecified
            | AddrClass::LinkLocal
            | AddrClass::Multicast
            | AddrClass::Broadcast
            | AddrClass::Reserved => false,
        };
        let own = self.own_addrs.iter().any(|a| canonical_ip(*a) == canon);
        // Own addresses are reported as such (a TURN server may still accept them on its relayed
        // ports, allocation to allocation): always when public (relay loops, services bound on the
        // relay host), and when their class is refused anyway. A loopback/private own address
        // whose class is allowed passes, which is what a single-host setup needs.
        if !class_allowed {
            return Err(if own {
                DenyReason::RelaySelf
            } else {
                DenyReason::Class(class)
            });
        }
        if class == AddrClass::Public && own {
            return Err(DenyReason::RelaySelf);
        }
        Ok(canon)
    }
}

/// An IP prefix (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// Not `ADDRESS` or `ADDRESS/PREFIX`.
    #[error("{0:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)")]
    Syntax(String),
    /// The prefix length exceeds the address width.
    #[error("prefix /{prefix} is longer than the address ({max} bits) in {text:?}")]
    Prefix {
        /// The text.
        text: String,
        /// Prefix given.
        prefix: u32,
        /// Width of the address.
        max: u32,
    },
}

impl Cidr {
    /// A prefix; host bits of `addr` are ignored. IPv6 spellings of IPv4 are *not* reduced
    /// here (a deny list entry means what it says; [`PeerPolicy::check`] matches both forms).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if u32::from(prefix) > max {
            return Err(CidrError::Prefix {
                text: format!("{addr}/{prefix}"),
                prefix: u32::from(prefix),
                max,
            });
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` lies inside the prefix (families must match).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let t = s.trim();
        let syntax = || CidrError::Syntax(s.to_owned());
        let (a, p) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| syntax())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u32 = match p {
            Some(p) => p.parse().map_err(|_| syntax())?,
            None => max,
        };
        if prefix > max {
            return Err(CidrError::Prefix {
                text: s.to_owned(),
                prefix,
                max,
            });
        }
        Cidr::new(addr, prefix as u8)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn canonicalises_every_embedded_v4_spelling() {
        let cases = [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::ffff:7f00:1", "127.0.0.1"),
            ("::ffff:0:127.0.0.1", "127.0.0.1"),
            ("::127.0.0.1", "127.0.0.1"),
            ("::10.0.0.1", "10.0.0.1"),
            ("::0.0.0.2", "0.0.0.2"),
            ("2002:7f00:1::", "127.0.0.1"),
            ("2002:a00:1::1234", "10.0.0.1"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("64:ff9b::10.0.0.1", "10.0.0.1"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
        ];
        for (from, to) in cases {
            assert_eq!(canonical_ip(ip(from)), ip(to), "{from}");
        }
        for same in [
            "::",
            "::1",
            "2001:db8::1",
            "fe80::1",
            "1.2.3.4",
            "2606:4700::1111",
        ] {
            assert_eq!(canonical_ip(ip(same)), ip(same), "{same}");
        }
    }

    #[test]
    fn classifies() {
        let cases = [
            ("0.0.0.0", AddrClass::Unspecified),
            ("0.1.2.3", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.0.9", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::127.0.0.1", AddrClass::Loopback),
            ("2002:7f00:1::", AddrClass::Loopback),
            ("64:ff9b::127.0.0.1", AddrClass::Loopback),
            ("10.0.0.1", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("172.32.0.1", AddrClass::Public),
            ("192.168.1.1", AddrClass::Private),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("2002:c0a8:101::", AddrClass::Private),
            ("fec0::1", AddrClass::Private),
            ("64:ff9b:1::a00:1", AddrClass::Private),
            ("100.64.0.1", AddrClass::SharedCgnat),
            ("100.127.255.255", AddrClass::SharedCgnat),
            ("100.128.0.1", AddrClass::Public),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("224.0.0.1", AddrClass::Multicast),
            ("239.255.255.250", AddrClass::Multicast),
            ("ff02::1", AddrClass::Multicast),
            ("::ffff:224.0.0.1", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Broadcast),
            ("240.0.0.1", AddrClass::Reserved),
            ("192.0.0.8", AddrClass::Reserved),
            ("198.18.0.1", AddrClass::Reserved),
            ("100::1", AddrClass::Reserved),
            ("fc00::1", AddrClass::UniqueLocal),
            ("fd12:3456::1", AddrClass::UniqueLocal),
            ("8.8.8.8", AddrClass::Public),
            ("192.0.2.1", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
            ("2001:db8::1", AddrClass::Public),
        ];
        for (s, class) in cases {
            assert_eq!(classify(ip(s)), class, "{s}");
        }
    }

    #[test]
    fn default_policy_denies_every_dangerous_spelling() {
        let p = PeerPolicy::default();
        for s in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "2002:7f00:1::",
            "64:ff9b::7f00:1",
            "10.0.0.1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "172.16.5.4",
            "192.168.0.1",
            "100.64.0.1",
            "fc00::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "2002:a00:1::",
            "64:ff9b::a00:1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
        ] {
            assert!(p.check(ip(s)).is_err(), "{s} must be denied");
        }
        assert_eq!(p.check(ip("8.8.8.8")), Ok(ip("8.8.8.8")));
        assert_eq!(p.check(ip("::ffff:8.8.8.8")), Ok(ip("8.8.8.8")));
    }

    #[test]
    fn allow_flags_open_only_their_classes() {
        let p = PeerPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        assert_eq!(p.check(ip("::ffff:127.0.0.1")), Ok(ip("127.0.0.1")));
        assert_eq!(p.check(ip("::1")), Ok(ip("::1")));
        assert!(p.check(ip("10.0.0.1")).is_err());
        assert!(p.check(ip("0.0.0.0")).is_err());

        let p = PeerPolicy {
            allow_private: true,
            ..Default::default()
        };
        assert_eq!(p.check(ip("10.0.0.1")), Ok(ip("10.0.0.1")));
        assert_eq!(p.check(ip("100.64.1.1")), Ok(ip("100.64.1.1")));
        assert_eq!(p.check(ip("fd00::1")), Ok(ip("fd00::1")));
        assert!(p.check(ip("127.0.0.1")).is_err());
        assert!(p.check(ip("169.254.1.1")).is_err(), "link-local never");
        assert!(p.check(ip("224.0.0.1")).is_err(), "multicast never");
        assert!(p.check(ip("::")).is_err(), "unspecified never");
    }

    #[test]
    fn own_addresses_are_denied_in_every_spelling() {
        let p = PeerPolicy {
            own_addrs: vec![ip("203.0.113.7")],
            ..Default::default()
        };
        assert_eq!(p.check(ip("203.0.113.7")), Err(DenyReason::RelaySelf));
        assert_eq!(
            p.check(ip("::ffff:203.0.113.7")),
            Err(DenyReason::RelaySelf)
        );
        assert_eq!(p.check(ip("2002:cb00:7107::")), Err(DenyReason::RelaySelf));
        assert!(p.check(ip("203.0.113.8")).is_ok());
        // A loopback relay address with loopback peers allowed (single-host tests) passes.
        let p = PeerPolicy {
            allow_loopback: true,
            own_addrs: vec![ip("127.0.0.1")],
            ..Default::default()
        };
        assert!(p.check(ip("127.0.0.1")).is_ok());
        let p = PeerPolicy {
            own_addrs: vec![ip("127.0.0.1")],
            ..Default::default()
        };
        assert_eq!(p.check(ip("127.0.0.1")), Err(DenyReason::RelaySelf));
        assert_eq!(
            p.check(ip("127.0.0.2")),
            Err(DenyReason::Class(AddrClass::Loopback))
        );
        assert_eq!(DenyReason::RelaySelf.as_str(), "relay_self");
        assert_eq!(DenyReason::Class(AddrClass::Loopback).as_str(), "loopback");
    }

    #[test]
    fn local_use_nat64_96_layout_is_canonicalised() {
        assert_eq!(canonical_ip(ip("64:ff9b:1::7f00:1")), ip("127.0.0.1"));
        assert_eq!(canonical_ip(ip("64:ff9b:1::10.1.2.3")), ip("10.1.2.3"));
        // Other layouts inside the /48 stay IPv6 and count as private.
        let other = ip("64:ff9b:1:a01:2:300::");
        assert_eq!(canonical_ip(other), other);
        assert_eq!(classify(other), AddrClass::Private);
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.255.1")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            !c.contains(ip("::ffff:10.1.0.1")),
            "no implicit canonicalisation"
        );
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert!(host.contains(ip("2001:db8::1")) && !host.contains(ip("2001:db8::2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert_eq!(v6.to_string(), "2001:db8::/32");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/", "/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    /// Attack: a `denied_peers` CIDR reached through every IPv6 spelling of an IPv4 inside it.
    #[test]
    fn denied_cidr_is_refused_in_every_ipv6_spelling() {
        let policy = PeerPolicy {
            denied: vec!["198.51.100.0/24".parse().unwrap()],
            ..PeerPolicy::default()
        };
        // 198.51.100.7 = c633:6407; Teredo stores it inverted: 39cc:9bf8.
        for spelling in [
            "198.51.100.7",
            "::ffff:198.51.100.7",
            "::ffff:c633:6407",
            "::ffff:0:198.51.100.7",
            "::198.51.100.7",
            "2002:c633:6407::1",
            "64:ff9b::198.51.100.7",
            "64:ff9b:1::198.51.100.7",
            "2001:0:4136:e378:8000:63bf:39cc:9bf8",
        ] {
            assert_eq!(
                policy.check(ip(spelling)),
                Err(DenyReason::Denied),
                "{spelling}"
            );
        }
        // Neighbours outside the prefix are public and pass.
        assert_eq!(policy.check(ip("198.51.101.7")), Ok(ip("198.51.101.7")));
        assert_eq!(
            policy.check(ip("64:ff9b::198.51.101.7")),
            Ok(ip("198.51.101.7"))
        );
        // An IPv6 entry matches as spelled.
        let v6 = PeerPolicy {
            denied: vec!["2001:db8:aa::/48".parse().unwrap()],
            ..PeerPolicy::default()
        };
        assert_eq!(v6.check(ip("2001:db8:aa::5")), Err(DenyReason::Denied));
        assert!(v6.check(ip("2001:db8:ab::5")).is_ok());
    }
}
