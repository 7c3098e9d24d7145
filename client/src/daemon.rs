//! The `meshpunch up` daemon: one UDP data socket for every peer, STUN, probes and TURN; one
//! 127.0.0.1 proxy port per peer for WireGuard; a [`PeerPath`] per peer deciding where each
//! WireGuard packet goes; the home relay's TURN allocation; the control socket.
//!
//! Everything runs in ONE task (the engine) that owns all state, so there are no locks:
//! it waits on the data socket, the proxy readers, the control socket, the rendezvous task and
//! the earliest timer any state machine asked for, feeds the input in, then drains what the
//! state machines want sent.
//!
//! Demultiplexing of the data socket: datagrams from an address the QUIC connection to the
//! rendezvous sent to go to quinn ([`crate::shared_socket`]: the rendezvous connection rides
//! the data socket, so the address it observes is the data socket's mapping); datagrams from
//! the home relay's address go to the TURN client next (its ChannelData/Data carry probes and
//! WireGuard packets of relayed peers); otherwise the first byte decides
//! ([`meshpunch_proto::probe::classify`]): STUN responses to our own Binding requests, probes
//! (looked up by key id), WireGuard (looked up by source).
//!
//! Birthday probing ([`crate::pool`]): while a peer's path manager searches as the "hard"
//! side, a pool of extra sockets is open; their datagrams reach the engine through one
//! channel and are handled like the data socket's, with the pool socket's index in the
//! [`PathAddr`]. A path found that way sends (fast path included) from that pool socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::nat::{choose_relay, RelayLatency};
use meshpunch_proto::path::{
    Candidate, CandidateKind, MappingBehaviour, PathAddr, PathConfig, PathEvent, PathKind,
    PeerPath, ProbeCounters, Via, DATA_SOCKET,
};
use meshpunch_proto::probe::{classify, peek_key_id, PacketKind, TxId};
use meshpunch_proto::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent, TurnOp};
use meshpunch_proto::wire::RelayRegion;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::binding;
use crate::config::PeerConfig;
use crate::control::{
    self, BirthdayTotals, CtlCmd, PeerStatus, PingResult, RelayStatus, RendezvousStatus, Status,
};
use crate::keys::{format_key, Identity};
use crate::pool::{Pool, PoolDatagram, StunMappings};
use crate::shared_socket::SharedSocket;
use crate::signal::{self, SignalCmd, SignalEvent};

/// How often the data socket re-asks STUN servers for its mapping.
pub const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// How long a STUN transaction waits for its answer.
pub const STUN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often relay latencies are re-measured (home relay choice, with hysteresis).
pub const RELAY_MEASURE_INTERVAL: Duration = Duration::from_secs(120);
/// How often interface addresses are re-read.
pub const HOST_SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Retry interval of offers to a peer that has no path.
pub const OFFER_RETRY: Duration = Duration::from_secs(20);
/// Delay before the peer with the higher key offers (the lower key offers at once).
pub const OFFER_DEFER: Duration = Duration::from_secs(1);
/// Shortest time between two offers to one peer.
pub const OFFER_MIN_GAP: Duration = Duration::from_secs(2);
/// Retry interval after the TURN allocation failed.
pub const TURN_RETRY: Duration = Duration::from_secs(15);
/// How long the source of a peer's last WireGuard packet stays usable as the way back while
/// no path is selected (a WireGuard handshake round trip is far shorter).
pub const LAST_RX_FALLBACK: Duration = Duration::from_secs(5);

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
}

