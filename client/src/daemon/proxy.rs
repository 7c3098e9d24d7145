//! The proxy ports: one 127.0.0.1 UDP socket per peer that WireGuard sends that peer's
//! packets to. Its reader task passes packets from WireGuard's one local address (the
//! configured `WireGuardEndpoint`, or the first address that used the port until restart) to
//! the engine — or, on the fast path, sends them itself to the route the engine published
//! in [`FastPath`] (no copy, no engine round trip).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshpunch_proto::path::PathAddr;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::wg::FromWg;

/// How often a proxy reader on the fast path tells the engine that data flows.
pub(super) const FAST_NOTIFY: Duration = Duration::from_millis(500);

/// A direct route as the proxy reader sends on it.
#[derive(Clone)]
pub(super) struct FastRoute {
    /// The peer's selected pair this was published from (the path manager's
    /// [`PeerPath::route`](meshpunch_proto::path::PeerPath::route) — the one source of truth;
    /// this is its published copy, written only by the engine).
    pub(super) path: PathAddr,
    /// The destination in the form the socket takes (IPv4-mapped on a dual-stack socket).
    pub(super) dest: SocketAddr,
    /// The birthday pool socket the path leaves from (`None`: the data socket).
    pub(super) pool_sock: Option<Arc<UdpSocket>>,
}

/// State shared between a peer's proxy reader and the engine: the published direct route
/// (set by the engine), and the fast path's counters.
#[derive(Default)]
pub(super) struct FastPath {
    route: std::sync::RwLock<Option<FastRoute>>,
    pub(super) tx_bytes: AtomicU64,
    pub(super) tx_packets: AtomicU64,
    /// Packets refused because they came from another local address than WireGuard's.
    pub(super) refused: AtomicU64,
}

impl FastPath {
    /// The pair the published route was made from.
    pub(super) fn published(&self) -> Option<PathAddr> {
        self.route
            .read()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.path))
    }

    /// Publishes a new route (`None`: every packet goes through the engine).
    pub(super) fn publish(&self, route: Option<FastRoute>) {
        if let Ok(mut w) = self.route.write() {
            *w = route;
        }
    }

    pub(super) fn current(&self) -> Option<FastRoute> {
        self.route.read().ok().and_then(|r| r.clone())
    }
}

/// Starts the reader of peer `i`'s proxy socket `reader` (bound at `proxy_addr`).
pub(super) fn spawn_reader(
    i: usize,
    reader: Arc<UdpSocket>,
    proxy_addr: SocketAddr,
    configured_wg: Option<SocketAddr>,
    data: Arc<UdpSocket>,
    fast_r: Arc<FastPath>,
    tx: mpsc::Sender<FromWg>,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        // The one local address allowed to use this proxy port: the configured
        // `WireGuardEndpoint`, or the first address that sent here, until the daemon
        // restarts. Another local process can neither inject into the peer's path nor,
        // by sending here, redirect the peer's packets to itself.
        let mut allowed: Option<SocketAddr> = configured_wg;
        let mut last_notify: Option<Instant> = None;
        loop {
            let (n, src) = match reader.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP port unreachable from WireGuard not listening yet, etc.
                    tracing::debug!(error = %e, "proxy recv error");
                    continue;
                }
            };
            // The first packet goes to the engine, which learns the address from it.
            let first = allowed.is_none();
            match allowed {
                Some(a) if a != src => {
                    if fast_r.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(%src, wireguard = %a, proxy = %proxy_addr, "packet on a proxy port from another local address than WireGuard's refused (set WireGuardEndpoint, or restart the daemon after moving WireGuard)");
                    }
                    continue;
                }
                Some(_) => {}
                None => {
                    tracing::info!(%src, proxy = %proxy_addr, "WireGuard's address for this proxy port learned (fixed until restart)");
                    allowed = Some(src);
                }
            }
            let pkt = &buf[..n];
            // Fast path: the selected path is direct: send from here, no copy, no engine
            // round trip.
            let direct = if first { None } else { fast_r.current() };
            match direct {
                Some(FastRoute {
                    dest, pool_sock, ..
                }) => {
                    // A birthday-found path leaves from its pool socket.
                    if let Err(e) = pool_sock.as_ref().unwrap_or(&data).try_send_to(pkt, dest) {
                        super::net::note_send_error(&e, dest);
                    }
                    fast_r.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    fast_r.tx_packets.fetch_add(1, Ordering::Relaxed);
                    // Tell the engine now and then that data flows (active probing).
                    let now = Instant::now();
                    if last_notify.is_none_or(|t| now.duration_since(t) >= FAST_NOTIFY) {
                        last_notify = Some(now);
                        let _ = tx.try_send(FromWg::Active(i));
                    }
                }
                None => {
                    if tx
                        .send(FromWg::Packet(i, pkt.to_vec(), Some(src)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    })
    .abort_handle()
}
