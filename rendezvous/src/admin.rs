//! Admin HTTP (axum routes on hyper's HTTP/1 connection): Prometheus `/metrics`, liveness
//! `/healthz`, readiness `/readyz`.
//!
//! The listener is often reachable by more than the scraper, so it is hardened like a public
//! server: a request head must arrive within [`HEADER_READ_TIMEOUT`] (a stalled or trickled
//! request is closed), at most [`MAX_CONNECTIONS`] connections are served at once (more are
//! closed on accept), and no connection lives longer than [`MAX_CONNECTION_AGE`] (a client that
//! stops reading a response cannot keep its slot). `axum::serve` offers none of these, so the
//! accept loop is ours. The relay's admin server (`relay/src/admin.rs`) is built the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::metrics as m;
use crate::server::Shared;

/// Time allowed for a request's line and headers, counted from the moment the server starts
/// waiting for them (also between keep-alive requests).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; a connection beyond it is closed when accepted.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Longest life of one admin connection, however busy.
pub(crate) const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` with the limits above until the future is dropped (dropping it
/// also ends every connection it serves).
async fn serve(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "admin_connections")
                        .increment(1);
                    debug!(%remote, "admin connection refused: too many open");
                    continue;
                };
                let service = TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _permit = permit;
                    metrics::gauge!(m::ADMIN_CONNECTIONS_OPEN).increment(1.0);
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(MAX_CONNECTION_AGE, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if e.is_timeout() => {
                            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "admin_header_timeout")
                                .increment(1);
                            debug!(%remote, "admin connection closed: request head too slow");
                        }
                        Ok(Err(e)) => debug!(%remote, error = %e, "admin connection failed"),
                        Err(_) => debug!(%remote, "admin connection closed: too old"),
                    }
                    metrics::gauge!(m::ADMIN_CONNECTIONS_OPEN).decrement(1.0);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Binds `addr` and serves the admin routes; returns the bound address.
pub(crate) async fn start(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let handle = tokio::spawn(serve(listener, app));
    Ok((bound, handle))
}

async fn metrics() -> (StatusCode, String) {
    match crate::metrics::install() {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n".to_string(),
        ),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    if shared.draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string());
    }
    if let Some(reason) = shared.degraded.read().ok().and_then(|g| g.clone()) {
        metrics::gauge!(crate::metrics::READY).set(0.0);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {reason}\n"),
        );
    }
    let health = shared.registry.health().await;
    if health.ready {
        metrics::gauge!(crate::metrics::READY).set(1.0);
        (StatusCode::OK, format!("ready ({})\n", health.detail))
    } else {
        metrics::gauge!(crate::metrics::READY).set(0.0);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: registry {}\n", health.detail),
        )
    }
}
