//! Time to direct: from "connect to peer" to the first authenticated direct reply, over many
//! pairs of real rendezvous clients.
//!
//! Each pair is two [`meshpunch::rendezvous::Client`]s registered on the rendezvous, each with
//! its own UDP data socket. A offers to B with its data-socket candidate; B answers with its
//! own; both get the same session secret and start time. At the start time both sides send
//! authenticated probes ([`meshpunch_proto::probe`], keys derived from the session secret and
//! each sender's public key) to every candidate of the other every 25 ms and answer every
//! authenticated ping with a pong. A's time to direct is the time from calling `offer` to the
//! first authenticated pong from B; it is split into the offer round trip (offer → punch
//! signal), the wait for the common start time, and the probe exchange.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use meshpunch::rendezvous::{Client, ClientConfig, Event, Punch};
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::probe::{self, ProbeBody, ProbeKey, ProbeReceiver, ProbeSender};
use meshpunch_proto::wire::{Candidate, CandidateKind, PeerKey};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use x25519_dalek::StaticSecret;

use crate::engine::Progress;
use crate::progress::Bar;

/// Probe interval while punching.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// Options of a punch run.
#[derive(Debug, Clone)]
pub struct PunchOptions {
    /// Connect string of the rendezvous.
    pub connect: String,
    /// Pairs to punch.
    pub pairs: usize,
    /// Pairs punching at the same time.
    pub concurrency: usize,
    /// Give up on a pair after this long.
    pub timeout: Duration,
}

impl Default for PunchOptions {
    fn default() -> Self {
        PunchOptions {
            connect: String::new(),
            pairs: 20,
            concurrency: 8,
            timeout: Duration::from_secs(20),
        }
    }
}

/// What a punch run measured (JSON keys are stable).
#[derive(Debug, Clone, Serialize)]
pub struct PunchReport {
    /// Pairs tried.
    pub pairs: usize,
    /// Pairs that got an authenticated direct reply.
    pub direct: u64,
    /// Pairs that did not.
    pub failed: u64,
    /// First few distinct failure reasons.
    pub failure_reasons: Vec<String>,
    /// Time to direct (offer call → first authenticated pong) p50, µs.
    pub ttd_p50_us: u64,
    /// Time to direct p90, µs.
    pub ttd_p90_us: u64,
    /// Time to direct p99, µs.
    pub ttd_p99_us: u64,
    /// Time to direct max, µs.
    pub ttd_max_us: u64,
    /// Offer round trip (offer call → punch signal) p50, µs.
    pub offer_rtt_p50_us: u64,
    /// Offer round trip p99, µs.
    pub offer_rtt_p99_us: u64,
    /// Wait for the common start time p50, µs.
    pub start_wait_p50_us: u64,
    /// Probe exchange (start → first authenticated pong) p50, µs.
    pub probe_p50_us: u64,
    /// Probe exchange p99, µs.
    pub probe_p99_us: u64,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

/// Errors that stop a punch run before it starts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PunchError {
    /// The connect string did not parse.
    #[error("connect string: {0}")]
    Connect(String),
    /// Runtime setup failed.
    #[error("setup: {0}")]
    Setup(String),
}

struct Timings {
    total: Duration,
    offer: Duration,
    wait: Duration,
    probe: Duration,
}

fn unix_ms() -> u64 {
    meshpunch_proto::clock::unix_ms(SystemTime::now())
}

fn host_candidate(sock: &UdpSocket) -> Result<Candidate, String> {
    Ok(Candidate {
        addr: sock.local_addr().map_err(|e| e.to_string())?,
        kind: CandidateKind::Host,
        priority: 100,
    })
}

