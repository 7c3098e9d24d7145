//! A bare UDP forwarder: the upper bound a TURN relay on this machine can be compared with.
//!
//! It does the least work a relay must do per packet — receive a batch with `recvmmsg`, find
//! where each datagram goes, send the batch with `sendmmsg` — and nothing else: no
//! authentication, no permissions, no allocation lifetimes, one socket per worker.
//!
//! To be loaded exactly like a TURN server it speaks ChannelData framing (RFC 8656 §12.4):
//! a client first binds a channel number to a peer address with a control datagram
//!
//! ```text
//! "MPFWDBND" | channel (u16 BE) | peer address as UTF-8 ("127.0.0.1:4000")
//! ```
//!
//! answered with `"MPFWDOK!" | channel`, then sends ChannelData datagrams; the forwarder strips
//! the 4-byte header and sends the payload to the bound peer from its own socket. Workers
//! share the port with `SO_REUSEPORT`, so the kernel keeps every client on one worker and each
//! worker owns a plain `HashMap` (no locks). The table is bounded by [`MAX_BINDINGS`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::udp::{self, Forward, RecvBatch, BATCH};

/// Magic of a bind request (checked before ChannelData: `M` is 0x4D, inside the channel range).
pub const BIND_MAGIC: &[u8; 8] = b"MPFWDBND";
/// Magic of a bind answer.
pub const BIND_OK: &[u8; 8] = b"MPFWDOK!";
/// Bindings one worker keeps at most (further binds are ignored).
pub const MAX_BINDINGS: usize = 1 << 20;

/// Builds a bind request for `channel` → `peer`.
pub fn bind_request(channel: u16, peer: SocketAddr) -> Vec<u8> {
    let mut v = BIND_MAGIC.to_vec();
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(peer.to_string().as_bytes());
    v
}

fn parse_bind(d: &[u8]) -> Option<(u16, SocketAddr)> {
    let rest = d.strip_prefix(BIND_MAGIC.as_slice())?;
    if rest.len() < 2 {
        return None;
    }
    let ch = u16::from_be_bytes([rest[0], rest[1]]);
    let peer = std::str::from_utf8(&rest[2..]).ok()?.parse().ok()?;
    Some((ch, peer))
}

/// Faults a forwarder injects on purpose, to check that the load generator counts loss,
/// duplicates and reordering right. Each rule applies to every `n`-th ChannelData datagram a
/// worker forwards (counted from 1; 0 = never): **drop** it; else **swap** it with the next
/// one of the same receive batch (it is sent right after that one); else **duplicate** it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Drop every n-th datagram.
    pub drop_every: u64,
    /// Send every n-th datagram twice.
    pub dup_every: u64,
    /// Send every n-th datagram after the one that follows it.
    pub swap_every: u64,
}

/// What a forwarder did, with [`Faults`] counted one by one.
#[derive(Debug, Default)]
pub struct FaultCounters {
    /// Datagrams dropped on purpose.
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Datagrams sent after a later datagram of the same flow (client and channel).
    pub reordered: AtomicU64,
}

/// A running forwarder; dropping it stops the workers.
pub struct Forwarder {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    faults: Arc<FaultCounters>,
    workers: Vec<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds `listen` with `threads` workers (at least one) and starts forwarding.
    pub fn start(listen: SocketAddr, threads: usize) -> io::Result<Forwarder> {
        Self::start_with_faults(listen, threads, Faults::default())
    }

    /// Like [`Self::start`], injecting `faults` (tests of the load generator's accounting).
    pub fn start_with_faults(
        listen: SocketAddr,
        threads: usize,
        faults: Faults,
    ) -> io::Result<Forwarder> {
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(FaultCounters::default());
        let first = reuseport_socket(listen)?;
        let local = first.local_addr()?;
        let mut socks = vec![first];
        for _ in 1..threads.max(1) {
            socks.push(reuseport_socket(local)?);
        }
        let workers = socks
            .into_iter()
            .map(|sock| {
                let stop = stop.clone();
                let forwarded = forwarded.clone();
                let counters = counters.clone();
                thread::spawn(move || worker(sock, stop, forwarded, faults, counters))
            })
            .collect();
        Ok(Forwarder {
            local,
            stop,
            forwarded,
            faults: counters,
            workers,
        })
    }

    /// What the injected faults did so far.
    pub fn faults(&self) -> &FaultCounters {
        &self.faults
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Waits for the workers (they only end when stopped).
    pub fn join(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    let fd = sock.as_raw_fd();
    let size = udp::SOCKET_BUFFER as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: fd is a valid socket; the option value outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let _ = sock.set_recv_buffer_size(udp::SOCKET_BUFFER);
            let _ = sock.set_send_buffer_size(udp::SOCKET_BUFFER);
        }
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn every(n: u64, k: u64) -> bool {
    k != 0 && n.is_multiple_of(k)
}

fn worker(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    faults: Faults,
    counters: Arc<FaultCounters>,
) {
    let _ = udp::set_read_timeout(&sock, Duration::from_millis(100));
    let mut table: HashMap<(SocketAddr, u16), SocketAddr> = HashMap::new();
    let mut batch = RecvBatch::new();
    let none = Forward {
        slot: 0,
        offset: 0,
        len: 0,
        to: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    // Room for every datagram of a batch sent twice.
    let mut out = [none; 2 * BATCH];
    let mut nth = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = match batch.recv(&sock) {
            Ok(n) => n,
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let mut k = 0usize;
        // A datagram held back by a swap, with its flow.
        let mut held: Option<(Forward, (SocketAddr, u16))> = None;
        for i in 0..n {
            let Some(src) = batch.source(i) else { continue };
            let d = batch.get(i);
            if let Some((ch, peer)) = parse_bind(d) {
                if table.len() < MAX_BINDINGS || table.contains_key(&(src, ch)) {
                    table.insert((src, ch), peer);
                    let mut ok = [0u8; 10];
                    ok[..8].copy_from_slice(BIND_OK);
                    ok[8..].copy_from_slice(&ch.to_be_bytes());
                    let _ = sock.send_to(&ok, src);
                }
            } else if d.len() >= 4 && (0x40..=0x4F).contains(&d[0]) {
                let ch = u16::from_be_bytes([d[0], d[1]]);
                let len = u16::from_be_bytes([d[2], d[3]]) as usize;
                if len + 4 > d.len() {
                    continue;
                }
                let Some(&to) = table.get(&(src, ch)) else {
                    continue;
                };
                let f = Forward {
                    slot: i,
                    offset: 4,
                    len,
                    to,
                };
                nth += 1;
                if every(nth, faults.drop_every) {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if held.is_none() && every(nth, faults.swap_every) {
                    held = Some((f, (src, ch)));
                    continue;
                }
                out[k] = f;
                k += 1;
                if every(nth, faults.dup_every) {
                    out[k] = f;
                    k += 1;
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                if let Some((h, flow)) = held.take() {
                    out[k] = h;
                    k += 1;
                    if flow == (src, ch) {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some((h, _)) = held.take() {
            out[k] = h;
            k += 1;
        }
        let mut done = 0;
        while done < k {
            let m = (k - done).min(BATCH);
            let sent = batch.forward(&sock, &out[done..done + m]);
            forwarded.fetch_add(sent as u64, Ordering::Relaxed);
            done += m;
        }
    }
}
