//! Admin HTTP: `/metrics` (Prometheus text) and `/healthz` (200 `ok`, 503 `draining`).
//!
//! Hardened like a public server (axum routes on hyper's HTTP/1 connection, our own accept
//! loop because `axum::serve` has none of this): a request head must arrive within
//! [`HEADER_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections are served at once (more
//! are closed on accept), and no connection lives longer than [`MAX_CONNECTION_AGE`]. The
//! rendezvous admin server is built the same way.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics as m;
use crate::Control;

/// Time allowed for a request's line and headers, counted from the moment the server starts
/// waiting for them (also between keep-alive requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; a connection beyond it is closed when accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest life of one admin connection, however busy.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-global Prometheus recorder (first call) and returns its handle;
/// `None` if another recorder was installed first.
pub fn install_recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    handle: Option<PrometheusHandle>,
    control: Control,
}

async fn metrics_page(State(s): State<AppState>) -> (StatusCode, String) {
    match &s.handle {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no metrics recorder\n".into(),
        ),
    }
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.control.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// Binds `addr` and serves the admin endpoints on the current tokio runtime; returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    handle: Option<PrometheusHandle>,
    control: Control,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(AppState { handle, control });
    tokio::spawn(serve_limited(listener, app));
    Ok(bound)
}

async fn serve_limited(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    metrics::counter!(m::ADMIN_REFUSED, "reason" => "too_many_connections")
                        .increment(1);
                    tracing::debug!(%remote, "admin connection refused: too many open");
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
                            metrics::counter!(m::ADMIN_REFUSED, "reason" => "header_timeout")
                                .increment(1);
                            tracing::debug!(%remote, "admin connection closed: request head too slow");
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "admin connection failed"),
                        Err(_) => tracing::debug!(%remote, "admin connection closed: too old"),
                    }
                    metrics::gauge!(m::ADMIN_CONNECTIONS_OPEN).decrement(1.0);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
