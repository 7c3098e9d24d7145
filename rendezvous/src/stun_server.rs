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
    // With OS-chosen ports the port picked for one IP may be taken on the other: retry.
    let ephemeral = primary.port() == 0 || alt.is_some_and(|a| a.port() == 0);
    let mut attempt = 0;
    let socks = loop {
        match bind_all(primary, alt).await {
            Ok(s) => break s,
            Err(e) if ephemeral && e.kind() == std::io::ErrorKind::AddrInUse && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    spawn_all(socks, software, limits)
}

async fn bind_all(
    primary: SocketAddr,
    alt: Option<SocketAddr>,
) -> std::io::Result<[Option<Arc<UdpSocket>>; 4]> {
    let mut socks: [Option<Arc<UdpSocket>>; 4] = [None, None, None, None];
    let s0 = bind(primary).await?;
    let p1 = s0.local_addr()?;
    socks[0] = Some(Arc::new(s0));
    if let Some(alt) = alt {
        let s_alt = bind(alt).await?;
        let a = s_alt.local_addr()?;
        if a.port() == p1.port() {
            // Same port on the second IP: only CHANGE-IP can be honoured.
            socks[2] = Some(Arc::new(s_alt));
        } else {
            socks[3] = Some(Arc::new(s_alt));
            socks[2] = Some(Arc::new(bind(SocketAddr::new(a.ip(), p1.port())).await?));
            socks[1] = Some(Arc::new(bind(SocketAddr::new(p1.ip(), a.port())).await?));
        }
    }
    Ok(socks)
}

fn spawn_all(
    socks: [Option<Arc<UdpSocket>>; 4],
    software: String,
    limits: &Limits,
) -> std::io::Result<(Vec<SocketAddr>, Vec<JoinHandle<()>>)> {
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
            let _ = out.send_to(&reply.bytes, reply.to).await;
        }
    }
}
