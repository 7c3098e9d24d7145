//! The daemon and a token the rendezvous stops accepting: `meshpunch status` (and its JSON)
//! shows state `unauthorized` with the typed reason and a readable expiry, the daemon does not
//! hammer the rendezvous with retries, and a new connect string (what SIGHUP hands it after the
//! operator rotated the token in the config) reconnects it without a restart.

#![allow(clippy::unwrap_used)]
mod support;

use std::time::{Duration, Instant};

use meshpunch::config::PeerConfig;
use meshpunch::control::Status;
use meshpunch::daemon::{self, Daemon, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch_proto::path::PathConfig;
use support::{free_udp_port, start_relay, start_rendezvous, status, FakeWg};

async fn wait_status(d: &Daemon, what: &str, f: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&d.control_socket).await;
        if f(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_shows_in_status_and_a_reloaded_one_reconnects_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let mut cs = rdv.dev_connect().unwrap().clone();
    cs.token = rdv.mint_token("dev", Duration::from_secs(3));
    let expires = meshpunch_proto::token::parse(&cs.token)
        .unwrap()
        .expires_unix;
    let me = Identity::from_private(generate_private());
    let other = Identity::from_private(generate_private());
    let wg = FakeWg::new().await;
    let d = daemon::start(Options {
        identity: me,
        rendezvous: Some(cs.to_string()),
        listen: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
        control_socket: dir.path().join("a.sock"),
        wireguard_endpoint: Some(wg.addr()),
        host_candidates: false,
        peers: vec![PeerConfig {
            public_key: other.public,
            name: Some("other".into()),
            proxy_port: 0,
            candidates: Vec::new(),
        }],
        path: PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    })
    .await
    .unwrap();
    wait_status(&d, "registered", |s| s.rendezvous.state == "connected").await;
    let st = wait_status(&d, "expiry reported", |s| {
        s.rendezvous.state == "unauthorized"
    })
    .await;
    assert_eq!(st.rendezvous.auth_reason.as_deref(), Some("expired"));
    assert_eq!(st.rendezvous.token_expires_unix, Some(expires));
    let error = st.rendezvous.error.clone().unwrap();
    let date = meshpunch_proto::token::format_unix_utc(expires);
    assert!(
        error.contains("network dev") && error.contains(&date),
        "{error} (want {date})"
    );
    // The JSON form carries the same fields.
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["rendezvous"]["auth_reason"], "expired");
    // No retry storm: the daemon stays away (slow retry, 5 min).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rdv.open_connections(), 0);
    assert_eq!(
        status(&d.control_socket).await.rendezvous.state,
        "unauthorized"
    );
    // The operator rotates the token; SIGHUP re-reads the config and hands it over.
    let mut fresh = cs.clone();
    fresh.token = rdv.mint_token("dev", Duration::from_secs(3600));
    d.reload_rendezvous(&fresh.to_string()).await.unwrap();
    let st = wait_status(&d, "reconnected with the new token", |s| {
        s.rendezvous.state == "connected"
    })
    .await;
    assert_eq!(st.rendezvous.auth_reason, None);
    relay.control().stop();
}
