//! Packet load through a relay: set up flows (TURN allocations, bare-forwarder bindings or
//! direct sockets), run one trial or a maximum-rate search, and build the report.
//!
//! Topology, identical for every target so the numbers compare:
//!
//! ```text
//! client socket i ──ChannelData──► server under test ──UDP──► peer socket (i mod peers)
//!  (sender thread, sendmmsg)        (TURN relay / bare         (receiver thread per peer,
//!                                    forwarder / nothing)       recvmmsg, latency histogram)
//! ```

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{self, Flow, Framing, Progress, SearchSpec, TrialResult, TrialSpec};
use crate::forwarder;
use crate::progress::Bar;
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
        /// Server address.
        server: SocketAddr,
        /// The `static-auth-secret` shared with the server.
        secret: String,
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
    /// Offered datagrams per second over all clients.
    pub rate: u64,
    /// Payload bytes per datagram (as the peer receives it).
    pub size: usize,
    /// Sending time per trial.
    pub duration: Duration,
    /// Peer sockets (each with its own receiver thread).
    pub peers: usize,
    /// Address peers bind to (must be reachable from the server's relay address).
    pub peer_ip: IpAddr,
    /// Address clients bind to.
    pub client_ip: IpAddr,
    /// Process id of the server, to report its CPU use.
    pub server_pid: Option<u32>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            clients: 16,
            rate: 10_000,
            size: 100,
            duration: Duration::from_secs(5),
            peers: 1,
            peer_ip: IpAddr::from([127, 0, 0, 1]),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            server_pid: None,
        }
    }
}

