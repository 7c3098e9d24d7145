//! What the daemon does when things go wrong: the rendezvous goes away (working paths stay),
//! the rendezvous is unreachable from the start, a peer never shows up, the relay refuses the
//! credentials. Each reaches `meshpunch status` with a clear reason.

#![allow(clippy::unwrap_used, clippy::too_many_arguments)]
mod support;

use std::time::{Duration, Instant};

use meshpunch::config::PeerConfig;
use meshpunch::control::Status;
use meshpunch::daemon::{self, Daemon, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch_proto::path::{PathConfig, PathKind};
use support::{free_udp_port, start_relay, start_rendezvous, status, wait_path, FakeWg};

fn opts(
    dir: &std::path::Path,
    me: &Identity,
    other: &Identity,
    rdv: Option<String>,
    listen_port: u16,
    static_peer: Option<u16>,
    wg: std::net::SocketAddr,
    name: &str,
) -> Options {
    Options {
        identity: me.clone(),
        rendezvous: rdv,
        listen: format!("127.0.0.1:{listen_port}").parse().unwrap(),
        control_socket: dir.join(format!("{name}.sock")),
        wireguard_endpoint: Some(wg),
        host_candidates: false,
        peers: vec![PeerConfig {
            public_key: other.public,
            name: Some("other".into()),
            proxy_port: 0,
            candidates: static_peer
                .map(|p| vec![format!("127.0.0.1:{p}").parse().unwrap()])
                .unwrap_or_default(),
        }],
        path: PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    }
}

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
async fn rendezvous_outage_does_not_disturb_a_working_path() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (wga, wgb) = (FakeWg::new().await, FakeWg::new().await);
    let da = daemon::start(opts(
        dir.path(),
        &a,
        &b,
        Some(connect.clone()),
        0,
        None,
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let db = daemon::start(opts(
        dir.path(),
        &b,
        &a,
        Some(connect),
        0,
        None,
        wgb.addr(),
        "b",
    ))
    .await
    .unwrap();
    wait_path(&da.control_socket, &["direct"], Duration::from_secs(30)).await;
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(30)).await;
    let before = status(&da.control_socket).await.peers[0].remote.clone();

    rdv.drain(Duration::from_millis(100)).await;
    drop(rdv);
    wait_status(&da, "rendezvous down noticed", |s| {
        s.rendezvous.state != "connected"
    })
    .await;
    // Traffic keeps flowing on the same direct path for several seconds.
    for _ in 0..3 {
        assert!(
            wga.exchange(da.proxies[0].1, &wgb, 20, Duration::from_secs(10))
                .await
                >= 18
        );
        assert!(
            wgb.exchange(db.proxies[0].1, &wga, 20, Duration::from_secs(10))
                .await
                >= 18
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let st = status(&da.control_socket).await;
    assert_eq!(st.peers[0].path, PathKind::Direct);
    assert_eq!(st.peers[0].remote, before);
    assert!(st.rendezvous.error.is_some());
    relay.control().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_rendezvous_is_reported_and_static_peers_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();
    rdv.drain(Duration::ZERO).await;
    drop(rdv);
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (wga, wgb) = (FakeWg::new().await, FakeWg::new().await);
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let da = daemon::start(opts(
        dir.path(),
        &a,
        &b,
        Some(connect.clone()),
        pa,
        Some(pb),
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let db = daemon::start(opts(
        dir.path(),
        &b,
        &a,
        Some(connect),
        pb,
        Some(pa),
        wgb.addr(),
        "b",
    ))
    .await
    .unwrap();
    wait_path(&da.control_socket, &["direct"], Duration::from_secs(30)).await;
    assert!(
        wga.exchange(da.proxies[0].1, &wgb, 20, Duration::from_secs(10))
            .await
            >= 18
    );
    let st = wait_status(&da, "rendezvous error reported", |s| {
        s.rendezvous.state == "disconnected" && s.rendezvous.error.is_some()
    })
    .await;
    println!("rendezvous error: {:?}", st.rendezvous.error);
    drop(db);
    relay.control().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_peer_and_refused_relay_credentials_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // The relay knows a different secret than the rendezvous mints credentials with.
    let relay = support::start_relay_with_secret("not-the-rendezvous-secret");
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();
    let a = Identity::from_private(generate_private());
    let ghost = Identity::from_private(generate_private());
    let wga = FakeWg::new().await;
    let da = daemon::start(opts(
        dir.path(),
        &a,
        &ghost,
        Some(connect),
        0,
        None,
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let st = wait_status(&da, "relay refusal reported", |s| {
        s.home_relay
            .as_ref()
            .is_some_and(|r| r.state == "failed" && r.error.is_some())
    })
    .await;
    let err = st.home_relay.unwrap().error.unwrap();
    println!("relay error: {err}");
    assert!(err.contains("401") || err.contains("refused"), "{err}");
    let st = wait_status(&da, "absent peer reported", |s| {
        s.peers[0].path == PathKind::None && s.peers[0].reason.contains("offer failed")
    })
    .await;
    println!("peer reason: {}", st.peers[0].reason);
    // The daemon still serves: status keeps answering and the rendezvous stays connected.
    assert_eq!(st.rendezvous.state, "connected");
    relay.control().stop();
}
