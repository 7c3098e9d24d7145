//! IPv6 paths: two hosts behind random-port symmetric IPv4 NATs (which alone end on the
//! relay) that also have global IPv6 addresses — no NAT for IPv6, as ISPs deliver it, but a
//! stateful IPv6 firewall on each home router that drops unsolicited inbound traffic. The
//! daemons offer their IPv6 interface addresses as host candidates; simultaneous probing
//! opens both firewalls, and the pair must end on a direct IPv6 path carrying traffic.
//! `meshpunch netcheck` reports the global IPv6 address and, against an IPv6 STUN server,
//! IPv6 reachability with no NAT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natlab::ipv6::SERVER_V6;
use natlab::mesh::{FakeWg, Mesh, UpOptions};
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;

#[test]
fn symmetric_nat_pair_goes_direct_over_ipv6_through_stateful_firewalls() {
    let test = "symmetric_nat_pair_goes_direct_over_ipv6_through_stateful_firewalls";
    if support::mesh_ready(test, &["sysctl"]).is_none() {
        return;
    }
    let t0 = Instant::now();
    let topo = TopologySpec::new()
        .site("s", Nat::Symmetric, 1)
        .site("t", Nat::Symmetric, 1)
        .build()
        .unwrap();
    let v6 = topo.enable_ipv6(true).unwrap();
    let (s6, t6) = (v6["s1"], v6["t1"]);
    println!("s1 {s6}, t1 {t6} (IPv4 behind symmetric NATs)");

    // The firewalls work: s1 reaches the server over IPv6, but t1 cannot be reached
    // unsolicited (ICMPv6 echo is dropped like any other inbound flow t1 did not start).
    let (ok, out) = mesh_ping6(&topo, "s1", &SERVER_V6.to_string());
    assert!(ok, "s1 cannot reach the server over IPv6: {out}");
    let (ok, _) = mesh_ping6(&topo, "s1", &t6.to_string());
    assert!(!ok, "t1's firewall let an unsolicited ping in");

    // A second STUN server on the server's IPv6 address (a meshpunch-relay answers Binding).
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let relay6 = SocketAddr::new(SERVER_V6.into(), 3478);
    let args: Vec<String> = [
        "--listen",
        &relay6.to_string(),
        "--relay-ip",
        &SERVER_V6.to_string(),
        "--auth-secret",
        "natlab-v6-stun",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let relay_bin = mesh.bins.relay.clone();
    let server = mesh.topo.server.clone();
    mesh.topo
        .lab
        .spawn(&server, "relay6", &relay_bin, &args)
        .unwrap();

    let pinger = FakeWg::bind(&mesh.topo, "s1", 0).unwrap();
    let echo = FakeWg::bind(&mesh.topo, "t1", 0)
        .unwrap()
        .spawn_echo()
        .unwrap();
    let echo_addr = echo.addr();
    let o1 = UpOptions {
        peers: vec!["t1".into()],
        wireguard_endpoint: Some(pinger.addr().unwrap()),
        proxy_ports: BTreeMap::from([("t1".to_string(), PROXY_PORT)]),
        ..Default::default()
    };
    let o2 = UpOptions {
        peers: vec!["s1".into()],
        wireguard_endpoint: Some(echo_addr),
        ..Default::default()
    };
    mesh.up("s1", &o1).unwrap();
    mesh.up("t1", &o2).unwrap();

    let result = (|| {
        let (view, took) = mesh.wait_path("s1", "t1", &["direct"], Duration::from_secs(30))?;
        println!(
            "s1 -> t1: {} via {:?} after {} ({})",
            view.path,
            view.remote,
            support::secs(took),
            view.reason
        );
        let remote = view.remote.clone().unwrap_or_default();
        assert!(
            remote.contains(&t6.to_string()),
            "direct path must go to t1's IPv6 address {t6}, got {remote}"
        );
        let (back, _) = mesh.wait_path("t1", "s1", &["direct"], Duration::from_secs(30))?;
        let back_remote = back.remote.clone().unwrap_or_default();
        assert!(
            back_remote.contains(&s6.to_string()),
            "t1's path must go to s1's IPv6 address {s6}, got {back_remote}"
        );
        let proxy = view
            .proxy
            .unwrap_or_else(|| ([127, 0, 0, 1], PROXY_PORT).into());
        let rtt = pinger.rtt(proxy, 20, Duration::from_millis(50), Duration::from_secs(1))?;
        println!("WireGuard-shaped echo over the IPv6 path: {rtt}");
        assert!(rtt.received >= 18, "{rtt}");
        // For the record: which IPv4 pairs worked (none without port prediction: symmetric
        // against symmetric; not asserted, birthday probing may find one).
        let st = mesh.status("s1")?;
        let v4_direct_valid = st["peers"][0]["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["state"] == "valid" && p["remote"]["via"] == "direct" && p["kind"] != "relayed"
            })
            .filter_map(|p| p["remote"]["addr"].as_str())
            .filter(|a| !a.starts_with('['))
            .map(str::to_string)
            .collect::<Vec<_>>();
        println!("s1's valid direct IPv4 pairs: {v4_direct_valid:?}");

        // netcheck: the global IPv6 host address, and IPv6 STUN reachability without NAT.
        let out = mesh.client(
            "s1",
            &[
                "netcheck",
                "--connect",
                &mesh.connect,
                "--stun",
                &relay6.to_string(),
                "--json",
            ],
        )?;
        let nc: serde_json::Value = serde_json::from_str(&out).unwrap();
        println!(
            "netcheck s1: ipv4 {} ipv6 {} public_addr {} public_addr_v6 {} ipv6_host_addrs {} mapping {}",
            nc["ipv4"], nc["ipv6"], nc["public_addr"], nc["public_addr_v6"], nc["ipv6_host_addrs"], nc["mapping"]
        );
        assert_eq!(nc["ipv6"], true, "{nc}");
        assert!(
            nc["public_addr_v6"]
                .as_str()
                .is_some_and(|a| a.contains(&s6.to_string())),
            "IPv6 without NAT: the STUN server must see s1's own address: {nc}"
        );
        assert!(
            nc["ipv6_host_addrs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == &s6.to_string())),
            "{nc}"
        );
        assert_eq!(nc["mapping"], "address-and-port-dependent", "{nc}");
        Ok::<(), natlab::Error>(())
    })();
    drop(echo);
    if let Err(e) = result {
        mesh.topo.lab.dump_logs(40);
        panic!("{e}");
    }
    println!("scenario took {}", support::secs(t0.elapsed()));
}

fn mesh_ping6(topo: &natlab::Topology, from: &str, to: &str) -> (bool, String) {
    topo.lab
        .exec_any(
            from,
            "ping",
            &["-6", "-n", "-c", "3", "-i", "0.2", "-W", "1", to],
        )
        .unwrap_or((false, String::new()))
}
