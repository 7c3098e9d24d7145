//! Rendezvous load: many QUIC clients register, watch a partner and exchange offers.
//!
//! The load generator speaks the rendezvous protocol ([`meshpunch_proto::wire`]) itself with a
//! lean client per simulated peer, many of them sharing one QUIC endpoint (one UDP socket):
//! that is what lets one process hold tens of thousands of registered clients. Each client:
//!
//! 1. connects (TLS 1.3, server certificate checked against the connect string's pin),
//! 2. opens the control stream and runs the handshake of
//!    [`meshpunch_proto::session::ClientSession`] (`Hello`, the key proof for the `Challenge`
//!    bound to the TLS exporter, `Registered`) — the registration latency; later
//!    re-authentication challenges are answered by the same session;
//! 3. watches its partner (clients are paired 0↔1, 2↔3, …);
//! 4. offers to its partner when told to; the partner answers every `IncomingOffer` at once;
//!    the offer round trip is the time from sending `Offer` to receiving `PunchStart`.
//!
//! With `--server-pid` the server's RSS is read before the first client and after the last
//! registration: the delta divided by the number of registered clients is the memory each
//! connected client costs the server.
//!
//! Per-IP limits of the server (connections, registrations/s) are honoured by spreading the
//! endpoints over many loopback source addresses (127.0.1.1, 127.0.1.2, …) when the server
//! is on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::session::{ClientEvent, ClientSession};
use meshpunch_proto::wire::{
    self, Answer, Candidate, CandidateKind, FrameDecoder, Message, Offer, PeerKey,
};
use serde::Serialize;
use tokio::sync::mpsc;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::engine::Progress;
use crate::progress::Bar;
use crate::sys;

