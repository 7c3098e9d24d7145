//! The `meshpunch up` daemon: the driver of the client node ([`meshpunch_proto::node::Node`],
//! the whole client brain, sans-IO). It owns the I/O — one UDP data socket for every peer,
//! STUN, probes, TURN and the rendezvous' QUIC connection; the birthday pool sockets; each
//! peer's WireGuard side ([`wg::WgSide`]); the control socket; the rendezvous task; DNS; the
//! background binding-lifetime measurement; the clock — and moves every input into the node
//! and performs every output.
//!
//! Everything runs in ONE task that owns all state, so there are no locks: it waits on the
//! data socket, the WireGuard sides, the control socket, the rendezvous task, the pool sockets
//! and the node's timer, feeds the input in, then performs what the node wants
//! ([`Node::poll_transmit`], [`Node::poll_event`]).
//!
//! Demultiplexing of the data socket: datagrams from an address the QUIC connection to the
//! rendezvous sent to go to quinn ([`crate::shared_socket`]: the rendezvous connection rides
//! the data socket, so the address it observes is the data socket's mapping); everything else
//! goes to the node, which tells STUN answers, the relay link's messages, probes and WireGuard
//! packets apart.
//!
//! Files: this one is the driver loop; `wg.rs` the WireGuard-side seam; `proxy.rs` the proxy
//! readers and the fast path; `net.rs` socket and interface helpers; `status.rs` the
//! `meshpunch status` snapshot. A peer's route lives in its path manager inside the node
//! ([`meshpunch_proto::path::PeerPath::route`]); the fast path only sees the copy the driver
//! publishes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshpunch_proto::addr::{for_socket, unmap};
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::node::{Event, Node, NodeConfig, PeerSpec, Signal, Socket, Transmit};
use meshpunch_proto::path::{PathConfig, PathKind, Via, DATA_SOCKET};
use meshpunch_proto::probe::TxId;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

mod device;
mod net;
mod proxy;
mod relay_stream;
mod status;
mod wg;

use net::bind_data;
pub use net::{
    interface_addrs, interface_addrs_excluding, turn_uri_authority, usable_candidates,
    wireguard_interfaces,
};
pub(crate) use net::{note_send_error, set_mark, set_probe_pmtu, SEND_TOO_BIG};
use proxy::{FastPath, FastRoute};
use wg::{FromWg, ProxyPort, WgSide};

use crate::config::PeerConfig;
use crate::control::{self, CtlCmd, PingResult, RendezvousStatus};
use crate::keys::{format_key, Identity};
use crate::pool::{Pool, PoolDatagram};
use crate::shared_socket::SharedSocket;
use crate::signal::{self, SignalCmd, SignalEvent};

pub use meshpunch_proto::node::discovery::{STUN_INTERVAL, STUN_TIMEOUT};
pub use meshpunch_proto::node::offers::{OFFER_DEFER, OFFER_MIN_GAP, OFFER_RETRY};
pub use meshpunch_proto::node::relay::{RELAY_MEASURE_INTERVAL, TURN_RETRY};
pub use meshpunch_proto::node::{HOST_SCAN_INTERVAL, LAST_RX_FALLBACK};

/// Longest the driver sleeps without looking at the node's timer again.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// WireGuard's (wg-quick's) default interface MTU.
const WG_DEFAULT_MTU: u16 = 1420;

/// What the daemon runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Our WireGuard identity.
    pub identity: Identity,
    /// Rendezvous connect string (None = static candidates only).
    pub rendezvous: Option<String>,
    /// Data socket address (port 0 = any).
    pub listen: SocketAddr,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Where WireGuard listens (None = learned from its first packet on each proxy port).
    pub wireguard_endpoint: Option<SocketAddr>,
    /// Offer interface addresses as candidates.
    pub host_candidates: bool,
    /// Peers.
    pub peers: Vec<PeerConfig>,
    /// Path manager timers.
    pub path: PathConfig,
    /// Interfaces whose addresses are never offered (besides every WireGuard interface found
    /// with `wg show interfaces` at start).
    pub exclude_interfaces: Vec<String>,
    /// Extra CA certificates trusted for the rendezvous (`--ca-file`, `CaFile`).
    pub ca_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// What the daemon runs with besides [`Options`] (the `meshpunch up` extras).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `FwMark` / `--fwmark`: SO_MARK on the data socket and the birthday pool sockets, so a
    /// full tunnel's policy routing (wg-quick's `not fwmark 51820`) does not send meshpunch's
    /// own packets into the tunnel. Needs CAP_NET_ADMIN.
    pub fwmark: Option<u32>,
    /// The watched `--wg-interface`, shown in `meshpunch status`.
    pub wg_interface: Option<crate::wg::SharedStatus>,
    /// `BirthdayTtl = auto`: once our mapping is endpoint-dependent (we are a birthday hard
    /// side), measure the routers to the STUN server and use that as the pool pings' TTL
    /// ([`crate::hops`]).
    pub birthday_ttl_auto: bool,
}

/// A running daemon (the engine task aborts when this is dropped).
#[derive(Debug)]
pub struct Daemon {
    /// Local address of the data socket.
    pub data_addr: SocketAddr,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Proxy address of each peer, in config order.
    pub proxies: Vec<([u8; 32], SocketAddr)>,
    task: tokio::task::JoinHandle<()>,
    /// Commands to the rendezvous task (for [`Daemon::reload_rendezvous`]).
    sig: Option<mpsc::Sender<SignalCmd>>,
    /// The engine's internal channel (port-mapping updates).
    int: mpsc::Sender<Internal>,
    /// The engine's command channel, as the control socket uses it (clean exit).
    ctl: mpsc::Sender<CtlCmd>,
    /// The port mapper of the data socket (`PortMapping = on`).
    portmap: Option<crate::portmap::PortMapper>,
    /// `meshpunch reload` requests from the control socket (see [`Daemon::reload_requests`]).
    reload_rx: Option<mpsc::Receiver<ReloadRequest>>,
    /// A full tunnel's policy routing (`--tun` with `AllowedIPs = 0.0.0.0/0`): its rules are
    /// deleted when the daemon is dropped or shut down.
    full_tunnel: Option<crate::tun::FullTunnel>,
}

/// A `meshpunch reload` request: the caller re-reads the config, applies it with
/// [`Daemon::reload_peers`] and answers here.
pub type ReloadRequest = oneshot::Sender<Result<control::PeerChanges, String>>;

/// The built-in WireGuard device's shared parts (for peers added at run time).
struct DeviceParts {
    dev: Arc<crate::tun::Device>,
    out: Arc<device::DeviceOut>,
    bufs: Arc<std::sync::Mutex<crate::tun::Buffers>>,
}

/// Adds and removes peers of a running daemon (the `--wg-interface` watcher uses it).
#[derive(Clone, Debug)]
pub struct PeerControl {
    tx: mpsc::Sender<Internal>,
}

impl PeerControl {
    /// Carries one more peer: returns its proxy port (a removed peer gets its old one back).
    pub async fn add(&self, key: [u8; 32]) -> anyhow::Result<SocketAddr> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Internal::AddPeer { key, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the daemon has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the daemon has stopped"))?
            .map_err(anyhow::Error::msg)
    }

    /// Stops carrying a peer (its packets are dropped from now on). False if unknown.
    pub async fn remove(&self, key: [u8; 32]) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Internal::RemovePeer { key, reply })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

impl Daemon {
    /// A handle that adds and removes peers at run time.
    pub fn peer_control(&self) -> PeerControl {
        PeerControl {
            tx: self.int.clone(),
        }
    }

