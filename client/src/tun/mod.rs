//! Built-in userspace WireGuard (`meshpunch up --tun NAME`, `Mode = tun`): a TUN device and
//! WireGuard's noise protocol in-process, so no `wg`, no kernel module and no second daemon
//! are needed, and encrypted packets pass to the path manager in memory instead of through a
//! loopback proxy port.
//!
//! The WireGuard protocol is boringtun's (`boringtun::noise::Tunn`, one per peer, BSD-3-Clause,
//! used by Cloudflare WARP and many others; see `docs/tun.md` for why not gotatun). Everything
//! around it is ours and small: [`sys`] creates the device and sets addresses, MTU and routes
//! over rtnetlink; [`allowed`] is the cryptokey routing table; [`Device`] moves packets:
//!
//! - outgoing: [`Device::run`] reads an IP packet from the TUN device, finds the peer by the
//!   longest `AllowedIPs` prefix holding its destination, encrypts it, and hands
//!   `(peer index, datagram)` to a sink — exactly what a proxy port's reader passes the
//!   engine today;
//! - incoming: [`Device::deliver`] takes `(peer index, datagram)` as received from that peer's
//!   path, decrypts it, checks that the inner source address is one of that peer's
//!   `AllowedIPs` (else the packet is dropped and counted, as WireGuard does), and writes it
//!   to the TUN device; handshake responses, cookie replies and queued packets go back out
//!   through the same sink;
//! - [`Device::tick`] runs WireGuard's timers (rekey, handshake retry, keepalive after
//!   receive); call it every [`TICK`].
//!
//! The hot path allocates nothing: each caller passes a reused [`Buffers`]. Persistent
//! keepalive is off: meshpunch keeps the NAT bindings of its paths warm itself.

pub mod allowed;
pub mod sys;

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use allowed::{AllowedIps, IpNet};
pub use sys::TunError;

/// How often [`Device::tick`] should run (boringtun's own device uses 250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// The default interface MTU: the largest inner packet for which every path meshpunch uses
/// fits a 1500-byte link: 1412 + WireGuard data header and tag (32) + TURN ChannelData
/// header (4) + UDP (8) + IPv6 (40) = 1496. (wg-quick's 1420 overflows a relayed path over
/// IPv6 by 4 bytes.) Links below 1500 (PPPoE, DS-Lite, some mobile networks) need
/// `MTU = 1280`.
pub const DEFAULT_MTU: u32 = 1412;

/// The smallest MTU an interface with an IPv6 address may have (RFC 8200 section 5).
pub const MIN_MTU_IPV6: u32 = 1280;

/// The smallest MTU accepted at all (IPv4's minimum datagram every host must accept,
/// RFC 791).
pub const MIN_MTU: u32 = 576;

/// Largest MTU accepted: a WireGuard datagram over UDP must still fit 65,535 bytes.
pub const MAX_MTU: u32 = 65_535 - 32 - 8 - 40;

/// Buffer size for one packet in either direction (IP's maximum plus WireGuard's overhead).
const BUF: usize = 65_536 + 64;

/// What a TUN device is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSettings {
    /// Interface name.
    pub name: String,
    /// `[Interface] Address`: our tunnel addresses with their prefix lengths.
    pub addresses: Vec<IpNet>,
    /// Interface MTU.
    pub mtu: u32,
    /// One per peer, in the daemon's peer order.
    pub peers: Vec<TunPeer>,
}

/// A peer as the TUN device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunPeer {
    /// Name or short key, for messages.
    pub label: String,
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// `PresharedKey`, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// `AllowedIPs`.
    pub allowed_ips: Vec<IpNet>,
}

/// The kernel side, created and configured: the TUN fd and its interface index. Dropping it
/// closes the fd, which removes the interface with its addresses and routes.
#[derive(Debug)]
pub struct TunIface {
    fd: OwnedFd,
    index: u32,
    name: String,
}

