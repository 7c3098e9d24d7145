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
//! Files: this one is the engine (the driver loop and the decisions not yet moved into
//! `proto`); `proxy.rs` the proxy readers and the fast path; `net.rs` socket and interface
//! helpers; `status.rs` the `meshpunch status` snapshot. A peer's route lives in its
//! [`PeerPath`]; the proxy reader only sees the copy the engine publishes.
//!
//! Birthday probing ([`crate::pool`]): while a peer's path manager searches as the "hard"
//! side, a pool of extra sockets is open; their datagrams reach the engine through one
//! channel and are handled like the data socket's, with the pool socket's index in the
//! [`PathAddr`]. A path found that way sends (fast path included) from that pool socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshpunch_proto::addr::{for_socket, unmap};
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::nat::{choose_relay, RelayLatency};
use meshpunch_proto::node::candidates::{LocalCandidates, Source as CandSource};
use meshpunch_proto::node::offers::OfferTimer;
use meshpunch_proto::node::srflx::ServerReflexive;
use meshpunch_proto::path::{
    Candidate, CandidateKind, PathAddr, PathConfig, PathEvent, PathKind, PeerPath, Via, DATA_SOCKET,
};
use meshpunch_proto::probe::{classify, peek_key_id, PacketKind, TxId};
use meshpunch_proto::stun;
use meshpunch_proto::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent, TurnOp};
use meshpunch_proto::wire::RelayRegion;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

mod net;
mod proxy;
mod status;

use net::{bind_data, usable_candidate};
pub use net::{
    interface_addrs, interface_addrs_excluding, turn_uri_authority, usable_candidates,
    wireguard_interfaces,
};
use proxy::{FastPath, FastRoute, FromProxy};

