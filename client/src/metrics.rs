//! `meshpunch up --metrics-listen ADDR`: the daemon's state as Prometheus metrics.
//!
//! Every scrape renders one `status` snapshot (the same one `meshpunch status --json` prints),
//! so the metrics and the CLI never disagree and the engine keeps no second set of counters.
//! Labels are small fixed sets (path kind, direction, result); per-peer figures are summed,
//! because peer keys would make an unbounded label. Served by the hardened admin loop the
//! servers use (`meshpunch-admin`: header timeout, connection cap, connection age).

use std::fmt::Write as _;
use std::path::PathBuf;

use meshpunch_proto::path::PathKind;

use crate::control::{self, Request, Status};

/// Renders `st` in the Prometheus text exposition format (version 0.0.4).
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let kinds = [
        PathKind::Lan,
        PathKind::Direct,
        PathKind::Relay,
        PathKind::None,
    ];
    let by_kind: Vec<(String, u64)> = kinds
        .iter()
        .map(|k| {
            (
                format!("path=\"{}\"", k.as_str()),
                st.peers.iter().filter(|p| p.path == *k).count() as u64,
            )
        })
        .collect();
    let by_kind: Vec<(&str, u64)> = by_kind.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "meshpunch_client_peers",
        "gauge",
        "Peers by the kind of path they use now.",
        &by_kind,
    );
    let sum = |f: fn(&control::PeerStatus) -> u64| st.peers.iter().map(f).sum::<u64>();
    metric(
        "meshpunch_client_path_changes_total",
        "counter",
        "Path changes of all peers (the first path counts as one).",
        &[("", sum(|p| p.path_changes))],
    );
    metric(
        "meshpunch_client_failovers_total",
        "counter",
        "A direct or LAN path given up for the relay or for no path.",
        &[("", sum(|p| p.failovers))],
    );
    let (tx, rx) = (sum(|p| p.tx_bytes), sum(|p| p.rx_bytes));
    let (rtx, rrx) = (sum(|p| p.relay_tx_bytes), sum(|p| p.relay_rx_bytes));
    metric(
        "meshpunch_client_bytes_total",
        "counter",
        "WireGuard bytes to and from peers, by path kind (direct includes LAN).",
        &[
            ("direction=\"tx\",path=\"direct\"", tx.saturating_sub(rtx)),
            ("direction=\"tx\",path=\"relay\"", rtx),
            ("direction=\"rx\",path=\"direct\"", rx.saturating_sub(rrx)),
            ("direction=\"rx\",path=\"relay\"", rrx),
        ],
    );
    metric(
        "meshpunch_client_dropped_no_path_total",
        "counter",
        "WireGuard packets dropped because the peer had no path.",
        &[("", sum(|p| p.dropped_no_path))],
    );
    metric(
        "meshpunch_client_probes_total",
        "counter",
        "Path probes received, by result.",
        &[
            ("result=\"accepted\"", st.probes.accepted),
            ("result=\"unauthenticated\"", st.probes.unauthenticated),
            ("result=\"replayed\"", st.probes.replayed),
        ],
    );
    metric(
        "meshpunch_client_refused_candidates_total",
        "counter",
        "Candidates from peers refused (loopback, multicast, a private address that is no host candidate, ...).",
        &[("", st.probes.refused_candidates)],
    );
    metric(
        "meshpunch_client_config_reloads_total",
        "counter",
        "Config reloads (SIGHUP, meshpunch reload) by outcome; an error changed nothing.",
        &[
            ("result=\"ok\"", st.config_reloads.ok),
            ("result=\"error\"", st.config_reloads.failed),
        ],
    );
    let b = &st.birthday;
    metric(
        "meshpunch_client_spray_sent_total",
        "counter",
        "Birthday-punching spray packets sent.",
        &[("", b.spray_sent)],
    );
    metric(
        "meshpunch_client_spray_hits_total",
        "counter",
        "Birthday-punching spray packets answered.",
        &[("", b.spray_hits)],
    );
    metric(
        "meshpunch_client_birthday_found_total",
        "counter",
        "Direct paths found by birthday punching.",
        &[("", b.found)],
    );
    metric(
        "meshpunch_client_low_ttl_pings_total",
        "counter",
        "Birthday pool pings sent with the low TTL (BirthdayTtl).",
        &[("", b.low_ttl_pings)],
    );
    metric(
        "meshpunch_client_pool_sockets_open",
        "gauge",
        "Birthday pool sockets open.",
        &[("", b.pool_open as u64)],
    );
    let relay_state = st.home_relay.as_ref().map(|r| r.state.as_str());
    let states: Vec<(String, u64)> = ["allocating", "allocated", "failed"]
        .iter()
        .map(|s| (format!("state=\"{s}\""), u64::from(relay_state == Some(*s))))
        .collect();
    let states: Vec<(&str, u64)> = states.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "meshpunch_client_relay_allocation",
        "gauge",
        "1 for the state of the home relay allocation (all 0 without a relay).",
        &states,
    );
    metric(
        "meshpunch_client_rendezvous_connected",
        "gauge",
        "1 while registered with the rendezvous.",
        &[("", u64::from(st.rendezvous.state == "connected"))],
    );
    if let Some(pm) = &st.portmap {
        metric(
            "meshpunch_client_portmap_mapped",
            "gauge",
            "1 while the gateway holds a port mapping for the data socket.",
            &[("", u64::from(pm.mapped.is_some()))],
        );
        let ignored: Vec<(String, u64)> = pm
            .ignored_total
            .iter()
            .map(|(r, n)| {
                (
                    format!("reason=\"{}\"", r.replace(['"', '\\', '\n'], "_")),
                    *n,
                )
            })
            .collect();
        let ignored: Vec<(&str, u64)> = ignored.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "meshpunch_client_portmap_ignored_total",
            "counter",
            "Port-mapping answers ignored (wrong nonce, wrong epoch, private address, not the gateway, ...).",
            &ignored,
        );
    }
    metric(
        "meshpunch_client_path_mtu_bytes",
        "gauge",
        "Smallest tunnel MTU any measured path to any peer allows (0: none measured yet).",
        &[("", st.mtu.path.map_or(0, u64::from))],
    );
    metric(
        "meshpunch_client_recommended_mtu_bytes",
        "gauge",
        "WireGuard interface MTU the daemon recommends (the measured path MTU, at most 1412).",
        &[("", u64::from(st.mtu.recommended))],
    );
    metric(
        "meshpunch_client_send_too_big_total",
        "counter",
        "Datagrams the kernel refused as larger than the outgoing link (EMSGSIZE).",
        &[("", st.mtu.send_too_big)],
    );
    if let Some(t) = &st.tun {
        metric(
            "meshpunch_client_tun_mtu_bytes",
            "gauge",
            "The built-in WireGuard interface's MTU now (follows the smallest working path).",
            &[("", u64::from(t.mtu))],
        );
        metric(
            "meshpunch_client_tun_mtu_changes_total",
            "counter",
            "Changes of the built-in WireGuard interface's MTU to follow the paths.",
            &[("", st.mtu.changes)],
        );
        metric(
            "meshpunch_client_tun_dropped_total",
            "counter",
            "Packets the built-in WireGuard dropped, by reason.",
            &[
                ("reason=\"no_peer\"", t.no_peer),
                ("reason=\"decrypt_failed\"", t.decrypt_failed),
                ("reason=\"bad_source\"", t.bad_source),
                ("reason=\"write_failed\"", t.write_failed),
            ],
        );
    }
    out
}

/// Serves `/metrics` on `listener` for the daemon behind `control_socket` until dropped.
pub async fn serve(listener: tokio::net::TcpListener, control_socket: PathBuf) {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sock = control_socket.clone();
            async move {
                let st = control::request(&sock, &Request::Status)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|v| serde_json::from_value::<Status>(v).map_err(|e| e.to_string()));
                match st {
                    Ok(st) => (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render(&st),
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("daemon status unavailable: {e}\n"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    meshpunch_admin::serve(
        listener,
        app,
        meshpunch_admin::Metrics {
            connections_open: "meshpunch_client_metrics_connections_open",
            refused: |_| {},
        },
    )
    .await;
}