/// Options of a rendezvous run.
#[derive(Debug, Clone)]
pub struct RendezvousOptions {
    /// Connect string of the server (`meshpunch://TOKEN@host:port?pin=…`).
    pub connect: String,
    /// Clients to register and keep connected.
    pub clients: usize,
    /// New connections per second (0 = as fast as allowed by `concurrency`).
    pub rate: f64,
    /// Connection attempts in flight at once.
    pub concurrency: usize,
    /// Offers to exchange after everyone registered (each between a pair of clients).
    pub offers: usize,
    /// Offers sent per second.
    pub offer_rate: f64,
    /// Clients per QUIC endpoint (UDP socket).
    pub clients_per_endpoint: usize,
    /// Spread endpoints over loopback source addresses 127.0.1.x (per-IP server limits).
    pub spread_source_ips: bool,
    /// Server pid, for RSS per client.
    pub server_pid: Option<u32>,
    /// How long to hold everyone connected after the offers (RSS is sampled at the end).
    pub hold: Duration,
    /// Give up on a client's registration after this long.
    pub timeout: Duration,
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        RendezvousOptions {
            connect: String::new(),
            clients: 100,
            rate: 0.0,
            concurrency: 256,
            offers: 100,
            offer_rate: 500.0,
            clients_per_endpoint: 32,
            spread_source_ips: true,
            server_pid: None,
            hold: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a rendezvous run measured (JSON keys are stable).
#[derive(Debug, Clone, Serialize)]
pub struct RendezvousReport {
    /// Server address.
    pub server: String,
    /// Clients asked for.
    pub clients: usize,
    /// Clients that completed registration.
    pub registered: u64,
    /// Registrations (or connections) that failed.
    pub failures: u64,
    /// First few distinct failure reasons.
    pub failure_reasons: Vec<String>,
    /// Seconds from the first connection attempt to the last registration.
    pub register_seconds: f64,
    /// Completed registrations per second.
    pub registrations_per_sec: f64,
    /// Registration latency (connect + Hello → Registered) p50, µs.
    pub register_p50_us: u64,
    /// Registration latency p99, µs.
    pub register_p99_us: u64,
    /// Offers sent.
    pub offers: u64,
    /// Offers answered (PunchStart received by the offerer).
    pub offers_ok: u64,
    /// Offers refused or timed out.
    pub offers_failed: u64,
    /// Offer round trip (Offer sent → PunchStart) p50, µs.
    pub offer_rtt_p50_us: u64,
    /// Offer round trip p90, µs.
    pub offer_rtt_p90_us: u64,
    /// Offer round trip p99, µs.
    pub offer_rtt_p99_us: u64,
    /// Offer round trip max, µs.
    pub offer_rtt_max_us: u64,
    /// Presence notifications received.
    pub presence_events: u64,
    /// Server RSS before the first client, KiB.
    pub server_rss_before_kib: Option<u64>,
    /// Server RSS with every client registered, KiB.
    pub server_rss_after_kib: Option<u64>,
    /// (after − before) / registered, bytes.
    pub server_rss_per_client_bytes: Option<u64>,
    /// Server CPU seconds spent during the run.
    pub server_cpu_seconds: Option<f64>,
    /// Load generator RSS with every client registered, KiB.
    pub generator_rss_kib: Option<u64>,
    /// QUIC endpoints (UDP sockets) used by the generator.
    pub endpoints: usize,
}

/// Errors that stop a rendezvous run before it starts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RendezvousError {
    /// The connect string did not parse.
    #[error("connect string: {0}")]
    Connect(String),
    /// The host did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// TLS / QUIC setup failed.
    #[error("setup: {0}")]
    Setup(String),
}

/// The same QUIC/TLS client config as real clients (TLS 1.3, ALPN, certificate pin).
fn client_config(
    pins: &[meshpunch_proto::connect::Pin],
) -> Result<quinn::ClientConfig, RendezvousError> {
    meshpunch::rendezvous::quic_client_config(pins, &[])
        .map_err(|e| RendezvousError::Setup(e.to_string()))
}

#[derive(Default)]
struct Shared {
    registered: AtomicU64,
    failures: AtomicU64,
    offers_ok: AtomicU64,
    offers_failed: AtomicU64,
    presence: AtomicU64,
    reasons: Mutex<Vec<String>>,
    register_hist: Mutex<Option<Histogram<u64>>>,
    offer_hist: Mutex<Option<Histogram<u64>>>,
}

impl Shared {
    fn fail(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.reasons.lock() {
            if r.len() < 5 && !r.contains(&why) {
                r.push(why);
            }
        }
    }
    fn record(hist: &Mutex<Option<Histogram<u64>>>, us: u64) {
        if let Ok(mut h) = hist.lock() {
            if h.is_none() {
                *h = Histogram::new_with_bounds(1, 600_000_000, 3).ok();
            }
            if let Some(h) = h.as_mut() {
                h.saturating_record(us.max(1));
            }
        }
    }
}

fn quantiles(hist: &Mutex<Option<Histogram<u64>>>) -> (u64, u64, u64, u64) {
    match hist.lock().ok().as_deref().and_then(|h| h.as_ref()) {
        Some(h) if !h.is_empty() => (
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.max(),
        ),
        _ => (0, 0, 0, 0),
    }
}

async fn send(stream: &mut quinn::SendStream, m: &Message) -> Result<(), String> {
    stream
        .write_all(&m.encode())
        .await
        .map_err(|e| format!("write: {e}"))
}

async fn next_message(
    stream: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Message, String> {
    loop {
        match dec.next_message() {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(format!("wire: {e}")),
        }
        match stream.read(buf).await {
            Ok(Some(n)) => dec.push(&buf[..n]),
            Ok(None) => return Err("server closed the control stream".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

struct Registered {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    core: ClientSession,
}

/// Sends what the session queued; `Err` when the server ended the session.
async fn flush(core: &mut ClientSession, send_s: &mut quinn::SendStream) -> Result<(), String> {
    while let Some(m) = core.poll_transmit() {
        send(send_s, &m).await?;
    }
    while let Some(ev) = core.poll_event() {
        match ev {
            ClientEvent::Refused(e) => {
                return Err(format!(
                    "refused: {:?} {:?} {}",
                    e.code, e.reason, e.message
                ))
            }
            ClientEvent::Protocol(p) => return Err(format!("protocol: {p}")),
            _ => {}
        }
    }
    Ok(())
}

async fn register(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    cs: &ConnectString,
    secret: &StaticSecret,
) -> Result<Registered, String> {
    let conn = endpoint
        .connect(server, &cs.host)
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send_s, mut recv_s) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
    let mut exporter = [0u8; wire::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
        .map_err(|_| "TLS exporter unavailable".to_string())?;
    let mut core = ClientSession::new(
        cs.token.clone(),
        secret.clone(),
        format!("meshpunch-loadtest/{}", env!("CARGO_PKG_VERSION")),
        exporter,
    );
    let mut dec = FrameDecoder::new(wire::MAX_FRAME_LEN);
    let mut buf = vec![0u8; 4096];
    flush(&mut core, &mut send_s).await?;
    while !core.is_registered() {
        let m = next_message(&mut recv_s, &mut dec, &mut buf).await?;
        let _ = core.handle_message(m);
        flush(&mut core, &mut send_s).await?;
    }
    Ok(Registered {
        conn,
        send: send_s,
        recv: recv_s,
        dec,
        core,
    })
}

enum Command {
    Offer { id: u64, to: PeerKey },
}

/// Runs the session of one registered client until `cmds` closes: answers incoming offers,
/// sends offers on command and records their round trip.
async fn session(mut r: Registered, mut cmds: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    let mut pending: Vec<(u64, Instant)> = Vec::new();
    let candidate = Candidate {
        addr: r.conn.local_ip().map_or_else(
            || SocketAddr::from(([127, 0, 0, 1], 51820)),
            |ip| SocketAddr::new(ip, 51820),
        ),
        kind: CandidateKind::Host,
        priority: 100,
    };
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Command::Offer { id, to }) => {
                    pending.push((id, Instant::now()));
                    let m = Message::Offer(Offer { id, peer: to, candidates: vec![candidate] });
                    if send(&mut r.send, &m).await.is_err() {
                        shared.offers_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            m = next_message(&mut r.recv, &mut r.dec, &mut buf) => match m.map(|m| r.core.handle_message(m)) {
                // Re-authentication challenges and session-ending errors: the session's.
                Ok(None) => {
                    if let Err(e) = flush(&mut r.core, &mut r.send).await {
                        shared.fail(format!("session: {e}"));
                        break;
                    }
                }
                Ok(Some(Message::IncomingOffer(o))) => {
                    let a = Message::Answer(Answer { offer_id: o.offer_id, candidates: vec![candidate] });
                    let _ = send(&mut r.send, &a).await;
                }
                Ok(Some(Message::PunchStart(p))) if p.initiator => {
                    if let Some(i) = pending.iter().position(|(id, _)| *id == p.id) {
                        let (_, at) = pending.swap_remove(i);
                        Shared::record(&shared.offer_hist, at.elapsed().as_micros() as u64);
                        shared.offers_ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Message::Error(e))) => {
                    if let Some(i) = pending.iter().position(|(id, _)| *id == e.id) {
                        pending.swap_remove(i);
                        shared.offers_failed.fetch_add(1, Ordering::Relaxed);
                        shared.fail(format!("offer refused: {:?} {}", e.code, e.message));
                    }
                }
                Ok(Some(Message::Presence { .. })) => {
                    shared.presence.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    shared.fail(format!("session: {e}"));
                    break;
                }
            },
        }
    }
    shared
        .offers_failed
        .fetch_add(pending.len() as u64, Ordering::Relaxed);
    r.conn.close(0u32.into(), b"loadtest done");
}

fn source_ip(server: SocketAddr, spread: bool, endpoint_index: usize) -> IpAddr {
    match server.ip() {
        IpAddr::V4(ip) if ip.is_loopback() && spread => {
            // 127.0.1.1 … 127.0.255.254: 254 × 255 addresses.
            let i = endpoint_index % (254 * 255);
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                1 + (i / 254) as u8,
                1 + (i % 254) as u8,
            ))
        }
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Runs the whole rendezvous load and returns its report.
pub fn run(opts: &RendezvousOptions) -> Result<RendezvousReport, RendezvousError> {
    sys::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RendezvousError::Setup(e.to_string()))?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &RendezvousOptions) -> Result<RendezvousReport, RendezvousError> {
    let cs = ConnectString::from_str(opts.connect.trim())
        .map_err(|e| RendezvousError::Connect(e.to_string()))?;
    let server = (cs.host.as_str(), cs.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| RendezvousError::Resolve(cs.host.clone()))?;
    let cfg = client_config(&cs.pins)?;
    let cs = Arc::new(cs);
    let n = opts.clients.max(2);
    let per = opts.clients_per_endpoint.max(1);
    let endpoint_count = n.div_ceil(per);
    let mut endpoints = Vec::with_capacity(endpoint_count);
    for i in 0..endpoint_count {
        let bind = SocketAddr::new(source_ip(server, opts.spread_source_ips, i), 0);
        let mut ep = quinn::Endpoint::client(bind)
            .map_err(|e| RendezvousError::Setup(format!("{bind}: {e}")))?;
        ep.set_default_client_config(cfg.clone());
        endpoints.push(ep);
    }

    let shared = Arc::new(Shared::default());
    let rss_before = opts.server_pid.and_then(sys::rss_kib);
    let cpu_before = opts.server_pid.and_then(sys::cpu_time);
    let secrets: Vec<StaticSecret> = (0..n)
        .map(|_| StaticSecret::random_from_rng(rand::rngs::OsRng))
        .collect();
    let keys: Vec<PeerKey> = secrets
        .iter()
        .map(|s| PeerKey::from(PublicKey::from(s)))
        .collect();

    // Phase 1: connect and register everyone, paced and bounded.
    let progress = Arc::new(Progress::default());
    let expected = if opts.rate > 0.0 {
        Duration::from_secs_f64(n as f64 / opts.rate)
    } else {
        Duration::from_secs(n as u64 / 500)
    };
    let bar = Bar::start("register", expected, progress.clone());
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let started = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for (i, secret) in secrets.into_iter().enumerate() {
        if opts.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / opts.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let ep = endpoints[i / per].clone();
        let cs = cs.clone();
        let shared = shared.clone();
        let progress_task = progress.clone();
        let timeout = opts.timeout;
        joins.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = tokio::time::timeout(timeout, register(&ep, server, &cs, &secret)).await;
            drop(permit);
            match r {
                Ok(Ok(reg)) => {
                    Shared::record(&shared.register_hist, t0.elapsed().as_micros() as u64);
                    shared.registered.fetch_add(1, Ordering::Relaxed);
                    progress_task.received.fetch_add(1, Ordering::Relaxed);
                    Some(reg)
                }
                Ok(Err(e)) => {
                    shared.fail(e);
                    None
                }
                Err(_) => {
                    shared.fail("registration timed out".into());
                    None
                }
            }
        }));
        progress.sent.fetch_add(1, Ordering::Relaxed);
    }
    let mut regs: Vec<Option<Registered>> = Vec::with_capacity(n);
    for j in joins {
        regs.push(j.await.ok().flatten());
    }
    let register_seconds = started.elapsed().as_secs_f64();
    bar.finish();
    let registered = shared.registered.load(Ordering::Relaxed);

    // Phase 2: watch the partner, start sessions.
    let mut senders: Vec<Option<mpsc::Sender<Command>>> = Vec::with_capacity(n);
    let mut sessions = Vec::new();
    for (i, reg) in regs.into_iter().enumerate() {
        match reg {
            Some(mut r) => {
                let partner = keys[(i ^ 1).min(n - 1)];
                let _ = send(&mut r.send, &Message::Watch(vec![partner])).await;
                let (tx, rx) = mpsc::channel(16);
                sessions.push(tokio::spawn(session(r, rx, shared.clone())));
                senders.push(Some(tx));
            }
            None => senders.push(None),
        }
    }
    // Let the watches settle before sampling memory and timing offers: every registered
    // client expects one Presence for its partner; wait until they stop arriving (the server
    // may still be working through tens of thousands of Watch requests).
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = shared.presence.load(Ordering::Relaxed);
        if now == last || now >= registered {
            break;
        }
        last = now;
    }
    let rss_after = opts.server_pid.and_then(sys::rss_kib);
    let generator_rss = sys::rss_kib(std::process::id());

