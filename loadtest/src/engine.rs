//! The measurement engine: paced batched senders, batched receivers, loss and latency.
//!
//! A trial pushes datagrams at a fixed rate from a set of [`Flow`]s (one client socket each,
//! connected to the server under test) and counts them where they come out (the peer
//! sockets). Every datagram carries, after the flow's framing prefix (a ChannelData header
//! for TURN, nothing for a direct run), a 24-byte stamp:
//!
//! ```text
//! 0      4       8              16             24
//! | tag  | flow  |   sequence   | send time ns |  padding up to --size
//! ```
//!
//! `tag` is random per trial so that late datagrams of an earlier trial never count; the send
//! time is nanoseconds since a monotonic epoch shared by sender and receivers, so the one-way
//! latency through the server is exact on one host.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::udp::{self, RecvBatch, SendBatch, BATCH, MAX_DATAGRAM};

/// Bytes of the stamp every load datagram carries after its framing prefix.
pub const STAMP_LEN: usize = 24;

/// Shortest pause of the sender between batches.
const MIN_SLEEP: Duration = Duration::from_micros(100);

/// Largest `--size` a trial accepts (payload bytes seen by the peer).
pub const MAX_SIZE: usize = MAX_DATAGRAM - 8;

/// How datagrams are framed on the way to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The payload as is (direct to a peer, or a forwarder with a fixed target).
    Raw,
    /// RFC 8656 §12.4 ChannelData: 2-byte channel number, 2-byte length, then the payload
    /// (no padding: over UDP it is optional and sizes here are multiples of 4 anyway).
    ChannelData(u16),
}

