//! IP prefixes (`10.9.0.2/32`, `fd00::/64`) and WireGuard's cryptokey routing table: which
//! peer a destination belongs to (longest prefix match over every peer's `AllowedIPs`), and
//! whether a decrypted packet's source is one the sending peer may use.
//!
//! The table is built once from the configuration and only read afterwards, on the hot path:
//! one hash lookup per distinct prefix length present (at most 33 for IPv4, 129 for IPv6,
//! usually two or three), no allocation.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP prefix: an address and a prefix length. `addr` keeps the bits as written (an
/// interface `Address` such as `10.9.0.1/24` is a host address plus its network); use
/// [`IpNet::network`] for the prefix alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address as written.
    pub addr: IpAddr,
    /// Prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub len: u8,
}

impl IpNet {
    /// A prefix; `None` if `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<IpNet> {
        (len <= max_len(addr)).then_some(IpNet { addr, len })
    }

    /// The prefix with the host bits cleared (`10.9.0.1/24` → `10.9.0.0/24`).
    pub fn network(self) -> IpNet {
        IpNet {
            addr: mask(self.addr, self.len),
            len: self.len,
        }
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.len) == mask(self.addr, self.len)
            }
            _ => false,
        }
    }

    /// Whether the two prefixes share any address (one contains the other).
    pub fn overlaps(self, other: IpNet) -> bool {
        let len = self.len.min(other.len);
        match (self.addr, other.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(self.addr, len) == mask(other.addr, len)
            }
            _ => false,
        }
    }

    /// Whether this is IPv6.
    pub fn is_ipv6(self) -> bool {
        self.addr.is_ipv6()
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpNet {
    type Err = String;

    /// `ADDR/LEN`, or a bare address (a host prefix: /32 or /128), as `wg` accepts.
    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| {
            format!("expected an IP prefix like 10.9.0.2/32 or fd00::2/128, found {s:?}")
        })?;
        let len = match l {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max_len(addr))
                .ok_or_else(|| {
                    format!(
                        "prefix length of {s:?} must be 0-{} for an {} address",
                        max_len(addr),
                        if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                    )
                })?,
            None => max_len(addr),
        };
        Ok(IpNet { addr, len })
    }
}

/// Parses a comma-separated list of prefixes (`AllowedIPs`, `Address`).
pub fn parse_list(v: &str) -> Result<Vec<IpNet>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(IpNet::from_str)
        .collect()
}

fn max_len(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(v) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v) & m))
        }
    }
}

/// Two peers claim the same prefix: WireGuard would silently move it to the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The prefix.
    pub prefix: IpNet,
    /// Index of the first peer claiming it.
    pub first: usize,
    /// Index of the second.
    pub second: usize,
}

/// The cryptokey routing table: prefix → peer index, longest prefix wins.
#[derive(Debug, Clone, Default)]
pub struct AllowedIps {
    /// Per family, the prefix lengths present, longest first, each with its map of
    /// network address → peer.
    v4: Vec<(u8, HashMap<u32, usize>)>,
    v6: Vec<(u8, HashMap<u128, usize>)>,
}

impl AllowedIps {
    /// Builds the table from each peer's prefixes (`peers[i]` belongs to peer `i`). The same
    /// prefix (after clearing host bits) claimed by two peers is an error; a prefix inside
    /// another peer's wider prefix is allowed (the longest prefix wins, as in WireGuard: an
    /// exit node's `0.0.0.0/0` next to other peers' `/32`s).
    pub fn build(peers: &[Vec<IpNet>]) -> Result<AllowedIps, Overlap> {
        let mut seen: HashMap<IpNet, usize> = HashMap::new();
        let mut t = AllowedIps::default();
        for (peer, nets) in peers.iter().enumerate() {
            for n in nets {
                let n = n.network();
                match seen.get(&n) {
                    Some(&first) if first != peer => {
                        return Err(Overlap {
                            prefix: n,
                            first,
                            second: peer,
                        })
                    }
                    Some(_) => continue,
                    None => {
                        seen.insert(n, peer);
                    }
                }
                match n.addr {
                    IpAddr::V4(a) => insert(&mut t.v4, n.len, u32::from(a), peer),
                    IpAddr::V6(a) => insert(&mut t.v6, n.len, u128::from(a), peer),
                }
            }
        }
        Ok(t)
    }

    /// The peer `ip` belongs to (longest matching prefix), if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<usize> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, m)| {
                    let k = if *len == 0 {
                        0
                    } else {
                        a & (u32::MAX << (32 - u32::from(*len)))
                    };
                    m.get(&k).copied()
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, m)| {
                    let k = if *len == 0 {
                        0
                    } else {
                        a & (u128::MAX << (128 - u32::from(*len)))
                    };
                    m.get(&k).copied()
                })
            }
        }
    }
}

fn insert<K: std::hash::Hash + Eq>(
    levels: &mut Vec<(u8, HashMap<K, usize>)>,
    len: u8,
    key: K,
    peer: usize,
) {
    match levels.iter_mut().find(|(l, _)| *l == len) {
        Some((_, m)) => {
            m.insert(key, peer);
        }
        None => {
            levels.push((len, HashMap::from([(key, peer)])));
            levels.sort_by_key(|l| std::cmp::Reverse(l.0));
        }
    }
}

