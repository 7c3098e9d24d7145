//! TURN over TCP and TLS (RFC 8656 §3.1, §5): the client reaches the relay over a stream, the
//! relayed transport stays UDP. For networks that drop UDP, or only let TCP 443 out.
//!
//! One thread runs a single-threaded tokio runtime with one [`TurnServer`] core per stream
//! transport (TCP, TLS): the same sans-IO core the UDP workers run, so authentication, the
//! quotas (the process-wide port pool), the bandwidth limits, the per-source rate tables and
//! the peer policy are the same code for every transport — nothing is checked twice or
//! skipped. The thread only moves bytes:
//!
//! * a connection's bytes go through a [`StreamFramer`] (STUN / padded ChannelData) and each
//!   message into the core as if it were a datagram from the connection's remote address;
//! * an allocation made over a stream is keyed by that connection (its remote address on that
//!   listener) and ends when the connection closes ([`TurnServer::release_client`]);
//! * peer data comes back down the stream as padded ChannelData or a Data indication, through
//!   a bounded per-connection write queue: when it is full the message is dropped and counted
//!   (`meshpunch_relay_stream_dropped_total`), memory never grows with a slow reader.
//!
//! Bad input closes only the connection it came on, with a counter: framing errors, a message
//! that stalls half-sent ([`StreamConfig::stall_timeout`]), no valid message within
//! [`StreamConfig::first_message_timeout`], more connections than
//! [`StreamConfig::max_connections`], TLS handshakes beyond
//! [`StreamConfig::max_handshakes`] at once or slower than
//! [`StreamConfig::handshake_timeout`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use meshpunch_certs::{CertManager, Source};
use meshpunch_proto::creds::Tenant;
use meshpunch_proto::turn::stream::{channel_data_len, encode_channel_data, StreamFramer};
use meshpunch_proto::turn::uri::TurnTransport;
use meshpunch_proto::turn::{
    AllocateError, ClientAction, Family, PeerAction, PortRequest, RelayAllocator, Reservation,
    ServerConfig, TurnServer,
};
use metrics::{counter, gauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;

use crate::metrics::{
    Exported, STREAM_BYTES, STREAM_CONNECTIONS, STREAM_CONNECTIONS_OPEN, STREAM_DROPPED,
    STREAM_FRAMING_ERRORS, STREAM_HANDSHAKE_FAILURES, STREAM_PACKETS, STREAM_REJECTED,
    STREAM_TIMEOUTS,
};
use crate::worker::Shared;

/// Default cap on open TCP + TLS connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time a new connection has to deliver its first whole message.
pub const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a message may take from its first byte to its last.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a TLS handshake may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of TLS handshakes in progress at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default per-connection write queue, in messages.
pub const DEFAULT_WRITE_QUEUE: usize = 512;
/// Accept queue length asked of the kernel.
const LISTEN_BACKLOG: i32 = 4096;
/// Most bytes gathered into one write (one TLS record burst).
const WRITE_GATHER: usize = 64 * 1024;

/// Settings of the TCP/TLS listeners.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// TURN over TCP listening address.
    pub tcp_listen: Option<SocketAddr>,
    /// TURN over TLS listening address.
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for TLS (re-read on SIGHUP and when the file changes).
    pub cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub key: Option<PathBuf>,
    /// Open connections (TCP + TLS) at most; more are closed at once and counted.
    pub max_connections: usize,
    /// A connection that has not sent one whole message within this time is closed.
    pub first_message_timeout: Duration,
    /// A message whose first byte arrived this long ago and is still incomplete closes the
    /// connection (a stalled half-sent frame).
    pub stall_timeout: Duration,
    /// A connection that sends nothing for this long is closed (its allocation, if any, has
    /// expired by then: clients refresh well within the allocation lifetime).
    pub idle_timeout: Duration,
    /// TLS handshake time limit.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; more are closed at once and counted.
    pub max_handshakes: usize,
    /// Messages queued towards one connection; beyond it they are dropped and counted.
    pub write_queue: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            tcp_listen: None,
            tls_listen: None,
            cert: None,
            key: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            first_message_timeout: DEFAULT_FIRST_MESSAGE_TIMEOUT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            idle_timeout: Duration::from_secs(3600 + 60),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            write_queue: DEFAULT_WRITE_QUEUE,
        }
    }
}

