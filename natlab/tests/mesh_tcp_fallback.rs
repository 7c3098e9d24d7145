//! A host on a network that drops every UDP packet (both ways, servers included) and lets TCP
//! out only to the servers' 443 and 80 (site type `udp-blocked-all`): its daemon still
//! registers with the rendezvous, over TLS on TCP 443, and `netcheck` says QUIC fails while
//! TLS/TCP works; and it reaches a host on another site through the relay over TURN-over-TLS
//! on 443.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use natlab::mesh::{FakeWg, Mesh, UpOptions};
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

/// The `udp-blocked-all` host reaches a host on an open network: registration over TLS/TCP,
/// the relay over TURN-over-TLS on 443 (its UDP Allocate gets no answer), WireGuard-framed
/// datagrams echoed through it. The open host stays on UDP to the relay.
#[test]
fn udp_blocked_host_relays_over_tls_to_another_site() {
    let test = "udp_blocked_host_relays_over_tls_to_another_site";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .server_delay(Duration::from_millis(10))
        .site("xb", Nat::UdpBlockedAll, 1)
        .site("op", Nat::Open, 1)
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let pinger = FakeWg::bind(&mesh.topo, "xb1", 0).unwrap();
    let echo = FakeWg::bind(&mesh.topo, "op1", 0)
        .unwrap()
        .spawn_echo()
        .unwrap();
    let started = Instant::now();
    mesh.up(
        "xb1",
        &UpOptions {
            peers: vec!["op1".into()],
            wireguard_endpoint: Some(pinger.addr().unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    mesh.up(
        "op1",
        &UpOptions {
            peers: vec!["xb1".into()],
            wireguard_endpoint: Some(echo.addr()),
            ..Default::default()
        },
    )
    .unwrap();
    let (view, took) = mesh
        .wait_path("xb1", "op1", &["relay"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.daemon_log("xb1")));
    println!(
        "xb1 -> op1: {} via {:?} after {} ({:.2} s after start)",
        view.path,
        view.remote,
        support::secs(took),
        started.elapsed().as_secs_f64()
    );
    let st = mesh.status("xb1").unwrap();
    assert_eq!(st["rendezvous"]["transport"], "tcp", "{st}");
    assert_eq!(st["home_relay"]["transport"], "tls", "{st}");
    assert_eq!(st["peers"][0]["relay_transport"], "tls", "{st}");
    let so = mesh.status("op1").unwrap();
    assert_eq!(so["home_relay"]["transport"], "udp", "{so}");
    std::thread::sleep(Duration::from_millis(500));
    let proxy = view.proxy.expect("proxy address of op1 on xb1");
    let rtt = pinger
        .rtt(
            proxy,
            20,
            Duration::from_millis(100),
            Duration::from_secs(2),
        )
        .unwrap();
    println!("xb1 -> op1 over the TLS relay: {rtt:?}");
    assert!(rtt.received >= 18, "{rtt:?}");
}
