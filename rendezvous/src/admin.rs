//! Admin HTTP (axum routes on hyper's HTTP/1 connection): Prometheus `/metrics`, liveness
//! `/healthz`, readiness `/readyz`.
//!
//! Served by [`meshpunch_admin::serve`], the hardened accept loop both servers share
//! (header-read timeout, connection cap, connection age limit).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics as m;
use crate::server::Shared;

fn count_refusal(r: meshpunch_admin::Refusal) {
    let limit = match r {
        meshpunch_admin::Refusal::TooManyConnections => "admin_connections",
        meshpunch_admin::Refusal::HeaderTimeout => "admin_header_timeout",
    };
    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => limit).increment(1);
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
    let handle = tokio::spawn(meshpunch_admin::serve(
        listener,
        app,
        meshpunch_admin::Metrics {
            connections_open: m::ADMIN_CONNECTIONS_OPEN,
            refused: count_refusal,
        },
    ));
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
