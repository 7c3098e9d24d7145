//! A host on a network that drops every UDP packet (both ways, servers included) and lets TCP
//! out only to the servers' 443 and 80 (site type `udp-blocked-all`): its daemon still
//! registers with the rendezvous, over TLS on TCP 443, and `netcheck` says QUIC fails while
//! TLS/TCP works. (Reaching peers from there needs TURN over TLS from the client: not yet, so
//! this test asserts registration and the transport only.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use natlab::mesh::{Mesh, UpOptions};
use natlab::{Nat, TopologySpec};

#[test]
fn udp_blocked_host_registers_over_tls_tcp() {
    let test = "udp_blocked_host_registers_over_tls_tcp";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .server_delay(Duration::from_millis(10))
        .site("xb", Nat::UdpBlockedAll, 1)
        .site("op", Nat::Open, 1)
        .build()
        .unwrap();
    let public = topo.host("xb1").unwrap().public_ip;
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();

    // netcheck: no UDP at all; the rendezvous answers over TLS/TCP only.
    let r = mesh.netcheck("xb1").unwrap();
    println!("netcheck on xb1: tcp_fallback = {}", r["tcp_fallback"]);
    assert_eq!(r["udp"], serde_json::json!(false), "{r}");
    assert_eq!(
        r["tcp_fallback"]["quic_ok"],
        serde_json::json!(false),
        "{r}"
    );
    assert_eq!(r["tcp_fallback"]["tcp_ok"], serde_json::json!(true), "{r}");
    assert_eq!(
        r["tcp_fallback"]["tcp_addr"],
        serde_json::json!("203.0.113.10:443"),
        "{r}"
    );

    // The daemon registers; the rendezvous saw it over TCP from the site's public address.
    let started = Instant::now();
    mesh.up(
        "xb1",
        &UpOptions {
            peers: vec!["op1".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let deadline = started + Duration::from_secs(30);
    loop {
        let st = mesh.status("xb1").unwrap();
        if st["rendezvous"]["state"] == serde_json::json!("connected") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "xb1 never registered: {st}\n{}",
            mesh.daemon_log("xb1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "xb1 registered (UDP blocked) {:.2} s after `meshpunch up` started",
        started.elapsed().as_secs_f64()
    );
    let log = mesh.topo.lab.log("rendezvous");
    let line = log
        .lines()
        .find(|l| l.contains(" registered") && l.contains(&format!("{public}:")))
        .unwrap_or_else(|| panic!("no registration from {public} in:\n{log}"));
    assert!(line.contains("transport=\"tcp\""), "{line}");
}
