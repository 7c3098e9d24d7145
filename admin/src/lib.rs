//! The admin HTTP accept loop of both servers (`meshpunch-rendezvous`, `meshpunch-relay`).
//!
//! An admin listener is often reachable by more than the scraper, so it is hardened like a
//! public server: a request head must arrive within [`HEADER_READ_TIMEOUT`] (a stalled or
//! trickled request is closed), at most [`MAX_CONNECTIONS`] connections are served at once
//! (more are closed on accept), and no connection lives longer than [`MAX_CONNECTION_AGE`] (a
//! client that stops reading a response cannot keep its slot). `axum::serve` offers none of
//! these, so the loop runs axum routes on hyper's HTTP/1 connection itself. Each server names
//! its own metrics ([`Metrics`]); the routes stay in the servers.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Time allowed for a request's line and headers, counted from the moment the server starts
/// waiting for them (also between keep-alive requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; a connection beyond it is closed when accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest life of one admin connection, however busy.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Why the loop refused or closed a connection early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`MAX_CONNECTIONS`] were open when it was accepted.
    TooManyConnections,
    /// Its request head did not arrive within [`HEADER_READ_TIMEOUT`].
    HeaderTimeout,
}

/// How a server counts what the loop does, in its own metric names.
#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    /// Gauge of connections being served.
    pub connections_open: &'static str,
    /// Called once per refusal (the server increments its own counter and labels).
    pub refused: fn(Refusal),
}

/// Serves `app` on `listener` with the limits above until the future is dropped (dropping it
/// also ends every connection it serves).
pub async fn serve(listener: TcpListener, app: Router, metrics: Metrics) {
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
                    (metrics.refused)(Refusal::TooManyConnections);
                    debug!(%remote, "admin connection refused: too many open");
                    continue;
                };
                let service = TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _permit = permit;
                    metrics::gauge!(metrics.connections_open).increment(1.0);
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(MAX_CONNECTION_AGE, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if e.is_timeout() => {
                            (metrics.refused)(Refusal::HeaderTimeout);
                            debug!(%remote, "admin connection closed: request head too slow");
                        }
                        Ok(Err(e)) => debug!(%remote, error = %e, "admin connection failed"),
                        Err(_) => debug!(%remote, "admin connection closed: too old"),
                    }
                    metrics::gauge!(metrics.connections_open).decrement(1.0);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
