//! The data plane: one thread per CPU, each with its own `SO_REUSEPORT` listening socket, its
//! own epoll set, its own [`TurnServer`] core and the relayed sockets of the allocations it
//! created.
//!
//! The kernel spreads clients over the listening sockets by a hash of the 4-tuple, so a client
//! always reaches the same worker, and that worker owns its allocation: lookups on the hot path
//! are in per-worker maps, with no lock. Shared by all workers: the relayed port pool with the
//! tenant quotas (a mutex taken on Allocate and on release, and per datagram only for traffic
//! to one of the relay's own addresses), each network's bandwidth bucket (one atomic per
//! relayed datagram), the sharded per-source rate tables (requests only, never relayed data)
//! and the drain/stop flags.
//!
//! Per wake-up a worker drains readable sockets with `recvmmsg` (GRO-coalesced where the kernel
//! does it), runs every datagram through the core, queues the answers in one arena and flushes
//! them with `sendmmsg` + GSO. Buffers are allocated at start; relaying allocates nothing.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshpunch_proto::channeldata;
use meshpunch_proto::creds::Tenant;
use meshpunch_proto::turn::{
    AllocateError, ClientAction, Family, PeerAction, PortPool, PortRequest, RelayAllocator,
    Reservation, ServerConfig, SharedLimits, TurnServer,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::Exported;
use crate::udp::{self, RecvBatch, SendQueue, RECV_BATCH};

/// Listener `k` has token `LISTENER_TOKEN - k`.
const LISTENER_TOKEN: u64 = u64::MAX;
const MAX_LISTENERS: usize = 8;
const WAKE_TOKEN: u64 = u64::MAX - MAX_LISTENERS as u64;
/// `recvmmsg` rounds per wake-up on a listening socket: up to 16 × 64 client datagrams are
/// handled before the send queue is flushed, so that what many clients send through the same
/// allocation leaves in one `sendmmsg` per relayed socket (sendmmsg batches per socket, across
/// destinations; interleaved real traffic rarely has two datagrams of one allocation within a
/// single receive batch, but often within a loaded wake-up).
const LISTENER_ROUNDS: usize = 16;
/// `recvmmsg` rounds per readable relayed socket per wake-up (fairness between sockets).
const ROUNDS_PER_WAKEUP: usize = 4;
/// How often counters are exported.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by all workers.
#[derive(Debug)]
pub struct Shared {
    /// Relayed port pool and the tenant quotas (per username, per network, the networks'
    /// bandwidth buckets): one for the process, so quotas hold across workers.
    pub pool: Mutex<PortPool>,
    /// Per-source rate tables, shared by every worker's core.
    pub limits: SharedLimits,
    /// Set on SIGTERM: new allocations are refused (508), existing ones run until they end or
    /// the drain period is over.
    pub draining: AtomicBool,
    /// Set to stop at once.
    pub stop: AtomicBool,
    /// Socket buffer size for relayed sockets.
    pub socket_buffer: usize,
    /// Enable GRO on relayed sockets.
    pub gro: bool,
    /// One eventfd per running worker: written by [`Shared::wake_all`] so a stop or drain
    /// takes effect at once instead of at the next timer.
    pub wakers: Mutex<Vec<RawFd>>,
    /// Sockets of ports reserved under a RESERVATION-TOKEN ([`crate::relayed`]).
    pub reserved: Mutex<HashMap<SocketAddr, UdpSocket>>,
}

impl Shared {
    /// Wakes every worker (after setting `stop` or `draining`).
    pub fn wake_all(&self) {
        if let Ok(w) = self.wakers.lock() {
            for fd in w.iter() {
                let one: u64 = 1;
                // SAFETY: writing 8 bytes to an eventfd we registered and have not closed
                // (it is removed from this list under the lock before closing).
                unsafe { libc::write(*fd, (&one as *const u64).cast(), 8) };
            }
        }
    }
}

/// Creates a UDP socket with large buffers, non-blocking, optionally `SO_REUSEPORT`.
pub fn udp_socket(addr: SocketAddr, reuse_port: bool, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    set_buffers(&s, buffer);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Sets SO_RCVBUF/SO_SNDBUF to `size`; where `net.core.rmem_max`/`wmem_max` cap it and the
/// process may (root or CAP_NET_ADMIN), uses the `*BUFFORCE` variants: bursts then queue in the
/// kernel instead of being dropped.
fn set_buffers(s: &Socket, size: usize) {
    let _ = s.set_recv_buffer_size(size);
    let _ = s.set_send_buffer_size(size);
    let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // Linux reports twice the requested value (bookkeeping overhead).
    let short = |got: io::Result<usize>| got.map_or(true, |g| g < size);
    for (short_now, opt) in [
        (short(s.recv_buffer_size()), libc::SO_RCVBUFFORCE),
        (short(s.send_buffer_size()), libc::SO_SNDBUFFORCE),
    ] {
        if short_now {
            // SAFETY: valid socket and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&want as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// The driver side of [`RelayAllocator`]: binds relayed sockets and registers them with the
/// worker's epoll set.
#[derive(Debug)]
pub struct WorkerAllocator {
    shared: Arc<Shared>,
    epfd: RawFd,
    sockets: HashMap<SocketAddr, UdpSocket>,
    by_fd: Vec<Option<SocketAddr>>,
    /// Sockets released during this round; closed after the send queue is flushed so queued
    /// datagrams never leave through a reused descriptor.
    graveyard: Vec<UdpSocket>,
}

impl WorkerAllocator {
    fn fd_of(&self, relayed: SocketAddr) -> Option<RawFd> {
        self.sockets.get(&relayed).map(|s| s.as_raw_fd())
    }
    fn addr_of(&self, fd: RawFd) -> Option<SocketAddr> {
        self.by_fd.get(usize::try_from(fd).ok()?).copied().flatten()
    }
}

impl RelayAllocator for WorkerAllocator {
    fn allocate(
        &mut self,
        _client: SocketAddr,
        tenant: &Tenant,
        family: Family,
        port: PortRequest,
        now: Instant,
    ) -> Result<Reservation, AllocateError> {
        let (reservation, sock) =
            crate::relayed::reserve_socket(&self.shared, tenant, family, port, now)?;
        let addr = reservation.relayed;
        let fd = sock.as_raw_fd();
        if self.shared.gro {
            udp::enable_gro(fd);
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: valid epoll and socket descriptors.
        if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            if let Ok(mut pool) = self.shared.pool.lock() {
                pool.release(addr, tenant);
            }
            return Err(AllocateError::Capacity);
        }
        let i = fd as usize;
        if self.by_fd.len() <= i {
            self.by_fd.resize(i + 1, None);
        }
        self.by_fd[i] = Some(addr);
        self.sockets.insert(addr, sock);
        tracing::debug!(%addr, user = %tenant.user, network = %tenant.network, "allocation created");
        Ok(reservation)
    }

    fn is_live_relayed(&self, addr: SocketAddr) -> bool {
        // Own sockets first (no lock), then the process-wide pool (other workers' allocations).
        self.sockets.contains_key(&addr) || self.shared.pool.lock().is_ok_and(|p| p.is_in_use(addr))
    }

    fn release(&mut self, relayed: SocketAddr, tenant: &Tenant) {
        tracing::debug!(addr = %relayed, user = %tenant.user, "allocation ended");
        if let Some(sock) = self.sockets.remove(&relayed) {
            let fd = sock.as_raw_fd();
            // SAFETY: valid descriptors; removing a registered fd.
            unsafe {
                libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
            }
            if let Some(slot) = self.by_fd.get_mut(fd as usize) {
                *slot = None;
            }
            self.graveyard.push(sock);
        }
        if let Ok(mut pool) = self.shared.pool.lock() {
            pool.release(relayed, tenant);
        }
    }
}

fn unix_now() -> u64 {
    meshpunch_proto::clock::unix_secs(SystemTime::now())
}

/// Runs one worker until stopped (or drained). `listeners` are this worker's sockets of the
/// listening addresses (one per address, at most 8); `drain` is the drain period.
pub fn run(
    id: usize,
    listeners: Vec<UdpSocket>,
    cfg: ServerConfig,
    shared: Arc<Shared>,
    gso: bool,
    drain: Duration,
) -> io::Result<()> {
    // SAFETY: plain syscall.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let lfds: Vec<RawFd> = listeners
        .iter()
        .take(MAX_LISTENERS)
        .map(|l| l.as_raw_fd())
        .collect();
    // Peer data goes back out of the listener of the client's address family.
    let mut lfd_v4 = None;
    let mut lfd_v6 = None;
    for (k, l) in listeners.iter().take(MAX_LISTENERS).enumerate() {
        let lfd = l.as_raw_fd();
        match l.local_addr() {
            Ok(a) if a.is_ipv4() => lfd_v4 = lfd_v4.or(Some(lfd)),
            Ok(_) => lfd_v6 = lfd_v6.or(Some(lfd)),
            Err(_) => {}
        }
        if shared.gro {
            udp::enable_gro(lfd);
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: LISTENER_TOKEN - k as u64,
        };
        // SAFETY: valid descriptors.
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, lfd, &mut ev) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: closing our own epoll descriptor.
            unsafe { libc::close(epfd) };
            return Err(e);
        }
    }
    let Some(&first_lfd) = lfds.first() else {
        // SAFETY: closing our own epoll descriptor.
        unsafe { libc::close(epfd) };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listening socket",
        ));
    };
    let lfd_for = |client: SocketAddr| -> RawFd {
        let fam = if client.is_ipv4() { lfd_v4 } else { lfd_v6 };
        fam.unwrap_or(first_lfd)
    };
    // SAFETY: plain syscall.
    let wakefd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if wakefd >= 0 {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKE_TOKEN,
        };
        // SAFETY: valid descriptors.
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, wakefd, &mut ev) } == 0 {
            if let Ok(mut w) = shared.wakers.lock() {
                w.push(wakefd);
            }
        }
    }
    let alloc = WorkerAllocator {
        shared: shared.clone(),
        epfd,
        sockets: HashMap::new(),
        by_fd: Vec::new(),
        graveyard: Vec::new(),
    };
    let start = Instant::now();
    let limits = shared.limits.clone();
    let mut server = TurnServer::with_limits(cfg, alloc, limits, start, unix_now());
    let mut rb = RecvBatch::new();
    let mut q = SendQueue::new(gso && udp::gso_supported(first_lfd));
    // Room for a Data indication around the largest UDP payload.
    let mut out = vec![0u8; 65_536 + 64];
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut exported = Exported::default();
    let mut next_export = start + EXPORT_INTERVAL;
    let mut drain_deadline: Option<Instant> = None;
    tracing::debug!(worker = id, gso = q.gso(), "worker started");

    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if shared.draining.load(Ordering::Relaxed) {
            let deadline = *drain_deadline.get_or_insert(now + drain);
            // Every worker keeps its listening socket until no allocation is left anywhere:
            // closing one would re-hash SO_REUSEPORT flows onto workers that do not own them.
            let all_idle = server.is_idle() && shared.pool.lock().map_or(true, |p| p.in_use() == 0);
            if all_idle || now >= deadline {
                break;
            }
        }
        let wake = server
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1))
            .min(next_export);
        let mut timeout_ms = wake.saturating_duration_since(now).as_millis().min(1000) as i32;
        if drain_deadline.is_some() {
            timeout_ms = timeout_ms.min(200);
        }
        // SAFETY: events buffer is valid for its length.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let now = Instant::now();
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == WAKE_TOKEN {
                let mut v: u64 = 0;
                // SAFETY: reading the 8-byte counter of our eventfd.
                unsafe { libc::read(wakefd, (&mut v as *mut u64).cast(), 8) };
                continue;
            }
            if token > WAKE_TOKEN {
                let Some(&lfd) = lfds.get((LISTENER_TOKEN - token) as usize) else {
                    continue;
                };
                for _ in 0..LISTENER_ROUNDS {
                    let got = match rb.recv(lfd) {
                        Ok(got) => got,
                        Err(_) => break,
                    };
                    for i in 0..got {
                        let Some((from, data, seg)) = rb.get(i) else {
                            continue;
                        };
                        for dgram in udp::segments(data, seg) {
                            match server.handle_client(now, from, dgram, &mut out) {
                                ClientAction::None => {}
                                ClientAction::Reply(len) => q.push(lfd, from, &out[..len], &[]),
                                ClientAction::Relay {
                                    relayed,
                                    peer,
                                    range,
                                } => {
                                    if let (Some(fd), Some(payload)) =
                                        (server.allocator().fd_of(relayed), dgram.get(range))
                                    {
                                        q.push(fd, peer, &[], payload);
                                    }
                                }
                            }
                        }
                        if q.is_full() {
                            q.flush();
                        }
                    }
                    if got < RECV_BATCH {
                        break;
                    }
                }
            } else {
                let fd = token as RawFd;
                let Some(relayed) = server.allocator().addr_of(fd) else {
                    continue;
                };
                for _ in 0..ROUNDS_PER_WAKEUP {
                    let got = match rb.recv(fd) {
                        Ok(got) => got,
                        Err(_) => break,
                    };
                    for i in 0..got {
                        let Some((from, data, seg)) = rb.get(i) else {
                            continue;
                        };
                        for dgram in udp::segments(data, seg) {
                            match server.handle_peer(now, relayed, from, dgram, &mut out) {
                                PeerAction::Drop => {}
                                PeerAction::ChannelData { client, channel } => {
                                    let mut hdr = [0u8; channeldata::HEADER_LEN];
                                    if channeldata::write_header(channel, dgram.len(), &mut hdr)
                                        .is_ok()
                                    {
                                        q.push(lfd_for(client), client, &hdr, dgram);
                                    }
                                }
                                PeerAction::Indication { client, len } => {
                                    q.push(lfd_for(client), client, &out[..len], &[])
                                }
                            }
                        }
                        if q.is_full() {
                            q.flush();
                        }
                    }
                    if got < RECV_BATCH {
                        break;
                    }
                }
            }
        }
        q.flush();
        server.allocator_mut().graveyard.clear();
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
            q.flush();
            server.allocator_mut().graveyard.clear();
        }
        if now >= next_export {
            next_export = now + EXPORT_INTERVAL;
            exported.export(server.stats(), server.gauges(now), q.stats);
            if id == 0 {
                crate::relayed::expire(&shared, now);
                if let Ok(pool) = shared.pool.lock() {
                    metrics::gauge!(crate::metrics::PORTS_IN_USE).set(pool.in_use() as f64);
                }
            }
        }
    }
    server.release_all();
    server.allocator_mut().graveyard.clear();
    exported.export(server.stats(), server.gauges(Instant::now()), q.stats);
    if wakefd >= 0 {
        if let Ok(mut w) = shared.wakers.lock() {
            w.retain(|fd| *fd != wakefd);
        }
        // SAFETY: closing our own eventfd, no longer reachable through `wakers`.
        unsafe { libc::close(wakefd) };
    }
    // SAFETY: closing our own epoll descriptor.
    unsafe { libc::close(epfd) };
    tracing::debug!(worker = id, "worker stopped");
    Ok(())
}
