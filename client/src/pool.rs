//! Birthday probing support for the daemon: the pool of extra UDP sockets the "hard" side
//! (behind an endpoint-dependent mapping) pings an easy peer from. When to open and close it
//! is the node's decision ([`meshpunch_proto::node::Event::OpenPool`] / `ClosePool`); the
//! classification of our own mapping is [`meshpunch_proto::node::discovery::StunMappings`].
//!
//! The pool is shared by every peer and opened only while some peer's
//! [`meshpunch_proto::path::PeerPath::wants_pool`] is true; afterwards every socket that no
//! pair uses is closed again (the one carrying a birthday-found path stays). Socket `i` of the
//! pool is [`LocalSocket`] `i` (1-based; 0 is the data socket). Each socket has a small reader
//! task that hands its datagrams to the engine through one channel, so the engine stays the
//! only owner of all state.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use meshpunch_proto::path::LocalSocket;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Largest datagram a pool socket receives (WireGuard packets over a birthday path included;
/// jumbo-frame sized so no real WireGuard MTU is cut).
const POOL_RECV_BUF: usize = 9216;
/// Receive buffer chunk of a pool socket's reader: datagrams are split off it as [`Bytes`]
/// that share the chunk, so a busy birthday path costs one allocation per chunk, not per
/// packet (the chunk is reclaimed once the engine dropped every datagram in it).
const POOL_RECV_CHUNK: usize = 64 * 1024;
/// Datagrams queued from all pool readers to the engine.
const POOL_QUEUE: usize = 1024;
/// After the system refused a pool socket (file descriptor limit), opening is not tried again
/// for this long (the engine asks on every turn of its loop).
const POOL_OPEN_RETRY: Duration = Duration::from_secs(10);

/// A datagram that arrived on a pool socket.
#[derive(Debug)]
pub(crate) struct PoolDatagram {
    /// Which pool socket.
    pub(crate) local: LocalSocket,
    /// Sender.
    pub(crate) from: SocketAddr,
    /// The bytes.
    pub(crate) bytes: Bytes,
}

struct PoolSocket {
    sock: Arc<UdpSocket>,
    /// The same socket (a duplicated descriptor) for the engine's sends: a plain `sendto`,
    /// so the first pings right after opening do not fail with `WouldBlock` before tokio's
    /// reactor has reported the new socket writable.
    send: std::net::UdpSocket,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for PoolSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The birthday socket pool (IPv4: NATs with random ports are IPv4 NATs).
pub(crate) struct Pool {
    cap: u16,
    socks: Vec<Option<PoolSocket>>,
    /// `Some` entries of `socks` (asked on every turn of the engine's loop).
    open: usize,
    /// Size announced to the path managers (0 = closed for new pairs).
    announced: u16,
    tx: mpsc::Sender<PoolDatagram>,
    rx: Option<mpsc::Receiver<PoolDatagram>>,
    open_failed_at: Option<Instant>,
    /// Sockets opened since start (status).
    pub(crate) opened_total: u64,
    /// SO_MARK of every pool socket (`FwMark`).
    mark: Option<u32>,
}

impl Pool {
    /// A closed pool of at most `cap` sockets.
    pub(crate) fn new(cap: u16) -> Self {
        let (tx, rx) = mpsc::channel(POOL_QUEUE);
        Pool {
            cap,
            socks: Vec::new(),
            open: 0,
            announced: 0,
            tx,
            rx: Some(rx),
            open_failed_at: None,
            opened_total: 0,
            mark: None,
        }
    }

    /// Marks every socket opened from now on with SO_MARK `mark` (`FwMark`).
    pub(crate) fn set_mark(&mut self, mark: Option<u32>) {
        self.mark = mark;
    }

    /// The receiving end of every pool socket (taken once by the engine loop).
    pub(crate) fn take_rx(&mut self) -> Option<mpsc::Receiver<PoolDatagram>> {
        self.rx.take()
    }

    /// Pool size announced to path managers (`1..=announced` are usable).
    pub(crate) fn announced(&self) -> u16 {
        self.announced
    }

    /// Sockets open now.
    pub(crate) fn open_count(&self) -> usize {
        self.open
    }

    /// Opens every missing socket up to the cap; returns the announced size (fewer if the
    /// system ran out of sockets; nothing is tried for [`POOL_OPEN_RETRY`] after a refusal).
    pub(crate) fn open(&mut self, now: Instant) -> u16 {
        if self
            .open_failed_at
            .is_some_and(|t| now.saturating_duration_since(t) < POOL_OPEN_RETRY)
        {
            return self.announced;
        }
        let mut n = 0u16;
        for i in 1..=self.cap {
            let idx = usize::from(i - 1);
            if self.socks.len() <= idx {
                self.socks.push(None);
            }
            if self.socks.get(idx).is_some_and(|s| s.is_none()) {
                match self.bind(i) {
                    Ok(s) => {
                        self.socks[idx] = Some(s);
                        self.open += 1;
                        self.opened_total += 1;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, opened = i - 1, "birthday pool: cannot open more sockets");
                        self.open_failed_at = Some(now);
                        break;
                    }
                }
            }
            n = i;
        }
        self.announced = n;
        n
    }