    /// Waits until the engine stops (it runs until aborted).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Starts mapping the data socket's port through the default gateway (`PortMapping = on`,
    /// see `docs/portmap.md`); the mapped address joins our candidates as a `portmap` one
    /// ([`Node::set_candidate_source`]). Nothing happens when the data socket is on loopback
    /// (no gateway forwards to it) or there is no default IPv4 gateway.
    pub fn start_port_mapping(&mut self, opts: crate::portmap::Options) -> anyhow::Result<()> {
        if self.portmap.is_some() || self.data_addr.ip().is_loopback() {
            return Ok(());
        }
        let Some(m) = crate::portmap::PortMapper::start_default(self.data_addr.port(), opts)?
        else {
            tracing::info!("no default IPv4 gateway: no port mapping");
            return Ok(());
        };
        let mut rx = m.subscribe();
        let int = self.int.clone();
        tokio::spawn(async move {
            loop {
                let s = rx.borrow_and_update().clone();
                if int.send(Internal::Portmap(Box::new(s))).await.is_err() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        self.portmap = Some(m);
        Ok(())
    }

    /// Clean exit: deletes the port mapping on the gateway and the relay allocation, then
    /// stops the engine.
    pub async fn shutdown(mut self) {
        if let Some(m) = self.portmap.take() {
            m.stop().await;
        }
        let (reply, rx) = oneshot::channel();
        if self.ctl.send(CtlCmd::Shutdown(reply)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
        self.task.abort();
    }

    /// The `meshpunch reload` requests that arrive on the control socket (once; the caller
    /// re-reads its config, which the daemon does not know, for each).
    pub fn reload_requests(&mut self) -> Option<mpsc::Receiver<ReloadRequest>> {
        self.reload_rx.take()
    }

    /// Applies a re-read config's peers (SIGHUP, `meshpunch reload`): peers not in `peers`
    /// any more are dropped (proxy port closed; in `--tun` mode tunnel and routes removed),
    /// new ones are added and start punching, changed ones are updated (a peer whose
    /// candidates, `ProxyPort`, `AllowedIPs` or `PresharedKey` changed is removed and added
    /// again; a new `Name` is just taken). `tun` (the new [`crate::tun::TunPeer`]s, in the
    /// order of `peers`) is required in `--tun` mode and refused otherwise. Everything is
    /// checked before anything changes: on an error nothing changed.
    pub async fn reload_peers(
        &self,
        peers: Vec<PeerConfig>,
        tun: Option<Vec<crate::tun::TunPeer>>,
    ) -> anyhow::Result<control::PeerChanges> {
        let (reply, rx) = oneshot::channel();
        self.int
            .send(Internal::Reload { peers, tun, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the daemon has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the daemon has stopped"))?
            .map_err(anyhow::Error::msg)
    }

    /// Counts a config reload's outcome (`config_reloads` in status, and the metric).
    pub async fn record_reload(&self, ok: bool) {
        let _ = self.int.send(Internal::ReloadOutcome(ok)).await;
    }

    /// Uses a new rendezvous connect string (SIGHUP: a rotated token) without a restart: the
    /// rendezvous client reconnects with it if it changed or the old token was refused.
    pub async fn reload_rendezvous(&self, connect: &str) -> anyhow::Result<()> {
        let cs: ConnectString = connect
            .parse()
            .map_err(|e| anyhow::anyhow!("rendezvous connect string: {e}"))?;
        let Some(sig) = &self.sig else {
            anyhow::bail!("the daemon was started without a rendezvous; restart it to add one");
        };
        sig.send(SignalCmd::Reload(Box::new(cs)))
            .await
            .map_err(|_| anyhow::anyhow!("the rendezvous task has stopped"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.task.abort();
        // The full tunnel's rules go before the control socket, whose removal tells
        // `meshpunch down` that the daemon is done.
        drop(self.full_tunnel.take());
        let _ = std::fs::remove_file(&self.control_socket);
    }
}

fn unix_ms() -> u64 {
    meshpunch_proto::clock::unix_ms(SystemTime::now())
}

/// The session secret both sides of a static peer derive from their keys.
fn static_secret(id: &Identity, peer: &[u8; 32]) -> [u8; 32] {
    let dh = id.shared_secret(peer);
    let mut h = Sha256::new();
    h.update(b"meshpunch static session v1");
    h.update(dh);
    h.finalize().into()
}

/// Starts the daemon: binds the data socket, the proxy ports and the control socket, starts
/// the rendezvous task and the engine. The keepalive interval is measured in the background
/// with the default schedule and no cache ([`start_with`] chooses).
pub async fn start(opts: Options) -> anyhow::Result<Daemon> {
    start_with(opts, crate::lifetime::LifetimeOptions::default()).await
}

/// [`start`] with the NAT binding-lifetime options (config key, measurement schedule, cache).
pub async fn start_with(
    opts: Options,
    lifetime: crate::lifetime::LifetimeOptions,
) -> anyhow::Result<Daemon> {
    start_full(opts, lifetime, None).await
}

/// [`start_with`], and with `tun` the built-in WireGuard on that TUN device (`--tun`,
/// `Mode = tun`) instead of proxy ports: `tun.peers` are `opts.peers`, in the same order.
/// The TUN device's addresses are never offered as candidates.
pub async fn start_full(
    opts: Options,
    lifetime: crate::lifetime::LifetimeOptions,
    tun: Option<crate::tun::TunSettings>,
) -> anyhow::Result<Daemon> {
    start_with_extras(opts, lifetime, tun, Extras::default()).await
}

/// [`start_full`] with the [`Extras`] (`FwMark`, the watched interface's status).
pub async fn start_with_extras(
    mut opts: Options,
    lifetime: crate::lifetime::LifetimeOptions,
    tun: Option<crate::tun::TunSettings>,
    extras: Extras,
) -> anyhow::Result<Daemon> {
    if let Some(ts) = &tun {
        anyhow::ensure!(
            ts.peers.len() == opts.peers.len()
                && ts
                    .peers
                    .iter()
                    .zip(&opts.peers)
                    .all(|(t, p)| t.public_key == p.public_key),
            "TUN peers must be the daemon's peers in the same order"
        );
        opts.exclude_interfaces.push(ts.name.clone());
    }
    let (std_sock, v6) = match bind_data(opts.listen) {
        Ok(x) => x,
        Err(e) if opts.listen.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            tracing::info!(error = %e, "no IPv6; data socket is IPv4 only");
            bind_data(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                opts.listen.port(),
            ))?
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot bind data socket {}: {e}",
                opts.listen
            ))
        }
    };
    if let Some(mark) = extras.fwmark {
        net::set_mark(&std_sock, mark).map_err(|e| anyhow::anyhow!("data socket: {e}"))?;
        tracing::info!(fwmark = mark, "data socket marked");
    }
    let sock = Arc::new(UdpSocket::from_std(std_sock)?);
    let data_addr = sock.local_addr()?;

    // On a loopback-only data socket loopback is the only network: peers' loopback
    // candidates are allowed there (tests, single-host setups) and nowhere else.
    let path_cfg = PathConfig {
        loopback_candidates: data_addr.ip().is_loopback(),
        ..opts.path.clone()
    };
    let (wg_tx, wg_rx) = mpsc::channel::<FromWg>(1024);
    let now = Instant::now();
    let mut peers = Vec::new();
    let mut specs = Vec::new();
    let mut proxies = Vec::new();
    let mut device_parts = None;
    let mut full_tunnel = None;
    if let Some(ts) = &tun {
        // Built-in WireGuard: one TUN device, no proxy ports.
        let mut iface = crate::tun::TunIface::create(ts)?;
        full_tunnel = iface.take_full_tunnel();
        let dev = Arc::new(
            crate::tun::Device::new(iface, opts.identity.private, &ts.peers)?.with_mtu(ts),
        );
        let fasts: Vec<Arc<FastPath>> = opts
            .peers
            .iter()
            .map(|_| Arc::new(FastPath::default()))
            .collect();
        let out = Arc::new(device::DeviceOut::new(
            fasts.clone(),
            sock.clone(),
            wg_tx.clone(),
        ));
        let bufs = Arc::new(std::sync::Mutex::new(crate::tun::Buffers::default()));
        for (i, ((pc, fast), tp)) in opts.peers.iter().zip(fasts).zip(&ts.peers).enumerate() {
            specs.push(peer_spec(&opts.identity, pc));
            let mut p = Peer::new(
                fast,
                format_key(&pc.public_key),
                pc.name.clone(),
                WgSide::Device(device::DeviceSide {
                    dev: dev.clone(),
                    peer: i,
                    out: out.clone(),
                    bufs: bufs.clone(),
                }),
            );
            p.cfg = Some(pc.clone());
            p.tun = Some(tp.clone());
            peers.push(p);
        }
        device::spawn(dev.clone(), out.clone());
        device_parts = Some(DeviceParts { dev, out, bufs });
    }
    for (i, pc) in opts.peers.iter().enumerate().filter(|_| tun.is_none()) {
        let proxy = UdpSocket::bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            pc.proxy_port,
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot bind proxy port 127.0.0.1:{} for peer {}: {e}",
                pc.proxy_port,
                format_key(&pc.public_key)
            )
        })?;
        let proxy = Arc::new(proxy);
        let proxy_addr = proxy.local_addr()?;
        proxies.push((pc.public_key, proxy_addr));
        let fast = Arc::new(FastPath::default());
        let reader = proxy::spawn_reader(
            i,
            proxy.clone(),
            proxy_addr,
            opts.wireguard_endpoint,
            sock.clone(),
            fast.clone(),
            wg_tx.clone(),
        );
        specs.push(peer_spec(&opts.identity, pc));
        let mut p = Peer::new(
            fast,
            format_key(&pc.public_key),
            pc.name.clone(),
            WgSide::Proxy(ProxyPort {
                sock: proxy,
                addr: proxy_addr,
                wg: opts.wireguard_endpoint,
                reader,
            }),
        );
        p.cfg = Some(pc.clone());
        peers.push(p);
    }

    let (ctl_tx, ctl_rx) = mpsc::channel::<CtlCmd>(64);
    control::serve(opts.control_socket.clone(), ctl_tx.clone())
        .await
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", opts.control_socket.display()))?;

    let (local_tx, local_rx) = watch::channel((0u64, Vec::new()));
    let (sig_ev_tx, sig_ev_rx) = mpsc::channel::<SignalEvent>(256);
    let (int_tx, int_rx) = mpsc::channel::<Internal>(1024);
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let mut rdv = RendezvousStatus {
        state: "disabled".into(),
        ..Default::default()
    };
    let mut quic = None;
    let sig = match &opts.rendezvous {
        Some(s) => {
            let cs: ConnectString = s
                .parse()
                .map_err(|e| anyhow::anyhow!("rendezvous connect string: {e}"))?;
            rdv.state = "connecting".into();
            // The QUIC connection to the rendezvous shares the data socket: one endpoint
            // for the daemon's whole life, every (re)connect on it.
            let shared = SharedSocket::new(sock.clone(), v6)?;
            let endpoint = crate::rendezvous::endpoint_on(shared.clone())?;
            quic = Some(shared);
            Some(signal::spawn_with(
                cs,
                opts.identity.private,
                opts.peers.iter().map(|p| p.public_key).collect(),
                local_rx,
                sig_ev_tx,
                Some(endpoint),
                opts.ca_roots.clone(),
            ))
        }
        None => None,
    };

    let node = Node::new(
        NodeConfig {
            me: opts.identity.public,
            data_port: data_addr.port(),
            v6,
            path: path_cfg,
            signalling: sig.is_some(),
            seed: rand::random(),
            unix_ms: unix_ms(),
        },
        specs,
        now,
    );
    let sig_handle = sig.clone();
    let mut engine = Engine {
        id: opts.identity.clone(),
        node,
        sock,
        v6,
        data_addr,
        peers,
        host_candidates: opts.host_candidates,
        exclude_ifaces: {
            let mut v = opts.exclude_interfaces.clone();
            if opts.host_candidates {
                v.extend(wireguard_interfaces());
            }
            v
        },
        lifetime: crate::lifetime::LifetimeState::new(lifetime),
        quic,
        rdv,
        sig,
        local_tx,
        pings: Vec::new(),
        int_tx,
        pool: {
            let mut p = Pool::new(opts.path.birthday_sockets);
            p.set_mark(extras.fwmark);
            p
        },
        wg_interface: extras.wg_interface.clone(),
        wg_tx: wg_tx.clone(),
        wireguard_endpoint: opts.wireguard_endpoint,
        streams: relay_stream::RelayStreams::new(opts.ca_roots.clone()),
        portmap: None,
        device: device_parts,
        reload_tx,
        reloads: control::ConfigReloads::default(),
        hops_wanted: extras.birthday_ttl_auto,
        fwmark: extras.fwmark,
        mtu: MtuState::default(),
    };
    if engine.lifetime.is_configured() {
        // `BindingLifetime` given: every path uses its keepalive from the start.
        engine.apply_keepalive(now);
    }
    let hosts = engine.scan_hosts();
    engine.node.set_hosts(now, hosts);
    let control_socket = opts.control_socket.clone();
    let int = engine.int_tx.clone();
    let task = tokio::spawn(engine.run(wg_rx, ctl_rx, sig_ev_rx, int_rx));
    Ok(Daemon {
        data_addr,
        control_socket,
        proxies,
        task,
        sig: sig_handle,
        int,
        ctl: ctl_tx,
        portmap: None,
        reload_rx: Some(reload_rx),
        full_tunnel,
    })
}

/// What the driver keeps of a peer besides the node's state: its WireGuard side and names.
struct Peer {
    /// The direct route published to the fast path, and the fast path's counters.
    fast: Arc<FastPath>,
    b64: String,
    name: Option<String>,
    /// Where this peer's WireGuard packets come from and go to.
    wg: WgSide,
    /// Path changes and failovers (a direct or LAN path given up for the relay or nothing),
    /// for `status` and the metrics endpoint.
    changes: PathChanges,
    /// The peer as configured (None: added by the `--wg-interface` watcher); a reload
    /// compares against it.
    cfg: Option<PeerConfig>,
    /// The peer as the built-in device has it (`--tun`).
    tun: Option<crate::tun::TunPeer>,
}

/// Writes one transmit of the node to the socket it names.
fn send_on(
    (sock, v6, pool, streams): (&UdpSocket, bool, &Pool, &relay_stream::RelayStreams),
    socket: Socket,
    dst: SocketAddr,
    bytes: &[u8],
    ttl: Option<u8>,
) {
    match socket {
        Socket::Data => {
            let dest = for_socket(v6, dst);
            if let Err(e) = sock.try_send_to(bytes, dest) {
                net::note_send_error(&e, dest);
            }
        }
        Socket::Pool(l) => {
            pool.send(l, dst, bytes, ttl);
        }
        Socket::Relay(link) => streams.send(link, bytes),
    }
}

impl Peer {
    fn new(fast: Arc<FastPath>, b64: String, name: Option<String>, wg: WgSide) -> Peer {
        Peer {
            fast,
            b64,
            name,
            wg,
            changes: PathChanges::default(),
            cfg: None,
            tun: None,
        }
    }
}

/// Binds a proxy port on 127.0.0.1 (`port` 0: any) for peer `label`.
fn bind_proxy(port: u16, label: &str) -> Result<(Arc<UdpSocket>, SocketAddr), String> {
    let std = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| format!("cannot bind proxy port 127.0.0.1:{port} for peer {label}: {e}"))?;
    let sock = UdpSocket::from_std(std).map_err(|e| format!("proxy port for peer {label}: {e}"))?;
    let addr = sock
        .local_addr()
        .map_err(|e| format!("proxy port for peer {label}: {e}"))?;
    Ok((Arc::new(sock), addr))
}