impl TunIface {
    /// Creates the TUN device in the calling thread's network namespace, sets MTU and up,
    /// adds every address and a route for every peer's `AllowedIPs`. Refuses (before creating
    /// anything) an `Address` or a prefix that collides with an existing route.
    pub fn create(s: &TunSettings) -> Result<TunIface, TunError> {
        // The name first: a second daemon with the same config must hear "exists", not that
        // its Address collides with the first daemon's route.
        if !sys::valid_name(&s.name) {
            return Err(TunError::BadName {
                name: s.name.clone(),
            });
        }
        if sys::if_index(&s.name).is_some() {
            return Err(TunError::Exists {
                name: s.name.clone(),
            });
        }
        let mut nl = sys::Netlink::open()?;
        let routes = nl.routes().map_err(|e| TunError::Sys {
            what: "reading the routing table".into(),
            err: e,
        })?;
        // Before anything exists, so a refused start leaves nothing behind.
        for a in &s.addresses {
            if let Some(r) = sys::address_collision(&routes, 0, *a) {
                return Err(TunError::AddressCollides {
                    addr: *a,
                    route: r.dst,
                    dev: sys::if_name(r.oif),
                });
            }
        }
        for p in &s.peers {
            for n in &p.allowed_ips {
                if let Some(r) = sys::route_collision(&routes, 0, *n) {
                    return Err(TunError::RouteCollides {
                        prefix: n.network(),
                        peer: p.label.clone(),
                        dev: sys::if_name(r.oif),
                    });
                }
            }
        }
        let (fd, index) = sys::create_tun(&s.name)?;
        let iface = TunIface {
            fd,
            index,
            name: s.name.clone(),
        };
        // Netlink says EPERM without CAP_NET_ADMIN; EACCES is what IPv6 answers when it is
        // disabled on the host, which is no permission problem.
        let perm = |what: String, v6: bool, e: io::Error| match e.raw_os_error() {
            Some(libc::EPERM) => TunError::NoPermission {
                name: s.name.clone(),
            },
            Some(libc::EACCES) if v6 => TunError::Sys {
                what: format!("{what} (is IPv6 disabled here? net.ipv6.conf.all.disable_ipv6)"),
                err: e,
            },
            _ => TunError::Sys { what, err: e },
        };
        nl.set_mtu_up(index, s.mtu)
            .map_err(|e| perm(format!("setting MTU {} on {}", s.mtu, s.name), false, e))?;
        for a in &s.addresses {
            nl.add_address(index, *a)
                .map_err(|e| perm(format!("adding Address {a} to {}", s.name), a.is_ipv6(), e))?;
        }
        for p in &s.peers {
            for n in &p.allowed_ips {
                match nl.add_route(index, *n) {
                    Ok(()) => {}
                    // Our own Address's prefix route, or a duplicate within one peer.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => {
                        return Err(perm(
                            format!(
                                "adding route {} dev {} (AllowedIPs of {})",
                                n.network(),
                                s.name,
                                p.label
                            ),
                            n.is_ipv6(),
                            e,
                        ))
                    }
                }
            }
        }
        tracing::info!(name = %s.name, index, mtu = s.mtu, addresses = ?s.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(), "TUN device up");
        Ok(iface)
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Interface index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// Counters of the device (exported as `meshpunch_client_tun_*` where the client exports
/// metrics, and shown by `status`).
#[derive(Debug, Default)]
pub struct TunStats {
    /// Packets read from the TUN device and sent to a peer.
    pub tx_packets: AtomicU64,
    /// Bytes of those packets (inner, before encryption).
    pub tx_bytes: AtomicU64,
    /// Packets decrypted and written to the TUN device.
    pub rx_packets: AtomicU64,
    /// Bytes of those packets (inner).
    pub rx_bytes: AtomicU64,
    /// Outgoing packets whose destination is in no peer's `AllowedIPs`
    /// (`meshpunch_client_tun_no_peer_total`; the kernel routed them here, so a route is
    /// wider than the peers' prefixes).
    pub no_peer: AtomicU64,
    /// Incoming datagrams that did not decrypt / authenticate or were replays
    /// (`meshpunch_client_tun_decrypt_failed_total`).
    pub decrypt_failed: AtomicU64,
    /// Decrypted packets whose source address is not in the sending peer's `AllowedIPs`,
    /// dropped (`meshpunch_client_tun_bad_source_total`).
    pub bad_source: AtomicU64,
    /// Packets the TUN device refused (`meshpunch_client_tun_write_failed_total`).
    pub write_failed: AtomicU64,
}

/// The interface MTU for a configured MTU, a floor and the smallest working path's tunnel MTU
/// (`None` = unknown): `min(configured, path)`, never below `floor` (nor above configured).
pub fn target_mtu(configured: u32, floor: u32, path: Option<u16>) -> u32 {
    let want = path.map_or(configured, |p| u32::from(p).min(configured));
    want.max(floor.min(configured))
}

/// One caller's packet buffers, reused for every packet.
pub struct Buffers {
    pkt: Box<[u8]>,
    out: Box<[u8]>,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            pkt: vec![0u8; BUF].into_boxed_slice(),
            out: vec![0u8; BUF].into_boxed_slice(),
        }
    }
}

