//! Admin HTTP: `/metrics` (Prometheus text) and `/healthz` (200 `ok`, 503 `draining`).

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Control;

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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(AppState { handle, control });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(bound)
}