impl StreamConfig {
    /// Whether any stream listener is configured.
    pub fn enabled(&self) -> bool {
        self.tcp_listen.is_some() || self.tls_listen.is_some()
    }
}

/// The running stream listeners.
#[derive(Debug)]
pub struct Streams {
    /// Bound TCP address.
    pub tcp: Option<SocketAddr>,
    /// Bound TLS address.
    pub tls: Option<SocketAddr>,
    /// The TLS certificate source (for SIGHUP reloads).
    pub certs: Option<Arc<CertManager>>,
    /// The stream thread.
    pub thread: JoinHandle<()>,
}

const TCP: usize = 0;
const TLS: usize = 1;

fn label(t: usize) -> &'static str {
    if t == TLS {
        TurnTransport::Tls.as_str()
    } else {
        TurnTransport::Tcp.as_str()
    }
}

/// Binds the listeners, loads the certificate and starts the stream thread.
pub fn start(
    cfg: StreamConfig,
    server_cfg: ServerConfig,
    shared: Arc<Shared>,
    drain: Duration,
) -> anyhow::Result<Streams> {
    let bind = |addr: SocketAddr| -> anyhow::Result<StdTcpListener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())
            .with_context(|| format!("binding TCP {addr}"))?;
        // A deep accept queue: a burst of connections waits in the kernel instead of SYN
        // retries (the kernel caps it at net.core.somaxconn).
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    let tcp = cfg.tcp_listen.map(bind).transpose()?;
    let tls = cfg.tls_listen.map(bind).transpose()?;
    let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let tls_addr = tls.as_ref().map(|l| l.local_addr()).transpose()?;
    let source = match (&tls, &cfg.cert, &cfg.key) {
        (None, _, _) => None,
        (Some(_), Some(cert), Some(key)) => Some(Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (Some(_), _, _) => anyhow::bail!("--tls-listen needs --cert FILE and --key FILE"),
    };
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<Result<Option<Arc<CertManager>>, String>>();
    let thread = std::thread::Builder::new()
        .name("relay-streams".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let certs = match source {
                    None => None,
                    Some(src) => match CertManager::start(src, "relay").await {
                        Ok(m) => Some(Arc::new(m)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("TLS certificate: {e}")));
                            return;
                        }
                    },
                };
                let acceptor = match (&certs, tls.is_some()) {
                    (Some(m), true) => match tls_acceptor(m) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("TLS configuration: {e}")));
                            return;
                        }
                    },
                    _ => None,
                };
                let _watch = certs.as_ref().map(|m| AbortOnDrop(m.spawn(|_| {})));
                let _ = ready_tx.send(Ok(certs.clone()));
                run(cfg, server_cfg, shared, drain, tcp, tls, acceptor).await;
            });
        })?;
    let certs = ready_rx
        .recv()
        .context("stream thread ended during start-up")?
        .map_err(anyhow::Error::msg)?;
    tracing::info!(tcp = ?tcp_addr, tls = ?tls_addr, "TURN over TCP/TLS listening");
    Ok(Streams {
        tcp: tcp_addr,
        tls: tls_addr,
        certs,
        thread,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS 1.3 and 1.2 (like coturn), no ALPN required, certificate from the reloadable resolver.
fn tls_acceptor(m: &CertManager) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(m.resolver());
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Counters of one transport, exported as deltas once a second.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    dropped: u64,
}

struct Core {
    servers: Vec<TurnServer<StreamAllocator>>,
    conns: [HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>; 2],
    out: Vec<u8>,
    counts: [Counts; 2],
}

impl Core {
    fn queue(&mut self, t: usize, client: SocketAddr, msg: Vec<u8>) {
        let Some(tx) = self.conns[t].get(&client) else {
            return;
        };
        let len = msg.len() as u64;
        match tx.try_send(msg) {
            Ok(()) => {
                self.counts[t].packets_out += 1;
                self.counts[t].bytes_out += len;
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.counts[t].dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_client_message(&mut self, t: usize, client: SocketAddr, msg: &[u8]) {
        self.counts[t].packets_in += 1;
        self.counts[t].bytes_in += msg.len() as u64;
        let Some(server) = self.servers.get_mut(t) else {
            return;
        };
        match server.handle_client(Instant::now(), client, msg, &mut self.out) {
            ClientAction::None => {}
            ClientAction::Reply(n) => {
                let reply = self.out[..n].to_vec();
                self.queue(t, client, reply);
            }
            ClientAction::Relay {
                relayed,
                peer,
                range,
            } => {
                if let (Some(sock), Some(payload)) =
                    (server.allocator().sockets.get(&relayed), msg.get(range))
                {
                    // Non-blocking: a full socket buffer drops the datagram, as UDP would.
                    let _ = sock.socket.try_send_to(payload, peer);
                }
            }
        }
    }

    fn on_peer_datagram(&mut self, t: usize, relayed: SocketAddr, from: SocketAddr, data: &[u8]) {
        let Some(server) = self.servers.get_mut(t) else {
            return;
        };
        match server.handle_peer(Instant::now(), relayed, from, data, &mut self.out) {
            PeerAction::Drop => {}
            PeerAction::ChannelData { client, channel } => {
                let mut m = vec![0u8; channel_data_len(data.len())];
                if encode_channel_data(channel, data, &mut m).is_ok() {
                    self.queue(t, client, m);
                }
            }
            PeerAction::Indication { client, len } => {
                let m = self.out[..len].to_vec();
                self.queue(t, client, m);
            }
        }
    }

    fn close(&mut self, t: usize, client: SocketAddr) {
        self.conns[t].remove(&client);
        if let Some(s) = self.servers.get_mut(t) {
            s.release_client(client);
        }
    }
}

struct RelayedSocket {
    socket: Rc<UdpSocket>,
    reader: AbortHandle,
}

/// The stream core's [`RelayAllocator`]: relayed sockets from the shared pool
/// ([`crate::relayed::reserve_socket`]), read by one local task each.
struct StreamAllocator {
    shared: Arc<Shared>,
    transport: usize,
    core: Weak<RefCell<Core>>,
    sockets: HashMap<SocketAddr, RelayedSocket>,
}

impl RelayAllocator for StreamAllocator {
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
        let socket = match UdpSocket::from_std(sock) {
            Ok(s) => Rc::new(s),
            Err(_) => {
                if let Ok(mut pool) = self.shared.pool.lock() {
                    pool.release(addr, tenant);
                }
                return Err(AllocateError::Capacity);
            }
        };
        let reader = tokio::task::spawn_local(peer_reader(
            self.core.clone(),
            self.transport,
            addr,
            socket.clone(),
        ))
        .abort_handle();
        self.sockets.insert(addr, RelayedSocket { socket, reader });
        Ok(reservation)
    }

    fn release(&mut self, relayed: SocketAddr, tenant: &Tenant) {
        if let Some(s) = self.sockets.remove(&relayed) {
            s.reader.abort();
        }
        if let Ok(mut pool) = self.shared.pool.lock() {
            pool.release(relayed, tenant);
        }
    }

    fn is_live_relayed(&self, addr: SocketAddr) -> bool {
        self.sockets.contains_key(&addr) || self.shared.pool.lock().is_ok_and(|p| p.is_in_use(addr))
    }
}

/// Reads one relayed socket and hands each datagram to the core.
async fn peer_reader(
    core: Weak<RefCell<Core>>,
    t: usize,
    relayed: SocketAddr,
    socket: Rc<UdpSocket>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors surface as recv errors on Linux: not fatal for the allocation.
            Err(_) => continue,
        };
        let Some(core) = core.upgrade() else { return };
        core.borrow_mut()
            .on_peer_datagram(t, relayed, from, &buf[..n]);
        // Everything else already readable, without going back to the reactor.
        while let Ok((n, from)) = socket.try_recv_from(&mut buf) {
            core.borrow_mut()
                .on_peer_datagram(t, relayed, from, &buf[..n]);
        }
    }
}

fn unix_now() -> u64 {
    meshpunch_proto::clock::unix_secs(SystemTime::now())
}

async fn run(
    cfg: StreamConfig,
    server_cfg: ServerConfig,
    shared: Arc<Shared>,
    drain: Duration,
    tcp: Option<StdTcpListener>,
    tls: Option<StdTcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let start = Instant::now();
    let core = Rc::new_cyclic(|weak: &Weak<RefCell<Core>>| {
        let servers = [TCP, TLS]
            .into_iter()
            .map(|t| {
                TurnServer::with_limits(
                    server_cfg.clone(),
                    StreamAllocator {
                        shared: shared.clone(),
                        transport: t,
                        core: weak.clone(),
                        sockets: HashMap::new(),
                    },
                    shared.limits.clone(),
                    start,
                    unix_now(),
                )
            })
            .collect();
        RefCell::new(Core {
            servers,
            conns: [HashMap::new(), HashMap::new()],
            out: vec![0u8; 65_536 + 64],
            counts: [Counts::default(); 2],
        })
    });
    let cfg = Rc::new(cfg);
    let open = Rc::new(Cell::new(0usize));
    let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes.max(1)));
    let mut accept_tasks = Vec::new();
    for (t, l) in [(TCP, tcp), (TLS, tls)] {
        let Some(l) = l else { continue };
        let listener = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, transport = label(t), "stream listener");
                continue;
            }
        };
        let acc = if t == TLS { acceptor.clone() } else { None };
        accept_tasks.push(AbortOnDrop(tokio::task::spawn_local(accept_loop(
            core.clone(),
            t,
            listener,
            acc,
            cfg.clone(),
            open.clone(),
            handshakes.clone(),
        ))));
    }
    let mut exported = [Exported::default(), Exported::default()];
    let mut counted = [Counts::default(); 2];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut next_sweep = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        tick.tick().await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if shared.draining.load(Ordering::Relaxed) {
            let deadline = *drain_deadline.get_or_insert(now + drain);
            let idle = core.borrow().servers.iter().all(|s| s.is_idle());
            if idle || now >= deadline {
                break;
            }
        }
        if now < next_sweep {
            continue;
        }
        next_sweep = now + Duration::from_secs(1);
        let mut c = core.borrow_mut();
        for (t, s) in c.servers.iter_mut().enumerate() {
            s.handle_timeout(now);
            exported[t].export(s.stats(), s.gauges(now), Default::default());
        }
        for t in [TCP, TLS] {
            let (new, old) = (c.counts[t], counted[t]);
            let l = label(t);
            counter!(STREAM_PACKETS, "transport" => l, "direction" => "in")
                .increment(new.packets_in - old.packets_in);
            counter!(STREAM_BYTES, "transport" => l, "direction" => "in")
                .increment(new.bytes_in - old.bytes_in);
            counter!(STREAM_PACKETS, "transport" => l, "direction" => "out")
                .increment(new.packets_out - old.packets_out);
            counter!(STREAM_BYTES, "transport" => l, "direction" => "out")
                .increment(new.bytes_out - old.bytes_out);
            counter!(STREAM_DROPPED, "transport" => l).increment(new.dropped - old.dropped);
            counted[t] = new;
        }
    }
    drop(accept_tasks);
    let mut c = core.borrow_mut();
    for s in c.servers.iter_mut() {
        s.release_all();
    }
    c.conns = [HashMap::new(), HashMap::new()];
}

