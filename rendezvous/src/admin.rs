//! Admin HTTP (axum): Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;

use crate::server::Shared;

/// Binds `addr` and serves the admin routes; returns the bound address.
pub(crate) async fn start(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
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
