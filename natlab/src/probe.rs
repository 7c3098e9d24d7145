//! A tiny STUN-like UDP reflector that proves each NAT's mapping and filtering behaviour
//! without any meshpunch code.
//!
//! A [`Reflector`] owns several UDP sockets (for example on the server's primary and alternate
//! addresses, and on a second port). A request is one byte: the index of the socket that must
//! answer. The answer is the request's observed source address as text (`ip:port`), sent from
//! that socket — the same trick as RFC 5780's CHANGE-REQUEST.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;

/// Reflector threads answering on a set of sockets; stops when dropped.
#[derive(Debug)]
pub struct Reflector {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Reflector {
    /// Serves on `sockets` (already bound, for example inside a lab namespace).
    pub fn start(sockets: Vec<UdpSocket>) -> Result<Reflector, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let addrs = sockets
            .iter()
            .map(UdpSocket::local_addr)
            .collect::<Result<Vec<_>, _>>()?;
        let all: Arc<Vec<UdpSocket>> = Arc::new(sockets);
        let mut threads = Vec::new();
        for i in 0..all.len() {
            let all = all.clone();
            let stop = stop.clone();
            all[i].set_read_timeout(Some(Duration::from_millis(100)))?;
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = all[i].recv_from(&mut buf) else {
                        continue;
                    };
                    let idx = if n >= 1 { usize::from(buf[0]) } else { i };
                    if let Some(out) = all.get(idx) {
                        let _ = out.send_to(from.to_string().as_bytes(), from);
                    }
                }
            }));
        }
        Ok(Reflector {
            addrs,
            stop,
            threads,
        })
    }

    /// Addresses served, by index.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends a request to `to` asking socket `reply_from` of the reflector to answer, and returns
/// the observed address if an answer arrives within `wait` (retrying twice against loss).
pub fn observe(
    sock: &UdpSocket,
    to: SocketAddr,
    reply_from: u8,
    wait: Duration,
) -> Result<Option<SocketAddr>, Error> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 64];
    // Drain answers to earlier requests.
    while sock.recv_from(&mut buf).is_ok() {}
    let tries = 3u32;
    for _ in 0..tries {
        // A firewall drop on the way out (a cut path) shows as EPERM: same as no answer.
        match sock.send_to(&[reply_from], to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + wait / tries;
        while Instant::now() < deadline {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                return text
                    .parse()
                    .map(Some)
                    .map_err(|_| Error::Setup(format!("bad reflector answer {text:?}")));
            }
        }
    }
    Ok(None)
}