/// Counts an open connection and un-counts it when dropped.
struct OpenGuard {
    open: Rc<Cell<usize>>,
    t: usize,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.set(self.open.get().saturating_sub(1));
        gauge!(STREAM_CONNECTIONS_OPEN, "transport" => label(self.t)).decrement(1.0);
    }
}

async fn accept_loop(
    core: Rc<RefCell<Core>>,
    t: usize,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    cfg: Rc<StreamConfig>,
    open: Rc<Cell<usize>>,
    handshakes: Arc<Semaphore>,
) {
    let l = label(t);
    loop {
        let (sock, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off a little instead of spinning.
                tracing::warn!(error = %e, transport = l, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if open.get() >= cfg.max_connections {
            counter!(STREAM_REJECTED, "transport" => l).increment(1);
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        open.set(open.get() + 1);
        counter!(STREAM_CONNECTIONS, "transport" => l).increment(1);
        gauge!(STREAM_CONNECTIONS_OPEN, "transport" => l).increment(1.0);
        let guard = OpenGuard {
            open: open.clone(),
            t,
        };
        let core = core.clone();
        let cfg = cfg.clone();
        match &acceptor {
            None => {
                tokio::task::spawn_local(async move {
                    let _guard = guard;
                    serve(core, t, client, sock, cfg).await;
                });
            }
            Some(acceptor) => {
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    counter!(STREAM_HANDSHAKE_FAILURES, "transport" => l, "reason" => "busy")
                        .increment(1);
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::task::spawn_local(async move {
                    let _guard = guard;
                    let hs =
                        tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(sock)).await;
                    drop(permit);
                    match hs {
                        Ok(Ok(s)) => serve(core, t, client, s, cfg).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%client, error = %e, "TLS handshake failed");
                            counter!(STREAM_HANDSHAKE_FAILURES, "transport" => l, "reason" => "error")
                                .increment(1);
                        }
                        Err(_) => {
                            counter!(STREAM_HANDSHAKE_FAILURES, "transport" => l, "reason" => "timeout")
                                .increment(1);
                        }
                    }
                });
            }
        }
    }
}

