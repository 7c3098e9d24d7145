//! The daemon's binding-lifetime measurement end to end on loopback: a real rendezvous whose
//! STUN server has an RFC 5780 alternate address (127.0.0.2), a daemon that measures with short
//! periods, writes its cache next to the control socket, and a restarted daemon that reads it.
//! Loopback has no NAT, so every period survives: the result is "longer than the longest
//! period" and the keepalive stays at the default — the point here is the plumbing (status,
//! cache, precedence); the NAT lab's `mesh_lifetime` measures a real NAT.

mod support;

use std::time::{Duration, Instant};

use meshpunch::config::PeerConfig;
use meshpunch::control::NatStatus;
use meshpunch::daemon::{self, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch::lifetime::{cache_path_for, LifetimeOptions};
use meshpunch_proto::nat::DEFAULT_KEEPALIVE;
use meshpunch_proto::path::PathConfig;

async fn wait_nat(sock: &std::path::Path, f: impl Fn(&NatStatus) -> bool) -> NatStatus {
    let start = Instant::now();
    loop {
        let st = support::status(sock).await;
        if f(&st.nat) {
            return st.nat;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nat status never matched: {:?}",
            st.nat
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_measures_caches_and_config_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path().join("rdv"));
    cfg.stun_alt = Some("127.0.0.2:0".parse().unwrap());
    let rdv = match meshpunch_rendezvous::Server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIP daemon_measures_caches_and_config_wins: no 127.0.0.2 ({e})");
            return;
        }
    };
    let connect = rdv.dev_connect().unwrap().to_string();
    let me = Identity::from_private(generate_private());
    let peer = Identity::from_private(generate_private());
    let control = dir.path().join("d.sock");
    let opts = || Options {
        identity: me.clone(),
        rendezvous: Some(connect.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        control_socket: control.clone(),
        wireguard_endpoint: None,
        host_candidates: false,
        peers: vec![PeerConfig {
            public_key: peer.public,
            name: None,
            proxy_port: 0,
            candidates: vec![],
        }],
        path: PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    };
    let cache = cache_path_for(&control);
    let lifetime = |configured| LifetimeOptions {
        configured,
        steps: Some(vec![Duration::from_secs(1), Duration::from_secs(2)]),
        cache: Some(cache.clone()),
    };

    // 1. Measured (in the background, from its own sockets) and written to the cache.
    let d = daemon::start_with(opts(), lifetime(None)).await.unwrap();
    let nat = wait_nat(&control, |n| n.source == "measured").await;
    assert!(!nat.measuring);
    assert_eq!(nat.binding_lifetime_s, Some(2), "{nat:?}");
    assert_eq!(nat.binding_lifetime_max_s, None, "no NAT: nothing expires");
    assert_eq!(nat.keepalive_interval_s, DEFAULT_KEEPALIVE.as_secs_f64());
    assert_eq!(nat.public_ip, Some("127.0.0.1".parse().unwrap()));
    assert!(cache.exists(), "cache {} not written", cache.display());
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2. Restarted: from the cache, without measuring.
    let d = daemon::start_with(opts(), lifetime(None)).await.unwrap();
    let nat = wait_nat(&control, |n| n.source != "default").await;
    assert_eq!(nat.source, "cached", "{nat:?}");
    assert!(!nat.measuring);
    assert_eq!(nat.binding_lifetime_s, Some(2));
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 3. BindingLifetime in the config wins over cache and measurement.
    let d = daemon::start_with(opts(), lifetime(Some(20)))
        .await
        .unwrap();
    let st = support::status(&control).await;
    assert_eq!(st.nat.source, "config");
    assert_eq!(st.nat.binding_lifetime_s, Some(20));
    assert_eq!(st.nat.keepalive_interval_s, 10.0);
    // Still config once the public address is known.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = support::status(&control).await;
    assert_eq!(st.nat.source, "config");
    assert!(!st.nat.measuring);
    drop(d);
}
