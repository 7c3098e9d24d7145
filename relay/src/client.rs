//! A small blocking driver for [`meshpunch_proto::turn_client::TurnClient`] over a std UDP
//! socket: what the interop tests use against our relay and against coturn, and a reference
//! for other drivers (the `meshpunch` client, the load generator).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::time::{Duration, Instant};

use meshpunch_proto::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent};

/// Errors of the blocking driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TurnSocketError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The server refused (or never answered, `code` = None).
    #[error("TURN {op:?} failed: {code:?} {reason}")]
    Failed {
        /// Operation.
        op: meshpunch_proto::turn_client::TurnOp,
        /// Error code.
        code: Option<u16>,
        /// Reason.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("timed out")]
    Timeout,
    /// Local API misuse.
    #[error(transparent)]
    Client(#[from] meshpunch_proto::turn_client::TurnClientError),
}

/// A TURN client on its own UDP socket.
#[derive(Debug)]
pub struct TurnSocket {
    sock: UdpSocket,
    client: TurnClient,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Relayed data that arrived while waiting for a control answer.
    backlog: std::collections::VecDeque<(SocketAddr, Vec<u8>)>,
}

impl TurnSocket {
    /// Binds `local` and prepares a client for `server`.
    pub fn new(local: SocketAddr, server: SocketAddr, creds: TurnCredentials) -> io::Result<Self> {
        let sock = UdpSocket::bind(local)?;
        Ok(TurnSocket {
            sock,
            client: TurnClient::new(server, creds, Instant::now()),
            buf: vec![0u8; 65_536],
            out: vec![0u8; 65_536 + 64],
            backlog: Default::default(),
        })
    }

    /// The state machine (for settings such as SHA-256 integrity).
    pub fn client_mut(&mut self) -> &mut TurnClient {
        &mut self.client
    }

    /// The local socket address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    fn flush(&mut self) -> io::Result<()> {
        while let Some(t) = self.client.poll_transmit() {
            self.sock.send_to(&t.payload, t.dst)?;
        }
        Ok(())
    }

    /// Runs the client until `pred` accepts an event, or `timeout`.
    fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&TurnEvent) -> bool,
    ) -> Result<TurnEvent, TurnSocketError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush()?;
            while let Some(ev) = self.client.poll_event() {
                if let TurnEvent::Failed { op, code, reason } = &ev {
                    return Err(TurnSocketError::Failed {
                        op: *op,
                        code: *code,
                        reason: reason.clone(),
                    });
                }
                if pred(&ev) {
                    return Ok(ev);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TurnSocketError::Timeout);
            }
            let wake = self.client.poll_timeout().unwrap_or(deadline).min(deadline);
            self.sock.set_read_timeout(Some(
                wake.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ))?;
            match self.sock.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    match self
                        .client
                        .handle_input(Instant::now(), from, &self.buf[..n])
                    {
                        Input::Data { peer, range } => {
                            if self.backlog.len() < 1024 {
                                self.backlog.push_back((peer, self.buf[range].to_vec()));
                            }
                        }
                        Input::Consumed | Input::NotTurn => {}
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.client.handle_timeout(Instant::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Allocates; returns the relayed address.
    pub fn allocate(&mut self, timeout: Duration) -> Result<SocketAddr, TurnSocketError> {
        self.client.allocate(Instant::now());
        match self.wait_event(timeout, |e| matches!(e, TurnEvent::Allocated { .. }))? {
            TurnEvent::Allocated { relayed, .. } => Ok(relayed),
            _ => Err(TurnSocketError::Timeout),
        }
    }

    /// Installs a permission for `ip`.
    pub fn create_permission(
        &mut self,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<(), TurnSocketError> {
        self.client.create_permission(ip, Instant::now())?;
        self.wait_event(
            timeout,
            |e| matches!(e, TurnEvent::PermissionCreated { peer_ip } if *peer_ip == ip),
        )?;
        Ok(())
    }

    /// Binds a channel to `peer`; returns the channel number.
    pub fn bind_channel(
        &mut self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<u16, TurnSocketError> {
        let n = self.client.bind_channel(peer, Instant::now())?;
        self.wait_event(
            timeout,
            |e| matches!(e, TurnEvent::ChannelBound { peer: p, .. } if *p == peer),
        )?;
        Ok(n)
    }

    /// Sends `data` to `peer` through the relay.
    pub fn send_to(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), TurnSocketError> {
        let n = self.client.encode_send(peer, data, &mut self.out)?;
        self.sock.send_to(&self.out[..n], self.client.server())?;
        Ok(())
    }

    /// Receives relayed data (from any peer) into `out`; returns peer and length.
    pub fn recv_from(
        &mut self,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<(SocketAddr, usize), TurnSocketError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((peer, data)) = self.backlog.pop_front() {
                let n = data.len().min(out.len());
                out[..n].copy_from_slice(&data[..n]);
                return Ok((peer, n));
            }
            self.flush()?;
            let now = Instant::now();
            if now >= deadline {
                return Err(TurnSocketError::Timeout);
            }
            let wake = self.client.poll_timeout().unwrap_or(deadline).min(deadline);
            self.sock.set_read_timeout(Some(
                wake.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ))?;
            match self.sock.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    if let Input::Data { peer, range } =
                        self.client
                            .handle_input(Instant::now(), from, &self.buf[..n])
                    {
                        let r: Range<usize> = range;
                        let len = r.len().min(out.len());
                        out[..len].copy_from_slice(&self.buf[r.start..r.start + len]);
                        return Ok((peer, len));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.client.handle_timeout(Instant::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Releases the allocation.
    pub fn release(&mut self, timeout: Duration) -> Result<(), TurnSocketError> {
        self.client.release(Instant::now());
        self.wait_event(timeout, |e| matches!(e, TurnEvent::Released))?;
        Ok(())
    }
}
