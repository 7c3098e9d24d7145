//! Packet load through a relay: set up flows (TURN allocations, bare-forwarder bindings or
//! direct sockets), run one trial or a maximum-rate search, and build the report.
//!
//! Topology, identical for every target so the numbers compare:
//!
//! ```text
//! client socket i ──ChannelData(ch j)──► server under test ──UDP──► peer socket (flow mod peers)
//!  (sender thread: one flow per            (TURN relay / bare        (receiver threads over
//!   client and channel, sendmmsg)           forwarder / nothing)      all peers: epoll +
//!                                                                     recvmmsg, per-flow
//!                                                                     sequence accounting)
//! ```
//!
//! Flow `f = i × peers_per_client + j` is client `i`'s channel `j`, leading to peer
//! `f mod peers`: with the realistic defaults (64 clients × 4 channels, 256 peers) every peer
//! hears from exactly one flow and every client talks to 4 peers.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{
    self, Back, Flow, Framing, Link, Pattern, Peer, Progress, SearchSpec, Sizes, TrialResult,
    TrialSpec,
};
use crate::forwarder;
use crate::progress::Bar;
use crate::stream::Transport;
use crate::sys::{self, CpuMeter};
use crate::turn;
use crate::udp;

/// What the load goes through.
#[derive(Debug, Clone)]
pub enum Target {
    /// Straight from client to peer sockets: what the generator alone can do.
    Direct,
    /// A bare forwarder ([`crate::forwarder`]) at this address.
    Bare(SocketAddr),
    /// A TURN server at `server`, authenticated with REST-API credentials from `secret`.
    Turn {
        /// Server address (UDP, TCP or TLS listener, as `transport` says).
        server: SocketAddr,
        /// The `static-auth-secret` shared with the server.
        secret: String,
        /// How clients reach the server; peers are on UDP whatever this is.
        transport: Transport,
    },
}

impl Target {
    /// Short name used in reports.
    pub fn mode(&self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Bare(_) => "bare",
            Target::Turn { .. } => "relay",
        }
    }

    /// How clients reach the server: `udp` except for TURN over TCP/TLS.
    pub fn transport(&self) -> &'static str {
        match self {
            Target::Turn { transport, .. } => transport.name(),
            _ => "udp",
        }
    }

    fn server(&self) -> Option<SocketAddr> {
        match self {
            Target::Direct => None,
            Target::Bare(a) => Some(*a),
            Target::Turn { server, .. } => Some(*server),
        }
    }
}

/// Shape of the load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Concurrent clients (allocations / bindings), each with its own socket.
    pub clients: usize,
    /// Channels (peers) per client; each is a flow with its own sequence numbers.
    pub peers_per_client: usize,
    /// Offered datagrams per second over all clients.
    pub rate: u64,
    /// Payload sizes (as the peer receives them).
    pub sizes: Sizes,
    /// Order of datagrams over flows.
    pub pattern: Pattern,
    /// Realistic pattern: runs of 1..=burst datagrams per flow visit (1: none).
    pub burst: usize,
    /// Sending time per trial.
    pub duration: Duration,
    /// Peer sockets (never more than flows).
    pub peers: usize,
    /// Receiver threads (0: one per 128 peers, at most 4).
    pub receivers: usize,
    /// Address peers bind to (must be reachable from the server's relay address).
    pub peer_ip: IpAddr,
    /// Address clients bind to.
    pub client_ip: IpAddr,
    /// Process id of the server, to report its CPU use.
    pub server_pid: Option<u32>,
    /// Seed of the flow order and size draws.
    pub seed: u64,
    /// Every other flow visit goes peer → client (relay and direct targets).
    pub bidirectional: bool,
}

impl LoadOptions {
    /// The realistic defaults: 64 clients × 4 channels to 256 peers, interleaved, WireGuard
    /// size mix, 10,000 pps for 5 s.
    pub fn realistic() -> LoadOptions {
        LoadOptions {
            clients: 64,
            peers_per_client: 4,
            rate: 10_000,
            sizes: Sizes::WireguardMix,
            pattern: Pattern::Realistic,
            burst: 1,
            duration: Duration::from_secs(5),
            peers: 256,
            receivers: 0,
            peer_ip: IpAddr::from([127, 0, 0, 1]),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            server_pid: None,
            seed: 1,
            bidirectional: false,
        }
    }

