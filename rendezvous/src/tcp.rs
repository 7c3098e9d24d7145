//! The TLS-over-TCP listener: the same signalling protocol as QUIC (same frames, ALPN
//! `meshpunch/1`, the key proof bound to the TLS exporter) for clients whose network blocks
//! UDP. By default it listens on the QUIC address and port (443 in production: one firewall
//! rule opens both).
//!
//! Admission, in this order (each refusal closes only that connection and counts
//! `meshpunch_rendezvous_limit_hits_total{limit=…}`):
//!
//! 1. **Draining**: new connections are closed at once.
//! 2. **Per-source slot** (`limits.max_connections_per_ip`, IPv4 address or IPv6 /64) at
//!    accept: TCP's three-way handshake already proved the source address, so no spoofer can
//!    hold a victim's slots. The slot is held for the whole connection.
//! 3. **First byte** within `limits.handshake_timeout` (`tls_handshake_timeout`): a
//!    connection that never speaks costs one task and one descriptor until then, and no
//!    handshake slot, so thousands of idle connections cannot starve real clients.
//! 4. **Global handshake cap** (`limits.max_handshakes_in_flight`, shared with QUIC) from the
//!    first byte until the TLS handshake completes (`handshakes_in_flight`).
//! 5. **TLS 1.3 handshake** completed within the rest of `limits.handshake_timeout`
//!    (`tls_handshake_timeout`); a failed one (wrong protocol, no ALPN, bad record) counts
//!    `meshpunch_rendezvous_tcp_handshake_failures_total`.
//!
//! Then the session runs exactly as over QUIC ([`crate::server::run_session`]): the
//! registration deadline, frame-size limit, stalled-frame timeout (`limits.frame_timeout`),
//! registration/offer/watch limits and drain are the same code. A dead peer is found by TCP
//! keep-alives (about `limits.idle_timeout`) and a write that is not acknowledged within
//! `limits.idle_timeout` (`TCP_USER_TIMEOUT`), the TCP counterparts of QUIC's idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics as m;
use crate::server::{run_session, Link, Recv, Shared, StartError};

/// Read buffer of one TCP connection. Signalling frames are small; a 64 KiB frame arrives
/// in several reads.
const READ_BUF: usize = 4096;

/// Pause after `accept` fails (out of descriptors): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Binds the TCP listener: `tcp_listen`, else the QUIC address and the port QUIC got.
/// When QUIC's port was chosen by the OS (`listen` port 0, tests) and that TCP port is taken,
/// the OS picks one too (connect strings then carry `tcp=`).
pub(crate) async fn bind(cfg: &Config, quic: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |addr: SocketAddr| {
        move |source| StartError::Io {
            what: format!("binding TCP {addr}"),
            source,
        }
    };
    if let Some(addr) = cfg.tcp_listen {
        return TcpListener::bind(addr).await.map_err(err(addr));
    }
    let same = SocketAddr::new(cfg.listen.ip(), quic.port());
    match TcpListener::bind(same).await {
        Ok(l) => Ok(l),
        Err(e) if cfg.listen.port() == 0 => {
            debug!(%same, error = %e, "TCP port of the OS-chosen QUIC port taken; using another");
            let any = SocketAddr::new(cfg.listen.ip(), 0);
            TcpListener::bind(any).await.map_err(err(any))
        }
        Err(e) => Err(err(same)(e)),
    }
}

/// Accepts TCP connections until the task is aborted (the server stops).
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: TlsAcceptor) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, remote)) => {
                    if shared.draining() {
                        continue;
                    }
                    let Some(slot) = shared.acquire_slot(remote.ip()) else {
                        metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "connections_per_ip")
                            .increment(1);
                        debug!(%remote, "TCP connection refused: too many connections from this source");
                        continue;
                    };
                    metrics::counter!(m::CONNECTIONS_TOTAL, "transport" => "tcp").increment(1);
                    conns.spawn(handle(shared.clone(), tls.clone(), stream, remote, slot));
                }
                Err(e) => {
                    metrics::counter!(m::TCP_ACCEPT_ERRORS_TOTAL).increment(1);
                    warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn set_socket_options(stream: &TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    // Three probes lost end the connection after about `idle` (QUIC's idle timeout).
    let ka = socket2::TcpKeepalive::new()
        .with_time((idle / 2).max(Duration::from_secs(1)))
        .with_interval((idle / 6).max(Duration::from_secs(1)))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(idle));
}