use crate::config::PeerConfig;
use crate::control::{self, CtlCmd, PingResult, RendezvousStatus};
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
pub use meshpunch_proto::node::offers::{OFFER_DEFER, OFFER_MIN_GAP, OFFER_RETRY};
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
    meshpunch_proto::clock::unix_ms(SystemTime::now())
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

    // On a loopback-only data socket loopback is the only network: peers' loopback
    // candidates are allowed there (tests, single-host setups) and nowhere else.
    let path_cfg = PathConfig {
        loopback_candidates: data_addr.ip().is_loopback(),
        ..opts.path.clone()
    };
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
        let fast = Arc::new(FastPath::default());
        proxy::spawn_reader(
            i,
            proxy.clone(),
            proxy_addr,
            opts.wireguard_endpoint,
            sock.clone(),
            fast.clone(),
            proxy_tx.clone(),
        );
        let path = PeerPath::new(
            path_cfg.clone(),
            opts.identity.public,
            pc.public_key,
            now,
            unix_ms(),
            rand::random(),
        );
        peers.push(Peer {
            fast,
            sent_version: 0,
            key: pc.public_key,
            b64: format_key(&pc.public_key),
            name: pc.name.clone(),
            proxy,
            proxy_addr,
            wg_addr: opts.wireguard_endpoint,
            path,
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            dropped: 0,
            last_rx: None,
            static_candidates: usable_candidates(v6, &pc.candidates),
            refused_seen: 0,
            offer: OfferTimer::default(),
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
        srflx: ServerReflexive::default(),
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
        cands: LocalCandidates::new(data_addr.port()),
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

struct Peer {
    fast: Arc<FastPath>,
    /// Version of our candidates the peer got with the latest punch.
    sent_version: u64,
    key: [u8; 32],
    b64: String,
    name: Option<String>,
    proxy: Arc<UdpSocket>,
    proxy_addr: SocketAddr,
    wg_addr: Option<SocketAddr>,
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
    /// Refused candidates already logged.
    refused_seen: u64,
    offer: OfferTimer,
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
    /// Our server-reflexive address and where it came from (STUN or the rendezvous).
    srflx: ServerReflexive,
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
    /// Our candidates from every candidate source, with their version.
    cands: LocalCandidates,
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
                            self.on_datagram(now, unmap(from), &buf[..n]);
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
            take(p.offer.next());
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
            if self.peers[i].offer.take_due(now) {
                let p = &self.peers[i];
                // A working path whose peer has our latest candidates needs no new session,
                // unless a birthday search could still turn a relay path into a direct one.
                let up_to_date = p.path.route().is_some()
                    && p.sent_version >= self.cands.version()
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
        let tx: [u8; 12] = rand::random();
        self.stun_pending.insert(tx, (purpose, now));
        let req = stun::binding_request(tx, false, false);
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
        let first = self.cands.list().is_empty();
        let mut changed = self.cands.set(CandSource::Hosts(self.hosts.clone()));
        changed |= self.cands.set(CandSource::ServerReflexive(
            self.srflx.addr(),
            self.stun_mappings.behaviour(),
        ));
        changed |= self.cands.set(CandSource::Relayed(
            self.turn.as_ref().and_then(|t| t.client.relayed_addr()),
        ));
        if !changed {
            return;
        }
        let c = self.cands.list().to_vec();
        tracing::info!(candidates = ?c.iter().map(|c| format!("{:?} {}", c.kind, c.addr)).collect::<Vec<_>>(), "local candidates");
        let _ = self.local_tx.send((self.cands.version(), c));
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
        self.peers[i].offer.schedule(now, delay);
    }

    fn send_offer(&mut self, now: Instant, i: usize) {
        let Some(sig) = &self.sig else { return };
        let p = &mut self.peers[i];
        p.offer.sent(now);
        if sig.try_send(SignalCmd::Offer(p.key)).is_err() {
            p.offer.send_failed(now);
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
    /// Publishes each peer's selected direct pair (the path manager's route, the one source
    /// of truth) to its proxy reader when it changed.
    fn publish_fast_routes(&mut self) {
        for p in &mut self.peers {
            let r = p.path.route().filter(|d| d.via == Via::Direct);
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
        let kind = classify(pkt);
        if kind == PacketKind::Stun {
            if let Some(tx) = stun::peek_transaction_id(pkt) {
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
                            self.on_peer_packet(now, PathAddr::relay(unmap(peer)), inner);
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
        let Ok(r) = stun::parse_binding_response(pkt) else {
            return;
        };
        let Some((purpose, sent)) = self.stun_pending.remove(&r.transaction_id) else {
            return;
        };
        match purpose {
            StunPurpose::Srflx => {
                if let Some(m) = r.mapped {
                    let m = unmap(m);
                    if !self.note_mapping(now, from, m) {
                        return;
                    }
                    let old = self.srflx.addr();
                    if self.srflx.on_stun(m) {
                        if old.is_some() {
                            tracing::info!(?old, new = %m, "observed address changed");
                        }
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
        // The proxy reader passes only packets from WireGuard's one address (configured, or
        // the first that used the port): learn it once.
        if p.wg_addr.is_none() {
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
                    p.server = addr.map(unmap);
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
                transport: _,
            } => {
                tracing::info!(%observed, shared_socket, "registered with the rendezvous");
                self.rdv.state = "connected".into();
                self.rdv.error = None;
                self.rdv.auth_reason = None;
                let before = self.rdv.observed_addr.replace(observed);
                self.rdv.shares_data_socket = shared_socket;
                self.rdv.quic_local_addr = local;
                self.observed_as_srflx(now, before, observed);
                let stun: Vec<SocketAddr> = stun.into_iter().map(unmap).collect();
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
                peer_observed,
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
                p.offer.cancel();
                // Before the candidates: birthday targets are checked against it.
                p.path
                    .set_peer_observed(peer_observed.map(|a| unmap(a).ip()));
                p.path.start_session(now, &secret, start_at, cands);
                let refused = p.path.counters().refused_candidates;
                if refused > p.refused_seen {
                    tracing::warn!(peer = %p.b64, refused = refused - p.refused_seen, "peer candidates refused (loopback, multicast, unspecified, broadcast, or a private address that is not a host candidate)");
                    p.refused_seen = refused;
                }
                self.rebuild_maps();
                self.bind_relay_channels(now);
                self.peers[i].sent_version = local_version;
                if local_version < self.cands.version() {
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
        if self
            .srflx
            .on_observed(self.rdv.shares_data_socket, before, observed)
        {
            tracing::info!(%observed, "server-reflexive candidate from the rendezvous' observed address");
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
            if p.offer.next().is_some() {
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
                let from = PathAddr::direct_on(d.local, unmap(d.from));
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
        let use_it = self.stun_mappings.record(unmap(server), mapped);
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
}