/// Probes the peer's candidates from `sock` and answers its pings until the first
/// authenticated pong arrives; returns when it did. Keeps answering for `linger` afterwards so
/// the other side gets its pong too.
async fn probe_until_direct(
    sock: &UdpSocket,
    punch: &Punch,
    me: PeerKey,
    linger: Duration,
    deadline: Instant,
) -> Result<Instant, String> {
    let mut sender = ProbeSender::new(ProbeKey::derive(&punch.session_secret, &me.0));
    let mut receiver = ProbeReceiver::new(ProbeKey::derive(&punch.session_secret, &punch.peer.0));
    let targets: Vec<SocketAddr> = punch.peer_candidates.iter().map(|c| c.addr).collect();
    let mut out = Vec::with_capacity(probe::MAX_PROBE_LEN);
    let mut buf = [0u8; 1500];
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    let mut direct_at: Option<Instant> = None;
    let mut tx_n: u64 = 0;
    loop {
        let stop = match direct_at {
            Some(t) => t + linger,
            None => deadline,
        };
        tokio::select! {
            _ = tick.tick(), if direct_at.is_none() => {
                tx_n += 1;
                let mut tx = [0u8; 12];
                tx[..8].copy_from_slice(&tx_n.to_be_bytes());
                sender.seal(unix_ms(), &ProbeBody::Ping { tx }, &mut out);
                for t in &targets {
                    let _ = sock.send_to(&out, *t).await;
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Ok(p) = receiver.open(unix_ms(), &buf[..n]) else { continue };
                match p.body {
                    ProbeBody::Ping { tx } => {
                        sender.seal(unix_ms(), &ProbeBody::Pong { tx, observed: from }, &mut out);
                        let _ = sock.send_to(&out, from).await;
                    }
                    // The loadtest never sends sized pings; a peer's path MTU probe is
                    // answered as the client would.
                    ProbeBody::SizedPing { tx, size } => {
                        sender.seal(unix_ms(), &ProbeBody::SizedPong { tx, observed: from, size }, &mut out);
                        let _ = sock.send_to(&out, from).await;
                    }
                    ProbeBody::Pong { .. } | ProbeBody::SizedPong { .. } => {
                        if direct_at.is_none() {
                            direct_at = Some(Instant::now());
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(stop) => {
                return direct_at.ok_or_else(|| "no authenticated reply before the deadline".to_string());
            }
        }
    }
}

/// The address simulated host `n` binds to: its own loopback address (127.1.x.y) when the
/// rendezvous is on loopback, so the server's per-IP limits apply per host as in production.
fn host_ip(cs: &ConnectString, n: usize) -> IpAddr {
    match cs.host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_loopback() => {
            let i = n % (254 * 255);
            IpAddr::V4(Ipv4Addr::new(127, 1, (i / 254) as u8, 1 + (i % 254) as u8))
        }
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

async fn connect_client(
    cs: &ConnectString,
    ip: IpAddr,
) -> Result<(Client, meshpunch::rendezvous::Events), String> {
    let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let mut cfg = ClientConfig::new(cs.clone(), secret);
    if !ip.is_unspecified() {
        cfg.socket = Some(
            std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?,
        );
    }
    Client::connect(cfg)
        .await
        .map_err(|e| format!("register: {e}"))
}

async fn one_pair(cs: &ConnectString, pair: usize, timeout: Duration) -> Result<Timings, String> {
    let a_ip = host_ip(cs, 2 * pair);
    let b_ip = host_ip(cs, 2 * pair + 1);
    let (a, _a_events) = connect_client(cs, a_ip).await?;
    let (b, mut b_events) = connect_client(cs, b_ip).await?;
    let data_ip = |ip: IpAddr| {
        if ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            ip
        }
    };
    let a_sock = UdpSocket::bind(SocketAddr::new(data_ip(a_ip), 0))
        .await
        .map_err(|e| e.to_string())?;
    let b_sock = UdpSocket::bind(SocketAddr::new(data_ip(b_ip), 0))
        .await
        .map_err(|e| e.to_string())?;
    let a_cand = host_candidate(&a_sock)?;
    let b_cand = host_candidate(&b_sock)?;
    let a_key = a.public_key();
    let b_key = b.public_key();
    let deadline = Instant::now() + timeout;

    // B: answer the offer, then punch back.
    let responder = tokio::spawn(async move {
        let offer = loop {
            match tokio::time::timeout_at(deadline, b_events.recv()).await {
                Ok(Some(Event::IncomingOffer(o))) => break o,
                Ok(Some(_)) => continue,
                Ok(None) => return Err("B's event stream ended".to_string()),
                Err(_) => return Err("B never saw the offer".to_string()),
            }
        };
        let punch = offer
            .answer(vec![b_cand])
            .await
            .map_err(|e| format!("answer: {e}"))?;
        tokio::time::sleep_until(punch.start_at).await;
        probe_until_direct(&b_sock, &punch, b_key, Duration::from_millis(300), deadline).await?;
        drop(b);
        Ok::<(), String>(())
    });

    let t0 = Instant::now();
    let punch = a
        .offer(b_key, vec![a_cand])
        .await
        .map_err(|e| format!("offer: {e}"))?;
    let t_punch = Instant::now();
    tokio::time::sleep_until(punch.start_at).await;
    let t_start = Instant::now();
    let t_direct =
        probe_until_direct(&a_sock, &punch, a_key, Duration::from_millis(300), deadline).await?;
    let _ = responder.await;
    a.close();
    Ok(Timings {
        total: t_direct - t0,
        offer: t_punch - t0,
        wait: t_start - t_punch,
        probe: t_direct.saturating_duration_since(t_start),
    })
}

#[derive(Default)]
struct Hists {
    total: Option<Histogram<u64>>,
    offer: Option<Histogram<u64>>,
    wait: Option<Histogram<u64>>,
    probe: Option<Histogram<u64>>,
}

fn rec(h: &mut Option<Histogram<u64>>, d: Duration) {
    if h.is_none() {
        *h = Histogram::new_with_bounds(1, 600_000_000, 3).ok();
    }
    if let Some(h) = h.as_mut() {
        h.saturating_record((d.as_micros() as u64).max(1));
    }
}

fn q(h: &Option<Histogram<u64>>, p: f64) -> u64 {
    match h {
        Some(h) if !h.is_empty() => h.value_at_quantile(p),
        _ => 0,
    }
}

/// Runs the punch measurement and returns its report.
pub fn run(opts: &PunchOptions) -> Result<PunchReport, PunchError> {
    let cs = ConnectString::from_str(opts.connect.trim())
        .map_err(|e| PunchError::Connect(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PunchError::Setup(e.to_string()))?;
    rt.block_on(async {
        let started = std::time::Instant::now();
        let hists = Arc::new(Mutex::new(Hists::default()));
        let reasons = Arc::new(Mutex::new(Vec::<String>::new()));
        let progress = Arc::new(Progress::default());
        let bar = Bar::start(
            "punch",
            Duration::from_millis(200) * opts.pairs as u32 / opts.concurrency.max(1) as u32,
            progress.clone(),
        );
        let sem = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
        let mut joins = Vec::new();
        for pair in 0..opts.pairs {
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            let cs = cs.clone();
            let hists = hists.clone();
            let reasons = reasons.clone();
            let progress = progress.clone();
            let timeout = opts.timeout;
            joins.push(tokio::spawn(async move {
                let r = one_pair(&cs, pair, timeout).await;
                drop(permit);
                progress
                    .sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r {
                    Ok(t) => {
                        progress
                            .received
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Ok(mut h) = hists.lock() {
                            rec(&mut h.total, t.total);
                            rec(&mut h.offer, t.offer);
                            rec(&mut h.wait, t.wait);
                            rec(&mut h.probe, t.probe);
                        }
                        true
                    }
                    Err(e) => {
                        if let Ok(mut r) = reasons.lock() {
                            if r.len() < 5 && !r.contains(&e) {
                                r.push(e);
                            }
                        }
                        false
                    }
                }
            }));
        }
        let mut direct = 0u64;
        let mut failed = 0u64;
        for j in joins {
            match j.await {
                Ok(true) => direct += 1,
                _ => failed += 1,
            }
        }
        bar.finish();
        let h = hists.lock().map(|h| {
            (
                [
                    q(&h.total, 0.5),
                    q(&h.total, 0.9),
                    q(&h.total, 0.99),
                    q(&h.total, 1.0),
                ],
                [q(&h.offer, 0.5), q(&h.offer, 0.99)],
                q(&h.wait, 0.5),
                [q(&h.probe, 0.5), q(&h.probe, 0.99)],
            )
        });
        let (total, offer, wait, probe) = h.unwrap_or(([0; 4], [0; 2], 0, [0; 2]));
        Ok(PunchReport {
            pairs: opts.pairs,
            direct,
            failed,
            failure_reasons: reasons.lock().map(|r| r.clone()).unwrap_or_default(),
            ttd_p50_us: total[0],
            ttd_p90_us: total[1],
            ttd_p99_us: total[2],
            ttd_max_us: total[3],
            offer_rtt_p50_us: offer[0],
            offer_rtt_p99_us: offer[1],
            start_wait_p50_us: wait,
            probe_p50_us: probe[0],
            probe_p99_us: probe[1],
            seconds: started.elapsed().as_secs_f64(),
        })
    })
}

/// The table people read.
pub fn table(r: &PunchReport) -> String {
    let mut s = format!(
        "punch: {} pairs, {} direct, {} failed in {:.2} s\n",
        r.pairs, r.direct, r.failed, r.seconds
    );
    s.push_str(&format!(
        "time to direct  p50 {} µs  p90 {} µs  p99 {} µs  max {} µs\n",
        r.ttd_p50_us, r.ttd_p90_us, r.ttd_p99_us, r.ttd_max_us
    ));
    s.push_str(&format!(
        "  = offer round trip p50 {} µs (p99 {})  + start wait p50 {} µs  + probes p50 {} µs (p99 {})\n",
        r.offer_rtt_p50_us, r.offer_rtt_p99_us, r.start_wait_p50_us, r.probe_p50_us, r.probe_p99_us
    ));
    for why in &r.failure_reasons {
        s.push_str(&format!("  failure: {why}\n"));
    }
    s
}