impl Framing {
    fn write_prefix(self, buf: &mut [u8], payload_len: usize) -> usize {
        match self {
            Framing::Raw => 0,
            Framing::ChannelData(ch) => {
                buf[0..2].copy_from_slice(&ch.to_be_bytes());
                buf[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
                4
            }
        }
    }
}

/// One sending client: a socket connected to the server (or peer) and its framing.
#[derive(Debug)]
pub struct Flow {
    /// Socket `connect`ed to where the datagrams go.
    pub sock: UdpSocket,
    /// Prefix written before each stamped payload.
    pub framing: Framing,
}

/// What one trial does.
#[derive(Debug, Clone, Copy)]
pub struct TrialSpec {
    /// Target datagrams per second over all flows.
    pub rate: u64,
    /// Payload bytes per datagram as the peer receives it (≥ [`STAMP_LEN`]).
    pub size: usize,
    /// How long to send.
    pub duration: Duration,
    /// How long to keep receiving after the last send.
    pub drain: Duration,
}

/// Measured outcome of one trial.
#[derive(Debug, Clone, Serialize)]
pub struct TrialResult {
    /// Offered rate (datagrams/s over all flows).
    pub rate: u64,
    /// Payload bytes per datagram.
    pub size: usize,
    /// Datagrams accepted by the kernel on the sending side.
    pub sent: u64,
    /// Datagrams of this trial received at the peers.
    pub received: u64,
    /// Sends refused by the kernel.
    pub send_errors: u64,
    /// Seconds spent sending.
    pub seconds: f64,
    /// Achieved send rate (datagrams/s).
    pub sent_pps: f64,
    /// Delivered datagrams per second (received / seconds).
    pub pps: f64,
    /// Delivered payload megabits per second.
    pub mbps: f64,
    /// Fraction of sent datagrams not received (0..1).
    pub loss: f64,
    /// One-way latency percentiles through the server, microseconds.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
}

/// Live counters a progress display may read while a trial runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Datagrams sent so far.
    pub sent: AtomicU64,
    /// Datagrams received so far.
    pub received: AtomicU64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: constant, valid bounds.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

struct RecvOutcome {
    received: u64,
    hist: Histogram<u64>,
}

fn receiver(
    sock: UdpSocket,
    tag: u32,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> (UdpSocket, RecvOutcome) {
    let mut batch = RecvBatch::new();
    let mut hist = new_histogram();
    let mut received = 0u64;
    let _ = udp::set_read_timeout(&sock, Duration::from_millis(50));
    while !stop.load(Ordering::Relaxed) {
        let n = match batch.recv(&sock) {
            Ok(n) => n,
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if n == 0 {
            continue;
        }
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let mut mine = 0u64;
        for i in 0..n {
            let d = batch.get(i);
            if d.len() < STAMP_LEN || d[0..4] != tag.to_be_bytes() {
                continue;
            }
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&d[16..24]);
            let sent_ns = u64::from_be_bytes(ts);
            let us = now_ns.saturating_sub(sent_ns) / 1000;
            hist.saturating_record(us.max(1));
            mine += 1;
        }
        received += mine;
        progress.received.fetch_add(mine, Ordering::Relaxed);
    }
    (sock, RecvOutcome { received, hist })
}

struct SendOutcome {
    sent: u64,
    errors: u64,
    seconds: f64,
}

fn sender(
    flows: &[Flow],
    spec: TrialSpec,
    tag: u32,
    epoch: Instant,
    progress: &Progress,
) -> SendOutcome {
    let mut batch = SendBatch::new();
    let size = spec.size.clamp(STAMP_LEN, MAX_SIZE);
    // Pre-fill the constant part of every slot: padding and tag.
    for i in 0..BATCH {
        let slot = batch.slot(i);
        for (j, b) in slot.iter_mut().enumerate() {
            *b = j as u8;
        }
    }
    // Tighter sleeps for pacing (default timer slack is 50 µs).
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    let rate = spec.rate.max(1) as f64;
    let start = Instant::now();
    let mut attempted = 0u64;
    let mut sent = 0u64;
    let mut errors = 0u64;
    let mut seqs = vec![0u64; flows.len()];
    let mut cur = 0usize;
    if flows.is_empty() {
        return SendOutcome {
            sent,
            errors,
            seconds: 0.0,
        };
    }
    loop {
        let elapsed = start.elapsed();
        if elapsed >= spec.duration {
            break;
        }
        let target = (elapsed.as_secs_f64() * rate) as u64;
        if attempted >= target {
            let next = (attempted + 1) as f64 / rate;
            // Never spin: the generator shares two cores with the server under test. A
            // sleep of tens of µs overshoots a little; the next round sends what fell due.
            let gap = (next - elapsed.as_secs_f64()).max(MIN_SLEEP.as_secs_f64());
            thread::sleep(Duration::from_secs_f64(gap));
            continue;
        }
        let mut due = target - attempted;
        while due > 0 {
            let k = (due as usize).min(BATCH);
            let flow = &flows[cur];
            let now_ns = epoch.elapsed().as_nanos() as u64;
            for i in 0..k {
                let slot = batch.slot(i);
                let off = flow.framing.write_prefix(slot, size);
                let s = &mut slot[off..];
                s[0..4].copy_from_slice(&tag.to_be_bytes());
                s[4..8].copy_from_slice(&(cur as u32).to_be_bytes());
                s[8..16].copy_from_slice(&seqs[cur].to_be_bytes());
                s[16..24].copy_from_slice(&now_ns.to_be_bytes());
                seqs[cur] += 1;
                batch.push_slot(off + size, None);
            }
            let ok = batch.send(&flow.sock) as u64;
            sent += ok;
            errors += k as u64 - ok;
            attempted += k as u64;
            due -= k as u64;
            progress.sent.fetch_add(ok, Ordering::Relaxed);
            cur = (cur + 1) % flows.len();
        }
    }
    SendOutcome {
        sent,
        errors,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Runs one trial: starts a receiver thread per peer socket, sends from the calling thread,
/// drains, and returns the peer sockets (for the next trial) with the result.
///
/// `progress` is updated live (for a progress bar).
pub fn run_trial(
    flows: &[Flow],
    peers: Vec<UdpSocket>,
    spec: TrialSpec,
    progress: Arc<Progress>,
) -> (Vec<UdpSocket>, TrialResult) {
    let tag: u32 = rand::random::<u32>() | 1;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    progress.sent.store(0, Ordering::Relaxed);
    progress.received.store(0, Ordering::Relaxed);
    let handles: Vec<_> = peers
        .into_iter()
        .map(|sock| {
            let stop = stop.clone();
            let progress = progress.clone();
            thread::spawn(move || receiver(sock, tag, epoch, stop, progress))
        })
        .collect();
    let out = sender(flows, spec, tag, epoch, &progress);
    // Drain: wait until nothing new arrives for a while, bounded by spec.drain.
    let drain_end = Instant::now() + spec.drain;
    let mut last = progress.received.load(Ordering::Relaxed);
    while Instant::now() < drain_end && last < out.sent {
        thread::sleep(Duration::from_millis(50));
        let now = progress.received.load(Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let mut received = 0u64;
    let mut hist = new_histogram();
    let mut socks = Vec::new();
    for h in handles {
        if let Ok((sock, o)) = h.join() {
            received += o.received;
            let _ = hist.add(&o.hist);
            socks.push(sock);
        }
    }
    let size = spec.size.clamp(STAMP_LEN, MAX_SIZE);
    let seconds = out.seconds.max(1e-9);
    let pps = received as f64 / seconds;
    let loss = if out.sent == 0 {
        1.0
    } else {
        1.0 - (received.min(out.sent) as f64 / out.sent as f64)
    };
    let q = |p: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(p)
        }
    };
    let result = TrialResult {
        rate: spec.rate,
        size,
        sent: out.sent,
        received,
        send_errors: out.errors,
        seconds,
        sent_pps: out.sent as f64 / seconds,
        pps,
        mbps: pps * size as f64 * 8.0 / 1e6,
        loss,
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        max_us: if hist.is_empty() { 0 } else { hist.max() },
    };
    (socks, result)
}

/// Parameters of a maximum-rate search.
#[derive(Debug, Clone, Copy)]
pub struct SearchSpec {
    /// First rate tried.
    pub start: u64,
    /// Never offer more than this.
    pub ceiling: u64,
    /// Loss fraction a passing trial must stay under (0.01 = 1 %).
    pub max_loss: f64,
    /// Bisection rounds after the first failing rate.
    pub steps: u32,
}

/// Searches the highest offered rate whose loss stays below `search.max_loss`.
///
/// A rate fails only when two trials in a row at that rate lose too much.
/// Doubles from `search.start` until a rate fails (or the ceiling is reached), then
/// bisects between the last good and the first bad rate. Returns every trial run (in order)
/// and the index of the best passing one, if any passed.
pub fn find_max(
    flows: &[Flow],
    mut peers: Vec<UdpSocket>,
    base: TrialSpec,
    search: SearchSpec,
    progress: Arc<Progress>,
    mut on_trial: impl FnMut(&TrialResult),
) -> (Vec<TrialResult>, Option<usize>) {
    let mut trials: Vec<TrialResult> = Vec::new();
    let mut best: Option<usize> = None;
    let mut good = 0u64;
    let mut bad: Option<u64> = None;
    let mut rate = search.start.max(1);
    let passes = |r: &TrialResult| r.loss < search.max_loss && r.received > 0;
    // A failing trial is run once more before the rate counts as failing: on a shared
    // machine one stall of another process must not end the search.
    let mut run = |rate: u64, peers: Vec<UdpSocket>, trials: &mut Vec<TrialResult>| {
        let (mut p, r) = run_trial(flows, peers, TrialSpec { rate, ..base }, progress.clone());
        on_trial(&r);
        let failed = !passes(&r);
        trials.push(r);
        if failed {
            let (p2, r2) = run_trial(flows, p, TrialSpec { rate, ..base }, progress.clone());
            on_trial(&r2);
            trials.push(r2);
            p = p2;
        }
        p
    };
    // Ramp up.
    loop {
        peers = run(rate, peers, &mut trials);
        let last = trials.len() - 1;
        if passes(&trials[last]) {
            good = rate;
            best = Some(last);
            if rate >= search.ceiling {
                break;
            }
            rate = rate.saturating_mul(2).min(search.ceiling);
        } else {
            bad = Some(rate);
            break;
        }
    }
    // Bisect.
    if let Some(mut hi) = bad {
        let mut lo = good;
        for _ in 0..search.steps {
            if hi <= lo + lo / 50 + 1 {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            peers = run(mid, peers, &mut trials);
            let last = trials.len() - 1;
            if passes(&trials[last]) {
                lo = mid;
                if best
                    .map(|b| trials[b].pps < trials[last].pps)
                    .unwrap_or(true)
                {
                    best = Some(last);
                }
            } else {
                hi = mid;
            }
        }
    }
    drop(peers);
    (trials, best)
}
