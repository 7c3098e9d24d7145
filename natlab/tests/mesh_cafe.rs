//! Scenario 2: the café. Two hosts on one LAN behind one NAT, the servers (rendezvous and
//! relay) 50 ms away each way. meshpunch must pick the LAN path — not a hairpin through the
//! NAT's public address, not the relay — and the round trip shows why: it is compared with
//! the same traffic forced through the relay (the LAN and hairpin paths cut with nftables).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use natlab::mesh::{FakeWg, Mesh, UpOptions};
use natlab::TopologySpec;

const PROXY_PORT: u16 = 51900;

#[test]
fn cafe_hosts_talk_over_the_lan_not_hairpin_not_relay() {
    let test = "cafe_hosts_talk_over_the_lan_not_hairpin_not_relay";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let delay = Duration::from_millis(50);
    let topo = TopologySpec::named("cafe")
        .unwrap()
        .server_delay(delay)
        .build()
        .unwrap();
    let c2_ip = topo.host("cafe2").unwrap().ip;
    let public = topo.host("cafe2").unwrap().public_ip;
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();

    // cafe1: a fake WireGuard that measures round trips; cafe2: a fake WireGuard that echoes.
    let pinger = FakeWg::bind(&mesh.topo, "cafe1", 0).unwrap();
    let echo = FakeWg::bind(&mesh.topo, "cafe2", 0)
        .unwrap()
        .spawn_echo()
        .unwrap();
    let echo_addr = echo.addr();

    let ports = BTreeMap::from([("cafe2".to_string(), PROXY_PORT)]);
    let o1 = UpOptions {
        peers: vec!["cafe2".into()],
        wireguard_endpoint: Some(pinger.addr().unwrap()),
        proxy_ports: ports,
        ..Default::default()
    };
    let o2 = UpOptions {
        peers: vec!["cafe1".into()],
        wireguard_endpoint: Some(echo_addr),
        ..Default::default()
    };
    mesh.up("cafe1", &o1).unwrap();
    mesh.up("cafe2", &o2).unwrap();

    let (view, took) = mesh
        .wait_path("cafe1", "cafe2", &["lan"], Duration::from_secs(30))
        .unwrap();
    println!(
        "cafe1 -> cafe2: {} via {:?} after {} ({})",
        view.path,
        view.remote,
        support::secs(took),
        view.reason
    );
    let remote = view.remote.clone().unwrap_or_default();
    assert!(
        remote.contains(&c2_ip.to_string()),
        "LAN path must go to cafe2's LAN address, got {remote}"
    );
    assert!(
        !remote.contains(&public.to_string()),
        "hairpin through the NAT: {remote}"
    );
    let proxy = view
        .proxy
        .unwrap_or_else(|| ([127, 0, 0, 1], PROXY_PORT).into());

    let count = 20;
    let lan = pinger
        .rtt(
            proxy,
            count,
            Duration::from_millis(100),
            Duration::from_secs(2),
        )
        .unwrap();

    // Force the relay: cut cafe1 <-> cafe2 (LAN address and the shared public address).
    mesh.topo.cut_both("cafe1", "cafe2").unwrap();
    let (rview, rtook) = mesh
        .wait_path("cafe1", "cafe2", &["relay"], Duration::from_secs(45))
        .unwrap();
    println!(
        "after cutting the LAN: {} via {:?} after {}",
        rview.path,
        rview.remote,
        support::secs(rtook)
    );
    // Let the relay path settle before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let relay = pinger
        .rtt(
            proxy,
            count,
            Duration::from_millis(100),
            Duration::from_secs(2),
        )
        .unwrap();

    println!(
        "\nRTT cafe1 -> cafe2 through meshpunch (servers {} ms away each way):",
        delay.as_millis()
    );
    println!("  chosen path (lan):  {lan}");
    println!("  forced relay:       {relay}");

    mesh.topo.restore_both("cafe1", "cafe2").unwrap();
    let (back, btook) = mesh
        .wait_path("cafe1", "cafe2", &["lan"], Duration::from_secs(30))
        .unwrap();
    println!(
        "restored: back on {} after {}",
        back.path,
        support::secs(btook)
    );

    drop(echo);
    assert!(lan.received >= count - 1, "{lan}");
    assert!(relay.received >= count - 2, "{relay}");
    // Through the relay a round trip crosses the 50 ms link four times.
    assert!(
        relay.min_ms >= 4.0 * delay.as_secs_f64() * 1e3 * 0.95,
        "{relay}"
    );
    assert!(
        lan.avg_ms < relay.min_ms / 4.0,
        "LAN {lan} vs relay {relay}"
    );
}
