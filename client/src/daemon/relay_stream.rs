//! The driver side of a stream relay link (TURN over TCP or TLS, RFC 8656 §3.1): one task per
//! link the node asks for ([`Event::OpenRelayStream`](meshpunch_proto::node::Event)). The
//! task connects (TLS: the relay's certificate checked like the rendezvous' — system roots
//! plus `--ca-file`/`CaFile`, against the URI's host name, or its IP SANs when the host is an
//! IP literal), splits what it reads into whole STUN/ChannelData messages with
//! [`StreamFramer`] and hands them to the engine, and writes what the node sends, adding the
//! stream padding to ChannelData (RFC 8656 §12.5). It reconnects with backoff until the node
//! closes the link.
//!
//! Outgoing messages wait in a bounded queue ([`QUEUE`] messages); when it is full (a stalled
//! stream) or the stream is down, a message is dropped and counted
//! ([`RelayStreams::dropped`], `home_relay.stream_dropped` in `meshpunch status`): memory never
//! grows with a slow relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshpunch_proto::node::relay::{LinkId, StreamKind};
use meshpunch_proto::turn::stream::{encode_channel_data, StreamFramer, MAX_STREAM_FRAME};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Internal;

/// Messages queued per stream before new ones are dropped.
pub(super) const QUEUE: usize = 512;
/// TCP connect plus TLS handshake must finish within this.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// A write that makes no progress for this long ends the connection.
pub(super) const WRITE_STALL: Duration = Duration::from_secs(10);
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Link {
    server: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    /// The task; it ends by itself once `tx` is dropped (after writing what was queued, or
    /// at once while it is down or waiting to reconnect).
    _task: tokio::task::JoinHandle<()>,
}

/// The engine's stream relay links.
pub(super) struct RelayStreams {
    ca_roots: Vec<CertificateDer<'static>>,
    tls: Option<tokio_rustls::TlsConnector>,
    links: HashMap<LinkId, Link>,
    /// Outgoing messages dropped (queue full, stream down).
    pub dropped: Arc<AtomicU64>,
}