/// What the node knows of a configured peer: its key, static candidates and, with static
/// candidates, the probe secret both sides derive without a rendezvous.
fn peer_spec(identity: &Identity, pc: &PeerConfig) -> PeerSpec {
    PeerSpec {
        key: pc.public_key,
        static_candidates: pc.candidates.clone(),
        static_secret: (!pc.candidates.is_empty()).then(|| static_secret(identity, &pc.public_key)),
    }
}

/// Counts of one peer's path changes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PathChanges {
    pub(crate) total: u64,
    pub(crate) failovers: u64,
    pub(crate) last: Option<PathKind>,
}

impl PathChanges {
    fn record(&mut self, kind: PathKind) {
        if self.last == Some(kind) {
            return;
        }
        if matches!(self.last, Some(PathKind::Direct | PathKind::Lan))
            && matches!(kind, PathKind::Relay | PathKind::None)
        {
            self.failovers += 1;
        }
        if self.last.is_some() || kind != PathKind::None {
            self.total += 1;
        }
        self.last = Some(kind);
    }
}

struct PendingPing {
    peer: usize,
    tx: TxId,
    sent: Instant,
    reply: oneshot::Sender<Result<PingResult, String>>,
}

enum Internal {
    /// The stream of relay link `.0` connected.
    RelayUp(meshpunch_proto::node::relay::LinkId),
    /// The stream of relay link `.0` closed or could not connect (`.1`: why).
    RelayDown(meshpunch_proto::node::relay::LinkId, String),
    /// A whole STUN/ChannelData message read from relay link `.0`'s stream.
    RelayFrame(meshpunch_proto::node::relay::LinkId, Vec<u8>),
    Resolved {
        idx: usize,
        addr: Option<SocketAddr>,
    },
    /// Routers to the STUN server, measured for the pool pings' TTL (`None`: no answer).
    Hops(Option<u8>),
    /// The background binding-lifetime measurement for this public IP ended.
    Lifetime {
        public_ip: IpAddr,
        outcome: meshpunch_proto::lifetime::Outcome,
    },
    /// Carry one more peer ([`PeerControl::add`]).
    AddPeer {
        key: [u8; 32],
        reply: oneshot::Sender<Result<SocketAddr, String>>,
    },
    /// Stop carrying a peer ([`PeerControl::remove`]).
    RemovePeer {
        key: [u8; 32],
        reply: oneshot::Sender<bool>,
    },
    /// The port mapper's state changed (see [`Daemon::start_port_mapping`]).
    Portmap(Box<crate::portmap::Snapshot>),
    /// A config reload ended (true: applied) ([`Daemon::record_reload`]).
    ReloadOutcome(bool),
    /// Apply a re-read config's peers ([`Daemon::reload_peers`]).
    Reload {
        peers: Vec<PeerConfig>,
        tun: Option<Vec<crate::tun::TunPeer>>,
        reply: oneshot::Sender<Result<control::PeerChanges, String>>,
    },
}