/// The TUN device with a WireGuard tunnel per peer.
pub struct Device {
    fd: AsyncFd<OwnedFd>,
    name: String,
    index: u32,
    /// `MTU` as configured: the interface never goes above it.
    configured_mtu: u32,
    /// The lowest MTU the interface may get ([`MIN_MTU_IPV6`] with an IPv6 address).
    floor_mtu: u32,
    /// The interface MTU now (follows the smallest working path, [`Device::follow_path_mtu`]).
    mtu: AtomicU32,
    peers: Vec<Mutex<Tunn>>,
    labels: Vec<String>,
    /// Per peer: its `AllowedIPs` as configured (for `status`).
    allowed: Vec<Vec<IpNet>>,
    table: AllowedIps,
    /// Counters.
    pub stats: TunStats,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("peers", &self.labels)
            .finish()
    }
}

/// The configuration cannot make a device (found before touching the kernel).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AllowedIPs {prefix} is claimed by peer {first} and by peer {second}: a prefix belongs to one peer (WireGuard would silently move it to the last); remove it from one of them")]
pub struct OverlapError {
    /// The prefix.
    pub prefix: IpNet,
    /// First peer's label.
    pub first: String,
    /// Second peer's label.
    pub second: String,
}

/// Builds the cryptokey routing table, naming both peers when two claim the same prefix.
pub fn routing_table(peers: &[TunPeer]) -> Result<AllowedIps, OverlapError> {
    let nets: Vec<Vec<IpNet>> = peers.iter().map(|p| p.allowed_ips.clone()).collect();
    AllowedIps::build(&nets).map_err(|o| OverlapError {
        prefix: o.prefix,
        first: peers
            .get(o.first)
            .map(|p| p.label.clone())
            .unwrap_or_default(),
        second: peers
            .get(o.second)
            .map(|p| p.label.clone())
            .unwrap_or_default(),
    })
}

