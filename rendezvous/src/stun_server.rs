//! UDP driver of the sans-IO [`BindingServer`]: binds the primary socket (and, with an
//! alternate address, the three other RFC 5780 sockets), rate-limits per source IP, and sends
//! each answer from the socket the core picks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshpunch_proto::stun::{BindingServer, Outcome};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::config::Limits;
use crate::limits::RateLimiter;
use crate::metrics as m;

async fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(addr).await
}

/// Binds the STUN sockets and spawns one receive task per socket. Returns the bound
/// addresses by socket index (primary first; with `alt`: primary-IP/alt-port, alt-IP/
/// primary-port, alt-IP/alt-port) and the task handles.
pub async fn start(
    primary: SocketAddr,
    alt: Option<SocketAddr>,
    software: String,
    limits: &Limits,
) -> std::io::Result<(Vec<SocketAddr>, Vec<JoinHandle<()>>)> {
    let mut socks: [Option<Arc<UdpSocket>>; 4] = [None, None, None, None];
    let s0 = bind(primary).await?;
    let p1 = s0.local_addr()?;
    socks[0] = Some(Arc::new(s0));
    if let Some(alt) = alt {
        let s3 = bind(alt).await?;
        let a3 = s3.local_addr()?;
        socks[3] = Some(Arc::new(s3));
        socks[2] = Some(Arc::new(bind(SocketAddr::new(a3.ip(), p1.port())).await?));
        if a3.port() != p1.port() {
            socks[1] = Some(Arc::new(bind(SocketAddr::new(p1.ip(), a3.port())).await?));
        } else {
            socks[3] = None;
        }
    }
    let mut addrs: [Option<SocketAddr>; 4] = [None; 4];
    for (i, s) in socks.iter().enumerate() {
        if let Some(s) = s {
            addrs[i] = Some(s.local_addr()?);
        }
    }
    let core = Arc::new(BindingServer::new(software, addrs));
    let limiter = Arc::new(RateLimiter::new(
        limits.stun_per_sec_per_ip,
        limits.stun_burst,
        limits.max_tracked_ips,
    ));
    let socks = Arc::new(socks);
    let mut handles = Vec::new();
    for (i, s) in socks.iter().enumerate() {
        if let Some(sock) = s.clone() {
            handles.push(tokio::spawn(serve(
                i,
                sock,
                socks.clone(),
                core.clone(),
                limiter.clone(),
            )));
        }
    }
    Ok((addrs.iter().flatten().copied().collect(), handles))
}

async fn serve(
    index: usize,
    sock: Arc<UdpSocket>,
    all: Arc<[Option<Arc<UdpSocket>>; 4]>,
    core: Arc<BindingServer>,
    limiter: Arc<RateLimiter>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors surface as recv errors on some platforms: keep serving.
            Err(e) => {
                debug!(error = %e, "stun recv error");
                continue;
            }
        };
        let Some(reply) = core.handle(index, from, &buf[..n]) else {
            continue;
        };
        if !limiter.allow(from.ip(), Instant::now()) {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "stun_rate").increment(1);
            metrics::counter!(m::STUN_REQUESTS_TOTAL, "result" => "dropped").increment(1);
            continue;
        }
        let label = match reply.outcome {
            Outcome::Ok => "ok",
            Outcome::Changed => "changed",
            Outcome::Error(_) => "error",
        };
        metrics::counter!(m::STUN_REQUESTS_TOTAL, "result" => label).increment(1);
        if let Some(out) = all.get(reply.via).cloned().flatten() {
            let _ = out.send_to(&reply.bytes, from).await;
        }
    }
}
