//! Admin HTTP: `/metrics` (Prometheus text) and `/healthz` (200 `ok`, 503 `draining`).
//!
//! Served by [`meshpunch_admin::serve`], the hardened accept loop both servers share
//! (header-read timeout, connection cap, connection age limit).

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::metrics as m;
use crate::Control;

pub use meshpunch_admin::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTION_AGE};

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
    tokio::spawn(meshpunch_admin::serve(
        listener,
        app,
        meshpunch_admin::Metrics {
            connections_open: m::ADMIN_CONNECTIONS_OPEN,
            refused: count_refusal,
        },
    ));
    Ok(bound)
}

fn count_refusal(r: meshpunch_admin::Refusal) {
    let reason = match r {
        meshpunch_admin::Refusal::TooManyConnections => "too_many_connections",
        meshpunch_admin::Refusal::HeaderTimeout => "header_timeout",
    };
    metrics::counter!(m::ADMIN_REFUSED, "reason" => reason).increment(1);
}