impl Daemon {
    /// Waits until the engine stops (it runs until aborted).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
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
        let _ = std::fs::remove_file(&self.control_socket);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Maps IPv4-mapped IPv6 addresses back to IPv4 (dual-stack data socket).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

/// The inverse of [`canonical`] for sending: on a dual-stack (`[::]`) socket an IPv4
/// destination is written IPv4-mapped; otherwise the address is used as it is.
pub fn for_socket(dual_stack: bool, a: SocketAddr) -> SocketAddr {
    match (dual_stack, a) {
        (true, SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => a,
    }
}

/// A candidate address as the data socket can use it: IPv4-mapped spellings become IPv4
/// (datagrams arrive from the canonical form, and pairs are matched by address); IPv6 is
/// `None` when the data socket is IPv4 only (it could never be sent to).
fn usable_candidate(v6_socket: bool, a: SocketAddr) -> Option<SocketAddr> {
    let a = canonical(a);
    (v6_socket || a.is_ipv4()).then_some(a)
}

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
fn bind_data(listen: SocketAddr) -> std::io::Result<(std::net::UdpSocket, bool)> {
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
    let sock = Arc::new(UdpSocket::from_std(std_sock)?);
    let data_addr = sock.local_addr()?;

    let (proxy_tx, proxy_rx) = mpsc::channel::<FromProxy>(1024);
    let now = Instant::now();
    let mut peers = Vec::new();
    let mut proxies = Vec::new();
    for (i, pc) in opts.peers.iter().enumerate() {
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
        let reader = proxy.clone();
        let tx = proxy_tx.clone();
        let fast = Arc::new(FastPath::default());
        let fast_r = fast.clone();
        let data = sock.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut last_src: Option<SocketAddr> = None;
            let mut last_notify: Option<Instant> = None;
            loop {
                let (n, src) = match reader.recv_from(&mut buf).await {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP port unreachable from WireGuard not listening yet, etc.
                        tracing::debug!(error = %e, "proxy recv error");
                        continue;
                    }
                };
                let pkt = &buf[..n];
                // Fast path: the selected path is direct and WireGuard's address is known:
                // send from here, no copy, no engine round trip.
                let direct = if last_src == Some(src) {
                    fast_r.route.read().ok().and_then(|r| r.clone())
                } else {
                    None
                };
                match direct {
                    Some((dest, pool_sock)) => {
                        // A birthday-found path leaves from its pool socket.
                        let _ = pool_sock.as_ref().unwrap_or(&data).try_send_to(pkt, dest);
                        fast_r.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        fast_r.tx_packets.fetch_add(1, Ordering::Relaxed);
                        // Tell the engine now and then that data flows (active probing).
                        let now = Instant::now();
                        if last_notify.is_none_or(|t| now.duration_since(t) >= FAST_NOTIFY) {
                            last_notify = Some(now);
                            let _ = tx.try_send(FromProxy::Active(i));
                        }
                    }
                    None => {
                        last_src = Some(src);
                        if tx
                            .send(FromProxy::Packet(i, pkt.to_vec(), src))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let path = PeerPath::new(
            opts.path.clone(),
            opts.identity.public,
            pc.public_key,
            now,
            unix_ms(),
            rand::random(),
        );
        peers.push(Peer {
            fast,
            fast_route: None,
            sent_version: 0,
            key: pc.public_key,
            b64: format_key(&pc.public_key),
            name: pc.name.clone(),
            proxy,
            proxy_addr,
            wg_addr: opts.wireguard_endpoint,
            wg_fixed: opts.wireguard_endpoint.is_some(),
            path,
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            dropped: 0,
            last_rx: None,
            static_candidates: usable_candidates(v6, &pc.candidates),
            next_offer_at: None,
            last_offer: None,
            note: None,
        });
    }

    let (ctl_tx, ctl_rx) = mpsc::channel::<CtlCmd>(64);
    control::serve(opts.control_socket.clone(), ctl_tx)
        .await
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", opts.control_socket.display()))?;

    let (local_tx, local_rx) = watch::channel((0u64, Vec::<Candidate>::new()));
    let (sig_ev_tx, sig_ev_rx) = mpsc::channel::<SignalEvent>(256);
    let (int_tx, int_rx) = mpsc::channel::<Internal>(64);
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

    let sig_handle = sig.clone();
    let mut engine = Engine {
        id: opts.identity.clone(),
        sock,
        v6,
        data_addr,
        peers,
        key_ids: HashMap::new(),
        addrs: HashMap::new(),
        host_candidates: opts.host_candidates,
        exclude_ifaces: {
            let mut v = opts.exclude_interfaces.clone();
            if opts.host_candidates {
                v.extend(wireguard_interfaces());
            }
            v
        },
        hosts: Vec::new(),
        lifetime: crate::lifetime::LifetimeState::new(lifetime),
        srflx: None,
        srflx_from_stun: false,
        quic,
        stun_servers: Vec::new(),
        stun_pending: HashMap::new(),
        regions: Vec::new(),
        relay_probes: Vec::new(),
        home: None,
        turn: None,
        turn_bound: HashSet::new(),
        turn_permitted: HashSet::new(),
        turn_retry_at: None,
        rdv,
        sig,
        local_tx,
        local_version: 0,
        local: Vec::new(),
        next_stun: now,
        next_relay_measure: None,
        relay_eval_at: None,
        next_host_scan: now,
        pings: Vec::new(),
        unknown_probes: 0,
        int_tx,
        out: vec![0u8; 65536 + 64],
        pool: Pool::new(opts.path.birthday_sockets),
        stun_mappings: StunMappings::default(),
    };
    if engine.lifetime.is_configured() {
        // `BindingLifetime` given: every path uses its keepalive from the start.
        engine.apply_keepalive(now);
    }
    engine.scan_hosts(now);
    engine.start_static_sessions(now);
    engine.update_local(now);
    let control_socket = opts.control_socket.clone();
    let task = tokio::spawn(engine.run(proxy_rx, ctl_rx, sig_ev_rx, int_rx));
    Ok(Daemon {
        data_addr,
        control_socket,
        proxies,
        task,
        sig: sig_handle,
    })
}

/// What a proxy reader hands the engine.
enum FromProxy {
    /// A packet from WireGuard that the fast path could not send.
    Packet(usize, Vec<u8>, SocketAddr),
    /// The fast path sent packets for this peer (data is flowing).
    Active(usize),
}

/// How often a proxy reader on the fast path tells the engine that data flows.
const FAST_NOTIFY: Duration = Duration::from_millis(500);

/// State shared between a peer's proxy reader and the engine: the direct destination of the
/// selected path and the pool socket it leaves from when birthday probing found it (set by
/// the engine), and the fast path's counters.
#[derive(Default)]
struct FastPath {
    route: std::sync::RwLock<Option<(SocketAddr, Option<Arc<UdpSocket>>)>>,
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
}

struct Peer {
    fast: Arc<FastPath>,
    fast_route: Option<PathAddr>,
    /// Version of our candidates the peer got with the latest punch.
    sent_version: u64,
    key: [u8; 32],
    b64: String,
    name: Option<String>,
    proxy: Arc<UdpSocket>,
    proxy_addr: SocketAddr,
    wg_addr: Option<SocketAddr>,
    wg_fixed: bool,
    path: PeerPath,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    rx_packets: u64,
    dropped: u64,
    /// Where this peer's last WireGuard packet came from, and when: the way back while no
    /// path is selected yet (the peer found its path before we did).
    last_rx: Option<(PathAddr, Instant)>,
    static_candidates: Vec<SocketAddr>,
    next_offer_at: Option<Instant>,
    last_offer: Option<Instant>,
    note: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum StunPurpose {
    Srflx,
    RelayLatency(usize),
}

struct RelayProbe {
    region: String,
    url: String,
    server: Option<SocketAddr>,
    latency: Option<Duration>,
}

struct Turn {
    client: TurnClient,
    region: String,
    server: SocketAddr,
    state: String,
    error: Option<String>,
}

struct PendingPing {
    peer: usize,
    tx: TxId,
    sent: Instant,
    reply: oneshot::Sender<Result<PingResult, String>>,
}

enum Internal {
    Resolved {
        idx: usize,
        addr: Option<SocketAddr>,
    },
    /// The background binding-lifetime measurement for this public IP ended.
    Lifetime {
        public_ip: IpAddr,
        outcome: meshpunch_proto::lifetime::Outcome,
    },
}

struct Engine {
    id: Identity,
    sock: Arc<UdpSocket>,
    v6: bool,
    data_addr: SocketAddr,
    peers: Vec<Peer>,
    key_ids: HashMap<u32, usize>,
    addrs: HashMap<PathAddr, usize>,
    host_candidates: bool,
    exclude_ifaces: Vec<String>,
    hosts: Vec<IpAddr>,
    /// Binding lifetime and keepalive interval (config, cache or background measurement).
    lifetime: crate::lifetime::LifetimeState,
    srflx: Option<SocketAddr>,
    /// `srflx` came from STUN (else from the rendezvous' observed address).
    srflx_from_stun: bool,
    /// The data socket as the rendezvous client's QUIC endpoint sees it.
    quic: Option<Arc<SharedSocket>>,
    stun_servers: Vec<SocketAddr>,
    stun_pending: HashMap<[u8; 12], (StunPurpose, Instant)>,
    regions: Vec<RelayRegion>,
    relay_probes: Vec<RelayProbe>,
    home: Option<String>,
    turn: Option<Turn>,
    turn_bound: HashSet<SocketAddr>,
    turn_permitted: HashSet<IpAddr>,
    turn_retry_at: Option<Instant>,
    rdv: RendezvousStatus,
    sig: Option<mpsc::Sender<SignalCmd>>,
    local_tx: watch::Sender<(u64, Vec<Candidate>)>,
    local_version: u64,
    local: Vec<Candidate>,
    next_stun: Instant,
    next_relay_measure: Option<Instant>,
    relay_eval_at: Option<Instant>,
    next_host_scan: Instant,
    pings: Vec<PendingPing>,
    unknown_probes: u64,
    int_tx: mpsc::Sender<Internal>,
    out: Vec<u8>,
    pool: Pool,
    stun_mappings: StunMappings,
}

/// Parses a TURN URI (`turn:host:port?transport=udp`, RFC 7065) into `host:port`.
pub fn turn_uri_authority(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("turn:")
        .or_else(|| url.strip_prefix("turns:"))
        .unwrap_or(url);
    let rest = rest.split('?').next()?;
    if rest.is_empty() {
        return None;
    }
    // Default TURN port (RFC 8656 §18) when none is given.
    if rest.parse::<SocketAddr>().is_ok() {
        return Some(rest.to_string());
    }
    if rest.starts_with('[') {
        return Some(if rest.contains("]:") {
            rest.to_string()
        } else {
            format!("{rest}:3478")
        });
    }
    match rest.matches(':').count() {
        0 => Some(format!("{rest}:3478")),
        1 => Some(rest.to_string()),
        _ => Some(format!("[{rest}]:3478")),
    }
}

impl Engine {
    async fn run(
        mut self,
        mut proxy_rx: mpsc::Receiver<FromProxy>,
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
            self.handle_timers(now);
            self.sync_pool(now);
            self.flush(now);
            self.publish_fast_routes();
            let deadline = self.next_deadline(now);
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    match r {
                        Ok((n, from)) => {
                            let now = Instant::now();
                            self.on_datagram(now, canonical(from), &buf[..n]);
                        }
                        Err(e) => tracing::debug!(error = %e, "data socket recv error"),
                    }
                }
                Some(m) = proxy_rx.recv() => match m {
                    FromProxy::Packet(i, pkt, src) => self.on_wireguard(Instant::now(), i, &pkt, src),
                    FromProxy::Active(i) => {
                        if let Some(p) = self.peers.get_mut(i) {
                            p.path.on_data_sent(Instant::now());
                        }
                    }
                },
                Some(cmd) = ctl_rx.recv() => self.on_ctl(Instant::now(), cmd),
                Some(ev) = sig_rx.recv() => self.on_signal(Instant::now(), ev),
                Some(ev) = int_rx.recv() => self.on_internal(Instant::now(), ev),
                Some(d) = pool_rx.recv() => self.on_pool_datagram(Instant::now(), d),
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
            }
        }
    }

    fn send_to(&self, dest: SocketAddr, bytes: &[u8]) {
        let dest = for_socket(self.v6, dest);
        if let Err(e) = self.sock.try_send_to(bytes, dest) {
            tracing::trace!(error = %e, %dest, "data socket send failed");
        }
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let mut t = now + Duration::from_secs(5);
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        for p in &self.peers {
            take(p.path.poll_timeout());
            take(p.next_offer_at);
        }
        if let Some(turn) = &self.turn {
            take(turn.client.poll_timeout());
        }
        take(Some(self.next_stun));
        take(self.next_relay_measure);
        take(self.relay_eval_at);
        take(Some(self.next_host_scan));
        take(self.turn_retry_at);
        for (_, sent) in self.stun_pending.values() {
            take(Some(*sent + STUN_TIMEOUT));
        }
        t.max(now)
    }

    fn handle_timers(&mut self, now: Instant) {
        for p in &mut self.peers {
            if p.path.poll_timeout().is_some_and(|t| t <= now) {
                p.path.handle_timeout(now);
            }
        }
        if let Some(turn) = &mut self.turn {
            if turn.client.poll_timeout().is_some_and(|t| t <= now) {
                turn.client.handle_timeout(now);
            }
        }
        self.stun_pending
            .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < STUN_TIMEOUT);
        if self.next_stun <= now {
            // Never slower than the keepalive: the data socket's own mapping (our server-
            // reflexive candidate) must outlive a NAT that forgets idle mappings quickly.
            self.next_stun = now + STUN_INTERVAL.min(self.lifetime.keepalive());
            for s in self.stun_servers.clone() {
                self.stun_send(now, s, StunPurpose::Srflx);
            }
        }
        if self.next_relay_measure.is_some_and(|t| t <= now) {
            self.next_relay_measure = Some(now + RELAY_MEASURE_INTERVAL);
            self.measure_relays(now);
        }
        if self.relay_eval_at.is_some_and(|t| t <= now) {
            self.relay_eval_at = None;
            self.choose_home(now);
        }
        if self.turn_retry_at.is_some_and(|t| t <= now) {
            self.turn_retry_at = None;
            if let Some(region) = self.home.clone() {
                self.setup_turn(now, &region);
            }
        }
        if self.next_host_scan <= now {
            self.next_host_scan = now + HOST_SCAN_INTERVAL;
            if self.scan_hosts(now) {
                self.update_local(now);
            }
        }
        self.schedule_birthday_retries(now);
        for i in 0..self.peers.len() {
            if self.peers[i].next_offer_at.is_some_and(|t| t <= now) {
                self.peers[i].next_offer_at = None;
                let p = &self.peers[i];
                // A working path whose peer has our latest candidates needs no new session,
                // unless a birthday search could still turn a relay path into a direct one.
                let up_to_date = p.path.route().is_some()
                    && p.sent_version >= self.local_version
                    && p.path.birthday_retry_at().is_none_or(|t| t > now);
                if !up_to_date {
                    self.send_offer(now, i);
                }
            }
        }
        self.pings.retain(|p| {
            now.saturating_duration_since(p.sent) < control::PING_TIMEOUT + Duration::from_secs(1)
        });
    }

    fn stun_send(&mut self, now: Instant, server: SocketAddr, purpose: StunPurpose) {
        let tx = binding::new_tx();
        self.stun_pending.insert(tx, (purpose, now));
        let req = binding::request(tx, None);
        self.send_to(server, &req);
    }

    fn scan_hosts(&mut self, _now: Instant) -> bool {
        let hosts = if self.host_candidates {
            let mut h = interface_addrs_excluding(&self.exclude_ifaces);
            if !self.v6 {
                h.retain(|ip| ip.is_ipv4());
            }
            h
        } else {
            Vec::new()
        };
        let changed = hosts != self.hosts;
        self.hosts = hosts;
        changed
    }

    /// Recomputes our candidates; on a change, re-checks every pair and re-offers.
    fn update_local(&mut self, now: Instant) {
        let port = self.data_addr.port();
        let mut c: Vec<Candidate> = self
            .hosts
            .iter()
            .map(|ip| Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::new(*ip, port),
            })
            .collect();
        if let Some(s) = self.srflx {
            if !c.iter().any(|x| x.addr == s) {
                c.push(Candidate {
                    kind: CandidateKind::Srflx,
                    addr: s,
                });
            }
            // Marks us as the hard side of birthday probing (old peers ignore the kind).
            if self.stun_mappings.behaviour() == MappingBehaviour::EndpointDependent {
                c.push(Candidate {
                    kind: CandidateKind::SrflxDependent,
                    addr: s,
                });
            }
        }
        if let Some(r) = self.turn.as_ref().and_then(|t| t.client.relayed_addr()) {
            c.push(Candidate {
                kind: CandidateKind::Relayed,
                addr: r,
            });
        }
        if c == self.local {
            return;
        }
        let first = self.local.is_empty();
        tracing::info!(candidates = ?c.iter().map(|c| format!("{:?} {}", c.kind, c.addr)).collect::<Vec<_>>(), "local candidates");
        self.local = c.clone();
        self.local_version += 1;
        let _ = self.local_tx.send((self.local_version, c));
        if first {
            return;
        }
        for i in 0..self.peers.len() {
            self.peers[i].path.local_addresses_changed(now);
            if self.peers[i].path.has_session() {
                self.schedule_offer(now, i, Duration::ZERO);
            }
        }
    }