/// Flows and peers ready to carry load.
pub struct Setup {
    /// Sending side.
    pub flows: Vec<Flow>,
    /// Receiving side.
    pub peers: Vec<UdpSocket>,
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
    if opts.clients == 0 || opts.peers == 0 {
        return Err(LoadError::Options("clients and peers must be ≥ 1".into()));
    }
    if opts.size < engine::STAMP_LEN || opts.size > engine::MAX_SIZE {
        return Err(LoadError::Options(format!(
            "size must be within {}..={} bytes",
            engine::STAMP_LEN,
            engine::MAX_SIZE
        )));
    }
    let started = Instant::now();
    let mut peers = Vec::with_capacity(opts.peers);
    for _ in 0..opts.peers {
        peers.push(udp::bind(SocketAddr::new(opts.peer_ip, 0))?);
    }
    let peer_addrs: Vec<SocketAddr> = peers
        .iter()
        .map(|p| p.local_addr())
        .collect::<Result<_, _>>()?;
    let mut flows = Vec::with_capacity(opts.clients);
    let mut allocations = Vec::new();
    match target {
        Target::Direct => {
            for i in 0..opts.clients {
                let sock = udp::bind(SocketAddr::new(opts.client_ip, 0))?;
                sock.connect(peer_addrs[i % peer_addrs.len()])?;
                flows.push(Flow {
                    sock,
                    framing: Framing::Raw,
                });
            }
        }
        Target::Bare(server) => {
            for i in 0..opts.clients {
                let sock = udp::bind(SocketAddr::new(opts.client_ip, 0))?;
                sock.connect(*server)?;
                let channel = 0x4000;
                bare_bind(&sock, channel, peer_addrs[i % peer_addrs.len()])
                    .map_err(|reason| LoadError::Setup { client: i, reason })?;
                flows.push(Flow {
                    sock,
                    framing: Framing::ChannelData(channel),
                });
            }
        }
        Target::Turn { server, secret } => {
            let peer_for: Vec<SocketAddr> = (0..opts.clients)
                .map(|i| peer_addrs[i % peer_addrs.len()])
                .collect();
            let (f, a) = turn::allocate_all(*server, secret, opts.client_ip, &peer_for)?;
            flows = f;
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

/// Everything a relay-mode run reports (JSON keys are stable).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `relay`, `bare` or `direct`.
    pub mode: String,
    /// Server under test, if any.
    pub server: Option<String>,
    /// Concurrent clients.
    pub clients: usize,
    /// Peer sockets.
    pub peers: usize,
    /// Seconds spent in setup.
    pub setup_seconds: f64,
    /// Offered rate of the reported trial.
    pub rate: u64,
    /// Payload bytes.
    pub size: usize,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received by peers.
    pub received: u64,
    /// Delivered datagrams per second.
    pub pps: f64,
    /// Delivered payload Mbit/s.
    pub mbps: f64,
    /// Loss fraction 0..1.
    pub loss: f64,
    /// Latency p50, µs.
    pub p50_us: u64,
    /// Latency p90, µs.
    pub p90_us: u64,
    /// Latency p99, µs.
    pub p99_us: u64,
    /// Latency max, µs.
    pub max_us: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Server CPU use during the reported trial (100 = one core), when `--server-pid` given.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU time per delivered datagram, µs (when `--server-pid` given): the cost of
    /// relaying one packet, independent of whether the generator or the server was the limit.
    pub server_cpu_us_per_packet: Option<f64>,
    /// Load generator CPU use during the reported trial.
    pub generator_cpu_percent: f64,
    /// For `--find-max`: every trial in order (the reported one is the best passing).
    pub trials: Option<Vec<TrialResult>>,
    /// For `--find-max`: whether any trial passed the loss limit.
    pub found: Option<bool>,
}

/// CPU measured over one trial: server (percent, seconds) and generator percent.
#[derive(Debug, Clone, Copy, Default)]
struct TrialCpu {
    server_percent: Option<f64>,
    server_seconds: Option<f64>,
    generator_percent: f64,
}

struct Meters {
    server: Option<CpuMeter>,
    generator: Option<CpuMeter>,
}

impl Meters {
    fn start(server_pid: Option<u32>) -> Meters {
        Meters {
            server: server_pid.and_then(CpuMeter::start),
            generator: CpuMeter::start(std::process::id()),
        }
    }
    fn read(&self) -> TrialCpu {
        TrialCpu {
            server_percent: self.server.and_then(|m| m.percent()),
            server_seconds: self.server.and_then(|m| m.used()).map(|d| d.as_secs_f64()),
            generator_percent: self.generator.and_then(|m| m.percent()).unwrap_or(0.0),
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
        server: target.server().map(|s| s.to_string()),
        clients: opts.clients,
        peers: opts.peers,
        setup_seconds,
        rate: r.rate,
        size: r.size,
        sent: r.sent,
        received: r.received,
        pps: r.pps,
        mbps: r.mbps,
        loss: r.loss,
        p50_us: r.p50_us,
        p90_us: r.p90_us,
        p99_us: r.p99_us,
        max_us: r.max_us,
        send_errors: r.send_errors,
        server_cpu_percent: cpu.server_percent,
        server_cpu_us_per_packet: match cpu.server_seconds {
            Some(s) if r.received > 0 => Some(s * 1e6 / r.received as f64),
            _ => None,
        },
        generator_cpu_percent: cpu.generator_percent,
        trials: None,
        found: None,
    }
}

fn drain_for(d: Duration) -> Duration {
    (d / 10).clamp(Duration::from_millis(300), Duration::from_secs(2))
}

/// Runs one trial at `opts.rate`.
pub fn run_once(target: &Target, opts: &LoadOptions) -> Result<Report, LoadError> {
    let setup = setup(target, opts)?;
    let progress = Arc::new(Progress::default());
    let spec = TrialSpec {
        rate: opts.rate,
        size: opts.size,
        duration: opts.duration,
        drain: drain_for(opts.duration),
    };
    let meters = Meters::start(opts.server_pid);
    let bar = Bar::start(target.mode(), opts.duration, progress.clone());
    let Setup {
        flows,
        peers,
        setup_seconds,
        turn,
    } = setup;
    let (peers, r) = engine::run_trial(&flows, peers, spec, progress);
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
    let base = TrialSpec {
        rate: opts.rate,
        size: opts.size,
        duration: opts.duration,
        drain: drain_for(opts.duration),
    };
    let search = SearchSpec {
        start: opts.rate,
        ceiling,
        max_loss,
        steps: 6,
    };
    let mut cpu: Vec<TrialCpu> = Vec::new();
    let mut meters = Meters::start(opts.server_pid);
    let (trials, best) = engine::find_max(&flows, peers, base, search, progress, |r| {
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
    let mut s = String::new();
    let server = r.server.as_deref().unwrap_or("-");
    s.push_str(&format!(
        "mode {}  server {}  clients {}  size {} B  offered {} pps  (setup {:.2} s)\n",
        r.mode, server, r.clients, r.size, r.rate, r.setup_seconds
    ));
    s.push_str(&format!(
        "{:>10} {:>10} {:>11} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}\n",
        "sent",
        "received",
        "pps",
        "Mbit/s",
        "loss%",
        "p50µs",
        "p90µs",
        "p99µs",
        "maxµs",
        "srv%",
        "gen%"
    ));
    s.push_str(&format!(
        "{:>10} {:>10} {:>11.0} {:>9.1} {:>7.3} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7.0}\n",
        r.sent,
        r.received,
        r.pps,
        r.mbps,
        r.loss * 100.0,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.max_us,
        r.server_cpu_percent
            .map(|c| format!("{c:.0}"))
            .unwrap_or_else(|| "-".into()),
        r.server_cpu_us_per_packet
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "-".into()),
        r.generator_cpu_percent
    ));
    if let Some(trials) = &r.trials {
        s.push_str(&format!(
            "max-rate search ({} trials): {}\n",
            trials.len(),
            if r.found == Some(true) {
                format!("best {:.0} pps delivered at {} offered", r.pps, r.rate)
            } else {
                "no rate passed the loss limit".to_string()
            }
        ));
        for t in trials {
            s.push_str(&format!(
                "  offered {:>9}  delivered {:>11.0} pps  loss {:>7.3}%  p99 {:>7} µs\n",
                t.rate,
                t.pps,
                t.loss * 100.0,
                t.p99_us
            ));
        }
    }
    s
}

/// Keeps [`sys`] linked for callers that only use this module.
pub fn raise_limits() -> u64 {
    sys::raise_nofile_limit()
}
