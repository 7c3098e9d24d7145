//! The kernel side of `--tun`: the TUN device (`/dev/net/tun`, `TUNSETIFF`) and a minimal
//! rtnetlink client for what wg-quick does with `ip`: set MTU and up, add each `Address`, add
//! a route per `AllowedIPs` prefix, and read the routing table to refuse an `Address` or a
//! prefix that collides with a route the machine already has.
//!
//! Netlink rather than running `ip`: no dependency on iproute2 being installed (the natlab
//! hosts and minimal containers need nothing but the binary), no fork per route, and errors
//! come back as errno values we can explain (`EEXIST`, `EPERM`) instead of parsed text. It is
//! written directly against `linux/rtnetlink.h` (a few hundred bytes of messages, set-up time
//! only) rather than with the `rtnetlink` crate family, which would add an async netlink stack
//! and a dozen crates for five requests.
//!
//! The TUN device is not persistent: closing its file descriptor (normal exit, a crash,
//! SIGKILL) removes the interface, and the kernel drops its addresses and routes with it.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::allowed::IpNet;

/// Why a TUN device could not be set up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// Creating a TUN device or configuring it needs CAP_NET_ADMIN.
    #[error("no permission to create TUN device {name}: run as root or give CAP_NET_ADMIN (e.g. `setcap cap_net_admin+ep $(which meshpunch)` or AmbientCapabilities=CAP_NET_ADMIN in the systemd unit)")]
    NoPermission {
        /// Interface name.
        name: String,
    },
    /// An interface of that name exists already.
    #[error("an interface named {name} already exists: pick another --tun name or remove it (`ip link del {name}`)")]
    Exists {
        /// Interface name.
        name: String,
    },
    /// The name is not a valid interface name.
    #[error("invalid TUN name {name:?}: 1-15 characters, no '/', whitespace or ':'")]
    BadName {
        /// Interface name.
        name: String,
    },
    /// No TUN support in this kernel / container.
    #[error("cannot open /dev/net/tun: {0} (load the tun module with `modprobe tun`; in a container, pass the device: --device /dev/net/tun)")]
    NoTunDevice(io::Error),
    /// An `Address` collides with a route or an address the machine already has.
    #[error("Address {addr} collides with the existing route {route} dev {dev}: pick a tunnel subnet that is not in use here")]
    AddressCollides {
        /// Our address.
        addr: IpNet,
        /// The existing route.
        route: IpNet,
        /// Its interface.
        dev: String,
    },
    /// An `AllowedIPs` prefix is routed through another interface already.
    #[error("AllowedIPs {prefix} of peer {peer} collides with the existing route {prefix} dev {dev}: remove that route or narrow AllowedIPs")]
    RouteCollides {
        /// The prefix.
        prefix: IpNet,
        /// The peer's name or short key.
        peer: String,
        /// Interface of the existing route.
        dev: String,
    },
    /// Two peers claim the same `AllowedIPs` prefix.
    #[error(transparent)]
    Overlap(#[from] super::OverlapError),
    /// Any other failure of a system call, with what was being done.
    #[error("{what}: {err}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        err: io::Error,
    },
}

fn sys(what: impl Into<String>, err: io::Error) -> TunError {
    TunError::Sys {
        what: what.into(),
        err,
    }
}

const IFNAMSIZ: usize = 16;

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// The index of interface `name` in this network namespace, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The name of interface `index` (or the index as text).
pub fn if_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; IFNAMSIZ];
    // SAFETY: `buf` has IFNAMSIZ bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{index}");
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Creates TUN device `name` (layer 3, no packet information header, non-blocking fd).
/// Refuses a name that exists: attaching to someone else's interface would steal its traffic.
pub fn create_tun(name: &str) -> Result<(OwnedFd, u32), TunError> {
    if !valid_name(name) {
        return Err(TunError::BadName { name: name.into() });
    }
    if if_index(name).is_some() {
        return Err(TunError::Exists { name: name.into() });
    }
    // SAFETY: a constant NUL-terminated path; flags are plain integers.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TunError::NoPermission { name: name.into() },
            _ => TunError::NoTunDevice(e),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an `ifreq` (name + flags, 40 bytes), which `req` is laid out as.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TunError::NoPermission { name: name.into() },
            Some(libc::EBUSY) | Some(libc::EEXIST) => TunError::Exists { name: name.into() },
            _ => sys(format!("TUNSETIFF {name}"), e),
        });
    }
    let index = if_index(name).ok_or_else(|| {
        sys(
            format!("TUN device {name} vanished after creation"),
            io::Error::from(io::ErrorKind::NotFound),
        )
    })?;
    Ok((fd, index))
}

// linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h, linux/if_link.h.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const IFF_UP: u32 = 0x1;

/// A policy routing rule of a full tunnel (wg-quick's recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `not fwmark MARK table TABLE`: every packet without meshpunch's mark uses the tunnel's
    /// table (its default route is the TUN device).
    NotMark {
        /// The mark of meshpunch's own sockets.
        mark: u32,
        /// The tunnel's routing table.
        table: u32,
        /// Rule priority.
        priority: u32,
    },
    /// `table main suppress_prefixlength 0`: the main table's specific routes (the LAN, the
    /// tunnel subnet) still apply, its default route does not.
    SuppressDefault {
        /// Rule priority.
        priority: u32,
    },
}

/// A route as the kernel reports it (the part we compare against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Output interface (0 = none).
    pub oif: u32,
    /// Routing table.
    pub table: u32,
    /// Route type (`RTN_*`).
    pub kind: u8,
}

/// A blocking rtnetlink socket (set-up time only).
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    while !msg.len().is_multiple_of(4) {
        msg.push(0);
    }
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// The rtmsg body of a main-table route to `dst` through interface `index` (what
/// [`Netlink::add_route`] creates and [`Netlink::del_route`] removes).
fn main_route(index: u32, dst: IpNet) -> Vec<u8> {
    let dst = dst.network();
    let mut body = Vec::with_capacity(40);
    body.push(family(dst.addr));
    body.push(dst.len);
    body.push(0); // src_len
    body.push(0); // tos
    body.push(RT_TABLE_MAIN);
    body.push(RTPROT_STATIC);
    body.push(RT_SCOPE_LINK);
    body.push(RTN_UNICAST);
    body.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut body, RTA_DST, &ip_bytes(dst.addr));
    push_attr(&mut body, RTA_OIF, &index.to_ne_bytes());
    body
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, TunError> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(sys("netlink socket", io::Error::last_os_error()));
        }
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 1 })
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<u32, io::Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is a valid buffer of msg.len() bytes; a netlink socket needs no address
        // for messages to the kernel.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads replies to `seq` and passes each message (type, payload) to `f` until the
    /// kernel's ACK (error code 0), an error, or the end of a dump.
    fn recv(&mut self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> Result<(), io::Error> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: `buf` is writable for buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &rest[16..len];
                let adv = ((len + 3) & !3).min(rest.len());
                rest = &rest[adv..];
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => f(kind, payload),
                }
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<(), io::Error> {
        let seq = self.send(kind, flags | NLM_F_ACK, body)?;
        self.recv(seq, |_, _| {})
    }

    /// Sets the MTU of interface `index` and brings it up.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> Result<(), io::Error> {
        let mut body = Vec::with_capacity(32);
        body.push(libc::AF_UNSPEC as u8);
        body.push(0);
        body.extend_from_slice(&0u16.to_ne_bytes());
        body.extend_from_slice(&(index as i32).to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
        push_attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &body)
    }

    /// Adds `addr` (with its prefix length) to interface `index`; IPv6 without duplicate
    /// address detection (the tunnel has no neighbours to collide with, and DAD would hold
    /// the address back for a second).
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), io::Error> {
        let mut body = Vec::with_capacity(40);
        body.push(family(addr.addr));
        body.push(addr.len);
        body.push(if addr.is_ipv6() { IFA_F_NODAD } else { 0 });
        body.push(RT_SCOPE_UNIVERSE);
        body.extend_from_slice(&index.to_ne_bytes());
        let b = ip_bytes(addr.addr);
        push_attr(&mut body, IFA_LOCAL, &b);
        push_attr(&mut body, IFA_ADDRESS, &b);
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Adds a route to `dst` through interface `index` in the main table. `EEXIST` means an
    /// identical route is there (for our own device: the prefix route of an `Address`).
    pub fn add_route(&mut self, index: u32, dst: IpNet) -> Result<(), io::Error> {
        let body = main_route(index, dst);
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Removes the route to `dst` through interface `index` from the main table (a peer
    /// removed at run time). `ESRCH` means it is not there.
    pub fn del_route(&mut self, index: u32, dst: IpNet) -> Result<(), io::Error> {
        let body = main_route(index, dst);
        self.request(RTM_DELROUTE, 0, &body)
    }

    /// Adds the default route of `family`'s (`addr` decides: 0.0.0.0 or ::) through interface
    /// `index` to routing table `table` (a full tunnel's table, wg-quick's recipe).
    pub fn add_default_route(&mut self, index: u32, v6: bool, table: u32) -> Result<(), io::Error> {
        let mut body = Vec::with_capacity(40);
        body.push(if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8);
        body.push(0); // dst_len: the default route
        body.push(0); // src_len
        body.push(0); // tos
        body.push(0); // RT_TABLE_UNSPEC: the table is in RTA_TABLE (it may be > 255)
        body.push(RTPROT_STATIC);
        body.push(RT_SCOPE_LINK);
        body.push(RTN_UNICAST);
        body.extend_from_slice(&0u32.to_ne_bytes());
        push_attr(&mut body, RTA_OIF, &index.to_ne_bytes());
        push_attr(&mut body, RTA_TABLE, &table.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Adds (`add`) or deletes a policy routing rule of one family: `rule` is
    /// [`Rule::NotMark`] (`ip rule add not fwmark M table T`) or [`Rule::SuppressDefault`]
    /// (`ip rule add table main suppress_prefixlength 0`).
    pub fn rule(&mut self, add: bool, v6: bool, rule: Rule) -> Result<(), io::Error> {
        let mut body = Vec::with_capacity(48);
        body.push(if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8);
        body.push(0); // dst_len
        body.push(0); // src_len
        body.push(0); // tos
        let (priority, table, flags) = match rule {
            Rule::NotMark {
                table, priority, ..
            } => (priority, table, FIB_RULE_INVERT),
            Rule::SuppressDefault { priority } => (priority, u32::from(RT_TABLE_MAIN), 0),
        };
        body.push(0); // table: in FRA_TABLE
        body.push(0); // res1
        body.push(0); // res2
        body.push(FR_ACT_TO_TBL);
        body.extend_from_slice(&flags.to_ne_bytes());
        push_attr(&mut body, FRA_PRIORITY, &priority.to_ne_bytes());
        push_attr(&mut body, FRA_TABLE, &table.to_ne_bytes());
        match rule {
            Rule::NotMark { mark, .. } => {
                push_attr(&mut body, FRA_FWMARK, &mark.to_ne_bytes());
                push_attr(&mut body, FRA_FWMASK, &u32::MAX.to_ne_bytes());
            }
            Rule::SuppressDefault { .. } => {
                push_attr(&mut body, FRA_SUPPRESS_PREFIXLEN, &0u32.to_ne_bytes());
            }
        }
        if add {
            self.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &body)
        } else {
            self.request(RTM_DELRULE, 0, &body)
        }
    }

    /// Every route of both families in the main and local tables.
    pub fn routes(&mut self) -> Result<Vec<Route>, io::Error> {
        let mut out = Vec::new();
        for fam in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let mut body = vec![0u8; 12];
            body[0] = fam;
            let seq = self.send(RTM_GETROUTE, NLM_F_DUMP, &body)?;
            self.recv(seq, |kind, p| {
                if kind == RTM_NEWROUTE {
                    if let Some(r) = parse_route(p) {
                        out.push(r);
                    }
                }
            })?;
        }
        Ok(out)
    }
}

/// Parses one RTM_NEWROUTE payload (rtmsg + attributes); `None` for what we do not compare.
fn parse_route(p: &[u8]) -> Option<Route> {
    let hdr = p.get(..12)?;
    let (fam, dst_len, table, kind) = (hdr[0], hdr[1], hdr[4], hdr[7]);
    let mut route = Route {
        dst: IpNet::new(
            if fam == libc::AF_INET as u8 {
                IpAddr::from([0u8; 4])
            } else if fam == libc::AF_INET6 as u8 {
                IpAddr::from([0u8; 16])
            } else {
                return None;
            },
            dst_len,
        )?,
        oif: 0,
        table: u32::from(table),
        kind,
    };
    let mut rest = &p[12..];
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let t = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        let d = &rest[4..len];
        match (t, d.len()) {
            (RTA_DST, 4) => {
                let b: [u8; 4] = d.try_into().ok()?;
                route.dst = IpNet::new(IpAddr::from(b), dst_len)?;
            }
            (RTA_DST, 16) => {
                let b: [u8; 16] = d.try_into().ok()?;
                route.dst = IpNet::new(IpAddr::from(b), dst_len)?;
            }
            (RTA_OIF, 4) => route.oif = u32::from_ne_bytes(d.try_into().ok()?),
            (RTA_TABLE, 4) => route.table = u32::from_ne_bytes(d.try_into().ok()?),
            _ => {}
        }
        let adv = (len + 3) & !3;
        rest = rest.get(adv..).unwrap_or_default();
    }
    Some(route)
}

/// The first existing route that an interface `Address` collides with: the same address
/// assigned on another interface, or a route on another interface to the address's
/// network or to a part of it (that route would take traffic meant for the tunnel). A
/// wider route (10.0.0.0/8 on the LAN, the default route) is no collision: the tunnel's
/// prefix is more specific and wins.
pub fn address_collision(routes: &[Route], ours: u32, addr: IpNet) -> Option<&Route> {
    let net = addr.network();
    routes.iter().find(|r| {
        if r.oif == ours {
            return false;
        }
        match (r.table, r.kind) {
            (t, RTN_LOCAL) if t == u32::from(RT_TABLE_LOCAL) => r.dst.addr == addr.addr,
            (t, RTN_UNICAST) if t == u32::from(RT_TABLE_MAIN) => {
                r.dst.len > 0 && r.dst.len >= net.len && net.contains(r.dst.addr)
            }
            _ => false,
        }
    })
}

/// The existing route on another interface with exactly this destination, if any.
pub fn route_collision(routes: &[Route], ours: u32, dst: IpNet) -> Option<&Route> {
    let dst = dst.network();
    routes.iter().find(|r| {
        r.oif != ours
            && r.table == u32::from(RT_TABLE_MAIN)
            && r.kind == RTN_UNICAST
            && r.dst.network() == dst
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn r(dst: &str, oif: u32, table: u8, kind: u8) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            oif,
            table: u32::from(table),
            kind,
        }
    }

    #[test]
    fn interface_names_are_checked_like_the_kernel() {
        assert!(valid_name("mp0"));
        assert!(valid_name("meshpunch012345"));
        assert!(!valid_name("meshpunch0123456"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(".."));
    }

    #[test]
    fn address_collisions() {
        let routes = vec![
            r("0.0.0.0/0", 2, RT_TABLE_MAIN, RTN_UNICAST),
            r("10.0.0.0/8", 2, RT_TABLE_MAIN, RTN_UNICAST),
            r("192.168.1.0/24", 2, RT_TABLE_MAIN, RTN_UNICAST),
            r("172.16.5.0/28", 3, RT_TABLE_MAIN, RTN_UNICAST),
            r("192.168.1.10/32", 2, RT_TABLE_LOCAL, RTN_LOCAL),
            r("10.9.0.0/24", 9, RT_TABLE_MAIN, RTN_UNICAST),
        ];
        let a = |s: &str| address_collision(&routes, 9, s.parse().unwrap()).map(|r| r.dst);
        // Wider routes and our own device: no collision.
        assert_eq!(a("10.9.0.1/24"), None);
        assert_eq!(a("10.8.0.1/24"), None);
        // The same network on the LAN.
        assert_eq!(
            a("192.168.1.77/24"),
            Some("192.168.1.0/24".parse().unwrap())
        );
        // A part of our network routed elsewhere.
        assert_eq!(a("172.16.0.1/16"), Some("172.16.5.0/28".parse().unwrap()));
        // Our address is a local address of another interface.
        assert!(a("192.168.1.10/32").is_some());
        let x = |s: &str| route_collision(&routes, 9, s.parse().unwrap()).map(|r| r.dst);
        assert_eq!(x("10.9.0.0/24"), None);
        assert_eq!(x("10.9.0.2/32"), None);
        assert_eq!(x("192.168.1.5/24"), Some("192.168.1.0/24".parse().unwrap()));
    }

    #[test]
    fn parses_route_messages_and_survives_garbage() {
        let mut p = vec![
            libc::AF_INET as u8,
            24,
            0,
            0,
            RT_TABLE_MAIN,
            4,
            253,
            1,
            0,
            0,
            0,
            0,
        ];
        push_attr(&mut p, RTA_DST, &[10, 9, 0, 0]);
        push_attr(&mut p, RTA_OIF, &7u32.to_ne_bytes());
        let route = parse_route(&p).unwrap();
        assert_eq!(route.dst, "10.9.0.0/24".parse().unwrap());
        assert_eq!(route.oif, 7);
        for l in 0..p.len() {
            let _ = parse_route(&p[..l]);
        }
        let mut bad = p.clone();
        bad[12] = 0xff; // attribute length past the end
        let _ = parse_route(&bad);
    }
}