struct Engine {
    id: Identity,
    /// The client brain.
    node: Node,
    sock: Arc<UdpSocket>,
    v6: bool,
    data_addr: SocketAddr,
    peers: Vec<Peer>,
    host_candidates: bool,
    exclude_ifaces: Vec<String>,
    /// Binding lifetime and keepalive interval (config, cache or background measurement).
    lifetime: crate::lifetime::LifetimeState,
    /// The data socket as the rendezvous client's QUIC endpoint sees it.
    quic: Option<Arc<SharedSocket>>,
    rdv: RendezvousStatus,
    sig: Option<mpsc::Sender<SignalCmd>>,
    local_tx: watch::Sender<(u64, Vec<meshpunch_proto::path::Candidate>)>,
    pings: Vec<PendingPing>,
    int_tx: mpsc::Sender<Internal>,
    pool: Pool,
    /// The watched `--wg-interface` (for status).
    wg_interface: Option<crate::wg::SharedStatus>,
    /// For the proxy readers of peers added at run time.
    wg_tx: mpsc::Sender<FromWg>,
    wireguard_endpoint: Option<SocketAddr>,
    /// Stream relay links (TURN over TCP/TLS).
    streams: relay_stream::RelayStreams,
    /// The port mapper's latest state (None: port mapping not running).
    portmap: Option<crate::portmap::Snapshot>,
    /// The built-in WireGuard device (`--tun`).
    device: Option<DeviceParts>,
    /// Where `meshpunch reload` requests go (to [`Daemon::reload_requests`]).
    reload_tx: mpsc::Sender<ReloadRequest>,
    /// Config reloads by outcome.
    reloads: control::ConfigReloads,
    /// `BirthdayTtl = auto` and not measured yet (see [`Extras::birthday_ttl_auto`]).
    hops_wanted: bool,
    /// SO_MARK for the measurement socket.
    fwmark: Option<u32>,
    /// Path MTU following (`status`'s `mtu`).
    mtu: MtuState,
}

/// What the engine did with the node's path MTU ([`Event::PathMtu`]).
#[derive(Debug, Default)]
struct MtuState {
    /// Interface MTU changes (`--tun`).
    changes: u64,
    /// The last error setting it.
    error: Option<String>,
    /// The recommendation last warned about (proxy / `--wg-interface` modes).
    warned: Option<u16>,
}