    /// The bulk defaults (the pattern of earlier tables): 16 clients, one channel each, one
    /// peer, 100 B, runs of up to 64 datagrams per client.
    pub fn bulk() -> LoadOptions {
        LoadOptions {
            clients: 16,
            peers_per_client: 1,
            sizes: Sizes::Fixed(100),
            pattern: Pattern::Bulk,
            peers: 1,
            ..LoadOptions::realistic()
        }
    }

    /// Flows: clients × channels per client.
    pub fn flows(&self) -> usize {
        self.clients * self.peers_per_client.max(1)
    }

    /// Peer sockets actually opened (no more than there are flows).
    pub fn peer_count(&self) -> usize {
        self.peers.min(self.flows()).max(1)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions::realistic()
    }
}

/// Flows and peers ready to carry load.
pub struct Setup {
    /// Sending side.
    pub flows: Vec<Flow>,
    /// Receiving side.
    pub peers: Vec<Peer>,
    /// How long setting up took (allocations, bindings).
    pub setup_seconds: f64,
    turn: Vec<turn::Allocation>,
}

impl Setup {
    /// Releases TURN allocations (best effort; the server frees them on expiry anyway).
    pub fn release(self) {
        turn::release_all(self.turn);
    }
}

/// Errors while preparing the load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A socket operation failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused or did not answer a setup request.
    #[error("setup of client {client} failed: {reason}")]
    Setup {
        /// Which client.
        client: usize,
        /// Why.
        reason: String,
    },
    /// Options out of range.
    #[error("bad options: {0}")]
    Options(String),
}

