//! The daemon's UDP data socket, shared with quinn: the QUIC connection to the rendezvous
//! rides the same socket as STUN, probes, TURN and WireGuard, so the address the rendezvous
//! reports is the data socket's own mapping (the mapping peers must hit), not the mapping of
//! some other socket.
//!
//! [`SharedSocket`] implements [`quinn::AsyncUdpSocket`]:
//! * **Sending**: quinn's datagrams go straight out of the data socket (`try_send_to`, IPv4
//!   destinations written IPv4-mapped when the socket is dual-stack `[::]`). Every destination
//!   quinn sends to is remembered as a *QUIC peer* (a small bounded list; an entry expires
//!   [`QUIC_PEER_IDLE`] after quinn last sent to it — a live connection sends keep-alives far
//!   more often).
//! * **Receiving**: the daemon's engine owns the receive side and, before anything else, hands
//!   each datagram to [`SharedSocket::offer`]. A datagram whose source is a QUIC peer is put in
//!   a bounded queue for quinn and quinn's `poll_recv` is woken; when the queue is full the
//!   datagram is dropped and counted (the engine never blocks on quinn). Everything else —
//!   STUN, probes, TURN, WireGuard — stays with the engine.
//!
//! Why by source and not by content: QUIC's first byte collides with the other protocols on
//! this socket. A short-header packet starts with `0x40..=0x7F`, which covers TURN ChannelData
//! (`0x40..=0x4F`); a Handshake packet's protected first byte can be `0xE1`, the probe magic;
//! with the QUIC bit greased (RFC 9287) anything goes. The source address is unambiguous: the
//! rendezvous' QUIC port is nobody's STUN, TURN or peer address.
//!
//! Only one quinn endpoint may use a `SharedSocket` at a time (one receive waker; two
//! endpoints would also answer each other's packets with stateless resets): make one
//! endpoint with [`crate::rendezvous::endpoint_on`] and reuse it for every connection.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::net::UdpSocket;

use meshpunch_proto::addr::{for_socket, unmap};

/// Datagrams waiting for quinn; more are dropped (and counted). The rendezvous connection
/// carries a few signalling messages and keep-alives, so this only fills if quinn's task
/// stalls.
pub const QUIC_QUEUE: usize = 256;
/// Most QUIC peers remembered at once (happy eyeballs tries every address of the rendezvous
/// host; the least recently used one is forgotten first).
pub const MAX_QUIC_PEERS: usize = 16;
/// How long after quinn last sent to an address its datagrams still go to quinn. Longer than
/// the rendezvous client's idle timeout (15 s) so a dying connection still sees its closes.
pub const QUIC_PEER_IDLE: Duration = Duration::from_secs(60);

/// Counters of the shared socket (see [`SharedSocket::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Datagrams from QUIC peers handed to quinn.
    pub rx: u64,
    /// Datagrams from QUIC peers dropped (queue full, or larger than quinn's buffer).
    pub rx_dropped: u64,
    /// Datagrams quinn sent.
    pub tx: u64,
    /// Datagrams quinn sent that the socket refused (other than "would block"; UDP is lossy
    /// and quinn retransmits, as with quinn's own sockets).
    pub tx_errors: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Datagrams for quinn: source (in the form quinn uses) and bytes.
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    /// quinn's endpoint driver, waiting in `poll_recv`.
    waker: Option<Waker>,
    /// Addresses quinn sent to (canonical form) and when it last did.
    peers: Vec<(SocketAddr, Instant)>,
}

/// The data socket as quinn sees it; see the module docs.
#[derive(Debug)]
pub struct SharedSocket {
    sock: Arc<UdpSocket>,
    local: SocketAddr,
    /// The socket is IPv6 with IPv4 mapped in (`[::]`, `IPV6_V6ONLY` off).
    dual_stack: bool,
    state: Mutex<State>,
    rx: AtomicU64,
    rx_dropped: AtomicU64,
    tx: AtomicU64,
    tx_errors: AtomicU64,
}

