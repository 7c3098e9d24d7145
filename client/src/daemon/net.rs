//! Socket and interface helpers of the daemon: binding the data socket, interface
//! addresses (host candidates), WireGuard interfaces to leave out, candidate addresses as the
//! data socket can use them, TURN URIs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

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
    set_probe_pmtu(&s, listen.is_ipv6())?;
    s.bind(&listen.into())?;
    s.set_nonblocking(true)?;
    Ok((s.into(), listen.is_ipv6()))
}

/// Datagrams the kernel refused with EMSGSIZE (larger than the outgoing interface's MTU: an
/// MTU probe or a WireGuard packet too big for the link) on the data and pool sockets
/// (`send_too_big` in `status`, `meshpunch_client_send_too_big_total`).
pub(crate) static SEND_TOO_BIG: AtomicU64 = AtomicU64::new(0);

/// Counts a failed send; EMSGSIZE is the expected fate of an MTU probe larger than the
/// local link, so it is counted, not logged.
pub(crate) fn note_send_error(e: &std::io::Error, dest: SocketAddr) {
    if e.raw_os_error() == Some(libc::EMSGSIZE) {
        SEND_TOO_BIG.fetch_add(1, Ordering::Relaxed);
    } else {
        tracing::trace!(error = %e, %dest, "send failed");
    }
}

/// "Don't fragment, and ignore the kernel's path-MTU cache" on a UDP socket
/// (`IP_PMTUDISC_PROBE`, and for IPv6 `IPV6_PMTUDISC_PROBE` with `IPV6_DONTFRAG`): an MTU
/// probe too large for some link is dropped there instead of being fragmented, so a size
/// that gets answered really fits (see `meshpunch_proto::mtu`). A dual-stack socket gets both
/// (IPv4-mapped traffic follows the IPv4 option).
pub(crate) fn set_probe_pmtu<S: std::os::fd::AsRawFd>(s: &S, v6: bool) -> std::io::Result<()> {
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int, what: &str| {
        // SAFETY: fd is an open socket owned by the caller; the option value is a c_int
        // that lives across the call, with its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(
                e.kind(),
                format!("setting {what} on the data socket: {e}"),
            ))
        }
    };
    set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
        "IP_MTU_DISCOVER=IP_PMTUDISC_PROBE",
    )?;
    if v6 {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
            "IPV6_MTU_DISCOVER=IPV6_PMTUDISC_PROBE",
        )?;
        set(libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1, "IPV6_DONTFRAG")?;
    }
    Ok(())
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

    fn sockopt(s: &std::net::UdpSocket, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, value and length pointers for the duration of the call.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn data_socket_sends_with_dont_fragment_and_probe_pmtu() {
        let (s, v6) = bind_data("[::1]:0".parse().unwrap()).unwrap();
        assert!(v6);
        assert_eq!(
            sockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER),
            libc::IPV6_PMTUDISC_PROBE
        );
        assert_eq!(sockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG), 1);
        assert_eq!(
            sockopt(&s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_PROBE
        );
        // A datagram larger than loopback's MTU (65536 with the IPv6 header) is refused, not
        // fragmented, and counted.
        let before = SEND_TOO_BIG.load(Ordering::Relaxed);
        let e = s
            .send_to(&vec![0u8; 65_500], "[::1]:9")
            .map(|_| ())
            .unwrap_err();
        note_send_error(&e, "[::1]:9".parse().unwrap());
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        assert!(SEND_TOO_BIG.load(Ordering::Relaxed) > before);
        let (s, _) = bind_data("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(
            sockopt(&s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_PROBE
        );
    }

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
