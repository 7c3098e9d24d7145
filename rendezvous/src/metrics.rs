//! Metric names (one home for each) and the Prometheus recorder.
//!
//! The recorder is process-global; it is installed once and every server in the process
//! (tests run several) renders from the same handle.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Counter: connections accepted, label `transport` = quic | tcp.
pub const CONNECTIONS_TOTAL: &str = "meshpunch_rendezvous_connections_total";
/// Gauge: connections open (session running), label `transport` = quic | tcp.
pub const CONNECTIONS_OPEN: &str = "meshpunch_rendezvous_connections_open";
/// Counter: TLS-over-TCP handshakes that failed (not TLS, no ALPN `meshpunch/1`, bad record).
pub const TCP_HANDSHAKE_FAILURES_TOTAL: &str = "meshpunch_rendezvous_tcp_handshake_failures_total";
/// Counter: failed `accept` calls on the TCP listener (out of file descriptors).
pub const TCP_ACCEPT_ERRORS_TOTAL: &str = "meshpunch_rendezvous_tcp_accept_errors_total";
/// Gauge: registered peers on this node.
pub const PEERS_REGISTERED: &str = "meshpunch_rendezvous_peers_registered";
/// Counter: successful registrations, label `transport` = quic | tcp.
pub const REGISTRATIONS_TOTAL: &str = "meshpunch_rendezvous_registrations_total";
/// Counter: refused registrations and sessions ended for authentication reasons, label
/// `reason` = expired | revoked | bad_token | bad_proof | key_not_allowed | reauth_timeout.
pub const AUTH_FAILURES_TOTAL: &str = "meshpunch_rendezvous_auth_failures_total";
/// Counter: re-authentications of live connections, label `result` = ok | reauth_timeout |
/// bad_proof.
pub const REAUTH_TOTAL: &str = "meshpunch_rendezvous_reauth_total";
/// Counter: typed errors sent to clients, label `code`.
pub const ERRORS_SENT_TOTAL: &str = "meshpunch_rendezvous_errors_sent_total";
/// Counter: offers, label `result` = forwarded | not_found | self_offer | timeout | failed.
pub const OFFERS_TOTAL: &str = "meshpunch_rendezvous_offers_total";
/// Counter: PunchStart messages sent.
pub const PUNCH_STARTS_TOTAL: &str = "meshpunch_rendezvous_punch_starts_total";
/// Counter: presence events sent.
pub const PRESENCE_EVENTS_TOTAL: &str = "meshpunch_rendezvous_presence_events_total";
/// Counter: observed-address changes seen on live connections.
pub const OBSERVED_ADDR_CHANGES_TOTAL: &str = "meshpunch_rendezvous_observed_addr_changes_total";
/// Counter: limits hit, label `limit` = connections_per_ip | migrated_connections_per_ip |
/// handshakes_in_flight | unvalidated_retry_token | registrations_per_ip | frame_size |
/// stalled_frame | idle_timeout | handshake_timeout | tls_handshake_timeout | offers_rate | pending_offers | watch_rate | stun_rate |
/// admin_connections | admin_header_timeout.
pub const LIMIT_HITS_TOTAL: &str = "meshpunch_rendezvous_limit_hits_total";
/// Counter: inbox deliveries dropped (recipient gone or its queue full).
pub const DELIVERIES_DROPPED_TOTAL: &str = "meshpunch_rendezvous_deliveries_dropped_total";
/// Counter: STUN requests, label `result` = ok | changed | error | dropped.
pub const STUN_REQUESTS_TOTAL: &str = "meshpunch_rendezvous_stun_requests_total";
/// Counter: certificate reloads, label `result` = ok | error.
pub const TLS_RELOADS_TOTAL: &str = "meshpunch_rendezvous_tls_reloads_total";
/// Gauge: notAfter of the served certificate, Unix seconds (set by `meshpunch-certs` with
/// component `rendezvous`, on start, reload and renewal).
pub const CERT_EXPIRY_TIMESTAMP_SECONDS: &str =
    "meshpunch_rendezvous_cert_expiry_timestamp_seconds";
/// Counter: ACME orders (first issuance and renewals), label `result` = ok | error (set by
/// `meshpunch-certs`; the log line says why an order failed).
pub const ACME_RENEWALS_TOTAL: &str = "meshpunch_rendezvous_acme_renewals_total";
/// Counter: GoAway messages sent, label `reason` = draining | superseded.
pub const GOAWAY_TOTAL: &str = "meshpunch_rendezvous_goaway_total";
/// Counter: stateless Retry packets sent to unvalidated sources (every first Initial of a
/// client without an address-validation token gets one; a spoofed flood shows up here only).
pub const RETRIES_TOTAL: &str = "meshpunch_rendezvous_retries_total";
/// Gauge: QUIC handshakes from validated sources in progress (capped by
/// `limits.max_handshakes_in_flight`).
pub const HANDSHAKES_IN_FLIGHT: &str = "meshpunch_rendezvous_handshakes_in_flight";
/// Gauge: admin HTTP connections open (at most 64, see `docs/rendezvous-limits.md`).
pub const ADMIN_CONNECTIONS_OPEN: &str = "meshpunch_rendezvous_admin_connections_open";
/// Gauge: 1 when ready, 0 when degraded or draining.
pub const READY: &str = "meshpunch_rendezvous_ready";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (first call) and returns the handle to render from.
/// `None` when another recorder was already installed by someone else.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .clone()
}