impl SharedSocket {
    /// Wraps the data socket. `dual_stack`: it is bound to an IPv6 address with IPv4 mapped
    /// in, so IPv4 destinations are written IPv4-mapped.
    pub fn new(sock: Arc<UdpSocket>, dual_stack: bool) -> io::Result<Arc<SharedSocket>> {
        let local = sock.local_addr()?;
        Ok(Arc::new(SharedSocket {
            sock,
            local,
            dual_stack: dual_stack && local.is_ipv6(),
            state: Mutex::new(State::default()),
            rx: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            tx_errors: AtomicU64::new(0),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every point a panic could happen; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's hook: a datagram `pkt` arrived from `from` (canonical form) on the data
    /// socket. Returns true when it belongs to quinn (queued, or dropped because the queue is
    /// full); false when the engine should handle it.
    pub fn offer(&self, now: Instant, from: SocketAddr, pkt: &[u8]) -> bool {
        let mut st = self.state();
        let Some(pos) = st.peers.iter().position(|(a, _)| *a == from) else {
            return false;
        };
        if st
            .peers
            .get(pos)
            .is_some_and(|(_, last)| now.saturating_duration_since(*last) > QUIC_PEER_IDLE)
        {
            st.peers.swap_remove(pos);
            return false;
        }
        if st.queue.len() >= QUIC_QUEUE {
            drop(st);
            self.rx_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "QUIC receive queue full; datagram dropped");
            return true;
        }
        let src = self.for_quinn(from);
        st.queue.push_back((src, pkt.to_vec()));
        let waker = st.waker.take();
        drop(st);
        self.rx.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Whether quinn sent to `addr` (canonical form) lately.
    pub fn is_quic_peer(&self, addr: SocketAddr) -> bool {
        self.state().peers.iter().any(|(a, _)| *a == addr)
    }

    /// Counters.
    pub fn stats(&self) -> SharedStats {
        SharedStats {
            rx: self.rx.load(Ordering::Relaxed),
            rx_dropped: self.rx_dropped.load(Ordering::Relaxed),
            tx: self.tx.load(Ordering::Relaxed),
            tx_errors: self.tx_errors.load(Ordering::Relaxed),
        }
    }

    /// An address in the form quinn uses for this socket (IPv4-mapped when dual-stack, which
    /// is what quinn's `connect` turns an IPv4 address into on an IPv6 socket).
    fn for_quinn(&self, a: SocketAddr) -> SocketAddr {
        if self.dual_stack {
            for_socket(true, a)
        } else {
            unmap(a)
        }
    }

    fn note_peer(&self, dest: SocketAddr) {
        let now = Instant::now();
        let mut st = self.state();
        if let Some(p) = st.peers.iter_mut().find(|(a, _)| *a == dest) {
            p.1 = now;
            return;
        }
        if st.peers.len() >= MAX_QUIC_PEERS {
            if let Some(oldest) = st
                .peers
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(i, _)| i)
            {
                st.peers.swap_remove(oldest);
            }
        }
        st.peers.push((dest, now));
    }

    fn send_one(&self, dest: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        match self.sock.try_send_to(bytes, dest) {
            Ok(_) => {
                self.tx.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                // Like quinn-udp: a refused send is a lost datagram, not a dead connection.
                self.tx_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, %dest, "QUIC send on the data socket failed");
                Ok(())
            }
        }
    }
}

impl AsyncUdpSocket for SharedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            sock: self.sock.clone(),
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.note_peer(unmap(transmit.destination));
        let dest = self.for_quinn(transmit.destination);
        // max_transmit_segments is 1, so quinn never batches; split if it ever does.
        let seg = transmit
            .segment_size
            .filter(|s| *s > 0)
            .unwrap_or(transmit.contents.len().max(1));
        for chunk in transmit.contents.chunks(seg) {
            self.send_one(dest, chunk)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.state();
        let mut n = 0;
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((src, pkt)) = st.queue.pop_front() else {
                break;
            };
            let Some(dst) = buf.get_mut(..pkt.len()) else {
                self.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            dst.copy_from_slice(&pkt);
            *m = RecvMeta::default();
            m.addr = src;
            m.len = pkt.len();
            // quinn splits the buffer at `stride`; one datagram per buffer.
            m.stride = pkt.len();
            m.ecn = None;
            m.dst_ip = None;
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Write readiness of the data socket for one quinn task.
struct Writable {
    sock: Arc<UdpSocket>,
    fut: Option<Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl std::fmt::Debug for Writable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let sock = &this.sock;
        let fut = this.fut.get_or_insert_with(|| {
            let sock = sock.clone();
            Box::pin(async move { sock.writable().await })
        });
        let r = fut.as_mut().poll(cx);
        if r.is_ready() {
            this.fut = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn meta() -> [RecvMeta; 2] {
        [RecvMeta::default(), RecvMeta::default()]
    }

    #[tokio::test]
    async fn only_sources_quinn_sent_to_are_taken_from_the_engine() {
        let data = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let shared = SharedSocket::new(data.clone(), false).unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let now = Instant::now();

        // Nothing sent yet: everything belongs to the engine.
        assert!(!shared.offer(now, server_addr, b"quic?"));

        // quinn sends: the datagram leaves from the data socket itself.
        let t = Transmit {
            destination: server_addr,
            ecn: None,
            contents: b"initial",
            segment_size: None,
            src_ip: None,
        };
        // A fresh tokio socket is not known writable yet: quinn's own retry path.
        while let Err(e) = shared.try_send(&t) {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            let mut poller = shared.clone().create_io_poller();
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                .await
                .unwrap();
        }
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"initial");
        assert_eq!(from, data.local_addr().unwrap());

        // Its answer goes to quinn; a datagram from anyone else stays with the engine.
        assert!(shared.offer(now, server_addr, b"handshake"));
        assert!(!shared.offer(now, other, b"probe"));
        let mut b1 = [0u8; 64];
        let mut b2 = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut b1), IoSliceMut::new(&mut b2)];
        let mut m = meta();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match shared.poll_recv(&mut cx, &mut bufs, &mut m) {
            Poll::Ready(Ok(1)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(m[0].addr, server_addr);
        assert_eq!(m[0].len, 9);
        assert_eq!(m[0].stride, 9);
        assert_eq!(&b1[..9], b"handshake");
        // Empty queue: pending until the engine offers more.
        let mut bufs = [IoSliceMut::new(&mut b1), IoSliceMut::new(&mut b2)];
        assert!(shared.poll_recv(&mut cx, &mut bufs, &mut m).is_pending());
        let st = shared.stats();
        assert_eq!((st.rx, st.tx, st.rx_dropped), (1, 1, 0));

        // Long after quinn's last send the address is the engine's again.
        assert!(!shared.offer(now + QUIC_PEER_IDLE * 2, server_addr, b"late"));
        assert!(!shared.is_quic_peer(server_addr));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let data = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let shared = SharedSocket::new(data, false).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        shared.note_peer(peer);
        let now = Instant::now();
        for _ in 0..QUIC_QUEUE + 10 {
            assert!(shared.offer(now, peer, b"x"));
        }
        let st = shared.stats();
        assert_eq!(st.rx, QUIC_QUEUE as u64);
        assert_eq!(st.rx_dropped, 10);
    }

    #[tokio::test]
    async fn dual_stack_socket_gives_quinn_ipv4_mapped_sources() {
        let Ok(std) = std::net::UdpSocket::bind("[::]:0") else {
            return; // no IPv6 here
        };
        std.set_nonblocking(true).unwrap();
        let data = Arc::new(UdpSocket::from_std(std).unwrap());
        let shared = SharedSocket::new(data, true).unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let v4 = server.local_addr().unwrap();
        let mapped = SocketAddr::new(
            IpAddr::V6(match v4.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            }),
            v4.port(),
        );
        // quinn on an IPv6 socket sends to the mapped form; the engine sees the IPv4 form.
        let t = Transmit {
            destination: mapped,
            ecn: None,
            contents: b"initial",
            segment_size: None,
            src_ip: None,
        };
        // A fresh tokio socket is not known writable yet: quinn's own retry path.
        while let Err(e) = shared.try_send(&t) {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            let mut poller = shared.clone().create_io_poller();
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                .await
                .unwrap();
        }
        let mut buf = [0u8; 16];
        let _ = server.recv_from(&mut buf).await.unwrap();
        assert!(shared.offer(Instant::now(), v4, b"answer"));
        let mut b1 = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut b1)];
        let mut m = [RecvMeta::default()];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            shared.poll_recv(&mut cx, &mut bufs, &mut m),
            Poll::Ready(Ok(1))
        ));
        assert_eq!(m[0].addr, mapped);
    }
}