    // Phase 3: offers between registered pairs.
    let pairs: Vec<usize> = (0..n / 2)
        .filter(|p| senders[2 * p].is_some() && senders[2 * p + 1].is_some())
        .collect();
    let mut offers = 0u64;
    if !pairs.is_empty() {
        let t0 = Instant::now();
        for k in 0..opts.offers {
            if opts.offer_rate > 0.0 {
                let due = t0 + Duration::from_secs_f64(k as f64 / opts.offer_rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let p = pairs[k % pairs.len()];
            if let Some(tx) = &senders[2 * p] {
                let cmd = Command::Offer {
                    id: k as u64 + 1,
                    to: keys[2 * p + 1],
                };
                if tx.send(cmd).await.is_ok() {
                    offers += 1;
                }
            }
        }
        // Wait for the answers (bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && shared.offers_ok.load(Ordering::Relaxed)
                + shared.offers_failed.load(Ordering::Relaxed)
                < offers
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if !opts.hold.is_zero() {
        tokio::time::sleep(opts.hold).await;
    }
    let rss_after = opts
        .server_pid
        .and_then(sys::rss_kib)
        .map(|now| now.max(rss_after.unwrap_or(0)));
    let cpu_after = opts.server_pid.and_then(sys::cpu_time);
    drop(senders);
    for s in sessions {
        let _ = s.await;
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"done");
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }

    let (rp50, _, rp99, _) = quantiles(&shared.register_hist);
    let (op50, op90, op99, omax) = quantiles(&shared.offer_hist);
    let per_client = match (rss_before, rss_after) {
        (Some(b), Some(a)) if registered > 0 => Some(a.saturating_sub(b) * 1024 / registered),
        _ => None,
    };
    Ok(RendezvousReport {
        server: server.to_string(),
        clients: n,
        registered,
        failures: shared.failures.load(Ordering::Relaxed),
        failure_reasons: shared.reasons.lock().map(|r| r.clone()).unwrap_or_default(),
        register_seconds,
        registrations_per_sec: registered as f64 / register_seconds.max(1e-9),
        register_p50_us: rp50,
        register_p99_us: rp99,
        offers,
        offers_ok: shared.offers_ok.load(Ordering::Relaxed),
        offers_failed: shared.offers_failed.load(Ordering::Relaxed),
        offer_rtt_p50_us: op50,
        offer_rtt_p90_us: op90,
        offer_rtt_p99_us: op99,
        offer_rtt_max_us: omax,
        presence_events: shared.presence.load(Ordering::Relaxed),
        server_rss_before_kib: rss_before,
        server_rss_after_kib: rss_after,
        server_rss_per_client_bytes: per_client,
        server_cpu_seconds: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b).as_secs_f64()),
            _ => None,
        },
        generator_rss_kib: generator_rss,
        endpoints: endpoint_count,
    })
}