/// The destination address of an IP packet (IPv4 or IPv6 header), if the header is there.
pub fn dst_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let b: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The source address of an IP packet, if the header is there.
pub fn src_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let b: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_prefixes_like_wg() {
        assert_eq!(n("10.9.0.2/32"), IpNet::new(ip("10.9.0.2"), 32).unwrap());
        assert_eq!(n("10.9.0.2").len, 32);
        assert_eq!(n("fd00::2").len, 128);
        assert_eq!(n(" 10.9.0.1/24 ").network(), n("10.9.0.0/24"));
        assert_eq!(n("10.9.0.1/24").addr, ip("10.9.0.1"));
        assert!("10.9.0.0/33".parse::<IpNet>().unwrap_err().contains("0-32"));
        assert!("fd00::/129".parse::<IpNet>().unwrap_err().contains("0-128"));
        assert!("10.9.0/24"
            .parse::<IpNet>()
            .unwrap_err()
            .contains("expected an IP prefix"));
        assert_eq!(
            parse_list("10.9.0.2/32, fd00::2/128,").unwrap(),
            vec![n("10.9.0.2/32"), n("fd00::2/128")]
        );
        assert!(n("10.0.0.0/8").overlaps(n("10.9.0.2/32")));
        assert!(!n("10.0.0.0/8").overlaps(n("11.0.0.0/8")));
        assert!(!n("0.0.0.0/0").overlaps(n("::/0")));
    }

    #[test]
    fn longest_prefix_wins() {
        let t = AllowedIps::build(&[
            vec![n("0.0.0.0/0")],
            vec![n("10.9.0.2/32"), n("fd00::2/128")],
            vec![n("10.9.0.0/24"), n("fd00::/64")],
        ])
        .unwrap();
        assert_eq!(t.lookup(ip("10.9.0.2")), Some(1));
        assert_eq!(t.lookup(ip("10.9.0.3")), Some(2));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(0));
        assert_eq!(t.lookup(ip("fd00::2")), Some(1));
        assert_eq!(t.lookup(ip("fd00::9")), Some(2));
        assert_eq!(t.lookup(ip("fd01::9")), None);
    }

    #[test]
    fn same_prefix_on_two_peers_is_an_error() {
        let e = AllowedIps::build(&[
            vec![n("10.9.0.2/32")],
            vec![n("10.9.0.3/32")],
            vec![n("10.9.0.3/32")],
        ])
        .unwrap_err();
        assert_eq!((e.first, e.second), (1, 2));
        // Host bits do not hide a duplicate.
        let e = AllowedIps::build(&[vec![n("10.9.0.0/24")], vec![n("10.9.0.7/24")]]).unwrap_err();
        assert_eq!(e.prefix, n("10.9.0.0/24"));
        // The same prefix twice for one peer is harmless.
        AllowedIps::build(&[vec![n("10.9.0.2/32"), n("10.9.0.2/32")]]).unwrap();
    }

    proptest::proptest! {
        /// The table's answer equals a brute-force longest-prefix search over every peer's
        /// prefixes, for random prefixes and addresses (IPv4 and IPv6 mixed).
        #[test]
        fn lookup_is_the_longest_matching_prefix(
            peers in proptest::collection::vec(
                proptest::collection::vec((proptest::bool::ANY, proptest::num::u128::ANY, 0u8..=128), 0..6),
                1..6,
            ),
            probes in proptest::collection::vec((proptest::bool::ANY, proptest::num::u128::ANY), 1..40),
        ) {
            let to_ip = |v4: bool, bits: u128| if v4 {
                IpAddr::V4(Ipv4Addr::from(bits as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(bits))
            };
            let nets: Vec<Vec<IpNet>> = peers
                .iter()
                .map(|p| p.iter().map(|(v4, bits, len)| {
                    let a = to_ip(*v4, *bits);
                    IpNet::new(a, if *v4 { len % 33 } else { *len }).unwrap()
                }).collect())
                .collect();
            // Probes near the prefixes too, not only random addresses.
            let mut addrs: Vec<IpAddr> = probes.iter().map(|(v4, b)| to_ip(*v4, *b)).collect();
            addrs.extend(nets.iter().flatten().map(|n| n.addr));
            match AllowedIps::build(&nets) {
                Err(o) => {
                    // Only a prefix claimed by two different peers is refused.
                    proptest::prop_assert_ne!(o.first, o.second);
                    proptest::prop_assert!(nets[o.first].iter().any(|n| n.network() == o.prefix));
                    proptest::prop_assert!(nets[o.second].iter().any(|n| n.network() == o.prefix));
                }
                Ok(t) => {
                    for a in addrs {
                        let best = nets
                            .iter()
                            .enumerate()
                            .flat_map(|(i, ns)| ns.iter().map(move |n| (i, *n)))
                            .filter(|(_, n)| n.contains(a))
                            .max_by_key(|(_, n)| n.len)
                            .map(|(i, _)| i);
                        proptest::prop_assert_eq!(t.lookup(a), best, "address {}", a);
                    }
                }
            }
        }
    }

    #[test]
    fn reads_addresses_from_headers_without_panicking() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 9, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 9, 0, 2]);
        assert_eq!(src_addr(&v4), Some(ip("10.9.0.1")));
        assert_eq!(dst_addr(&v4), Some(ip("10.9.0.2")));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[23] = 1;
        v6[39] = 2;
        assert_eq!(src_addr(&v6), Some(ip("::1")));
        assert_eq!(dst_addr(&v6), Some(ip("::2")));
        for l in 0..40 {
            let _ = (dst_addr(&v6[..l]), src_addr(&v4[..l.min(20)]));
        }
        assert_eq!(dst_addr(&[]), None);
        assert_eq!(dst_addr(&[0x50; 40]), None);
    }
}
