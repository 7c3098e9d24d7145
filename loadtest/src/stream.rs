//! TURN over a stream for the load (RFC 8656 §3.1): one TCP or TLS connection per simulated
//! client carries its Allocate, its ChannelBinds and then its ChannelData, framed by proto's
//! [`StreamFramer`] and [`encode_channel_data`] (the one home of the stream codec). The peers
//! stay on UDP: what a stream transport costs the relay is the client side (TCP receive, TLS
//! decryption, reframing) while the relayed side is the same UDP as ever.
//!
//! Setup is blocking with a deadline. During a trial the connection is non-blocking: the
//! sender hands whole runs of padded ChannelData to [`StreamConn::try_send`], which takes
//! them only while the previous runs have left for the kernel (the socket's send buffer is
//! the queue, as the daemon's bounded queue is for a real client). A run refused because the
//! stream is still backed up — the server does not read fast enough — counts as sent and
//! lost, never as a generator limit.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshpunch_proto::turn::stream::{encode_channel_data, StreamFramer, MAX_STREAM_FRAME};
use meshpunch_proto::turn_client::{TurnClient, TurnEvent};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

/// How a simulated client reaches the TURN server.
#[derive(Debug, Clone)]
pub enum Transport {
    /// UDP datagrams (the default).
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls(TlsOptions),
}

impl Transport {
    /// Name used in reports: `udp`, `tcp`, `tls`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
        }
    }
}

/// Client side of TURN over TLS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsOptions {
    /// Trusts exactly the certificates in PEM file `ca` (the relay's self-signed certificate,
    /// or the CA that issued it) and checks the server's certificate for `name` (a DNS name
    /// or an IP literal). TLS 1.3 and 1.2, ring, no ALPN (TURN servers need none).
    pub fn from_ca_file(ca: &Path, name: &str) -> Result<TlsOptions, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{}: {e}", ca.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", ca.display()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{}: certificate unusable: {e}", ca.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
        Ok(TlsOptions {
            config: Arc::new(config),
            name,
        })
    }
}

/// One client's connection to the server: TCP, with a TLS session on top for `tls`.
pub struct StreamConn {
    tcp: TcpStream,
    tls: Option<rustls::ClientConnection>,
    /// TCP only: bytes of the last run the kernel has not taken yet.
    pending: Vec<u8>,
    /// Read side, for setup answers.
    framer: StreamFramer,
}

impl std::fmt::Debug for StreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConn")
            .field("tls", &self.tls.is_some())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl StreamConn {
    /// Connects (and for TLS completes the handshake) within `timeout`, from `client_ip`.
    pub fn connect(
        server: SocketAddr,
        client_ip: std::net::IpAddr,
        transport: &Transport,
        timeout: Duration,
    ) -> io::Result<StreamConn> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.bind(&SocketAddr::new(client_ip, 0).into())?;
        sock.connect_timeout(&server.into(), timeout)?;
        let tcp: TcpStream = sock.into();
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
        tcp.set_write_timeout(Some(timeout))?;
        let tls = match transport {
            Transport::Tls(o) => {
                let mut c = rustls::ClientConnection::new(o.config.clone(), o.name.clone())
                    .map_err(io::Error::other)?;
                // A run is whole or refused (see try_send): no rustls limit in between.
                c.set_buffer_limit(None);
                Some(c)
            }
            _ => None,
        };
        let mut conn = StreamConn {
            tcp,
            tls,
            pending: Vec::new(),
            framer: StreamFramer::new(MAX_STREAM_FRAME),
        };
        if let Some(c) = conn.tls.as_mut() {
            let deadline = Instant::now() + timeout;
            while c.is_handshaking() {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    ));
                }
                match c.complete_io(&mut conn.tcp) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(conn)
    }

    /// Blocking write of whole messages (setup).
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(c) => {
                let mut s = rustls::Stream::new(c, &mut self.tcp);
                s.write_all(bytes)?;
                s.flush()
            }
            None => self.tcp.write_all(bytes),
        }
    }

    /// Sends what the sans-IO client wants sent, ChannelData padded for the stream.
    fn flush_client(&mut self, client: &mut TurnClient) -> io::Result<()> {
        while let Some(t) = client.poll_transmit() {
            if t.payload.first().is_some_and(|b| b & 0xC0 == 0x40) && t.payload.len() >= 4 {
                let ch = u16::from_be_bytes([t.payload[0], t.payload[1]]);
                let mut out = vec![0u8; t.payload.len() + 4];
                let n = encode_channel_data(ch, &t.payload[4..], &mut out)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                self.write_all(&out[..n])?;
            } else {
                self.write_all(&t.payload)?;
            }
        }
        Ok(())
    }

    /// Reads once (up to the socket's read timeout) and feeds whole messages to `client`.
    fn pump(&mut self, client: &mut TurnClient, server: SocketAddr) -> io::Result<()> {
        let space = self.framer.read_space();
        let r = match self.tls.as_mut() {
            Some(c) => rustls::Stream::new(c, &mut self.tcp).read(space),
            None => self.tcp.read(space),
        };
        match r {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the stream",
                ))
            }
            Ok(n) => self.framer.commit(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                client.handle_timeout(Instant::now());
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        loop {
            match self.framer.next_frame() {
                Ok(Some(f)) => {
                    let _ = client.handle_input(Instant::now(), server, f.bytes);
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
    }

    /// Drives `client` over this stream until `until` says done (setup requests).
    pub fn drive(
        &mut self,
        client: &mut TurnClient,
        server: SocketAddr,
        timeout: Duration,
        until: impl Fn(&TurnEvent) -> Option<Result<(), String>>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush_client(client).map_err(|e| e.to_string())?;
            while let Some(ev) = client.poll_event() {
                if let Some(done) = until(&ev) {
                    return done;
                }
                if let TurnEvent::Failed { op, code, reason } = &ev {
                    return Err(format!("{op:?} failed: {code:?} {reason}"));
                }
            }
            if Instant::now() >= deadline {
                return Err("timed out".into());
            }
            self.pump(client, server).map_err(|e| e.to_string())?;
        }
    }

    /// Switches to the trial's non-blocking sends.
    pub fn start_load(&mut self) -> io::Result<()> {
        self.tcp.set_nonblocking(true)
    }

    /// True while earlier runs have not all left for the kernel.
    fn backed_up(&self) -> bool {
        match &self.tls {
            Some(c) => c.wants_write(),
            None => !self.pending.is_empty(),
        }
    }

    /// Writes to the kernel what it takes without blocking.
    fn flush_some(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(c) => {
                while c.wants_write() {
                    match c.write_tls(&mut self.tcp) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            None => {
                let mut off = 0;
                while off < self.pending.len() {
                    match self.tcp.write(&self.pending[off..]) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => off += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                self.pending.drain(..off);
            }
        }
        Ok(())
    }

    /// Queues `frames` (whole padded messages) unless the stream is still backed up with
    /// earlier ones. Ok(false): refused, nothing of `frames` was queued.
    pub fn try_send(&mut self, frames: &[u8]) -> io::Result<bool> {
        self.flush_some()?;
        if self.backed_up() {
            return Ok(false);
        }
        match self.tls.as_mut() {
            Some(c) => c.writer().write_all(frames)?,
            None => self.pending.extend_from_slice(frames),
        }
        self.flush_some()?;
        Ok(true)
    }
}
