//! Socket and interface helpers of the daemon: binding the data socket, interface
//! addresses (host candidates), WireGuard interfaces to leave out, candidate addresses as the
//! data socket can use them, TURN URIs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use meshpunch_proto::node::relay::turn_uri_authority;
use meshpunch_proto::node::usable_candidate;

/// Candidate addresses as the data socket can use them: IPv4-mapped IPv6 spellings become
/// IPv4 (datagrams arrive from the canonical form, and pairs are matched by address), and
/// IPv6 addresses are dropped when the data socket is IPv4 only (they could never be sent to).
pub fn usable_candidates(v6_socket: bool, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = addrs
        .iter()
        .filter_map(|a| usable_candidate(v6_socket, *a))
        .collect();
    out.dedup();
    out
}

/// Every usable interface address (no loopback, no link-local, no unspecified).
pub fn interface_addrs() -> Vec<IpAddr> {
    interface_addrs_excluding(&[])
}

/// Names of the WireGuard interfaces on this host (`wg show interfaces`; empty if `wg` is not
/// installed or not allowed).
pub fn wireguard_interfaces() -> Vec<String> {
    std::process::Command::new("wg")
        .args(["show", "interfaces"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Usable interface addresses except those of the interfaces named in `exclude` (the
/// WireGuard interfaces: a probe to a tunnel address would loop into the tunnel meshpunch
/// itself carries).
pub fn interface_addrs_excluding(exclude: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free with freeifaddrs below; we only read
    // entries while the list is alive and check every pointer for null.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            let excluded = !ifa.ifa_name.is_null() && {
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
                exclude.iter().any(|e| *e == name)
            };
            if !excluded && !ifa.ifa_addr.is_null() && ifa.ifa_flags & (libc::IFF_UP as u32) != 0 {
                let fam = i32::from((*ifa.ifa_addr).sa_family);
                if fam == libc::AF_INET {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                } else if fam == libc::AF_INET6 {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.retain(|ip| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            }
    });
    out.sort();
    out.dedup();
    out
}

/// Binds the data socket: dual-stack when `listen` is `[::]`, else as given.
pub(super) fn bind_data(listen: SocketAddr) -> std::io::Result<(std::net::UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if listen.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if listen.is_ipv6() {
        s.set_only_v6(false)?;
    }
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&listen.into())?;
    s.set_nonblocking(true)?;
    Ok((s.into(), listen.is_ipv6()))
}

/// Sets SO_MARK `mark` on `sock`, with an error that says what to do when it is refused.
pub(crate) fn set_mark(sock: &std::net::UdpSocket, mark: u32) -> std::io::Result<()> {
    socket2::SockRef::from(sock).set_mark(mark).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (SO_MARK needs CAP_NET_ADMIN: run meshpunch as root or with CAP_NET_ADMIN, as the systemd unit does, or set FwMark = off / --fwmark off)"
        } else {
            ""
        };
        std::io::Error::new(e.kind(), format!("cannot set FwMark {mark}: {e}{hint}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_canonical_and_fit_the_socket() {
        let c: Vec<SocketAddr> = ["[::ffff:192.0.2.7]:5", "[2001:db8::7]:5", "192.0.2.8:5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let v4: Vec<SocketAddr> = ["192.0.2.7:5", "192.0.2.8:5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(usable_candidates(false, &c), v4);
        assert_eq!(usable_candidates(true, &c).len(), 3);
        assert_eq!(usable_candidates(true, &c)[0], v4[0]);
    }
}
