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
use std::sync::{Mutex, RwLock};
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
    /// A peer's `AllowedIPs` holds `0.0.0.0/0` or `::/0` (a full tunnel): the firewall mark
    /// of meshpunch's own sockets, also the number of the tunnel's routing table (wg-quick's
    /// recipe; [`FullTunnel`]). None: no full tunnel.
    pub full_tunnel: Option<u32>,
}

/// The wg-quick default for a full tunnel's fwmark and routing table.
pub const FULL_TUNNEL_MARK: u32 = 51820;

/// Priorities of the full tunnel's rules: the suppressing one is consulted first.
const SUPPRESS_PRIORITY: u32 = 32764;
const NOT_MARK_PRIORITY: u32 = 32765;

/// A full tunnel's policy routing, installed for each family with a default prefix in some
/// peer's `AllowedIPs` (wg-quick's recipe): routing table `mark` holds the default route
/// through the TUN device; `ip rule not fwmark MARK table MARK` sends every packet without
/// meshpunch's mark there; `ip rule table main suppress_prefixlength 0` keeps the main table's
/// specific routes (LAN, tunnel subnet) and drops only its default route. meshpunch's own
/// sockets carry the mark, so its packets (paths to peers, rendezvous, relay, STUN, port
/// mapping) keep the main table's default route. The rules are deleted when this is dropped
/// (`meshpunch down`, SIGTERM); the table's route goes with the interface.
#[derive(Debug)]
pub struct FullTunnel {
    mark: u32,
    /// Families whose rules were added (`false` = IPv4, `true` = IPv6), with the rules.
    added: Vec<(bool, sys::Rule)>,
}

impl FullTunnel {
    fn install(index: u32, mark: u32, v4: bool, v6: bool) -> Result<FullTunnel, TunError> {
        let mut nl = sys::Netlink::open()?;
        let mut ft = FullTunnel {
            mark,
            added: Vec::new(),
        };
        for fam in [false, true]
            .into_iter()
            .filter(|f| if *f { v6 } else { v4 })
        {
            let ipv = if fam { "IPv6" } else { "IPv4" };
            nl.add_default_route(index, fam, mark).map_err(|e| {
                sys_err(format!("adding the {ipv} default route to table {mark}"), e)
            })?;
            for rule in [
                sys::Rule::NotMark {
                    mark,
                    table: mark,
                    priority: NOT_MARK_PRIORITY,
                },
                sys::Rule::SuppressDefault {
                    priority: SUPPRESS_PRIORITY,
                },
            ] {
                match nl.rule(true, fam, rule) {
                    Ok(()) => ft.added.push((fam, rule)),
                    // Left by a daemon that was killed: it is the same rule.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => ft.added.push((fam, rule)),
                    Err(e) => {
                        return Err(sys_err(format!("adding the {ipv} rule {rule:?}"), e));
                    }
                }
            }
        }
        if v4 {
            // wg-quick does the same: replies to marked packets pass reverse-path filtering.
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1") {
                tracing::warn!(error = %e, "cannot set net.ipv4.conf.all.src_valid_mark=1; with rp_filter on, replies to meshpunch's own packets may be dropped");
            }
        }
        tracing::info!(
            fwmark = mark,
            table = mark,
            ipv4 = v4,
            ipv6 = v6,
            "full tunnel: policy routing installed"
        );
        Ok(ft)
    }

    /// The mark (and table number).
    pub fn mark(&self) -> u32 {
        self.mark
    }
}

impl Drop for FullTunnel {
    fn drop(&mut self) {
        let Ok(mut nl) = sys::Netlink::open() else {
            tracing::error!("full tunnel: cannot open netlink to delete the rules; delete them with `ip rule del`");
            return;
        };
        for (fam, rule) in self.added.drain(..).rev() {
            if let Err(e) = nl.rule(false, fam, rule) {
                tracing::error!(?rule, error = %e, "full tunnel rule not deleted; delete it with `ip rule del`");
            }
        }
        tracing::info!(table = self.mark, "full tunnel: policy routing removed");
    }
}

