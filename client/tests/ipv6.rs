//! IPv6 paths on loopback: two daemons whose only candidates are IPv6 addresses reach a
//! direct path whose remote is an IPv6 address and carry WireGuard-shaped traffic through
//! their proxy ports. One data socket is dual-stack (`[::]`), the other IPv6-only (`[::1]`).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshpunch::config::PeerConfig;
use meshpunch::daemon::{self, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch_proto::path::PathConfig;
use support::{wait_path, FakeWg};

fn free_udp6_port() -> Option<u16> {
    std::net::UdpSocket::bind("[::1]:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_candidates_give_a_direct_ipv6_path() {
    let (Some(pa), Some(pb)) = (free_udp6_port(), free_udp6_port()) else {
        eprintln!("SKIP ipv6_candidates_give_a_direct_ipv6_path: no IPv6 loopback (::1)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let mk = |me: &Identity,
              other: &Identity,
              listen: SocketAddr,
              other_addr: SocketAddr,
              wg,
              name: &str| Options {
        identity: me.clone(),
        rendezvous: None,
        listen,
        control_socket: dir.path().join(format!("{name}.sock")),
        wireguard_endpoint: Some(wg),
        host_candidates: false,
        peers: vec![PeerConfig {
            public_key: other.public,
            name: Some("other".into()),
            proxy_port: 0,
            candidates: vec![other_addr],
        }],
        path: PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    };
    let a6: SocketAddr = format!("[::1]:{pa}").parse().unwrap();
    let b6: SocketAddr = format!("[::1]:{pb}").parse().unwrap();
    // a: dual-stack data socket; b: IPv6 only.
    let da = daemon::start(mk(
        &a,
        &b,
        format!("[::]:{pa}").parse().unwrap(),
        b6,
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let db = daemon::start(mk(&b, &a, b6, a6, wgb.addr(), "b"))
        .await
        .unwrap();
    let st = wait_path(&da.control_socket, &["direct"], Duration::from_secs(20)).await;
    assert_eq!(st.peers[0].remote.as_deref(), Some(b6.to_string().as_str()));
    let st = wait_path(&db.control_socket, &["direct"], Duration::from_secs(20)).await;
    assert_eq!(st.peers[0].remote.as_deref(), Some(a6.to_string().as_str()));

    let got = wga
        .exchange(da.proxies[0].1, &wgb, 50, Duration::from_secs(10))
        .await;
    assert!(got >= 45, "a->b over IPv6 {got}/50");
    let got = wgb
        .exchange(db.proxies[0].1, &wga, 50, Duration::from_secs(10))
        .await;
    assert!(got >= 45, "b->a over IPv6 {got}/50");
    let st = support::status(&da.control_socket).await;
    assert!(st.peers[0].rx_packets >= 45 && st.peers[0].tx_packets >= 45);
    assert!(st.peers[0].rtt_ms.is_some());
}

/// A candidate written as an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]:P`) on a
/// dual-stack data socket is the IPv4 address: answers come from `127.0.0.1:P`, so the pair
/// must be that address (not a second, never-answering pair for the mapped spelling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_candidate_on_a_dual_stack_socket_is_ipv4() {
    if free_udp6_port().is_none() {
        eprintln!("SKIP ipv4_mapped_candidate_on_a_dual_stack_socket_is_ipv4: no IPv6");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (pa, pb) = (support::free_udp_port(), support::free_udp_port());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let opts =
        |me: &Identity, other: &Identity, listen: &str, cand: &str, wg, name: &str| Options {
            identity: me.clone(),
            rendezvous: None,
            listen: listen.parse().unwrap(),
            control_socket: dir.path().join(format!("{name}.sock")),
            wireguard_endpoint: Some(wg),
            host_candidates: false,
            peers: vec![PeerConfig {
                public_key: other.public,
                name: None,
                proxy_port: 0,
                candidates: vec![cand.parse().unwrap()],
            }],
            path: PathConfig::default(),
            exclude_interfaces: Vec::new(),
            ca_roots: Vec::new(),
        };
    let da = daemon::start(opts(
        &a,
        &b,
        &format!("[::]:{pa}"),
        &format!("[::ffff:127.0.0.1]:{pb}"),
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let db = daemon::start(opts(
        &b,
        &a,
        &format!("127.0.0.1:{pb}"),
        &format!("127.0.0.1:{pa}"),
        wgb.addr(),
        "b",
    ))
    .await
    .unwrap();
    let st = wait_path(&da.control_socket, &["direct"], Duration::from_secs(20)).await;
    assert_eq!(
        st.peers[0].remote.as_deref(),
        Some(format!("127.0.0.1:{pb}").as_str())
    );
    // One pair for the one address: no dead pair for the mapped spelling probed forever.
    let remotes: Vec<String> = st.peers[0]
        .pairs
        .iter()
        .map(|p| p.remote.addr.to_string())
        .collect();
    assert_eq!(remotes, vec![format!("127.0.0.1:{pb}")]);
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(20)).await;
    let got = wga
        .exchange(da.proxies[0].1, &wgb, 20, Duration::from_secs(10))
        .await;
    assert!(got >= 18, "a->b {got}/20");
}