    fn bind(&self, local: LocalSocket) -> std::io::Result<PoolSocket> {
        let std = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))?;
        if let Some(mark) = self.mark {
            crate::daemon::set_mark(&std, mark)?;
        }
        // A birthday-found path carries MTU probes too.
        crate::daemon::set_probe_pmtu(&std, false)?;
        std.set_nonblocking(true)?;
        let send = std.try_clone()?;
        let sock = Arc::new(UdpSocket::from_std(std)?);
        let r = sock.clone();
        let tx = self.tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                if buf.capacity() < POOL_RECV_BUF {
                    buf.reserve(POOL_RECV_CHUNK);
                }
                match r.recv_buf_from(&mut buf).await {
                    Ok((n, from)) => {
                        let d = PoolDatagram {
                            local,
                            from,
                            bytes: buf.split_to(n.min(buf.len())).freeze(),
                        };
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                    // ICMP errors from pings to closed ports; keep reading.
                    Err(e) => {
                        buf.clear();
                        tracing::trace!(error = %e, local, "pool socket recv error");
                    }
                }
            }
        });
        Ok(PoolSocket { sock, send, reader })
    }

    fn slot(&self, local: LocalSocket) -> Option<&PoolSocket> {
        let idx = usize::from(local.checked_sub(1)?);
        self.socks.get(idx)?.as_ref()
    }

    /// The socket with index `local`, if open.
    pub(crate) fn socket(&self, local: LocalSocket) -> Option<&Arc<UdpSocket>> {
        self.slot(local).map(|s| &s.sock)
    }

    /// Local port of pool socket `local`.
    pub(crate) fn local_port(&self, local: LocalSocket) -> Option<u16> {
        self.socket(local)?.local_addr().ok().map(|a| a.port())
    }

    /// Sends from pool socket `local` (dropped if it is closed), with IP TTL `ttl` for this
    /// datagram only when given (low-TTL birthday pings; the socket's TTL is not changed, so
    /// a WireGuard packet sent from another task at the same time keeps the default).
    pub(crate) fn send(
        &self,
        local: LocalSocket,
        dest: SocketAddr,
        bytes: &[u8],
        ttl: Option<u8>,
    ) -> bool {
        let Some(s) = self.slot(local) else {
            return false;
        };
        let sent = match (ttl, dest) {
            (Some(ttl), SocketAddr::V4(v4)) => send_with_ttl(&s.send, v4, bytes, ttl),
            _ => s.send.send_to(bytes, dest),
        };
        match sent {
            Ok(_) => true,
            Err(e) => {
                crate::daemon::note_send_error(&e, dest);
                false
            }
        }
    }

    /// Closes every socket not in `used`; no new pairs may use the pool afterwards.
    pub(crate) fn close_unused(&mut self, used: &HashSet<LocalSocket>) {
        self.announced = 0;
        let mut closed = 0;
        for (idx, s) in self.socks.iter_mut().enumerate() {
            let local = LocalSocket::try_from(idx + 1).unwrap_or(LocalSocket::MAX);
            if s.is_some() && !used.contains(&local) {
                *s = None;
                closed += 1;
            }
        }
        self.open -= closed;
        if closed > 0 {
            tracing::info!(
                closed,
                kept = self.open_count(),
                "birthday pool: unused sockets closed"
            );
        }
    }
}

/// `sendmsg` with an `IP_TTL` control message: the TTL of this one datagram (Linux 4.6+).
fn send_with_ttl(
    sock: &std::net::UdpSocket,
    dest: std::net::SocketAddrV4,
    bytes: &[u8],
    ttl: u8,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dest.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dest.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one cmsg carrying a c_int, 8-byte aligned.
    let mut cbuf = [0u64; 4];
    let value = libc::c_int::from(ttl);
    // SAFETY: the sockaddr, iovec and control buffer live until sendmsg returns; the control
    // buffer is large and aligned enough for one cmsg with a c_int (CMSG_SPACE checked).
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        debug_assert!(space <= std::mem::size_of_val(&cbuf));
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &addr as *const libc::sockaddr_in as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_TTL;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), value);
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pool_opens_sends_receives_and_closes_unused_sockets() {
        let mut pool = Pool::new(4);
        let mut rx = pool.take_rx().unwrap();
        assert_eq!(pool.open(Instant::now()), 4);
        assert_eq!(pool.open_count(), 4);
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let pa = peer.local_addr().unwrap();
        assert!(pool.send(3, pa, b"hi", None));
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(Some(from.port()), pool.local_port(3));
        let to = SocketAddr::from(([127, 0, 0, 1], from.port()));
        peer.send_to(b"back", to).unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((d.local, &d.bytes[..]), (3, &b"back"[..]));
        pool.close_unused(&HashSet::from([3]));
        assert_eq!(pool.open_count(), 1);
        assert_eq!(pool.announced(), 0);
        assert!(pool.socket(3).is_some() && pool.socket(1).is_none());
        assert!(!pool.send(1, pa, b"x", None));
        assert!(pool.socket(0).is_none() && pool.socket(9).is_none());
        // Reopening keeps socket 3 (and its port) and binds the others again.
        let port3 = pool.local_port(3);
        assert_eq!(pool.open(Instant::now()), 4);
        assert_eq!(pool.local_port(3), port3);
        assert_eq!(pool.opened_total, 7);
    }

    /// A datagram sent with a TTL carries it (read back with `IP_RECVTTL` on loopback, which
    /// does not decrement); one without carries the socket's default.
    #[tokio::test]
    async fn send_sets_the_ttl_of_that_datagram_only() {
        let mut pool = Pool::new(1);
        assert_eq!(pool.open(Instant::now()), 1);
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        crate::hops::set_recv_ttl(&peer).unwrap();
        let pa = peer.local_addr().unwrap();
        assert!(pool.send(1, pa, b"low", Some(3)));
        assert!(pool.send(1, pa, b"full", None));
        let (bytes, ttl, _) = crate::hops::recv_with_ttl(&peer).unwrap();
        assert_eq!((&bytes[..], ttl), (&b"low"[..], Some(3)));
        let (bytes, ttl, _) = crate::hops::recv_with_ttl(&peer).unwrap();
        assert_eq!(&bytes[..], b"full");
        assert!(ttl.is_some_and(|t| t > 3), "{ttl:?}");
    }
}