/// Opens sockets and performs the per-client setup the target needs.
pub fn setup(target: &Target, opts: &LoadOptions) -> Result<Setup, LoadError> {
    if opts.clients == 0 || opts.peers == 0 || opts.peers_per_client == 0 {
        return Err(LoadError::Options(
            "clients, peers and peers per client must be ≥ 1".into(),
        ));
    }
    if opts.peers_per_client > 0x3FFF {
        return Err(LoadError::Options(
            "at most 16383 channels per client".into(),
        ));
    }
    let (lo, hi) = opts.sizes.bounds();
    if lo < engine::STAMP_LEN || hi > engine::MAX_SIZE {
        return Err(LoadError::Options(format!(
            "size must be within {}..={} bytes",
            engine::STAMP_LEN,
            engine::MAX_SIZE
        )));
    }
    if opts.bidirectional && target.transport() != "udp" {
        return Err(LoadError::Options(
            "--bidirectional is UDP only (over TCP/TLS the clients' streams carry one direction)"
                .into(),
        ));
    }
    if opts.bidirectional && matches!(target, Target::Bare(_)) {
        return Err(LoadError::Options(
            "--bidirectional needs a TURN server or direct mode (the bare forwarder is one-way)"
                .into(),
        ));
    }
    let started = Instant::now();
    let n_peers = opts.peer_count();
    let ppc = opts.peers_per_client;
    let mut peers = Vec::with_capacity(n_peers);
    for _ in 0..n_peers {
        peers.push(Peer::new(udp::bind(SocketAddr::new(opts.peer_ip, 0))?)?);
    }
    let peer_addrs: Vec<SocketAddr> = peers
        .iter()
        .map(|p| p.sock.local_addr())
        .collect::<Result<_, _>>()?;
    let peer_of = |client: usize, j: usize| (client * ppc + j) % n_peers;
    let mut flows = Vec::with_capacity(opts.flows());
    let mut allocations = Vec::new();
    match target {
        Target::Direct => {
            // One socket per flow: a direct flow is a client address talking to one peer.
            for i in 0..opts.clients {
                for j in 0..ppc {
                    let peer = peer_of(i, j);
                    let sock = udp::bind(SocketAddr::new(opts.client_ip, 0))?;
                    sock.connect(peer_addrs[peer])?;
                    let back = if opts.bidirectional {
                        peers.push(Peer::new(sock.try_clone()?)?);
                        Some(Back {
                            via: peers[peer].sock.try_clone()?,
                            to: sock.local_addr()?,
                            rx: peers.len() - 1,
                        })
                    } else {
                        None
                    };
                    flows.push(Flow {
                        link: Link::Udp(sock),
                        framing: Framing::Raw,
                        peer,
                        back,
                    });
                }
            }
        }
        Target::Bare(server) => {
            for i in 0..opts.clients {
                let sock = udp::bind(SocketAddr::new(opts.client_ip, 0))?;
                sock.connect(*server)?;
                for j in 0..ppc {
                    let peer = peer_of(i, j);
                    let channel = 0x4000 + j as u16;
                    bare_bind(&sock, channel, peer_addrs[peer])
                        .map_err(|reason| LoadError::Setup { client: i, reason })?;
                    flows.push(Flow {
                        link: Link::Udp(sock.try_clone()?),
                        framing: Framing::ChannelData(channel),
                        peer,
                        back: None,
                    });
                }
            }
        }
        Target::Turn {
            server,
            secret,
            transport,
        } => {
            let peer_for: Vec<Vec<(usize, SocketAddr)>> = (0..opts.clients)
                .map(|i| {
                    (0..ppc)
                        .map(|j| {
                            let p = peer_of(i, j);
                            (p, peer_addrs[p])
                        })
                        .collect()
                })
                .collect();
            let (f, a) = turn::allocate_all(*server, secret, opts.client_ip, transport, &peer_for)?;
            flows = f;
            if opts.bidirectional {
                // Flows come client by client, `ppc` each; a client's reverse datagrams arrive
                // as ChannelData on its socket (4-byte header before the stamp).
                for (i, alloc) in a.iter().enumerate() {
                    let Some(Link::Udp(sock)) = flows.get(i * ppc).map(|f| &f.link) else {
                        break;
                    };
                    peers.push(Peer::with_prefix(sock.try_clone()?, 4)?);
                    let rx = peers.len() - 1;
                    for f in flows.iter_mut().skip(i * ppc).take(ppc) {
                        f.back = Some(Back {
                            via: peers[f.peer].sock.try_clone()?,
                            to: alloc.relayed(),
                            rx,
                        });
                    }
                }
            }
            allocations = a;
        }
    }
    Ok(Setup {
        flows,
        peers,
        setup_seconds: started.elapsed().as_secs_f64(),
        turn: allocations,
    })
}

fn bare_bind(sock: &UdpSocket, channel: u16, peer: SocketAddr) -> Result<(), String> {
    let req = forwarder::bind_request(channel, peer);
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        sock.send(&req).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match udp::recv_timeout(sock, &mut buf, Duration::from_millis(100)) {
                Ok(Some((n, _))) if buf[..n].starts_with(forwarder::BIND_OK) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("forwarder not listening (ICMP port unreachable)".into())
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Err("no answer from the forwarder".into())
}

/// Everything a relay-mode run reports (JSON keys are stable; the trial's keys are at the top
/// level).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `relay`, `bare` or `direct`.
    pub mode: String,
    /// How clients reached the server: `udp`, `tcp` or `tls` (peers always on UDP).
    pub transport: String,
    /// Server under test, if any.
    pub server: Option<String>,
    /// Concurrent clients.
    pub clients: usize,
    /// Channels per client.
    pub peers_per_client: usize,
    /// Flows (clients × channels), each with its own sequence numbers.
    pub flows: usize,
    /// Peer sockets.
    pub peers: usize,
    /// Realistic pattern: longest run per flow visit.
    pub burst: usize,
    /// Whether every other flow visit went peer → client.
    pub bidirectional: bool,
    /// Seconds spent in setup.
    pub setup_seconds: f64,
    /// The reported trial (with `--find-max`: the weaker of the best passing rate's two).
    #[serde(flatten)]
    pub trial: TrialResult,
    /// Server CPU use during the reported trial (100 = one core), when `--server-pid` given.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU time per delivered datagram, µs (when `--server-pid` given): the cost of
    /// relaying one packet, independent of whether the generator or the server was the limit.
    pub server_cpu_us_per_packet: Option<f64>,
    /// For `--find-max`: every trial in order.
    pub trials: Option<Vec<TrialResult>>,
    /// For `--find-max`: whether any rate passed (two trials in a row under the loss limit).
    pub found: Option<bool>,
}