/// The table people read.
pub fn table(r: &RendezvousReport) -> String {
    let mut s = format!(
        "rendezvous {}  clients {}  endpoints {}\n",
        r.server, r.clients, r.endpoints
    );
    s.push_str(&format!(
        "registered {} / {} in {:.2} s = {:.0}/s  (p50 {} µs, p99 {} µs)  failures {}\n",
        r.registered,
        r.clients,
        r.register_seconds,
        r.registrations_per_sec,
        r.register_p50_us,
        r.register_p99_us,
        r.failures
    ));
    s.push_str(&format!(
        "offers {} ok {} failed {}  round trip p50 {} µs  p90 {} µs  p99 {} µs  max {} µs\n",
        r.offers,
        r.offers_ok,
        r.offers_failed,
        r.offer_rtt_p50_us,
        r.offer_rtt_p90_us,
        r.offer_rtt_p99_us,
        r.offer_rtt_max_us
    ));
    if let (Some(b), Some(a)) = (r.server_rss_before_kib, r.server_rss_after_kib) {
        s.push_str(&format!(
            "server RSS {} KiB → {} KiB  = {} bytes per registered client\n",
            b,
            a,
            r.server_rss_per_client_bytes.unwrap_or(0)
        ));
    }
    for why in &r.failure_reasons {
        s.push_str(&format!("  failure: {why}\n"));
    }
    s
}