    fn start_static_sessions(&mut self, now: Instant) {
        for p in &mut self.peers {
            if p.static_candidates.is_empty() {
                continue;
            }
            let dh = self.id.shared_secret(&p.key);
            let mut h = Sha256::new();
            h.update(b"meshpunch static session v1");
            h.update(dh);
            let secret: [u8; 32] = h.finalize().into();
            let cands = p
                .static_candidates
                .iter()
                .map(|a| Candidate {
                    kind: CandidateKind::Host,
                    addr: *a,
                })
                .collect();
            p.path.start_session(now, &secret, now, cands);
        }
        self.rebuild_maps();
    }

    fn rebuild_maps(&mut self) {
        self.key_ids.clear();
        self.addrs.clear();
        for (i, p) in self.peers.iter().enumerate() {
            for k in p.path.key_ids() {
                self.key_ids.insert(k, i);
            }
            for a in p.path.remotes() {
                self.addrs.entry(a).or_insert(i);
            }
        }
    }

    fn schedule_offer(&mut self, now: Instant, i: usize, delay: Duration) {
        if self.sig.is_none() {
            return;
        }
        let p = &mut self.peers[i];
        let mut at = now + delay;
        if let Some(last) = p.last_offer {
            at = at.max(last + OFFER_MIN_GAP);
        }
        p.next_offer_at = Some(p.next_offer_at.map_or(at, |t| t.min(at)));
    }