impl Device {
    /// Wraps a configured interface (must run inside a tokio runtime) with a tunnel per peer.
    pub fn new(
        iface: TunIface,
        private_key: [u8; 32],
        peers: &[TunPeer],
    ) -> Result<Device, TunError> {
        let table = routing_table(peers)?;
        let secret = x25519_dalek::StaticSecret::from(private_key);
        let tunnels = peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Mutex::new(Tunn::new(
                    boringtun::x25519::StaticSecret::from(secret.to_bytes()),
                    boringtun::x25519::PublicKey::from(p.public_key),
                    p.preshared_key,
                    None,
                    // Each tunnel's session indices carry its peer number (boringtun shifts
                    // this left by 8 and fills the low bits per session).
                    i as u32,
                    None,
                ))
            })
            .collect();
        let name = iface.name.clone();
        let index = iface.index;
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and its raw fd
        // unchanged) until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(iface.fd, Interest::READABLE) }.map_err(
            |e| TunError::Sys {
                what: format!("registering {name} with the runtime"),
                err: e.into(),
            },
        )?;
        Ok(Device {
            fd,
            name,
            index,
            configured_mtu: DEFAULT_MTU,
            floor_mtu: MIN_MTU_IPV6,
            mtu: AtomicU32::new(DEFAULT_MTU),
            peers: tunnels,
            labels: peers.iter().map(|p| p.label.clone()).collect(),
            allowed: peers.iter().map(|p| p.allowed_ips.clone()).collect(),
            table,
            stats: TunStats::default(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records the MTU the interface was created with ([`TunSettings::mtu`]) and the lowest
    /// it may be given: [`MIN_MTU_IPV6`] when it has an IPv6 address, else [`MIN_MTU`].
    pub fn with_mtu(mut self, s: &TunSettings) -> Device {
        self.configured_mtu = s.mtu;
        self.floor_mtu = if s.addresses.iter().any(|a| a.is_ipv6()) {
            MIN_MTU_IPV6
        } else {
            MIN_MTU
        };
        self.mtu = AtomicU32::new(s.mtu);
        self
    }

    /// The interface MTU now.
    pub fn mtu(&self) -> u32 {
        self.mtu.load(Ordering::Relaxed)
    }

    /// The configured MTU (the most [`Device::follow_path_mtu`] ever sets).
    pub fn configured_mtu(&self) -> u32 {
        self.configured_mtu
    }

    /// The MTU the interface should have when the smallest working path allows `path`
    /// (a tunnel MTU, `None` = unknown): `min(configured, path)`, never below the floor.
    pub fn target_mtu(&self, path: Option<u16>) -> u32 {
        target_mtu(self.configured_mtu, self.floor_mtu, path)
    }

    /// Sets the interface MTU (rtnetlink) to [`Device::target_mtu`] of `path` if it differs
    /// from the MTU now. Returns the new MTU when it changed.
    pub fn follow_path_mtu(&self, path: Option<u16>) -> Result<Option<u32>, TunError> {
        let target = self.target_mtu(path);
        if target == self.mtu() {
            return Ok(None);
        }
        let mut nl = sys::Netlink::open()?;
        nl.set_mtu_up(self.index, target)
            .map_err(|e| TunError::Sys {
                what: format!("setting MTU {target} on {}", self.name),
                err: e,
            })?;
        self.mtu.store(target, Ordering::Relaxed);
        Ok(Some(target))
    }

    /// Peer `peer`'s `AllowedIPs` (empty for an unknown peer).
    pub fn allowed_ips(&self, peer: usize) -> &[IpNet] {
        self.allowed.get(peer).map_or(&[], |a| a.as_slice())
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Reads packets from the TUN device forever, encrypts each for its peer and passes
    /// `(peer index, datagram)` to `sink`. Returns only on a read error of the device.
    pub async fn run(&self, mut sink: impl FnMut(usize, &[u8])) -> io::Result<()> {
        let mut b = Buffers::default();
        loop {
            let mut guard = self.fd.readable().await?;
            loop {
                let n = match guard.try_io(|fd| read_fd(fd.get_ref(), &mut b.pkt)) {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => break,
                };
                self.outgoing(&b.pkt[..n], &mut b.out, &mut sink);
            }
        }
    }

    /// Encrypts one IP packet read from the device for the peer owning its destination.
    fn outgoing(&self, pkt: &[u8], out: &mut [u8], sink: &mut impl FnMut(usize, &[u8])) {
        let Some(peer) = allowed::dst_addr(pkt).and_then(|d| self.table.lookup(d)) else {
            self.stats.no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(t) = self.peers.get(peer) else {
            return;
        };
        let Ok(mut t) = t.lock() else {
            return;
        };
        match t.encapsulate(pkt, out) {
            TunnResult::WriteToNetwork(d) => {
                self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .tx_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
                sink(peer, d);
            }
            TunnResult::Err(e) => {
                tracing::debug!(peer = %self.labels[peer], error = ?e, "encapsulate failed");
            }
            // Queued until the handshake completes (no session yet).
            _ => {}
        }
    }

    /// Handles a datagram received from peer `peer`'s path: decrypts data into the TUN
    /// device (if its source is one of the peer's `AllowedIPs`), and passes what WireGuard
    /// answers (handshake response, cookie reply, queued packets after a handshake) to
    /// `sink`.
    pub fn deliver(
        &self,
        peer: usize,
        datagram: &[u8],
        b: &mut Buffers,
        mut sink: impl FnMut(usize, &[u8]),
    ) {
        let Some(t) = self.peers.get(peer) else {
            return;
        };
        let Ok(mut t) = t.lock() else {
            return;
        };
        let mut input = datagram;
        loop {
            match t.decapsulate(None, input, &mut b.out) {
                TunnResult::Done => return,
                TunnResult::WriteToNetwork(d) => {
                    sink(peer, d);
                    // Repeat with no input until Done: flushes packets queued during the
                    // handshake.
                    input = &[];
                    continue;
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    self.to_tun(peer, p, IpAddr::V4(src));
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    self.to_tun(peer, p, IpAddr::V6(src));
                }
                TunnResult::Err(e) => {
                    let n = self.stats.decrypt_failed.fetch_add(1, Ordering::Relaxed);
                    if (n + 1).is_power_of_two() {
                        tracing::warn!(peer = %self.labels[peer], error = ?e, count = n + 1, "WireGuard datagram dropped (meshpunch_client_tun_decrypt_failed_total)");
                    }
                }
            }
            return;
        }
    }

    fn to_tun(&self, peer: usize, pkt: &[u8], src: IpAddr) {
        // Keepalives decrypt to an empty packet.
        if pkt.is_empty() {
            return;
        }
        // Cryptokey routing: the inner source must route back to the same peer.
        if self.table.lookup(src) != Some(peer) {
            let n = self.stats.bad_source.fetch_add(1, Ordering::Relaxed);
            if (n + 1).is_power_of_two() {
                tracing::warn!(peer = %self.labels[peer], %src, count = n + 1, "packet from a source outside the peer's AllowedIPs dropped (meshpunch_client_tun_bad_source_total)");
            }
            return;
        }
        match write_fd(self.fd.get_ref(), pkt) {
            Ok(_) => {
                self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rx_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self.stats.write_failed.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    tracing::warn!(name = %self.name, error = %e, "write to the TUN device failed");
                }
            }
        }
    }

    /// Runs every tunnel's timers; what they send (handshake initiations and retries,
    /// keepalives) goes to `sink`.
    pub fn tick(&self, b: &mut Buffers, mut sink: impl FnMut(usize, &[u8])) {
        for (i, t) in self.peers.iter().enumerate() {
            let Ok(mut t) = t.lock() else {
                continue;
            };
            match t.update_timers(&mut b.out) {
                TunnResult::WriteToNetwork(d) => sink(i, d),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %self.labels[i], error = ?e, "WireGuard timer")
                }
                _ => {}
            }
        }
    }

    /// The peer has a path now: if no session is up, start a handshake at once instead of
    /// waiting for WireGuard's 5 s retry (the first initiation, sent before any path
    /// existed, was dropped). Packets queued meanwhile leave when the handshake completes.
    pub fn path_up(&self, peer: usize, b: &mut Buffers, mut sink: impl FnMut(usize, &[u8])) {
        let Some(Ok(mut t)) = self.peers.get(peer).map(|t| t.lock()) else {
            return;
        };
        if t.stats().0.is_some() {
            return;
        }
        if let TunnResult::WriteToNetwork(d) = t.format_handshake_initiation(&mut b.out, true) {
            sink(peer, d);
        }
    }

    /// Time since the last completed handshake with peer `peer`, if any.
    pub fn last_handshake(&self, peer: usize) -> Option<Duration> {
        self.peers.get(peer)?.lock().ok()?.stats().0
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for buf.len() bytes; `fd` is open.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for buf.len() bytes; `fd` is open.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod mtu_tests {
    use super::*;

    #[test]
    fn interface_mtu_follows_the_path_but_never_above_configured_nor_below_the_floor() {
        assert_eq!(target_mtu(1412, MIN_MTU_IPV6, None), 1412);
        assert_eq!(target_mtu(1412, MIN_MTU_IPV6, Some(1340)), 1340);
        assert_eq!(target_mtu(1412, MIN_MTU_IPV6, Some(1440)), 1412);
        assert_eq!(target_mtu(1412, MIN_MTU_IPV6, Some(1100)), 1280);
        assert_eq!(target_mtu(1412, MIN_MTU, Some(1100)), 1100);
        // A configured MTU below the floor stays what was configured.
        assert_eq!(target_mtu(1000, MIN_MTU_IPV6, Some(900)), 1000);
    }
}