async fn handle(
    shared: Arc<Shared>,
    tls: TlsAcceptor,
    stream: TcpStream,
    remote: SocketAddr,
    _slot: crate::limits::ConnSlot,
) {
    let limits = &shared.cfg.limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    set_socket_options(&stream, limits.idle_timeout);
    let local = stream.local_addr().unwrap_or(remote);
    // No handshake slot until the client speaks (`peek`: readiness alone can be spurious).
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return,
        Err(_) => {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "tls_handshake_timeout").increment(1);
            debug!(%remote, "TCP connection closed: nothing sent before the handshake deadline");
            return;
        }
    }
    let Some(guard) = shared.begin_handshake() else {
        metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "handshakes_in_flight").increment(1);
        debug!(%remote, "TCP connection closed: handshake cap reached");
        return;
    };
    let started = Instant::now();
    let tls_stream = match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!(m::TCP_HANDSHAKE_FAILURES_TOTAL).increment(1);
            debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "tls_handshake_timeout").increment(1);
            debug!(%remote, "TLS handshake not finished in time");
            return;
        }
    };
    // TLS 1.3: from our first flight to the client's Finished is one round trip (plus the
    // client's signature check), the RTT estimate used for punch timing.
    let rtt = started.elapsed();
    drop(guard);
    let (_, conn) = tls_stream.get_ref();
    // rustls refuses a client offering other protocols; one offering none must be refused
    // here.
    if conn.alpn_protocol() != Some(meshpunch_proto::wire::ALPN) {
        metrics::counter!(m::TCP_HANDSHAKE_FAILURES_TOTAL).increment(1);
        debug!(%remote, "TLS client did not offer ALPN meshpunch/1");
        return;
    }
    // The same exporter input as quinn's (label, empty context): the key proof is the same
    // computation on both transports. All zeros if unavailable: then no proof verifies.
    let mut exporter = [0u8; meshpunch_proto::wire::EXPORTER_LEN];
    if let Ok(out) = conn.export_keying_material(
        [0u8; meshpunch_proto::wire::EXPORTER_LEN],
        meshpunch_proto::wire::EXPORTER_LABEL,
        Some(b""),
    ) {
        exporter = out;
    }
    let (read, write) = tokio::io::split(tls_stream);
    let link = Link::Tcp(TcpLink {
        write,
        remote,
        local,
        rtt,
        timed_out: false,
    });
    let recv = Recv::Tcp(TcpRecv {
        read,
        buf: vec![0u8; READ_BUF].into_boxed_slice(),
    });
    run_session(shared, link, recv, exporter, std::future::pending()).await;
}

/// The writing side of a TLS-over-TCP session.
pub(crate) struct TcpLink {
    write: WriteHalf<TlsStream<TcpStream>>,
    pub(crate) remote: SocketAddr,
    pub(crate) local: SocketAddr,
    /// Estimated from the TLS handshake.
    pub(crate) rtt: Duration,
    timed_out: bool,
}

impl TcpLink {
    pub(crate) async fn write_all(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let r = async {
            self.write.write_all(frame).await?;
            self.write.flush().await
        }
        .await;
        if let Err(e) = &r {
            self.timed_out |= e.kind() == std::io::ErrorKind::TimedOut;
        }
        r
    }

    /// Sends TLS close_notify and the FIN (bounded wait for a peer that does not read).
    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.write.shutdown()).await;
    }

    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out
    }
}

/// The reading side of a TLS-over-TCP session.
pub(crate) struct TcpRecv {
    read: ReadHalf<TlsStream<TcpStream>>,
    buf: Box<[u8]>,
}

impl TcpRecv {
    /// The next bytes; `None` at end of stream or on an error (a keep-alive timeout among
    /// them).
    pub(crate) async fn read(&mut self) -> Option<bytes::Bytes> {
        match self.read.read(&mut self.buf).await {
            Ok(0) => None,
            Ok(n) => Some(bytes::Bytes::copy_from_slice(self.buf.get(..n)?)),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "idle_timeout").increment(1);
                }
                None
            }
        }
    }
}