impl RelayStreams {
    pub(super) fn new(ca_roots: Vec<CertificateDer<'static>>) -> Self {
        RelayStreams {
            ca_roots,
            tls: None,
            links: HashMap::new(),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The TLS client config for relays: the rendezvous' verifier (system roots plus the
    /// configured CA file), TLS 1.3 and 1.2, no ALPN (TURN servers do not need one).
    fn tls(&mut self) -> Result<tokio_rustls::TlsConnector, String> {
        if let Some(t) = &self.tls {
            return Ok(t.clone());
        }
        let (cfg, _failures) = crate::tls::relay_client_crypto(&self.ca_roots)?;
        let t = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        self.tls = Some(t.clone());
        Ok(t)
    }

    /// Starts link `link`'s stream task.
    pub(super) fn open(
        &mut self,
        link: LinkId,
        server: SocketAddr,
        kind: StreamKind,
        host: String,
        events: mpsc::Sender<Internal>,
    ) {
        let tls = match kind {
            StreamKind::Tls => match self.tls() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(link, error = %e, "TURN over TLS impossible");
                    None
                }
            },
            StreamKind::Tcp => None,
        };
        if kind == StreamKind::Tls && tls.is_none() {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = self.dropped.clone();
        let task = tokio::spawn(run(link, server, tls, host, rx, events, dropped));
        self.links.insert(
            link,
            Link {
                server,
                tx,
                _task: task,
            },
        );
    }

    /// Closes link `link`: its task writes what is queued, then ends.
    pub(super) fn close(&mut self, link: LinkId) {
        self.links.remove(&link);
    }

    /// The server of link `link`.
    pub(super) fn server(&self, link: LinkId) -> Option<SocketAddr> {
        self.links.get(&link).map(|l| l.server)
    }

    /// Queues one whole STUN or ChannelData message for link `link` (dropped and counted
    /// when the queue is full or the link is unknown).
    pub(super) fn send(&self, link: LinkId, msg: &[u8]) {
        let ok = self
            .links
            .get(&link)
            .is_some_and(|l| l.tx.try_send(msg.to_vec()).is_ok());
        if !ok {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The stream form of `msg`: ChannelData padded to a multiple of 4 (RFC 8656 §12.5), STUN
/// as it is (its length is always a multiple of 4).
fn stream_form(msg: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let is_cd = msg.first().is_some_and(|b| b & 0xC0 == 0x40);
    if is_cd && msg.len() >= 4 {
        let channel = u16::from_be_bytes([msg[0], msg[1]]);
        let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
        if let Some(data) = msg.get(4..4 + len) {
            out.resize(meshpunch_proto::turn::stream::channel_data_len(len), 0);
            if let Ok(n) = encode_channel_data(channel, data, out) {
                out.truncate(n);
                return;
            }
        }
    }
    out.extend_from_slice(msg);
}

async fn connect(
    server: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    host: &str,
) -> Result<Box<dyn Stream>, String> {
    // `FwMark`: in a full tunnel the relay stream must not be routed into the tunnel.
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, crate::fwmark::tcp_connect(server))
        .await
        .map_err(|_| format!("tcp {server}: connect timed out"))?
        .map_err(|e| format!("tcp {server}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    // An IP literal becomes `ServerName::IpAddress` and is checked against the IP SANs.
    let name =
        ServerName::try_from(host.to_string()).map_err(|e| format!("TLS name {host:?}: {e}"))?;
    let s = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
        .await
        .map_err(|_| format!("tls {server}: handshake timed out"))?
        .map_err(|e| format!("tls {server} ({host}): {e}"))?;
    Ok(Box::new(s))
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn run(
    link: LinkId,
    server: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    host: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Internal>,
    dropped: Arc<AtomicU64>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let reason = match connect(server, tls.as_ref(), &host).await {
            Ok(stream) => {
                // What was queued while down belonged to a dead allocation.
                while rx.try_recv().is_ok() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(link, %server, "relay stream connected");
                if events.send(Internal::RelayUp(link)).await.is_err() {
                    return;
                }
                backoff = MIN_BACKOFF;
                match pump(link, stream, &mut rx, &events).await {
                    Some(r) => r,
                    // The link was closed and its queue written.
                    None => return,
                }
            }
            Err(e) => e,
        };
        tracing::warn!(link, %server, error = %reason, retry_in = ?backoff, "relay stream down");
        if events
            .send(Internal::RelayDown(link, reason))
            .await
            .is_err()
        {
            return;
        }
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                m = rx.recv() => match m {
                    Some(_) => { dropped.fetch_add(1, Ordering::Relaxed); }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Moves bytes until the stream fails (`Some(reason)`) or the link is closed (`None`).
async fn pump(
    link: LinkId,
    stream: Box<dyn Stream>,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<Internal>,
) -> Option<String> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut framer = StreamFramer::new(MAX_STREAM_FRAME);
    let mut out = Vec::with_capacity(2048);
    loop {
        // Hand out every whole message before reading more.
        loop {
            match framer.next_frame() {
                Ok(Some(f)) => {
                    let msg = f.bytes.to_vec();
                    if events.send(Internal::RelayFrame(link, msg)).await.is_err() {
                        return None;
                    }
                }
                Ok(None) => break,
                Err(e) => return Some(format!("relay sent a bad frame: {e}")),
            }
        }
        tokio::select! {
            r = rd.read(framer.read_space()) => match r {
                Ok(0) => return Some("closed by the relay".into()),
                Ok(n) => framer.commit(n),
                Err(e) => return Some(format!("read: {e}")),
            },
            m = rx.recv() => match m {
                Some(msg) => {
                    stream_form(&msg, &mut out);
                    match tokio::time::timeout(WRITE_STALL, wr.write_all(&out)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Some(format!("write: {e}")),
                        Err(_) => return Some("write stalled".into()),
                    }
                }
                None => {
                    let _ = tokio::time::timeout(WRITE_STALL, wr.shutdown()).await;
                    return None;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_data_gets_the_stream_padding_and_stun_does_not() {
        let mut out = Vec::new();
        stream_form(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5], &mut out);
        assert_eq!(out, [0x40, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        let stun = [
            0u8, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        stream_form(&stun, &mut out);
        assert_eq!(out, stun);
    }

    #[tokio::test]
    async fn a_stalled_relay_stream_drops_and_counts_instead_of_queueing_without_bound() {
        // A "relay" that accepts and never reads.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let (ev_tx, mut ev_rx) = mpsc::channel(16);
        let mut rs = RelayStreams::new(Vec::new());
        rs.open(1, addr, StreamKind::Tcp, "127.0.0.1".into(), ev_tx);
        assert!(matches!(ev_rx.recv().await, Some(Internal::RelayUp(1))));
        // 60 kB ChannelData messages, 4,000 of them (240 MB): the socket buffers take a few
        // MB, the queue at most QUEUE messages; the rest is dropped and counted.
        let mut msg = vec![0x40, 0x00, 0xEA, 0x60];
        msg.resize(4 + 60_000, 0xAB);
        for _ in 0..4000 {
            rs.send(1, &msg);
            tokio::task::yield_now().await;
        }
        let dropped = rs.dropped.load(Ordering::Relaxed);
        assert!(dropped > 3000, "dropped {dropped}");
        // An unknown link is a drop too, never a panic.
        rs.send(9, &msg);
        assert_eq!(rs.dropped.load(Ordering::Relaxed), dropped + 1);
    }
}