fn sys_err(what: String, err: io::Error) -> TunError {
    TunError::Sys { what, err }
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
    full: Option<FullTunnel>,
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
            // A default prefix goes to the full tunnel's own table, not the main one.
            for n in p.allowed_ips.iter().filter(|n| n.len > 0) {
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
        let mut iface = TunIface {
            fd,
            index,
            name: s.name.clone(),
            full: None,
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
            for n in p.allowed_ips.iter().filter(|n| n.len > 0) {
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
        let defaults = s
            .peers
            .iter()
            .flat_map(|p| &p.allowed_ips)
            .filter(|n| n.len == 0);
        let (v4, v6) = defaults.fold((false, false), |(a, b), n| {
            (a || !n.is_ipv6(), b || n.is_ipv6())
        });
        if v4 || v6 {
            let mark = s.full_tunnel.unwrap_or(FULL_TUNNEL_MARK);
            iface.full = Some(
                FullTunnel::install(index, mark, v4, v6).map_err(|e| match e {
                    TunError::Sys { err, .. } if err.raw_os_error() == Some(libc::EPERM) => {
                        TunError::NoPermission {
                            name: s.name.clone(),
                        }
                    }
                    e => e,
                })?,
            );
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

    /// Takes the full tunnel's policy routing (its rules go when it is dropped), if any.
    pub fn take_full_tunnel(&mut self) -> Option<FullTunnel> {
        self.full.take()
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
    /// Interface index (for routes of peers added or removed at run time).
    index: u32,
    /// Our private key (for tunnels of peers added at run time).
    private_key: [u8; 32],
    /// The peers; written only when a peer is added or removed (SIGHUP), read per packet.
    peers: RwLock<PeerTable>,
    /// `MTU` as configured: the interface never goes above it.
    configured_mtu: u32,
    /// The lowest MTU the interface may get ([`MIN_MTU_IPV6`] with an IPv6 address).
    floor_mtu: u32,
    /// The interface MTU now (follows the smallest working path, [`Device::follow_path_mtu`]).
    mtu: AtomicU32,
    /// Counters.
    pub stats: TunStats,
}

/// The device's peers by index (the daemon's peer index; a removed peer's slot stays empty
/// so that indices never move).
#[derive(Default)]
struct PeerTable {
    tunnels: Vec<Option<Mutex<Tunn>>>,
    labels: Vec<String>,
    /// Per peer: its `AllowedIPs` as configured (for `status`; empty for a removed peer).
    allowed: Vec<Vec<IpNet>>,
    table: AllowedIps,
}

impl PeerTable {
    fn label(&self, i: usize) -> &str {
        self.labels.get(i).map_or("?", |l| l.as_str())
    }
}

fn tunnel(private_key: [u8; 32], i: usize, p: &TunPeer) -> Mutex<Tunn> {
    Mutex::new(Tunn::new(
        boringtun::x25519::StaticSecret::from(private_key),
        boringtun::x25519::PublicKey::from(p.public_key),
        p.preshared_key,
        None,
        // Each tunnel's session indices carry its peer number (boringtun shifts this left by
        // 8 and fills the low bits per session).
        i as u32,
        None,
    ))
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("index", &self.index)
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
        let tunnels = peers
            .iter()
            .enumerate()
            .map(|(i, p)| Some(tunnel(private_key, i, p)))
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
            private_key,
            peers: RwLock::new(PeerTable {
                tunnels,
                labels: peers.iter().map(|p| p.label.clone()).collect(),
                allowed: peers.iter().map(|p| p.allowed_ips.clone()).collect(),
                table,
            }),
            configured_mtu: DEFAULT_MTU,
            floor_mtu: MIN_MTU_IPV6,
            mtu: AtomicU32::new(DEFAULT_MTU),
            stats: TunStats::default(),
        })
    }

    /// Checks that `peer` could take slot `i` (the daemon's peer index; `i` = the peer
    /// count appends): its `AllowedIPs` claimed by no other peer, and no route on another
    /// interface to one of them. Nothing changes.
    pub fn check_peer(&self, i: usize, peer: &TunPeer) -> Result<(), TunError> {
        {
            let t = self.peers.read().map_err(|_| poisoned())?;
            self.new_table(&t, i, Some(peer))?;
        }
        self.check_routes(peer)
    }

    /// Checks that no route on another interface goes to one of `peer`'s `AllowedIPs`.
    pub fn check_routes(&self, peer: &TunPeer) -> Result<(), TunError> {
        if let Some(n) = peer.allowed_ips.iter().find(|n| n.len == 0) {
            return Err(TunError::Sys {
                what: format!(
                    "AllowedIPs {n} of peer {}: a full tunnel is set up at start only",
                    peer.label
                ),
                err: io::Error::other("restart meshpunch to add one"),
            });
        }
        let mut nl = sys::Netlink::open()?;
        let routes = nl.routes().map_err(|e| TunError::Sys {
            what: "reading the routing table".into(),
            err: e,
        })?;
        for n in &peer.allowed_ips {
            if let Some(r) = sys::route_collision(&routes, self.index, *n) {
                return Err(TunError::RouteCollides {
                    prefix: n.network(),
                    peer: peer.label.clone(),
                    dev: sys::if_name(r.oif),
                });
            }
        }
        Ok(())
    }

    /// The cryptokey routing table with slot `i` holding `peer` (None: empty).
    fn new_table(
        &self,
        t: &PeerTable,
        i: usize,
        peer: Option<&TunPeer>,
    ) -> Result<AllowedIps, TunError> {
        let mut nets = t.allowed.clone();
        let mut labels = t.labels.clone();
        if nets.len() <= i {
            nets.resize(i + 1, Vec::new());
            labels.resize(i + 1, String::new());
        }
        nets[i] = peer.map(|p| p.allowed_ips.clone()).unwrap_or_default();
        if let Some(p) = peer {
            labels[i] = p.label.clone();
        }
        AllowedIps::build(&nets).map_err(|o| {
            let l = |k: usize| labels.get(k).cloned().unwrap_or_default();
            TunError::from(OverlapError {
                prefix: o.prefix,
                first: l(o.first),
                second: l(o.second),
            })
        })
    }

    /// Puts `peer` in slot `i` at run time (`i` = the peer count appends; a removed peer's
    /// slot is reused for the same key): a fresh WireGuard tunnel, its `AllowedIPs` in the
    /// cryptokey routing table and a route for each through the device. On an error nothing
    /// is left changed.
    pub fn add_peer(&self, i: usize, peer: &TunPeer) -> Result<(), TunError> {
        self.check_peer(i, peer)?;
        let mut nl = sys::Netlink::open()?;
        let mut added = Vec::new();
        for n in &peer.allowed_ips {
            match nl.add_route(self.index, *n) {
                Ok(()) => added.push(*n),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    for a in added {
                        let _ = nl.del_route(self.index, a);
                    }
                    return Err(TunError::Sys {
                        what: format!(
                            "adding route {} dev {} (AllowedIPs of {})",
                            n.network(),
                            self.name,
                            peer.label
                        ),
                        err: e,
                    });
                }
            }
        }
        let mut t = self.peers.write().map_err(|_| poisoned())?;
        let table = match self.new_table(&t, i, Some(peer)) {
            Ok(x) => x,
            Err(e) => {
                for a in added {
                    let _ = nl.del_route(self.index, a);
                }
                return Err(e);
            }
        };
        if t.tunnels.len() <= i {
            t.tunnels.resize_with(i + 1, || None);
            t.labels.resize(i + 1, String::new());
            t.allowed.resize(i + 1, Vec::new());
        }
        t.tunnels[i] = Some(tunnel(self.private_key, i, peer));
        t.labels[i] = peer.label.clone();
        t.allowed[i] = peer.allowed_ips.clone();
        t.table = table;
        Ok(())
    }

    /// Empties slot `i` (a peer removed at run time): its tunnel and sessions are dropped,
    /// its `AllowedIPs` leave the cryptokey routing table and their routes are deleted.
    /// Returns the prefixes whose route could not be deleted (with why).
    pub fn remove_peer(&self, i: usize) -> Vec<(IpNet, String)> {
        let Ok(mut t) = self.peers.write() else {
            return Vec::new();
        };
        let Some(old) = t.allowed.get(i).cloned() else {
            return Vec::new();
        };
        if let Ok(table) = self.new_table(&t, i, None) {
            t.table = table;
        }
        if let Some(x) = t.tunnels.get_mut(i) {
            *x = None;
        }
        if let Some(a) = t.allowed.get_mut(i) {
            a.clear();
        }
        drop(t);
        let mut failed = Vec::new();
        let mut nl = match sys::Netlink::open() {
            Ok(nl) => nl,
            Err(e) => return old.into_iter().map(|n| (n, e.to_string())).collect(),
        };
        for n in old {
            match nl.del_route(self.index, n) {
                Ok(()) => {}
                // Not there (an Address's own prefix route is the kernel's, not ours).
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => failed.push((n, e.to_string())),
            }
        }
        failed
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

    /// Peer `peer`'s `AllowedIPs` (empty for an unknown or removed peer).
    pub fn allowed_ips(&self, peer: usize) -> Vec<IpNet> {
        self.peers
            .read()
            .ok()
            .and_then(|t| t.allowed.get(peer).cloned())
            .unwrap_or_default()
    }

    /// Number of peer slots (removed peers' included).
    pub fn peer_count(&self) -> usize {
        self.peers.read().map_or(0, |t| t.tunnels.len())
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
        let Ok(peers) = self.peers.read() else {
            return;
        };
        let Some(peer) = allowed::dst_addr(pkt).and_then(|d| peers.table.lookup(d)) else {
            self.stats.no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(Some(t)) = peers.tunnels.get(peer) else {
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
                tracing::debug!(peer = %peers.label(peer), error = ?e, "encapsulate failed");
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
        let Ok(peers) = self.peers.read() else {
            return;
        };
        let Some(Some(t)) = peers.tunnels.get(peer) else {
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
                    self.to_tun(&peers, peer, p, IpAddr::V4(src));
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    self.to_tun(&peers, peer, p, IpAddr::V6(src));
                }
                TunnResult::Err(e) => {
                    let n = self.stats.decrypt_failed.fetch_add(1, Ordering::Relaxed);
                    if (n + 1).is_power_of_two() {
                        tracing::warn!(peer = %peers.label(peer), error = ?e, count = n + 1, "WireGuard datagram dropped (meshpunch_client_tun_decrypt_failed_total)");
                    }
                }
            }
            return;
        }
    }

    fn to_tun(&self, peers: &PeerTable, peer: usize, pkt: &[u8], src: IpAddr) {
        // Keepalives decrypt to an empty packet.
        if pkt.is_empty() {
            return;
        }
        // Cryptokey routing: the inner source must route back to the same peer.
        if peers.table.lookup(src) != Some(peer) {
            let n = self.stats.bad_source.fetch_add(1, Ordering::Relaxed);
            if (n + 1).is_power_of_two() {
                tracing::warn!(peer = %peers.label(peer), %src, count = n + 1, "packet from a source outside the peer's AllowedIPs dropped (meshpunch_client_tun_bad_source_total)");
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
        let Ok(peers) = self.peers.read() else {
            return;
        };
        for (i, t) in peers.tunnels.iter().enumerate() {
            let Some(Ok(mut t)) = t.as_ref().map(|t| t.lock()) else {
                continue;
            };
            match t.update_timers(&mut b.out) {
                TunnResult::WriteToNetwork(d) => sink(i, d),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peers.label(i), error = ?e, "WireGuard timer")
                }
                _ => {}
            }
        }
    }

    /// The peer has a path now: if no session is up, start a handshake at once instead of
    /// waiting for WireGuard's 5 s retry (the first initiation, sent before any path
    /// existed, was dropped). Packets queued meanwhile leave when the handshake completes.
    pub fn path_up(&self, peer: usize, b: &mut Buffers, mut sink: impl FnMut(usize, &[u8])) {
        let Ok(peers) = self.peers.read() else {
            return;
        };
        let Some(Ok(mut t)) = peers
            .tunnels
            .get(peer)
            .and_then(|t| t.as_ref())
            .map(|t| t.lock())
        else {
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
        let peers = self.peers.read().ok()?;
        let t = peers.tunnels.get(peer)?.as_ref()?.lock().ok()?;
        t.stats().0
    }
}

fn poisoned() -> TunError {
    TunError::Sys {
        what: "the device's peer table".into(),
        err: io::Error::other("lock poisoned by a panic"),
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