impl Engine {
    async fn run(
        mut self,
        mut wg_rx: mpsc::Receiver<FromWg>,
        mut ctl_rx: mpsc::Receiver<CtlCmd>,
        mut sig_rx: mpsc::Receiver<SignalEvent>,
        mut int_rx: mpsc::Receiver<Internal>,
    ) {
        let mut buf = vec![0u8; 65536];
        let sock = self.sock.clone();
        let Some(mut pool_rx) = self.pool.take_rx() else {
            return;
        };
        loop {
            let now = Instant::now();
            if self.node.poll_timeout() <= now {
                self.node.handle_timeout(now);
            }
            self.perform(now);
            self.publish_fast_routes();
            self.pings.retain(|p| {
                now.saturating_duration_since(p.sent)
                    < control::PING_TIMEOUT + Duration::from_secs(1)
            });
            let deadline = self.node.poll_timeout().min(now + MAX_SLEEP).max(now);
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    match r {
                        Ok((n, from)) => self.on_datagram(Instant::now(), unmap(from), &buf[..n]),
                        Err(e) => tracing::debug!(error = %e, "data socket recv error"),
                    }
                }
                Some(m) = wg_rx.recv() => match m {
                    FromWg::Packet(i, pkt, src) => self.on_wireguard(Instant::now(), i, &pkt, src),
                    FromWg::Active(i) => self.node.on_data_sent(Instant::now(), i),
                },
                Some(cmd) = ctl_rx.recv() => {
                    if let CtlCmd::Shutdown(reply) = cmd {
                        // `meshpunch down` or [`Daemon::shutdown`]: the driver returns;
                        // `Daemon::wait` ends and the caller restores what it changed.
                        self.release().await;
                        let _ = reply.send(());
                        return;
                    }
                    self.on_ctl(Instant::now(), cmd)
                }
                Some(ev) = sig_rx.recv() => self.on_signal(Instant::now(), ev),
                Some(ev) = int_rx.recv() => self.on_internal(Instant::now(), ev),
                Some(d) = pool_rx.recv() => self.on_pool_datagram(Instant::now(), d),
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
            }
        }
    }

    /// Clean exit: deletes the relay allocation so a restart from the same address (same
    /// `ListenPort`, same NAT mapping) allocates at once.
    async fn release(&mut self) {
        let now = Instant::now();
        self.node.shutdown(now);
        self.perform(now);
        // A TURN-over-TCP/TLS link's writer task sends the request; give it a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn send(&self, socket: Socket, dst: SocketAddr, bytes: &[u8], ttl: Option<u8>) {
        send_on(
            (&self.sock, self.v6, &self.pool, &self.streams),
            socket,
            dst,
            bytes,
            ttl,
        );
    }

    /// Performs everything the node wants until it wants nothing more.
    fn perform(&mut self, now: Instant) {
        loop {
            let mut idle = true;
            while let Some(Transmit {
                socket,
                dst,
                payload,
                ttl,
            }) = self.node.poll_transmit()
            {
                idle = false;
                self.send(socket, dst, &payload, ttl);
            }
            while let Some(ev) = self.node.poll_event() {
                idle = false;
                self.on_event(now, ev);
            }
            if idle {
                return;
            }
        }
    }

    fn on_event(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::LocalCandidates {
                version,
                candidates,
            } => {
                tracing::info!(candidates = ?candidates.iter().map(|c| format!("{:?} {}", c.kind, c.addr)).collect::<Vec<_>>(), "local candidates");
                let _ = self.local_tx.send((version, candidates));
            }
            Event::Offer { peer } => {
                let queued = self
                    .sig
                    .as_ref()
                    .is_some_and(|s| s.try_send(SignalCmd::Offer(peer)).is_ok());
                if !queued {
                    self.node.offer_not_queued(now, &peer);
                }
            }
            Event::PathChanged {
                peer,
                kind,
                remote,
                reason,
            } => {
                tracing::info!(peer = %self.peers[peer].b64, path = kind.as_str(), remote = ?remote.map(|r| r.to_string()), %reason, "path changed");
                if let Some(p) = self.peers.get_mut(peer) {
                    p.changes.record(kind);
                }
                if kind != PathKind::None {
                    if let Some(p) = self.peers.get(peer) {
                        p.wg.path_up();
                    }
                }
            }
            Event::Pong {
                peer,
                remote,
                kind,
                tx,
                rtt,
            } => {
                if let Some(pos) = self.pings.iter().position(|p| p.peer == peer && p.tx == tx) {
                    let p = self.pings.swap_remove(pos);
                    let label = match (remote.via, kind) {
                        (Via::Direct, PathKind::Relay) => format!("relay:{}", remote.addr),
                        _ => remote.to_string(),
                    };
                    let _ = p.reply.send(Ok(PingResult {
                        path: kind,
                        remote: label,
                        rtt,
                    }));
                }
            }
            Event::Punching { peer, candidates } => {
                tracing::info!(peer = %self.peers[peer].b64, candidates, "punching");
            }
            Event::CandidatesRefused { peer, count } => {
                tracing::warn!(peer = %self.peers[peer].b64, refused = count, "peer candidates refused (loopback, multicast, unspecified, broadcast, or a private address that is not a host candidate)");
            }
            Event::OpenPool => {
                let n = self.pool.open(now);
                if n > 0 {
                    tracing::info!(sockets = n, "birthday pool open");
                }
                self.node
                    .pool_report(now, self.pool.announced(), self.pool.open_count());
            }
            Event::ClosePool { keep } => {
                let keep: HashSet<u16> = keep.into_iter().collect();
                self.pool.close_unused(&keep);
                self.node
                    .pool_report(now, self.pool.announced(), self.pool.open_count());
            }
            Event::ScanHosts => {
                let hosts = self.scan_hosts();
                self.node.set_hosts(now, hosts);
            }
            Event::Resolve { index, authority } => {
                let tx = self.int_tx.clone();
                tokio::spawn(async move {
                    let addr = tokio::net::lookup_host(authority)
                        .await
                        .ok()
                        .and_then(|mut it| it.find(|a| a.is_ipv4()));
                    let _ = tx.send(Internal::Resolved { idx: index, addr }).await;
                });
            }
            Event::PublicAddress(public) => self.check_lifetime(now, public),
            Event::ServerReflexive { old, new, source } => {
                tracing::info!(?old, %new, source = source.as_str(), "server-reflexive address");
            }
            Event::MappingBehaviour(m) => {
                tracing::info!(mapping = ?m, "data socket mapping behaviour");
                if m == meshpunch_proto::path::MappingBehaviour::EndpointDependent {
                    self.measure_hops();
                }
            }
            Event::RelayAllocating {
                region,
                server,
                transport,
            } => {
                tracing::info!(%region, %server, transport = transport.as_str(), "allocating on home relay");
            }
            Event::OpenRelayStream {
                link,
                server,
                kind,
                host,
            } => {
                let tx = self.int_tx.clone();
                self.streams.open(link, server, kind, host, tx);
            }
            Event::CloseRelayStream { link } => self.streams.close(link),
            Event::RelayAllocated { region, relayed } => {
                tracing::info!(%relayed, %region, "relay allocation ready");
            }
            Event::RelayError { region, message } => {
                tracing::warn!(%region, error = %message, "relay error");
            }
            Event::PathMtu(mtu) => self.follow_path_mtu(mtu),
        }
    }

    /// The smallest working path's tunnel MTU changed: a `--tun` interface follows it
    /// (lowered, or raised back up to `MTU`, never above; logged once per change); in the
    /// other modes the interface is not ours, so a recommendation below WireGuard's default
    /// MTU is logged once per value and shown in `status`.
    fn follow_path_mtu(&mut self, path: Option<u16>) {
        if let Some(dev) = self.peers.iter().find_map(|p| p.wg.device()) {
            let from = dev.mtu();
            match dev.follow_path_mtu(path) {
                Ok(Some(to)) => {
                    self.mtu.changes += 1;
                    self.mtu.error = None;
                    tracing::info!(name = %dev.name(), from, to, path_mtu = ?path, "TUN interface MTU follows the smallest working path");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(name = %dev.name(), error = %e, "cannot set the TUN interface MTU");
                    self.mtu.error = Some(e.to_string());
                }
            }
            return;
        }
        let rec = status::recommended_mtu(path);
        if path.is_some_and(|p| p < WG_DEFAULT_MTU) && self.mtu.warned != Some(rec) {
            self.mtu.warned = Some(rec);
            tracing::warn!(recommended = rec, path_mtu = ?path, "a path to a peer carries less than WireGuard's default MTU 1420: set MTU = {rec} (or lower) on the WireGuard interface, or full-size packets are dropped on that path");
        }
    }

    fn scan_hosts(&self) -> Vec<IpAddr> {
        if self.host_candidates {
            interface_addrs_excluding(&self.exclude_ifaces)
        } else {
            Vec::new()
        }
    }

    /// Publishes each peer's selected direct pair (the path manager's route, the one source
    /// of truth) to its WireGuard side's fast path when it changed.
    fn publish_fast_routes(&mut self) {
        for (p, np) in self.peers.iter().zip(self.node.peers()) {
            let r = np.path().route().filter(|d| d.via == Via::Direct);
            if r == p.fast.published() {
                continue;
            }
            let route = r.and_then(|d| match d.local {
                DATA_SOCKET => Some(FastRoute {
                    path: d,
                    dest: for_socket(self.v6, d.addr),
                    pool_sock: None,
                }),
                // Pool sockets are IPv4: the address goes as it is.
                l => self.pool.socket(l).map(|s| FastRoute {
                    path: d,
                    dest: d.addr,
                    pool_sock: Some(s.clone()),
                }),
            });
            p.fast.publish(route);
        }
    }

    fn on_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) {
        // QUIC from the rendezvous: by source, before any look at the bytes (QUIC's first
        // byte can look like ChannelData or a probe).
        if self.quic.as_ref().is_some_and(|q| q.offer(now, from, pkt)) {
            return;
        }
        if let Some(d) = self.node.handle_datagram(now, Socket::Data, from, pkt) {
            self.deliver(d.peer, pkt.get(d.range));
        }
    }

    /// A datagram on a birthday pool socket: probes and WireGuard, as on the data socket.
    fn on_pool_datagram(&mut self, now: Instant, d: PoolDatagram) {
        let r = self
            .node
            .handle_datagram(now, Socket::Pool(d.local), d.from, &d.bytes);
        if let Some(r) = r {
            self.deliver(r.peer, d.bytes.get(r.range));
        }
    }

    fn deliver(&self, peer: usize, pkt: Option<&[u8]>) {
        if let (Some(p), Some(pkt)) = (self.peers.get(peer), pkt) {
            p.wg.deliver(pkt);
        }
    }

    fn on_wireguard(&mut self, now: Instant, i: usize, pkt: &[u8], src: Option<SocketAddr>) {
        let Some(p) = self.peers.get_mut(i) else {
            return;
        };
        // The proxy reader passes only packets from WireGuard's one address (configured, or
        // the first that used the port): learn it once.
        p.wg.learn_source(src);
        // The bytes borrow the node, so the sockets are passed by field, not through `self`.
        if let Some((socket, dst, bytes)) = self.node.handle_wireguard(now, i, pkt) {
            send_on(
                (&self.sock, self.v6, &self.pool, &self.streams),
                socket,
                dst,
                bytes,
                None,
            );
        }
    }

    fn find_peer(&self, s: &str) -> Option<usize> {
        self.peers
            .iter()
            .zip(self.node.peers())
            .position(|(p, np)| !np.is_removed() && (p.b64 == s || p.name.as_deref() == Some(s)))
    }

    fn on_ctl(&mut self, now: Instant, cmd: CtlCmd) {
        match cmd {
            CtlCmd::Status(reply) => {
                let _ = reply.send(self.status());
            }
            CtlCmd::PingOnce { peer, reply } => {
                let Some(i) = self.find_peer(&peer) else {
                    let _ = reply.send(Err(format!("unknown peer {peer}")));
                    return;
                };
                match self.node.ping(now, i) {
                    Ok(tx) => self.pings.push(PendingPing {
                        peer: i,
                        tx,
                        sent: now,
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            CtlCmd::Debug {
                peer,
                knob,
                on,
                reply,
            } => {
                let Some(i) = self.find_peer(&peer) else {
                    let _ = reply.send(Err(format!("unknown peer {peer}")));
                    return;
                };
                let _ = reply.send(self.node.set_debug(now, i, &knob, on));
            }
            // Handled by the run loop (it stops the engine).
            CtlCmd::Shutdown(reply) => {
                let _ = reply.send(());
            }
            // The config file is the caller's (`meshpunch up`): it re-reads it and answers.
            CtlCmd::Reload(reply) => {
                if let Err(
                    mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r),
                ) = self.reload_tx.try_send(reply)
                {
                    let _ = r.send(Err("a reload is already under way (or the daemon does not reload its config); try again".into()));
                }
            }
        }
    }

    fn on_internal(&mut self, now: Instant, ev: Internal) {
        match ev {
            Internal::Resolved { idx, addr } => self.node.relay_resolved(now, idx, addr),
            Internal::RelayUp(link) => self.node.relay_stream_up(now, link),
            Internal::RelayDown(link, reason) => self.node.relay_stream_down(now, link, &reason),
            Internal::RelayFrame(link, msg) => {
                let Some(server) = self.streams.server(link) else {
                    return;
                };
                if let Some(d) = self
                    .node
                    .handle_datagram(now, Socket::Relay(link), server, &msg)
                {
                    self.deliver(d.peer, msg.get(d.range));
                }
            }
            Internal::Portmap(s) => {
                let mapped = s.report.mapped;
                self.portmap = Some(*s);
                self.node.set_candidate_source(
                    now,
                    meshpunch_proto::node::candidates::Source::PortMapped(mapped),
                );
            }
            Internal::Hops(h) => {
                let ttl = h.map_or(0, crate::hops::pool_ttl);
                tracing::info!(routers = ?h, ttl, "birthday pool pings: TTL from the routers to the STUN server (0 = the system's)");
                self.node.set_birthday_ttl(ttl);
            }
            Internal::Lifetime { public_ip, outcome } => {
                if self.lifetime.on_result(now, public_ip, outcome) {
                    self.apply_keepalive(now);
                }
            }
            Internal::AddPeer { key, reply } => {
                let _ = reply.send(self.add_peer(now, key));
            }
            Internal::ReloadOutcome(true) => self.reloads.ok += 1,
            Internal::ReloadOutcome(false) => self.reloads.failed += 1,
            Internal::Reload { peers, tun, reply } => {
                // The caller logs the outcome (one line).
                let _ = reply.send(self.reload(now, peers, tun));
            }
            Internal::RemovePeer { key, reply } => {
                let removed = self.node.remove_peer(now, unix_ms(), &key).is_some();
                if removed {
                    tracing::info!(peer = %format_key(&key), "peer removed");
                    self.peers_changed();
                }
                let _ = reply.send(removed);
            }
        }
    }

    /// Carries one more peer: a new proxy port and reader, or the slot it had before.
    fn add_peer(&mut self, now: Instant, key: [u8; 32]) -> Result<SocketAddr, String> {
        let b64 = format_key(&key);
        let slot = self.peers.iter().position(|p| p.b64 == b64);
        let new = match slot.map(|i| &self.peers[i].wg) {
            Some(WgSide::Proxy(_) | WgSide::Device(_)) => None,
            Some(WgSide::Removed) | None => Some(bind_proxy(0, &b64)?),
        };
        let i = self.node.add_peer(
            now,
            unix_ms(),
            PeerSpec {
                key,
                static_candidates: Vec::new(),
                static_secret: None,
            },
        );
        if let Some((sock, addr)) = new {
            let (fast, side) = self.proxy_side(i, sock, addr);
            self.put_peer(i, Peer::new(fast, b64.clone(), None, side))?;
        }
        let addr = self.peers[i].wg.status_addr();
        tracing::info!(peer = %b64, proxy = %addr, "peer added");
        self.peers_changed();
        self.perform(now);
        Ok(addr)
    }

    /// Puts a driver peer at node index `i` (appended, or replacing a removed peer's slot).
    fn put_peer(&mut self, i: usize, p: Peer) -> Result<(), String> {
        if i < self.peers.len() {
            self.peers[i] = p;
        } else if i == self.peers.len() {
            self.peers.push(p);
        } else {
            return Err(format!("peer {}: node index {i} out of step", p.b64));
        }
        Ok(())
    }

    /// A proxy port's WireGuard side for peer `i`, with its reader running.
    fn proxy_side(
        &self,
        i: usize,
        sock: Arc<UdpSocket>,
        addr: SocketAddr,
    ) -> (Arc<FastPath>, WgSide) {
        let fast = Arc::new(FastPath::default());
        let reader = proxy::spawn_reader(
            i,
            sock.clone(),
            addr,
            self.wireguard_endpoint,
            self.sock.clone(),
            fast.clone(),
            self.wg_tx.clone(),
        );
        (
            fast,
            WgSide::Proxy(ProxyPort {
                sock,
                addr,
                wg: self.wireguard_endpoint,
                reader,
            }),
        )
    }

    /// Applies a re-read config's peers ([`Daemon::reload_peers`]): checks everything first
    /// (mode, `AllowedIPs` overlaps and route collisions, proxy ports bindable), then removes,
    /// changes and adds peers. Peers not touched keep their paths and sessions.
    fn reload(
        &mut self,
        now: Instant,
        new: Vec<PeerConfig>,
        tun: Option<Vec<crate::tun::TunPeer>>,
    ) -> Result<control::PeerChanges, String> {
        use crate::config::peer_label;
        match (&self.device, &tun) {
            (Some(_), None) => return Err("this daemon runs the built-in WireGuard (--tun, Mode = tun) and the new config does not: restart meshpunch to change the mode".into()),
            (None, Some(_)) => return Err("this daemon runs proxy ports and the new config asks for Mode = tun: restart meshpunch to change the mode".into()),
            _ => {}
        }
        if let Some(t) = &tun {
            if t.len() != new.len()
                || t.iter()
                    .zip(&new)
                    .any(|(t, p)| t.public_key != p.public_key)
            {
                return Err("internal: TUN peers are not the config's peers".into());
            }
            crate::tun::routing_table(t).map_err(|e| e.to_string())?;
        }
        if self.wg_interface.is_some() {
            return Err("peers follow the --wg-interface (add or remove them with `wg set`); the config's [Peer] sections are not reloaded".into());
        }
        let active: std::collections::HashMap<[u8; 32], usize> = self
            .node
            .peers()
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.is_removed())
            .map(|(i, p)| (*p.key(), i))
            .collect();
        let keep: HashSet<[u8; 32]> = new.iter().map(|p| p.public_key).collect();
        let mut removed: Vec<usize> = active
            .iter()
            .filter(|(k, _)| !keep.contains(*k))
            .map(|(_, i)| *i)
            .collect();
        removed.sort_unstable();
        // What to do with each peer of the new config.
        struct Plan {
            j: usize,
            /// The node index of the peer today (None: new).
            i: Option<usize>,
            /// Node state restarts (new candidates or a new WireGuard side).
            reset: bool,
            /// A new WireGuard side (proxy port or tunnel).
            side: bool,
            /// Only the name changed.
            renamed: bool,
            /// A proxy port bound in advance.
            bound: Option<(Arc<UdpSocket>, SocketAddr)>,
        }
        let mut plans = Vec::new();
        for (j, pc) in new.iter().enumerate() {
            let tp = tun.as_ref().and_then(|t| t.get(j));
            let Some(&i) = active.get(&pc.public_key) else {
                plans.push(Plan {
                    j,
                    i: None,
                    reset: true,
                    side: true,
                    renamed: false,
                    bound: None,
                });
                continue;
            };
            let p = &self.peers[i];
            let old = p.cfg.as_ref();
            let cands = old.is_none_or(|o| o.candidates != pc.candidates);
            let side = match (&p.wg, tp) {
                (WgSide::Proxy(pp), None) => pc.proxy_port != 0 && pc.proxy_port != pp.addr.port(),
                (WgSide::Device(_), Some(tp)) => p.tun.as_ref().is_none_or(|t| {
                    t.allowed_ips != tp.allowed_ips || t.preshared_key != tp.preshared_key
                }),
                _ => true,
            };
            let renamed = p.name != pc.name;
            if cands || side || renamed {
                plans.push(Plan {
                    j,
                    i: Some(i),
                    reset: cands || side,
                    side,
                    renamed,
                    bound: None,
                });
            }
        }
        // Checks that need the system: routes, proxy ports (bound now, used below).
        for plan in plans.iter_mut().filter(|p| p.side) {
            let pc = &new[plan.j];
            match (&self.device, tun.as_ref().and_then(|t| t.get(plan.j))) {
                (Some(d), Some(tp)) => d.dev.check_routes(tp).map_err(|e| e.to_string())?,
                _ => {
                    // A peer that keeps its fixed port keeps its socket.
                    plan.bound = Some(bind_proxy(pc.proxy_port, &peer_label(pc))?);
                }
            }
        }
        let mut changes = control::PeerChanges::default();
        for i in removed {
            let key = *self.node.peers()[i].key();
            self.node.remove_peer(now, unix_ms(), &key);
            let p = &mut self.peers[i];
            let label = p
                .cfg
                .as_ref()
                .map_or_else(|| p.b64.chars().take(8).collect(), peer_label);
            if let (Some(d), Some(_)) = (&self.device, &p.tun) {
                for (n, e) in d.dev.remove_peer(i) {
                    tracing::error!(peer = %label, route = %n, error = %e, "route of a removed peer not deleted; delete it with `ip route del`");
                    changes
                        .errors
                        .push(format!("route {n} of {label} not deleted: {e}"));
                }
            }
            let was = p.wg.status_addr();
            p.wg = WgSide::Removed;
            p.cfg = None;
            p.tun = None;
            p.fast.publish(None);
            tracing::info!(peer = %label, key = %p.b64, proxy = %was, "peer removed (config reload)");
            changes.removed.push(label);
        }
        for plan in plans {
            let pc = &new[plan.j];
            let tp = tun.as_ref().and_then(|t| t.get(plan.j));
            let label = peer_label(pc);
            if let Some(i) = plan.i {
                if plan.reset {
                    self.node.remove_peer(now, unix_ms(), &pc.public_key);
                    self.node.add_peer(now, unix_ms(), peer_spec(&self.id, pc));
                }
                if plan.side {
                    match self.new_side(i, pc, tp, plan.bound) {
                        Ok((fast, side)) => {
                            let p = &mut self.peers[i];
                            p.fast = fast;
                            p.wg = side;
                        }
                        Err(e) => {
                            tracing::error!(peer = %label, error = %e, "peer not changed");
                            changes.errors.push(e);
                            continue;
                        }
                    }
                }
                let p = &mut self.peers[i];
                p.name = pc.name.clone();
                p.cfg = Some(pc.clone());
                p.tun = tp.cloned();
                tracing::info!(peer = %label, key = %p.b64, proxy = %p.wg.status_addr(), allowed_ips = ?tp.map(|t| t.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>()), renamed = plan.renamed, restarted = plan.reset, "peer changed (config reload)");
                changes.changed.push(label);
            } else {
                let i = self.node.add_peer(now, unix_ms(), peer_spec(&self.id, pc));
                match self.new_side(i, pc, tp, plan.bound) {
                    Ok((fast, side)) => {
                        let mut p =
                            Peer::new(fast, format_key(&pc.public_key), pc.name.clone(), side);
                        p.cfg = Some(pc.clone());
                        p.tun = tp.cloned();
                        let shown = p.wg.status_addr();
                        if let Err(e) = self.put_peer(i, p) {
                            self.node.remove_peer(now, unix_ms(), &pc.public_key);
                            changes.errors.push(e);
                            continue;
                        }
                        tracing::info!(peer = %label, key = %format_key(&pc.public_key), proxy = %shown, allowed_ips = ?tp.map(|t| t.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>()), "peer added (config reload)");
                        changes.added.push(label);
                    }
                    Err(e) => {
                        self.node.remove_peer(now, unix_ms(), &pc.public_key);
                        tracing::error!(peer = %label, error = %e, "peer not added");
                        changes.errors.push(e);
                    }
                }
            }
        }
        self.peers_changed();
        self.perform(now);
        Ok(changes)
    }

    /// A fresh WireGuard side for peer slot `i`: the proxy port bound in advance (or a new
    /// one), or the peer's tunnel and routes in the built-in device.
    fn new_side(
        &self,
        i: usize,
        pc: &PeerConfig,
        tp: Option<&crate::tun::TunPeer>,
        bound: Option<(Arc<UdpSocket>, SocketAddr)>,
    ) -> Result<(Arc<FastPath>, WgSide), String> {
        match (&self.device, tp) {
            (Some(d), Some(tp)) => {
                d.dev.remove_peer(i);
                d.dev.add_peer(i, tp).map_err(|e| e.to_string())?;
                let fast = Arc::new(FastPath::default());
                d.out.set_fast(i, fast.clone());
                Ok((
                    fast,
                    WgSide::Device(device::DeviceSide {
                        dev: d.dev.clone(),
                        peer: i,
                        out: d.out.clone(),
                        bufs: d.bufs.clone(),
                    }),
                ))
            }
            _ => {
                let (sock, addr) = match bound {
                    Some(b) => b,
                    None => bind_proxy(pc.proxy_port, &crate::config::peer_label(pc))?,
                };
                Ok(self.proxy_side(i, sock, addr))
            }
        }
    }

    /// Tells the rendezvous task which peers we carry now.
    fn peers_changed(&self) {
        if let Some(sig) = &self.sig {
            let keys = self
                .node
                .peers()
                .iter()
                .filter(|p| !p.is_removed())
                .map(|p| *p.key())
                .collect();
            let _ = sig.try_send(SignalCmd::SetPeers(keys));
        }
    }

    /// The data socket's public address is known (a STUN answer): use a cached binding
    /// lifetime for it or measure it in the background (see [`crate::lifetime`]).
    fn check_lifetime(&mut self, now: Instant, public: SocketAddr) {
        let (changed, job) = self
            .lifetime
            .on_public_addr(now, public, self.node.stun_servers());
        if changed {
            self.apply_keepalive(now);
        }
        if let Some(job) = job {
            let tx = self.int_tx.clone();
            let task = tokio::spawn(async move {
                let outcome = crate::lifetime::measure(job.server, &job.steps).await;
                let _ = tx
                    .send(Internal::Lifetime {
                        public_ip: job.public_ip,
                        outcome,
                    })
                    .await;
            });
            self.lifetime.set_task(task);
        }
    }

    /// `BirthdayTtl = auto`: measures the routers to the first IPv4 STUN server once, in the
    /// background; the answer comes back as [`Internal::Hops`].
    fn measure_hops(&mut self) {
        if !self.hops_wanted {
            return;
        }
        let Some(server) = self.node.stun_servers().iter().find_map(|s| match s {
            SocketAddr::V4(a) => Some(*a),
            SocketAddr::V6(_) => None,
        }) else {
            return;
        };
        self.hops_wanted = false;
        let (tx, mark) = (self.int_tx.clone(), self.fwmark);
        tokio::spawn(async move {
            let h = tokio::task::spawn_blocking(move || crate::hops::routers_to(server, mark))
                .await
                .ok()
                .flatten();
            let _ = tx.send(Internal::Hops(h)).await;
        });
    }

    /// Gives the node the current keepalive interval.
    fn apply_keepalive(&mut self, now: Instant) {
        let k = self.lifetime.keepalive();
        tracing::info!(keepalive_s = k.as_secs_f64(), "keepalive interval");
        self.node.set_keepalive(now, k);
    }

    fn on_signal(&mut self, now: Instant, ev: SignalEvent) {
        let sig = match ev {
            SignalEvent::Registered {
                observed,
                stun,
                relays,
                shared_socket,
                local,
                transport,
            } => {
                tracing::info!(%observed, shared_socket, "registered with the rendezvous");
                self.rdv.state = "connected".into();
                self.rdv.error = None;
                self.rdv.auth_reason = None;
                self.rdv.observed_addr = Some(observed);
                self.rdv.shares_data_socket = shared_socket;
                self.rdv.quic_local_addr = local;
                self.rdv.transport = Some(transport.as_str().to_string());
                Signal::Registered {
                    observed,
                    stun,
                    relays,
                    shared_socket,
                    transport,
                }
            }
            SignalEvent::ConnectFailed { reason } => {
                self.rdv.state = "disconnected".into();
                self.rdv.error = Some(reason);
                return;
            }
            SignalEvent::Disconnected { reason } => {
                // A token refusal stays visible until the next registration.
                if self.rdv.auth_reason.is_none() {
                    self.rdv.state = "disconnected".into();
                    self.rdv.error = Some(reason);
                }
                return;
            }
            SignalEvent::Unauthorized(f) => {
                self.rdv.state = "unauthorized".into();
                self.rdv.error = Some(f.describe());
                self.rdv.auth_reason =
                    Some(f.reason.map_or("unauthorized", |r| r.as_str()).to_string());
                self.rdv.token_expires_unix = f.token_expires_unix;
                return;
            }
            SignalEvent::Relays(r) => Signal::Relays(r),
            SignalEvent::ObservedChanged(a) => {
                tracing::info!(observed = %a, "rendezvous sees a new address; re-checking our mapping");
                self.rdv.observed_addr = Some(a);
                Signal::ObservedChanged(a)
            }
            SignalEvent::Presence { key, online } => Signal::Presence { key, online },
            SignalEvent::Punch {
                peer,
                candidates,
                secret,
                start_at,
                local_version,
                peer_observed,
            } => Signal::Punch(meshpunch_proto::node::Punch {
                peer,
                candidates,
                secret,
                start_at,
                local_version,
                peer_observed,
            }),
            SignalEvent::OfferFailed { peer, reason } => {
                if let Some(i) = self.node.find(&peer) {
                    tracing::info!(peer = %self.peers[i].b64, %reason, "offer failed");
                }
                Signal::OfferFailed { peer, reason }
            }
        };
        self.node.handle_signal(now, sig);
    }
}

#[cfg(test)]
mod path_change_tests {
    use super::*;

    #[test]
    fn a_direct_path_given_up_for_the_relay_is_a_failover() {
        let mut c = PathChanges::default();
        c.record(PathKind::None);
        assert_eq!((c.total, c.failovers), (0, 0));
        c.record(PathKind::Relay);
        c.record(PathKind::Relay);
        c.record(PathKind::Direct);
        assert_eq!((c.total, c.failovers), (2, 0));
        c.record(PathKind::Relay);
        c.record(PathKind::Lan);
        c.record(PathKind::None);
        assert_eq!((c.total, c.failovers), (5, 2));
    }
}
