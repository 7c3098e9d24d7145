//! `meshpunch netcheck --connect … --json` against a real rendezvous (STUN with an RFC 5780
//! alternate address on 127.0.0.2) and a real relay, on loopback: no NAT, so mapping `none`,
//! filtering endpoint-independent, a relay latency and a preferred relay.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::{start_relay, SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_json_on_loopback_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path());
    cfg.stun_alt = Some("127.0.0.2:0".parse().unwrap());
    cfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "loopback".into(),
        urls: vec![format!("turn:{}", relay.listen_addr())],
        secret: SECRET.into(),
    }];
    let rdv = meshpunch_rendezvous::Server::start(cfg).await.unwrap();
    let connect = rdv.dev_connect().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_meshpunch"))
            .args(["netcheck", "--connect", &connect, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for k in [
        "udp",
        "public_addr",
        "mapping",
        "filtering",
        "hairpin",
        "relays",
        "preferred_relay",
        "ipv4",
        "ipv6",
        "port_preserving",
    ] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
    assert_eq!(v["udp"], true);
    assert_eq!(v["mapping"], "none");
    assert_eq!(v["verdict"], "direct paths likely with most peers");
    assert_eq!(v["filtering"], "endpoint-independent");
    assert_eq!(v["port_preserving"], true);
    assert!(v["public_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(v["relays"][0]["region"], "loopback");
    assert!(v["relays"][0]["latency_ms"].as_f64().is_some());
    assert_eq!(v["preferred_relay"], "loopback");
    relay.control().stop();
}

/// The rendezvous is down (nothing on its port) or refuses (pin mismatch): netcheck still
/// tests NAT behaviour against the connect string's `stun=` server and says why in a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcheck_uses_the_connect_strings_stun_server_when_the_rendezvous_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let rdv =
        meshpunch_rendezvous::Server::start(meshpunch_rendezvous::Config::loopback(dir.path()))
            .await
            .unwrap();
    let stun = rdv.stun_addrs()[0];
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let down_port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = format!(
        "meshpunch://mpt1.x@127.0.0.1:{down_port}?pin=spki:{}&stun={stun}",
        "00".repeat(32)
    );
    let wrong_pin = format!(
        "meshpunch://mpt1.x@{}?pin=spki:{}&stun={stun}",
        rdv.quic_addr(),
        "00".repeat(32)
    );
    for connect in [down, wrong_pin] {
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_meshpunch"))
                .args(["netcheck", "--connect", &connect, "--json"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stderr.contains("rendezvous unreachable"), "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["udp"], true);
        assert!(v["public_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
}
