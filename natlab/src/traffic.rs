//! Constant-rate UDP traffic between lab hosts, and what its receiver saw: the largest gap in
//! arrivals (how long a failover interrupted the flow), loss, and when packets arrived.
//!
//! A [`Flow`] sends sequence-numbered datagrams at a fixed interval from a socket in one
//! namespace; a [`Sink`] in another records the arrival time of each sequence number.
//! Datagrams are framed like WireGuard transport messages (type 4, three zero bytes), so a
//! meshpunch daemon carries them through its proxy ports as it carries WireGuard.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lab::Lab;
use crate::Error;

/// Payload size of each datagram (WireGuard-like header + sequence number + padding).
const PAYLOAD: usize = 64;
/// First bytes of a WireGuard transport data message.
pub const WG_HEADER: [u8; 4] = [4, 0, 0, 0];

/// A sender of sequence-numbered datagrams at a constant rate; stops when dropped.
#[derive(Debug)]
pub struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flow {
    /// Starts sending from a socket bound in `node` (to `bind`) to `dst` every `interval`.
    pub fn start(
        lab: &Lab,
        node: &str,
        bind: SocketAddr,
        dst: SocketAddr,
        interval: Duration,
    ) -> Result<Flow, Error> {
        let sock = lab.udp_socket(node, bind)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, n2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; PAYLOAD];
            buf[..4].copy_from_slice(&WG_HEADER);
            let start = Instant::now();
            let mut seq: u64 = 0;
            while !s2.load(Ordering::Relaxed) {
                buf[4..12].copy_from_slice(&seq.to_be_bytes());
                // Errors (a cut path answering EPERM, no route yet) are loss, not failure.
                let _ = sock.send_to(&buf, dst);
                seq += 1;
                n2.store(seq, Ordering::Relaxed);
                let next = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        });
        Ok(Flow {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receiver of a [`Flow`]: records `(arrival, seq)` of each datagram; stops when dropped.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on `bind` inside `node`.
    pub fn start(lab: &Lab, node: &str, bind: SocketAddr) -> Result<Sink, Error> {
        let sock: UdpSocket = lab.udp_socket(node, bind)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (s2, a2) = (stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n >= 12 && buf[..4] == WG_HEADER {
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(&buf[4..12]);
                        if let Ok(mut a) = a2.lock() {
                            a.push((Instant::now(), u64::from_be_bytes(seq)));
                        }
                    }
                }
            }
        });
        Ok(Sink {
            addr,
            stop,
            arrivals,
            thread: Some(thread),
        })
    }

    /// Address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.arrivals.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Every arrival so far: (time, sequence number), in arrival order (for result files).
    pub fn arrivals(&self) -> Vec<(Instant, u64)> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Time of the last arrival.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.arrivals.lock().ok()?.last().map(|a| a.0)
    }

    /// Waits until a datagram arrives after `after`; returns its arrival time.
    pub fn wait_arrival_after(&self, after: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.last_arrival().filter(|t| *t > after) {
                return Some(t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The largest interval between consecutive arrivals within `[from, to]`, counting the
    /// interval from the last arrival before `from` (the flow's real interruption).
    pub fn max_gap(&self, from: Instant, to: Instant) -> Duration {
        self.max_gap_span(from, to)
            .map(|(a, b)| b - a)
            .unwrap_or(Duration::ZERO)
    }

    /// Like [`Sink::max_gap`], returning the last arrival before the gap and the first after.
    pub fn max_gap_span(&self, from: Instant, to: Instant) -> Option<(Instant, Instant)> {
        let a = self.arrivals.lock().ok()?;
        let mut prev: Option<Instant> = None;
        let mut best: Option<(Instant, Instant)> = None;
        for &(t, _) in a.iter() {
            if t > to {
                break;
            }
            if t >= from {
                if let Some(p) = prev {
                    if best.is_none_or(|(x, y)| t - p > y - x) {
                        best = Some((p, t));
                    }
                }
            }
            prev = Some(t);
        }
        best
    }

    /// Sequence numbers below `sent` that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        let Ok(a) = self.arrivals.lock() else {
            return sent;
        };
        let mut seen = vec![false; usize::try_from(sent).unwrap_or(0)];
        for &(_, s) in a.iter() {
            if let Some(slot) = usize::try_from(s).ok().and_then(|i| seen.get_mut(i)) {
                *slot = true;
            }
        }
        seen.iter().filter(|s| !**s).count() as u64
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
