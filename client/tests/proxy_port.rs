//! Attack on the proxy port (issue 12): a second local process sending to a peer's proxy
//! port neither receives the peer's packets nor gets its own forwarded. The port belongs to
//! the configured `WireGuardEndpoint`, or to the first local address that used it, until the
//! daemon restarts. Two daemons on loopback with static candidates, real sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshpunch::config::PeerConfig;
use meshpunch::daemon::{self, Daemon, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch_proto::path::PathConfig;
use support::{free_udp_port, wait_path, FakeWg};

async fn pair(
    dir: &std::path::Path,
    wg_a: Option<SocketAddr>,
    wg_b: SocketAddr,
) -> (Daemon, Daemon) {
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mk =
        |me: &Identity, other: &Identity, port: u16, other_port: u16, wg, name: &str| Options {
            identity: me.clone(),
            rendezvous: None,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            control_socket: dir.join(format!("{name}.sock")),
            wireguard_endpoint: wg,
            host_candidates: false,
            peers: vec![PeerConfig {
                public_key: other.public,
                name: Some("other".into()),
                proxy_port: 0,
                candidates: vec![format!("127.0.0.1:{other_port}").parse().unwrap()],
            }],
            path: PathConfig::default(),
            exclude_interfaces: Vec::new(),
            ca_roots: Vec::new(),
        };
    let da = daemon::start(mk(&a, &b, pa, pb, wg_a, "a")).await.unwrap();
    let db = daemon::start(mk(&b, &a, pb, pa, Some(wg_b), "b"))
        .await
        .unwrap();
    wait_path(&da.control_socket, &["direct"], Duration::from_secs(20)).await;
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(20)).await;
    (da, db)
}

/// Sends 20 packets from `intruder` to `proxy`; then b's WireGuard sends 20 to a. Checks that
/// nothing of the intruder's reaches b and nothing of b's reaches the intruder, while a's
/// real WireGuard still gets b's packets.
async fn intruder_gets_nothing(da: &Daemon, db: &Daemon, wga: &FakeWg, wgb: &FakeWg) {
    let intruder = FakeWg::new().await;
    let to_b = da.proxies[0].1;
    let to_a = db.proxies[0].1;
    // The intruder tries to inject (and, on the old code, took the port over).
    for n in 0..20 {
        intruder
            .sock
            .send_to(&FakeWg::packet(n), to_b)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nothing of it reaches b's WireGuard.
    let mut buf = vec![0u8; 2048];
    let leaked =
        tokio::time::timeout(Duration::from_millis(500), wgb.sock.recv_from(&mut buf)).await;
    assert!(leaked.is_err(), "intruder's packet forwarded to the peer");
    // b's packets still go to a's WireGuard, never to the intruder.
    let got = wgb.exchange(to_a, wga, 20, Duration::from_secs(5)).await;
    assert!(got >= 18, "b->a {got}/20");
    let stolen = tokio::time::timeout(
        Duration::from_millis(300),
        intruder.sock.recv_from(&mut buf),
    )
    .await;
    assert!(stolen.is_err(), "peer's packet delivered to the intruder");
    let st = support::status(&da.control_socket).await;
    assert!(
        st.peers[0].proxy_refused >= 20,
        "{}",
        st.peers[0].proxy_refused
    );
    // And a's WireGuard keeps working in both directions.
    let got = wga.exchange(to_b, wgb, 20, Duration::from_secs(5)).await;
    assert!(got >= 18, "a->b {got}/20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_local_process_cannot_use_a_learned_proxy_port() {
    let dir = tempfile::tempdir().unwrap();
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    // a learns WireGuard's address from its first packet.
    let (da, db) = pair(dir.path(), None, wgb.addr()).await;
    let got = wga
        .exchange(da.proxies[0].1, &wgb, 10, Duration::from_secs(5))
        .await;
    assert!(got >= 9, "a->b {got}/10");
    intruder_gets_nothing(&da, &db, &wga, &wgb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_local_process_cannot_use_a_configured_proxy_port() {
    let dir = tempfile::tempdir().unwrap();
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    // The intruder is first this time; the configured endpoint still owns the port.
    let (da, db) = pair(dir.path(), Some(wga.addr()), wgb.addr()).await;
    intruder_gets_nothing(&da, &db, &wga, &wgb).await;
}
