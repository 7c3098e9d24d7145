//! End to end on loopback: TURN over TLS when the relay's UDP port cannot be reached. A real
//! rendezvous (in-process), a real meshpunch-relay with `--tls-listen` (self-signed
//! certificate for the IP 127.0.0.1, trusted through `CaFile`), a relay region whose UDP URI
//! points at a port nobody answers; two daemons, direct blocked on one side (debug knob), so
//! WireGuard-shaped packets must cross the relay, over TLS.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use meshpunch::control::{self, Request, Status};
use support::{status, wait_path, FakeWg, SECRET};

async fn wait_status(
    sock: &std::path::Path,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Status) -> bool,
) -> Status {
    let start = Instant::now();
    loop {
        let st = status(sock).await;
        if ok(&st) {
            return st;
        }
        assert!(
            start.elapsed() < timeout,
            "{what} not reached after {timeout:?}: {}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_relay_over_tls_when_the_relay_udp_port_is_unreachable() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A certificate for the IP literal the TURN URI names (checked against its IP SAN).
    let g = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("relay.crt");
    let key = dir.path().join("relay.key");
    std::fs::write(&cert, g.cert.pem()).unwrap();
    std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
    let o = meshpunch_relay::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        cert: Some(cert.clone()),
        key: Some(key),
        ..Default::default()
    };
    let cfg = meshpunch_relay::config::RelayConfig::resolve(Default::default(), o, None).unwrap();
    let relay = meshpunch_relay::Relay::start(cfg).unwrap();
    let tls = relay.tls_addr().unwrap();
    // Nobody answers UDP here: the UDP Allocate goes unanswered, the client moves to TLS.
    let dead = support::free_udp_port();

    let mut rcfg = meshpunch_rendezvous::Config::loopback(dir.path().join("rdv"));
    rcfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "loopback".into(),
        urls: vec![
            format!("turn:127.0.0.1:{dead}?transport=udp"),
            format!("turns:{tls}"),
        ],
        secret: SECRET.into(),
    }];
    let rdv = meshpunch_rendezvous::Server::start(rcfg).await.unwrap();
    let connect = rdv.dev_connect().unwrap().to_string();

    use meshpunch::keys::{generate_private, Identity};
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let ca_roots = meshpunch::tls::load_ca_file(&cert).unwrap();
    let mut oa = support::rendezvous_peer_options(&a, &b, &connect, dir.path(), wga.addr(), "a");
    oa.ca_roots = ca_roots.clone();
    let mut ob = support::rendezvous_peer_options(&b, &a, &connect, dir.path(), wgb.addr(), "b");
    ob.ca_roots = ca_roots;
    let da = meshpunch::daemon::start(oa).await.unwrap();
    let db = meshpunch::daemon::start(ob).await.unwrap();
    let (ca, cb) = (da.control_socket.clone(), db.control_socket.clone());
    let (to_b, to_a) = (da.proxies[0].1, db.proxies[0].1);

    // Both allocate over TLS.
    let t = Instant::now();
    for c in [&ca, &cb] {
        let st = wait_status(c, "allocation over tls", Duration::from_secs(30), |s| {
            s.home_relay
                .as_ref()
                .is_some_and(|r| r.state == "allocated" && r.transport == "tls")
        })
        .await;
        let r = st.home_relay.unwrap();
        assert_eq!(r.server, tls);
        assert!(r.url.starts_with("turns:"), "{}", r.url);
    }
    println!("allocated over TLS on both sides after {:?}", t.elapsed());

    // Direct blocked on A: the pair ends on the relay, over TLS, and carries traffic.
    let v = control::request(
        &ca,
        &Request::Debug {
            peer: "other".into(),
            knob: "force-relay".into(),
            on: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let mut n = 0;
    let st = loop {
        // Traffic keeps the paths busy while they move to the relay.
        let _ = wga
            .exchange(to_b, &wgb, 5, Duration::from_millis(300))
            .await;
        let sa = status(&ca).await;
        let sb = status(&cb).await;
        if sa.peers[0].path.as_str() == "relay" && sb.peers[0].path.as_str() == "relay" {
            break sa;
        }
        n += 1;
        assert!(
            n < 100,
            "not on the relay: {}\n{}",
            serde_json::to_string_pretty(&sa).unwrap(),
            serde_json::to_string_pretty(&sb).unwrap()
        );
    };
    assert_eq!(st.peers[0].relay_transport.as_deref(), Some("tls"));
    let sb = wait_path(&cb, &["relay"], Duration::from_secs(5)).await;
    assert_eq!(sb.peers[0].relay_transport.as_deref(), Some("tls"));
    let ab = wga.exchange(to_b, &wgb, 100, Duration::from_secs(10)).await;
    let ba = wgb.exchange(to_a, &wga, 100, Duration::from_secs(10)).await;
    println!("over the TLS relay: a->b {ab}/100, b->a {ba}/100");
    assert!(ab >= 95 && ba >= 95, "a->b {ab}, b->a {ba}");
    // The JSON users read.
    let v = control::request(&ca, &Request::Status).await.unwrap();
    assert_eq!(v["peers"][0]["relay_transport"], "tls", "{v}");
    assert_eq!(v["home_relay"]["transport"], "tls", "{v}");
    assert_eq!(v["home_relay"]["stream_dropped"], 0, "{v}");

    drop(da);
    drop(db);
    relay.control().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_certificate_outside_the_trusted_roots_is_refused() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let g = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("relay.crt");
    let key = dir.path().join("relay.key");
    std::fs::write(&cert, g.cert.pem()).unwrap();
    std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
    let o = meshpunch_relay::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        cert: Some(cert.clone()),
        key: Some(key),
        ..Default::default()
    };
    let cfg = meshpunch_relay::config::RelayConfig::resolve(Default::default(), o, None).unwrap();
    let relay = meshpunch_relay::Relay::start(cfg).unwrap();
    let tls = relay.tls_addr().unwrap();
    let mut rcfg = meshpunch_rendezvous::Config::loopback(dir.path().join("rdv"));
    rcfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "loopback".into(),
        // A stream-only region: the client starts on TLS.
        urls: vec![format!("turns:{tls}")],
        secret: SECRET.into(),
    }];
    let rdv = meshpunch_rendezvous::Server::start(rcfg).await.unwrap();
    let connect = rdv.dev_connect().unwrap().to_string();
    // No CaFile: the self-signed certificate is trusted by nobody.
    let (da, _db, _wga, _wgb) = support::start_rendezvous_pair(&connect, dir.path()).await;
    let st = wait_status(
        &da.control_socket,
        "certificate error",
        Duration::from_secs(20),
        |s| {
            s.home_relay
                .as_ref()
                .and_then(|r| r.error.as_deref())
                .is_some_and(|e| e.contains("certificate"))
        },
    )
    .await;
    let r = st.home_relay.unwrap();
    assert_eq!(r.transport, "tls");
    assert_ne!(r.state, "allocated");
    println!("refused: {:?}", r.error);
    // The message names the relay and the fix that applies to relays (no pin= for them).
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("the relay certificate for 127.0.0.1 is not trusted") && e.contains("CaFile"),
        "{e}"
    );
    assert!(!e.contains("pin="), "{e}");
    relay.control().stop();
}