    fn send_offer(&mut self, now: Instant, i: usize) {
        let Some(sig) = &self.sig else { return };
        let p = &mut self.peers[i];
        p.last_offer = Some(now);
        if sig.try_send(SignalCmd::Offer(p.key)).is_err() {
            p.next_offer_at = Some(now + OFFER_MIN_GAP);
        }
    }

    fn measure_relays(&mut self, now: Instant) {
        for i in 0..self.relay_probes.len() {
            if let Some(s) = self.relay_probes[i].server {
                self.stun_send(now, s, StunPurpose::RelayLatency(i));
            }
        }
        self.relay_eval_at = Some(now + Duration::from_millis(1500));
    }

    fn relay_latencies(&self) -> Vec<RelayLatency> {
        self.relay_probes
            .iter()
            .map(|r| RelayLatency {
                region: r.region.clone(),
                addr: r.url.clone(),
                latency_ms: r.latency.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect()
    }

    fn choose_home(&mut self, now: Instant) {
        let lat = self.relay_latencies();
        let mut region = choose_relay(self.home.as_deref(), &lat);
        if region.is_none() {
            // No relay answered STUN: still try the first resolvable one.
            region = self
                .relay_probes
                .iter()
                .find(|r| r.server.is_some())
                .map(|r| r.region.clone());
        }
        let Some(region) = region else { return };
        let need = self.home.as_deref() != Some(region.as_str()) || self.turn.is_none();
        self.home = Some(region.clone());
        if need {
            self.setup_turn(now, &region);
        }
    }

    fn setup_turn(&mut self, now: Instant, region: &str) {
        let Some(probe) = self.relay_probes.iter().find(|r| r.region == region) else {
            return;
        };
        let Some(server) = probe.server else { return };
        let Some(reg) = self.regions.iter().find(|r| r.region == region) else {
            return;
        };
        if let Some(mut old) = self.turn.take() {
            old.client.release(now);
            while let Some(t) = old.client.poll_transmit() {
                self.send_to(t.dst, &t.payload);
            }
        }
        let mut client = TurnClient::new(
            server,
            TurnCredentials {
                username: reg.username.clone(),
                password: reg.password.clone(),
            },
            now,
        );
        client.allocate(now);
        tracing::info!(%region, %server, "allocating on home relay");
        self.turn = Some(Turn {
            client,
            region: region.to_string(),
            server,
            state: "allocating".into(),
            error: None,
        });
        self.turn_bound.clear();
        self.turn_permitted.clear();
    }

    /// Installs TURN permissions for every direct address of every peer, so that a peer's
    /// probes and packets sent straight to our relayed address are let through (permissions
    /// are per IP, RFC 8656 §9, so any port a symmetric NAT picks is covered).
    fn sync_permissions(&mut self, now: Instant) {
        let Some(turn) = &mut self.turn else { return };
        if !turn.client.is_allocated() {
            return;
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for p in &self.peers {
            for a in p.path.remotes() {
                if a.via == Via::Direct && p.path.class_of(&a) != PathKind::Relay {
                    ips.push(a.addr.ip());
                }
            }
        }
        for ip in ips {
            if self.turn_permitted.insert(ip) {
                if let Err(e) = turn.client.create_permission(ip, now) {
                    tracing::debug!(error = %e, %ip, "TURN permission refused");
                }
            }
        }
    }

    fn ensure_channel(&mut self, now: Instant, peer_relayed: SocketAddr) {
        let Some(turn) = &mut self.turn else { return };
        if !turn.client.is_allocated() || self.turn_bound.contains(&peer_relayed) {
            return;
        }
        match turn.client.bind_channel(peer_relayed, now) {
            Ok(_) => {
                self.turn_bound.insert(peer_relayed);
            }
            Err(e) => tracing::warn!(error = %e, peer = %peer_relayed, "channel bind refused"),
        }
    }

    fn send_path(&mut self, now: Instant, dest: PathAddr, payload: &[u8]) -> bool {
        match dest.via {
            Via::Direct if dest.local != DATA_SOCKET => {
                self.pool.send(dest.local, dest.addr, payload)
            }
            Via::Direct => {
                self.send_to(dest.addr, payload);
                true
            }
            Via::Relay => {
                self.ensure_channel(now, dest.addr);
                let Some(turn) = &mut self.turn else {
                    return false;
                };
                if !turn.client.is_allocated() {
                    return false;
                }
                match turn.client.encode_send(dest.addr, payload, &mut self.out) {
                    Ok(n) => {
                        let server = turn.server;
                        let out = std::mem::take(&mut self.out);
                        self.send_to(server, &out[..n]);
                        self.out = out;
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TURN send failed");
                        false
                    }
                }
            }
        }
    }

    /// Drains every state machine's output.
    fn flush(&mut self, now: Instant) {
        let mut remap = false;
        for i in 0..self.peers.len() {
            while let Some(t) = self.peers[i].path.poll_transmit() {
                self.send_path(now, t.dest, &t.payload);
            }
            while let Some(ev) = self.peers[i].path.poll_event() {
                match ev {
                    PathEvent::PathChanged {
                        kind,
                        remote,
                        reason,
                    } => {
                        tracing::info!(peer = %self.peers[i].b64, path = kind.as_str(), remote = ?remote.map(|r| r.to_string()), %reason, "path changed");
                    }
                    PathEvent::RemotesChanged => remap = true,
                    PathEvent::ObservedAddress(_) => {}
                    PathEvent::Pong {
                        remote,
                        kind,
                        tx,
                        rtt,
                    } => {
                        if let Some(pos) = self.pings.iter().position(|p| p.peer == i && p.tx == tx)
                        {
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
                }
            }
        }
        if remap {
            self.rebuild_maps();
            self.bind_relay_channels(now);
            self.sync_permissions(now);
        }
        let mut allocated = false;
        self.flush_turn();
        if let Some(turn) = &mut self.turn {
            let mut failed_alloc = false;
            while let Some(ev) = turn.client.poll_event() {
                match ev {
                    TurnEvent::Allocated { relayed, .. } => {
                        tracing::info!(%relayed, region = %turn.region, "relay allocation ready");
                        turn.state = "allocated".into();
                        turn.error = None;
                        allocated = true;
                    }
                    TurnEvent::Failed { op, code, reason } => {
                        let msg = match code {
                            Some(c) => format!("{op:?} refused by relay: {c} {reason}"),
                            None => format!("{op:?}: relay did not answer ({reason})"),
                        };
                        tracing::warn!(region = %turn.region, error = %msg, "relay error");
                        turn.error = Some(msg);
                        if matches!(op, TurnOp::Allocate | TurnOp::Refresh) {
                            turn.state = "failed".into();
                            failed_alloc = true;
                        }
                    }
                    _ => {}
                }
            }
            if failed_alloc {
                self.turn_retry_at = Some(now + TURN_RETRY);
                self.turn_bound.clear();
                self.turn_permitted.clear();
            }
        }
        if allocated {
            self.update_local(now);
            self.bind_relay_channels(now);
            self.sync_permissions(now);
            // Send what the channel binds and permissions queued.
            self.flush_turn();
        }
    }

    /// Binds a TURN channel to every relayed remote of every peer.
    fn bind_relay_channels(&mut self, now: Instant) {
        let relayed: Vec<SocketAddr> = self
            .addrs
            .keys()
            .filter(|a| a.via == Via::Relay)
            .map(|a| a.addr)
            .collect();
        for r in relayed {
            self.ensure_channel(now, r);
        }
    }

    /// Sends everything the TURN client has queued to the relay.
    fn flush_turn(&mut self) {
        let Some(turn) = &mut self.turn else { return };
        let mut sends = Vec::new();
        while let Some(t) = turn.client.poll_transmit() {
            sends.push(t);
        }
        for t in sends {
            self.send_to(t.dst, &t.payload);
        }
    }

    /// Publishes each peer's direct destination to its proxy reader (the fast path).
    fn publish_fast_routes(&mut self) {
        for p in &mut self.peers {
            let r = p.path.route().filter(|d| d.via == Via::Direct);
            if r != p.fast_route {
                p.fast_route = r;
                let route = r.and_then(|d| match d.local {
                    DATA_SOCKET => Some((for_socket(self.v6, d.addr), None)),
                    // Pool sockets are IPv4: the address goes as it is.
                    l => self.pool.socket(l).map(|s| (d.addr, Some(s.clone()))),
                });
                if let Ok(mut w) = p.fast.route.write() {
                    *w = route;
                }
            }
        }
    }

    fn on_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) {
        // QUIC from the rendezvous: by source, before any look at the bytes (QUIC's first
        // byte can look like ChannelData or a probe).
        if self.quic.as_ref().is_some_and(|q| q.offer(now, from, pkt)) {
            return;
        }
        let kind = classify(pkt);
        if kind == PacketKind::Stun {
            if let Some(tx) = binding::any_tx(pkt) {
                if self.stun_pending.contains_key(&tx) {
                    self.on_stun(now, from, pkt);
                    return;
                }
            }
        }
        if let Some(turn) = &mut self.turn {
            if from == turn.server {
                match turn.client.handle_input(now, from, pkt) {
                    Input::Data { peer, range } => {
                        if let Some(inner) = pkt.get(range) {
                            self.on_peer_packet(now, PathAddr::relay(canonical(peer)), inner);
                        }
                        return;
                    }
                    Input::Consumed => return,
                    Input::NotTurn => {}
                }
            }
        }
        match kind {
            PacketKind::Probe | PacketKind::WireGuard => {
                self.on_peer_packet(now, PathAddr::direct(from), pkt)
            }
            _ => tracing::trace!(%from, len = pkt.len(), "unclassified datagram dropped"),
        }
    }

    fn on_stun(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) {
        let Some(r) = binding::parse_response(pkt) else {
            return;
        };
        let Some((purpose, sent)) = self.stun_pending.remove(&r.tx) else {
            return;
        };
        match purpose {
            StunPurpose::Srflx => {
                if let Some(m) = r.mapped {
                    let m = canonical(m);
                    if !self.note_mapping(now, from, m) {
                        return;
                    }
                    self.srflx_from_stun = true;
                    if self.srflx != Some(m) {
                        if self.srflx.is_some() {
                            tracing::info!(old = ?self.srflx, new = %m, "observed address changed");
                        }
                        self.srflx = Some(m);
                        self.update_local(now);
                    }
                    self.check_lifetime(now, m);
                }
            }
            StunPurpose::RelayLatency(i) => {
                if let Some(p) = self.relay_probes.get_mut(i) {
                    p.latency = Some(now.saturating_duration_since(sent));
                }
                if self
                    .relay_probes
                    .iter()
                    .all(|p| p.latency.is_some() || p.server.is_none())
                {
                    self.relay_eval_at = Some(now);
                }
            }
        }
    }

    fn on_peer_packet(&mut self, now: Instant, from: PathAddr, pkt: &[u8]) {
        match classify(pkt) {
            PacketKind::Probe => {
                let Ok(kid) = peek_key_id(pkt) else { return };
                let Some(&i) = self.key_ids.get(&kid) else {
                    self.unknown_probes += 1;
                    tracing::debug!(%from, key_id = kid, "probe for an unknown session dropped");
                    return;
                };
                if let Err(e) = self.peers[i].path.handle_probe(now, from, pkt) {
                    tracing::debug!(peer = %self.peers[i].b64, %from, error = %e, "probe refused");
                }
            }
            PacketKind::WireGuard => {
                let Some(&i) = self.addrs.get(&from) else {
                    tracing::trace!(%from, "WireGuard packet from an unknown address dropped");
                    return;
                };
                let p = &mut self.peers[i];
                if p.path.direct_blocked() && p.path.class_of(&from) != PathKind::Relay {
                    return;
                }
                p.rx_bytes += pkt.len() as u64;
                p.rx_packets += 1;
                p.last_rx = Some((from, now));
                p.path.on_data_received(now, &from);
                if let Some(wg) = p.wg_addr {
                    let _ = p.proxy.try_send_to(pkt, wg);
                }
            }
            _ => {}
        }
    }

    fn on_wireguard(&mut self, now: Instant, i: usize, pkt: &[u8], src: SocketAddr) {
        let Some(p) = self.peers.get_mut(i) else {
            return;
        };
        if !p.wg_fixed {
            // Learn (and follow) where WireGuard sends from.
            p.wg_addr = Some(src);
        }
        p.path.on_data_sent(now);
        // No path selected yet, but the peer's packets arrive from a known remote: answer
        // there instead of dropping (a lost handshake response costs WireGuard a 5 s retry).
        let fallback = p
            .last_rx
            .filter(|(_, at)| now.saturating_duration_since(*at) < LAST_RX_FALLBACK)
            .map(|(from, _)| from)
            .filter(|from| !p.path.direct_blocked() || p.path.class_of(from) == PathKind::Relay);
        let Some(dest) = p.path.route().or(fallback) else {
            p.dropped += 1;
            return;
        };
        p.tx_bytes += pkt.len() as u64;
        p.tx_packets += 1;
        if !self.send_path(now, dest, pkt) {
            self.peers[i].dropped += 1;
        }
    }

    fn find_peer(&self, s: &str) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.b64 == s || p.name.as_deref() == Some(s))
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
                match self.peers[i].path.ping_now(now) {
                    Some((tx, _)) => self.pings.push(PendingPing {
                        peer: i,
                        tx,
                        sent: now,
                        reply,
                    }),
                    None => {
                        let _ = reply.send(Err(format!(
                            "no path: {}",
                            self.peers[i].path.status().reason
                        )));
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
                let r = match knob.as_str() {
                    "block-direct" | "force-relay" => {
                        self.peers[i].path.set_direct_blocked(now, on);
                        Ok(())
                    }
                    "block-relay" => {
                        self.peers[i].path.set_relay_blocked(now, on);
                        Ok(())
                    }
                    k => Err(format!(
                        "unknown knob {k}; expected block-direct, force-relay or block-relay"
                    )),
                };
                let _ = reply.send(r);
            }
        }
    }

    fn on_internal(&mut self, now: Instant, ev: Internal) {
        match ev {
            Internal::Resolved { idx, addr } => {
                if let Some(p) = self.relay_probes.get_mut(idx) {
                    p.server = addr.map(canonical);
                }
                if self.next_relay_measure.is_none_or(|t| t > now) {
                    self.next_relay_measure = Some(now);
                }
            }
            Internal::Lifetime { public_ip, outcome } => {
                if self.lifetime.on_result(now, public_ip, outcome) {
                    self.apply_keepalive(now);
                }
            }
        }
    }

    /// The data socket's public address is known (a STUN answer): use a cached binding
    /// lifetime for it or measure it in the background (see [`crate::lifetime`]).
    fn check_lifetime(&mut self, now: Instant, public: SocketAddr) {
        let (changed, job) = self
            .lifetime
            .on_public_addr(now, public, &self.stun_servers);
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

    /// Gives every peer's path the current keepalive interval.
    fn apply_keepalive(&mut self, now: Instant) {
        let k = self.lifetime.keepalive();
        tracing::info!(keepalive_s = k.as_secs_f64(), "keepalive interval");
        for p in &mut self.peers {
            p.path.set_keepalive_interval(now, k);
        }
    }

    fn set_regions(&mut self, now: Instant, regions: Vec<RelayRegion>) {
        let same_layout = regions.len() == self.regions.len()
            && regions
                .iter()
                .zip(&self.regions)
                .all(|(a, b)| a.region == b.region && a.urls == b.urls);
        self.regions = regions;
        if same_layout {
            // Fresh credentials only: a failed allocation retries with them.
            if self.turn.as_ref().is_some_and(|t| t.state == "failed") {
                self.turn_retry_at = Some(now);
            }
            return;
        }
        self.relay_probes.clear();
        for (idx, r) in self.regions.iter().enumerate() {
            let url = r.urls.first().cloned().unwrap_or_default();
            let auth = turn_uri_authority(&url);
            let direct = auth.as_deref().and_then(|a| a.parse::<SocketAddr>().ok());
            self.relay_probes.push(RelayProbe {
                region: r.region.clone(),
                url: url.clone(),
                server: direct,
                latency: None,
            });
            if direct.is_none() {
                if let Some(auth) = auth {
                    let tx = self.int_tx.clone();
                    tokio::spawn(async move {
                        let addr = tokio::net::lookup_host(auth)
                            .await
                            .ok()
                            .and_then(|mut it| it.find(|a| a.is_ipv4()));
                        let _ = tx.send(Internal::Resolved { idx, addr }).await;
                    });
                }
            }
        }
        self.next_relay_measure = Some(now);
    }

    fn on_signal(&mut self, now: Instant, ev: SignalEvent) {
        match ev {
            SignalEvent::Registered {
                observed,
                stun,
                relays,
                shared_socket,
                local,
            } => {
                tracing::info!(%observed, shared_socket, "registered with the rendezvous");
                self.rdv.state = "connected".into();
                self.rdv.error = None;
                self.rdv.auth_reason = None;
                let before = self.rdv.observed_addr.replace(observed);
                self.rdv.shares_data_socket = shared_socket;
                self.rdv.quic_local_addr = local;
                self.observed_as_srflx(now, before, observed);
                let stun: Vec<SocketAddr> = stun.into_iter().map(canonical).collect();
                self.stun_mappings.set_servers(&stun);
                if stun != self.stun_servers {
                    self.stun_servers = stun;
                }
                self.next_stun = now;
                self.set_regions(now, relays);
                let me = self.id.public;
                for i in 0..self.peers.len() {
                    if self.peers[i].path.route().is_none() {
                        let delay = if me < self.peers[i].key {
                            Duration::from_millis(300)
                        } else {
                            OFFER_DEFER
                        };
                        self.schedule_offer(now, i, delay);
                    }
                }
            }
            SignalEvent::ConnectFailed { reason } => {
                self.rdv.state = "disconnected".into();
                self.rdv.error = Some(reason);
            }
            SignalEvent::Disconnected { reason } => {
                // A token refusal stays visible until the next registration.
                if self.rdv.auth_reason.is_none() {
                    self.rdv.state = "disconnected".into();
                    self.rdv.error = Some(reason);
                }
            }
            SignalEvent::Unauthorized(f) => {
                self.rdv.state = "unauthorized".into();
                self.rdv.error = Some(f.describe());
                self.rdv.auth_reason =
                    Some(f.reason.map_or("unauthorized", |r| r.as_str()).to_string());
                self.rdv.token_expires_unix = f.token_expires_unix;
            }
            SignalEvent::Relays(r) => self.set_regions(now, r),
            SignalEvent::ObservedChanged(a) => {
                tracing::info!(observed = %a, "rendezvous sees a new address; re-checking our mapping");
                let before = self.rdv.observed_addr.replace(a);
                self.observed_as_srflx(now, before, a);
                // Re-ask STUN from the data socket now; a changed mapping re-gathers.
                self.next_stun = now;
                self.scan_hosts(now);
                self.update_local(now);
            }
            SignalEvent::Presence { key, online } => {
                let Some(i) = self.peers.iter().position(|p| p.key == key) else {
                    return;
                };
                if online {
                    self.peers[i].note = None;
                    if self.peers[i].path.route().is_none() || !self.peers[i].path.has_session() {
                        let delay = if self.id.public < key {
                            Duration::from_millis(100)
                        } else {
                            OFFER_DEFER
                        };
                        self.schedule_offer(now, i, delay);
                    }
                } else {
                    self.peers[i].note = Some("peer is not connected to the rendezvous".into());
                    self.peers[i]
                        .path
                        .set_reason("peer is not connected to the rendezvous");
                }
            }
            SignalEvent::Punch {
                peer,
                candidates,
                secret,
                start_at,
                local_version,
            } => {
                let Some(i) = self.peers.iter().position(|p| p.key == peer) else {
                    return;
                };
                let v6 = self.v6;
                let p = &mut self.peers[i];
                let mut cands: Vec<Candidate> = candidates
                    .into_iter()
                    .filter_map(|c| {
                        usable_candidate(v6, c.addr).map(|addr| Candidate { addr, ..c })
                    })
                    .collect();
                for a in &p.static_candidates {
                    if !cands.iter().any(|c| c.addr == *a) {
                        cands.push(Candidate {
                            kind: CandidateKind::Host,
                            addr: *a,
                        });
                    }
                }
                tracing::info!(peer = %p.b64, candidates = cands.len(), "punching");
                p.note = None;
                p.next_offer_at = None;
                p.path.start_session(now, &secret, start_at, cands);
                self.rebuild_maps();
                self.bind_relay_channels(now);
                self.peers[i].sent_version = local_version;
                if local_version < self.local_version {
                    // Our candidates changed while this offer/answer was in flight (typically the
                    // relay allocation became ready): send the new set at once.
                    self.schedule_offer(now, i, Duration::ZERO);
                } else {
                    // If nothing works after a while, offer again (fresh candidates, new secret).
                    self.schedule_offer(now, i, OFFER_RETRY);
                }
            }
            SignalEvent::OfferFailed { peer, reason } => {
                let Some(i) = self.peers.iter().position(|p| p.key == peer) else {
                    return;
                };
                tracing::info!(peer = %self.peers[i].b64, %reason, "offer failed");
                let msg = format!("offer failed: {reason}");
                self.peers[i].note = Some(msg.clone());
                self.peers[i].path.set_reason(msg);
                self.schedule_offer(now, i, OFFER_RETRY);
            }
        }
    }

    /// The rendezvous observed `observed` (before: `before`). When its connection rides the
    /// data socket that is the data socket's server-reflexive address, usable at once: while
    /// STUN has not answered (slow or absent), or when it follows a mapping STUN agreed with.
    /// A STUN answer that differs keeps precedence: behind a symmetric NAT each destination
    /// has its own mapping, and STUN is what tells that apart.
    fn observed_as_srflx(
        &mut self,
        now: Instant,
        before: Option<SocketAddr>,
        observed: SocketAddr,
    ) {
        if !self.rdv.shares_data_socket {
            return;
        }
        let observed = canonical(observed);
        let agreed = before.map(canonical).is_some_and(|b| self.srflx == Some(b));
        if self.srflx_from_stun && !agreed {
            return;
        }
        if self.srflx != Some(observed) {
            tracing::info!(%observed, "server-reflexive candidate from the rendezvous' observed address");
            self.srflx = Some(observed);
            self.srflx_from_stun = false;
            self.update_local(now);
        }
    }

    /// A peer whose birthday search failed (or whose birthday path died) gets a new offer, so
    /// a new session searches again, at the time its path manager names (with backoff). The
    /// peer with the higher key waits [`OFFER_DEFER`] longer: the first offer resets the other
    /// side's search, so two crossing offers are rare.
    fn schedule_birthday_retries(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.next_offer_at.is_some() {
                continue;
            }
            let Some(at) = p.path.birthday_retry_at() else {
                continue;
            };
            let at = if self.id.public < p.key {
                at
            } else {
                at + OFFER_DEFER
            };
            self.schedule_offer(now, i, at.saturating_duration_since(now));
        }
    }

    /// Opens the birthday pool while a peer searches as the hard side and tells those peers
    /// its size; once no search needs it, closes every pool socket no pair uses.
    fn sync_pool(&mut self, now: Instant) {
        if self.peers.iter().any(|p| p.path.wants_pool()) {
            if self.pool.announced() == 0 {
                let n = self.pool.open(now);
                if n > 0 {
                    tracing::info!(sockets = n, "birthday pool open");
                }
            }
            let n = self.pool.announced();
            for p in &mut self.peers {
                if p.path.wants_pool() && p.path.pool() != n {
                    p.path.set_pool(now, n);
                }
            }
            return;
        }
        if !self.pool.gc_due(now) {
            return;
        }
        let used: HashSet<u16> = self
            .peers
            .iter()
            .flat_map(|p| p.path.local_sockets())
            .collect();
        self.pool.close_unused(&used);
        for p in &mut self.peers {
            if p.path.pool() != 0 {
                p.path.set_pool(now, 0);
            }
        }
    }

    /// A datagram on a birthday pool socket: probes and WireGuard, as on the data socket.
    fn on_pool_datagram(&mut self, now: Instant, d: PoolDatagram) {
        match classify(&d.bytes) {
            PacketKind::Probe | PacketKind::WireGuard => {
                let from = PathAddr::direct_on(d.local, canonical(d.from));
                self.on_peer_packet(now, from, &d.bytes);
            }
            _ => {
                tracing::trace!(from = %d.from, local = d.local, "unclassified datagram on a pool socket dropped")
            }
        }
    }

    /// Records a STUN server's view of the data socket; a changed mapping behaviour goes to
    /// every path manager and into our candidates. Returns whether this answer sets our
    /// server-reflexive address (see [`StunMappings::record`]).
    fn note_mapping(&mut self, now: Instant, server: SocketAddr, mapped: SocketAddr) -> bool {
        let before = self.stun_mappings.behaviour();
        let use_it = self.stun_mappings.record(canonical(server), mapped);
        let after = self.stun_mappings.behaviour();
        if after != before {
            tracing::info!(mapping = ?after, "data socket mapping behaviour");
            for p in &mut self.peers {
                p.path.set_local_mapping(after);
            }
            self.update_local(now);
        }
        use_it
    }

    fn status(&self) -> Status {
        let mut probes = ProbeCounters {
            unauthenticated: self.unknown_probes,
            ..ProbeCounters::default()
        };
        let mut birthday = BirthdayTotals {
            mapping: self.stun_mappings.behaviour(),
            pool_open: self.pool.open_count(),
            pool_opened_total: self.pool.opened_total,
            ..BirthdayTotals::default()
        };
        let peers = self
            .peers
            .iter()
            .map(|p| {
                let st = p.path.status();
                let c = p.path.counters();
                probes.accepted += c.accepted;
                probes.unauthenticated += c.unauthenticated;
                probes.replayed += c.replayed;
                let reason = match (&p.note, st.kind) {
                    (Some(n), PathKind::None) => n.clone(),
                    _ => st.reason.clone(),
                };
                birthday.spray_sent += st.birthday.spray_sent;
                birthday.spray_hits += st.birthday.spray_hits;
                birthday.found += st.birthday.found;
                let local_socket = st.remote.map_or(DATA_SOCKET, |r| r.local);
                let local_port = match local_socket {
                    DATA_SOCKET => Some(self.data_addr.port()),
                    l => self.pool.local_port(l),
                };
                PeerStatus {
                    public_key: p.b64.clone(),
                    name: p.name.clone(),
                    proxy: p.proxy_addr,
                    path: st.kind,
                    remote: st.remote_label.clone(),
                    rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    tx_bytes: p.tx_bytes + p.fast.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: p.rx_bytes,
                    tx_packets: p.tx_packets + p.fast.tx_packets.load(Ordering::Relaxed),
                    rx_packets: p.rx_packets,
                    dropped_no_path: p.dropped,
                    reason,
                    session: p.path.has_session(),
                    direct_blocked: p.path.direct_blocked(),
                    local_socket,
                    local_port,
                    birthday: st.birthday,
                    pairs: st.pairs,
                }
            })
            .collect();
        Status {
            public_key: format_key(&self.id.public),
            nat: self.lifetime.status(),
            data_addr: self.data_addr,
            public_addr: self.srflx,
            public_addr_source: self.srflx.map(|_| {
                if self.srflx_from_stun {
                    "stun".to_string()
                } else {
                    "rendezvous".to_string()
                }
            }),
            rendezvous: {
                let mut r = self.rdv.clone();
                if let Some(q) = &self.quic {
                    let st = q.stats();
                    r.quic_rx = st.rx;
                    r.quic_rx_dropped = st.rx_dropped;
                }
                r
            },
            home_relay: self.turn.as_ref().map(|t| RelayStatus {
                region: t.region.clone(),
                server: t.server,
                relayed: t.client.relayed_addr(),
                state: t.state.clone(),
                error: t.error.clone(),
            }),
            relays: self.relay_latencies(),
            probes,
            birthday,
            peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_uris_are_parsed() {
        assert_eq!(
            turn_uri_authority("turn:127.0.0.1:3478?transport=udp").as_deref(),
            Some("127.0.0.1:3478")
        );
        assert_eq!(
            turn_uri_authority("turn:relay.example.com").as_deref(),
            Some("relay.example.com:3478")
        );
        assert_eq!(
            turn_uri_authority("turn:relay.example.com:5349").as_deref(),
            Some("relay.example.com:5349")
        );
        assert_eq!(
            turn_uri_authority("turn:[2001:db8::1]:3478").as_deref(),
            Some("[2001:db8::1]:3478")
        );
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:5".parse().unwrap();
        assert_eq!(canonical(a), "127.0.0.1:5".parse().unwrap());
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
