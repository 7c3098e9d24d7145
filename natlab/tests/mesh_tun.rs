//! Built-in WireGuard: `meshpunch up --tun NAME` on hosts with nothing else installed (no
//! `wg`, no boringtun-cli, no kernel WireGuard module in use). The daemon creates the TUN
//! device with the config's `Address`, routes each peer's `AllowedIPs` to it and runs
//! WireGuard in-process; `ping` and an iperf3 TCP transfer go through it:
//!
//! - two hosts behind different NATs (port-restricted and carrier-grade double NAT): direct
//!   path, then the direct path cut: the relay;
//! - two hosts in the café (one LAN behind one NAT): the LAN path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use natlab::mesh::{Mesh, TunOptions, UpOptions};
use natlab::{Nat, TopologySpec};

const TUN: &str = "mptun0";

/// The `--tun` flag is there (else skip outside CI, fail in CI).
fn tun_ready(test: &str, extra: &[&str]) -> bool {
    let Some(bins) = support::mesh_ready(test, extra) else {
        return false;
    };
    let help = std::process::Command::new(&bins.client)
        .args(["up", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    natlab::testenv::require_features(
        test,
        (!help.contains("--tun")).then(|| "meshpunch up --tun".to_string()),
    )
}

/// Starts `--tun` daemons on `h1` (10.9.0.1) and `h2` (10.9.0.2), each the other's peer.
fn up_pair(mesh: &mut Mesh, h1: &str, h2: &str) {
    for (h, me, peer, peer_ip) in [
        (h1, "10.9.0.1/24", h2, "10.9.0.2/32"),
        (h2, "10.9.0.2/24", h1, "10.9.0.1/32"),
    ] {
        let opts = UpOptions {
            peers: vec![peer.to_string()],
            tun: Some(TunOptions {
                name: TUN.into(),
                address: me.into(),
                allowed_ips: BTreeMap::from([(peer.to_string(), peer_ip.to_string())]),
            }),
            ..Default::default()
        };
        mesh.up(h, &opts).unwrap();
    }
}

/// One ping that may wait for the WireGuard handshake before anything is measured.
fn warm_up(mesh: &Mesh, from: &str, dst: &str) {
    let _ = mesh
        .topo
        .lab
        .exec_any(from, "ping", &["-n", "-q", "-c", "1", "-W", "8", dst]);
}

fn ping(mesh: &Mesh, from: &str, dst: &str) -> natlab::RttStats {
    warm_up(mesh, from, dst);
    match mesh.topo.ping(from, dst.parse().unwrap(), 10) {
        Ok(r) => r,
        Err(e) => {
            for h in mesh
                .topo
                .hosts()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
            {
                eprintln!("--- {h} addr: {:?}", mesh.topo.lab.ip(&h, &["addr"]));
                eprintln!("--- {h} route: {:?}", mesh.topo.lab.ip(&h, &["route"]));
            }
            mesh.topo.lab.dump_logs(60);
            panic!("ping {from} -> {dst} through the TUN device: {e}");
        }
    }
}

/// An iperf3 TCP transfer of `secs` seconds from `from` to `to_ip` (server on `to`).
/// Returns (bytes received, Mbit/s).
fn tcp_transfer(mesh: &mut Mesh, from: &str, to: &str, to_ip: &str, secs: u32) -> (u64, f64) {
    let iperf = natlab::testenv::which("iperf3").unwrap();
    let name = format!("iperf3-{to}");
    mesh.topo
        .lab
        .spawn(
            to,
            &name,
            &iperf,
            &["-s".into(), "-1".into(), "-B".into(), to_ip.into()],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = mesh
        .topo
        .lab
        .exec_any(
            from,
            "iperf3",
            &["-c", to_ip, "-t", &secs.to_string(), "-J"],
        )
        .unwrap()
        .1;
    mesh.topo.lab.stop(&name);
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 output ({e}): {out}"));
    let sum = &json["end"]["sum_received"];
    (
        sum["bytes"].as_u64().unwrap_or(0),
        sum["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
    )
}

#[test]
fn tun_hosts_behind_different_nats_ping_and_carry_tcp_direct_and_relayed() {
    let test = "tun_hosts_behind_different_nats_ping_and_carry_tcp_direct_and_relayed";
    if !tun_ready(test, &["iperf3"]) {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::DoubleNat, 1)
        .server_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    up_pair(&mut mesh, "a1", "b1");

    let (v, took) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 -> b1: direct via {:?} after {}",
        v.remote,
        support::secs(took)
    );
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    // The TUN device and its route exist; the tunnel address is never a candidate path.
    let link = mesh.topo.lab.ip("a1", &["link", "show", TUN]).unwrap();
    assert!(link.contains("mtu 1412"), "{link}");
    let direct = ping(&mesh, "a1", "10.9.0.2");
    println!("ping through --tun, direct path: {direct}");
    assert!(direct.received >= 8, "{direct}");
    let (bytes, mbps) = tcp_transfer(&mut mesh, "a1", "b1", "10.9.0.2", 3);
    println!("iperf3 through --tun, direct path: {bytes} bytes, {mbps:.1} Mbit/s");
    assert!(
        bytes > 500_000,
        "TCP transfer on the direct path: {bytes} bytes"
    );
    let v = mesh.peer("a1", "b1").unwrap();
    assert_eq!(v.path, "direct", "{v:?}");
    assert!(
        !v.remote.clone().unwrap_or_default().contains("10.9.0."),
        "the tunnel address became a path: {v:?}"
    );

    // Direct path cut: the relay carries the tunnel.
    mesh.topo.cut_both("a1", "b1").unwrap();
    let (rv, rtook) = mesh
        .wait_path("a1", "b1", &["relay"], Duration::from_secs(45))
        .unwrap();
    println!(
        "direct cut: relay via {:?} after {}",
        rv.remote,
        support::secs(rtook)
    );
    mesh.wait_path("b1", "a1", &["relay"], Duration::from_secs(45))
        .unwrap();
    let relay = ping(&mesh, "a1", "10.9.0.2");
    println!("ping through --tun, forced relay: {relay}");
    assert!(relay.received >= 7, "{relay}");
    assert!(
        relay.min_ms > direct.min_ms,
        "relay {relay} vs direct {direct}"
    );
    let (bytes, mbps) = tcp_transfer(&mut mesh, "a1", "b1", "10.9.0.2", 3);
    println!("iperf3 through --tun, relay: {bytes} bytes, {mbps:.1} Mbit/s");
    assert!(bytes > 100_000, "TCP transfer on the relay: {bytes} bytes");

    // The daemon removes its interface when it stops.
    mesh.down("a1");
    std::thread::sleep(Duration::from_millis(500));
    assert!(mesh.topo.lab.ip("a1", &["link", "show", TUN]).is_err());
}

#[test]
fn tun_cafe_hosts_use_the_lan_path() {
    let test = "tun_cafe_hosts_use_the_lan_path";
    if !tun_ready(test, &["iperf3"]) {
        return;
    }
    let topo = TopologySpec::named("cafe")
        .unwrap()
        .server_delay(Duration::from_millis(50))
        .build()
        .unwrap();
    let c2_ip = topo.host("cafe2").unwrap().ip;
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    up_pair(&mut mesh, "cafe1", "cafe2");
    let (v, took) = mesh
        .wait_path("cafe1", "cafe2", &["lan"], Duration::from_secs(30))
        .unwrap();
    println!(
        "cafe1 -> cafe2: lan via {:?} after {}",
        v.remote,
        support::secs(took)
    );
    assert!(
        v.remote
            .clone()
            .unwrap_or_default()
            .contains(&c2_ip.to_string()),
        "LAN path must go to cafe2's LAN address: {v:?}"
    );
    mesh.wait_path("cafe2", "cafe1", &["lan"], Duration::from_secs(30))
        .unwrap();
    let r = ping(&mesh, "cafe1", "10.9.0.2");
    println!("ping through --tun, LAN path: {r}");
    assert!(r.received >= 8, "{r}");
    // The servers are 50 ms away: a LAN round trip is far below that.
    assert!(r.avg_ms < 50.0, "{r}");
    let (bytes, mbps) = tcp_transfer(&mut mesh, "cafe1", "cafe2", "10.9.0.2", 3);
    println!("iperf3 through --tun, LAN path: {bytes} bytes, {mbps:.1} Mbit/s");
    assert!(
        bytes > 500_000,
        "TCP transfer on the LAN path: {bytes} bytes"
    );
    assert_eq!(mesh.peer("cafe1", "cafe2").unwrap().path, "lan");
}