/// Server CPU measured over one trial (percent, seconds).
#[derive(Debug, Clone, Copy, Default)]
struct TrialCpu {
    server_percent: Option<f64>,
    server_seconds: Option<f64>,
}

struct Meters {
    server: Option<CpuMeter>,
}

impl Meters {
    fn start(server_pid: Option<u32>) -> Meters {
        Meters {
            server: server_pid.and_then(CpuMeter::start),
        }
    }
    fn read(&self) -> TrialCpu {
        TrialCpu {
            server_percent: self.server.and_then(|m| m.percent()),
            server_seconds: self.server.and_then(|m| m.used()).map(|d| d.as_secs_f64()),
        }
    }
}

fn report_from(
    target: &Target,
    opts: &LoadOptions,
    setup_seconds: f64,
    r: &TrialResult,
    cpu: TrialCpu,
) -> Report {
    Report {
        mode: target.mode().into(),
        transport: target.transport().into(),
        server: target.server().map(|s| s.to_string()),
        clients: opts.clients,
        peers_per_client: opts.peers_per_client,
        flows: opts.flows(),
        peers: opts.peer_count(),
        burst: opts.burst,
        bidirectional: opts.bidirectional,
        setup_seconds,
        trial: r.clone(),
        server_cpu_percent: cpu.server_percent,
        server_cpu_us_per_packet: match cpu.server_seconds {
            Some(s) if r.received > 0 => Some(s * 1e6 / r.received as f64),
            _ => None,
        },
        trials: None,
        found: None,
    }
}

fn spec_of(opts: &LoadOptions) -> TrialSpec {
    TrialSpec {
        rate: opts.rate,
        sizes: opts.sizes,
        pattern: opts.pattern,
        burst: opts.burst,
        duration: opts.duration,
        drain: drain_for(opts.duration),
        seed: opts.seed,
        bidirectional: opts.bidirectional,
    }
}

fn drain_for(d: Duration) -> Duration {
    (d / 10).clamp(Duration::from_millis(300), Duration::from_secs(2))
}

/// Runs one trial at `opts.rate`.
pub fn run_once(target: &Target, opts: &LoadOptions) -> Result<Report, LoadError> {
    let setup = setup(target, opts)?;
    let progress = Arc::new(Progress::default());
    let spec = spec_of(opts);
    let meters = Meters::start(opts.server_pid);
    let bar = Bar::start(target.mode(), opts.duration, progress.clone());
    let Setup {
        flows,
        peers,
        setup_seconds,
        turn,
    } = setup;
    let (peers, r) = engine::run_trial(&flows, peers, opts.receivers, spec, progress);
    bar.finish();
    let report = report_from(target, opts, setup_seconds, &r, meters.read());
    Setup {
        flows,
        peers,
        setup_seconds,
        turn,
    }
    .release();
    Ok(report)
}