/// Why a connection ended.
enum End {
    Closed,
    Framing,
    Timeout(&'static str),
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    core: Rc<RefCell<Core>>,
    t: usize,
    client: SocketAddr,
    stream: S,
    cfg: Rc<StreamConfig>,
) {
    let l = label(t);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(cfg.write_queue.max(1));
    core.borrow_mut().conns[t].insert(client, tx);
    // Over TLS every message goes into a record of its own (one write each, one flush per
    // burst): coturn's uclient reads one TURN message per TLS record and loses the rest of a
    // record holding several. Over TCP a burst is gathered into one write.
    let gather = t == TCP;
    let writer = async move {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            if gather {
                batch.clear();
                batch.extend_from_slice(&first);
                while batch.len() < WRITE_GATHER {
                    match rx.try_recv() {
                        Ok(m) => batch.extend_from_slice(&m),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
            } else {
                if wr.write_all(&first).await.is_err() {
                    break;
                }
                let mut burst = first.len();
                let mut failed = false;
                while burst < WRITE_GATHER {
                    let Ok(m) = rx.try_recv() else { break };
                    burst += m.len();
                    if wr.write_all(&m).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
            }
            if wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut framer = StreamFramer::default();
        let opened = Instant::now();
        let mut got_message = false;
        let mut partial_since: Option<Instant> = None;
        loop {
            let (deadline, phase) = match partial_since {
                Some(since) => (since + cfg.stall_timeout, "stalled"),
                None if !got_message => (opened + cfg.first_message_timeout, "first_message"),
                None => (Instant::now() + cfg.idle_timeout, "idle"),
            };
            let space = framer.read_space();
            if space.is_empty() {
                return End::Framing;
            }
            let n = match tokio::time::timeout_at(deadline.into(), rd.read(space)).await {
                Err(_) => return End::Timeout(phase),
                Ok(Err(_)) | Ok(Ok(0)) => return End::Closed,
                Ok(Ok(n)) => n,
            };
            framer.commit(n);
            loop {
                match framer.next_frame() {
                    Ok(Some(f)) => {
                        got_message = true;
                        core.borrow_mut().on_client_message(t, client, f.bytes);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%client, transport = l, error = %e, "stream framing error");
                        return End::Framing;
                    }
                }
            }
            partial_since = match (framer.pending(), partial_since) {
                (0, _) => None,
                (_, Some(s)) => Some(s),
                (_, None) => Some(Instant::now()),
            };
        }
    };
    let end = tokio::select! {
        e = reader => e,
        _ = writer => End::Closed,
    };
    match end {
        End::Closed => {}
        End::Framing => counter!(STREAM_FRAMING_ERRORS, "transport" => l).increment(1),
        End::Timeout(phase) => {
            counter!(STREAM_TIMEOUTS, "transport" => l, "phase" => phase).increment(1)
        }
    }
    core.borrow_mut().close(t, client);
}