/// Searches the highest rate with loss below `max_loss`, trials of `opts.duration` each.
pub fn run_find_max(
    target: &Target,
    opts: &LoadOptions,
    max_loss: f64,
    ceiling: u64,
    mut on_trial: impl FnMut(&TrialResult),
) -> Result<Report, LoadError> {
    let Setup {
        flows,
        peers,
        setup_seconds,
        turn,
    } = setup(target, opts)?;
    let progress = Arc::new(Progress::default());
    let base = spec_of(opts);
    let search = SearchSpec {
        start: opts.rate,
        ceiling,
        max_loss,
        steps: 6,
    };
    let mut cpu: Vec<TrialCpu> = Vec::new();
    let mut meters = Meters::start(opts.server_pid);
    let (trials, best) =
        engine::find_max(&flows, peers, opts.receivers, base, search, progress, |r| {
            cpu.push(meters.read());
            meters = Meters::start(opts.server_pid);
            on_trial(r);
        });
    turn::release_all(turn);
    let idx = best.unwrap_or(0);
    let c = cpu.get(idx).copied().unwrap_or_default();
    let mut report = match trials.get(idx) {
        Some(r) => report_from(target, opts, setup_seconds, r, c),
        None => return Err(LoadError::Options("no trial ran".into())),
    };
    report.found = Some(best.is_some());
    report.trials = Some(trials);
    drop(flows);
    Ok(report)
}

/// The table people read.
pub fn table(r: &Report) -> String {
    let t = &r.trial;
    let mut s = String::new();
    let server = r.server.as_deref().unwrap_or("-");
    s.push_str(&format!(
        "mode {}  server {} ({})  pattern {}  clients {} × {} channels → {} peers  size {} (mean {} B)  offered {} pps  (setup {:.2} s)\n",
        r.mode, server, r.transport, t.pattern, r.clients, r.peers_per_client, r.peers, t.sizes, t.size, t.rate, r.setup_seconds
    ));
    s.push_str(&format!(
        "{:>10} {:>10} {:>11} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7}\n",
        "sent",
        "delivered",
        "pps",
        "Mbit/s",
        "loss%",
        "dup",
        "reord",
        "p50µs",
        "p99µs",
        "maxµs",
        "srv%",
        "srvµs/pkt",
        "gen%"
    ));
    s.push_str(&format!(
        "{:>10} {:>10} {:>11.0} {:>9.1} {:>7.3} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7.0}\n",
        t.sent,
        t.received,
        t.pps,
        t.mbps,
        t.loss * 100.0,
        t.duplicates,
        t.reordered,
        t.p50_us,
        t.p99_us,
        t.max_us,
        r.server_cpu_percent
            .map(|c| format!("{c:.0}"))
            .unwrap_or_else(|| "-".into()),
        r.server_cpu_us_per_packet
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "-".into()),
        t.generator_cpu_percent
    ));
    if t.late > 0 || t.misrouted > 0 || t.send_errors > 0 {
        s.push_str(&format!(
            "late beyond window {}  misrouted {}  send errors {}\n",
            t.late, t.misrouted, t.send_errors
        ));
    }
    let server_drops = t
        .host_udp_rcvbuf_errors
        .saturating_sub(t.generator_rx_drops);
    s.push_str(&format!(
        "drops: generator sockets {}  other sockets on this host (the server's) {}\n",
        t.generator_rx_drops, server_drops
    ));
    if t.generator_limited {
        s.push_str(&format!(
            "GENERATOR-LIMITED (the server may do more): {}\n",
            t.generator_limits.join("; ")
        ));
    } else {
        s.push_str("generator not the limit (sender, receivers and own sockets kept up)\n");
    }
    if let Some(trials) = &r.trials {
        s.push_str(&format!(
            "max-rate search ({} trials, a rate passes with two passing trials in a row): {}\n",
            trials.len(),
            if r.found == Some(true) {
                format!(
                    "best {:.0} pps delivered at {} offered (weaker of its two trials)",
                    t.pps, t.rate
                )
            } else {
                "no rate passed the loss limit".to_string()
            }
        ));
        for x in trials {
            s.push_str(&format!(
                "  offered {:>9}  delivered {:>11.0} pps  loss {:>7.3}%  dup {:>5}  reord {:>5}  p99 {:>7} µs{}\n",
                x.rate,
                x.pps,
                x.loss * 100.0,
                x.duplicates,
                x.reordered,
                x.p99_us,
                if x.generator_limited { "  (generator-limited)" } else { "" }
            ));
        }
    }
    s
}

/// Keeps [`sys`] linked for callers that only use this module.
pub fn raise_limits() -> u64 {
    sys::raise_nofile_limit()
}
