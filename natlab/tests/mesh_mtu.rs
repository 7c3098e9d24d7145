//! Path MTU probing with the built-in WireGuard (`meshpunch up --tun`): one site's uplink is
//! lowered to 1400 bytes (both ends of the router's `wan` link), so the default tunnel MTU
//! (1412: 1412 + 32 + 8 + 20 = 1472-byte packets) would blackhole full-size packets, since the
//! data socket sends with don't-fragment. Each daemon must measure its paths with sized
//! probes, show the smaller `mtu` in `status`, lower its TUN interface to it, and a full-size
//! inner packet of that MTU (`ping -M do`) must pass:
//!
//! - over IPv4, on the direct path and then (direct cut) on the relay;
//! - over IPv6, on a direct path (two symmetric IPv4 NATs with global IPv6);
//! - on a forced relay (`debug block-direct`) whose client leg is IPv6: the relay also listens
//!   on the server's IPv6 address and the relay map's UDP URI is that literal
//!   ([`Mesh::relay_over_ipv6`]); relayed addresses stay IPv4. This is the case where
//!   WireGuard's default MTU blackholes (1420 + 32 + 4 + 8 + 40 = 1504 bytes).
//!
//! A relay path from b1 may show 1500: the relay host, which sends without
//! `IP_PMTUDISC_PROBE`, fragments towards a's 1400-byte link once it learned that link's MTU,
//! and fragments reassembled at a1 do work. a1's own paths all start on its 1400-byte uplink.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use natlab::mesh::Mesh;
use natlab::{Nat, TopologySpec};

const TUN: &str = "mpmtu0";
/// The lowered uplink MTU.
const LINK_MTU: u32 = 1400;

fn tun_ready(test: &str, extra: &[&str]) -> bool {
    support::tun_ready(test, extra)
}

fn up_pair(mesh: &mut Mesh, h1: &str, h2: &str, extra: &[&str]) {
    support::up_tun_pair(mesh, TUN, h1, h2, extra);
}

/// Lowers both ends of site `site`'s uplink (router `wan`, internet `d-<site>`) to LINK_MTU.
fn lower_uplink(mesh: &Mesh, site: &str) {
    let mtu = LINK_MTU.to_string();
    mesh.topo
        .lab
        .ip(site, &["link", "set", "wan", "mtu", &mtu])
        .unwrap();
    mesh.topo
        .lab
        .ip(
            &mesh.topo.internet,
            &["link", "set", &format!("d-{site}"), "mtu", &mtu],
        )
        .unwrap();
}

/// The interface MTU `ip link` reports for the TUN device on `host`.
fn link_mtu(mesh: &Mesh, host: &str) -> u32 {
    let link = mesh.topo.lab.ip(host, &["link", "show", TUN]).unwrap();
    link.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {link}"))
}

/// The largest `mtu.outer` among `st`'s first peer's valid pairs that `pick` selects.
fn pair_outer(st: &serde_json::Value, pick: impl Fn(&serde_json::Value) -> bool) -> Option<u64> {
    st["peers"][0]["pairs"]
        .as_array()?
        .iter()
        .filter(|p| p["state"] == "valid" && pick(p))
        .filter_map(|p| p["mtu"]["outer"].as_u64())
        .max()
}

/// A direct pair (not to the peer's relayed address, not through our allocation).
fn is_direct(p: &serde_json::Value) -> bool {
    p["kind"] != "relayed" && p["remote"]["via"] == "direct"
}

/// Waits until `host`'s status shows a measured path MTU at most `at_most`, its TUN
/// interface follows it and the pairs `pick` selects have a result; returns (path mtu,
/// interface mtu, status).
fn wait_mtu(
    mesh: &mut Mesh,
    host: &str,
    at_most: u32,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> (u32, u32, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = mesh.status(host).unwrap();
        let path = st["mtu"]["path"].as_u64().map(|m| m as u32);
        let tun = st["tun"]["mtu"].as_u64().unwrap_or(0) as u32;
        if let Some(p) = path {
            if p <= at_most && tun == p.min(1412) && pair_outer(&st, &pick).is_some() {
                return (p, tun, st);
            }
        }
        if Instant::now() > deadline {
            mesh.topo.lab.dump_logs(60);
            panic!("{host}: path MTU not measured/followed (want <= {at_most}): {st:#}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A full-size inner packet for the interface MTU `mtu` (don't fragment) gets through and back.
fn full_size_ping(mesh: &Mesh, from: &str, dst: &str, mtu: u32) {
    let _ = mesh
        .topo
        .lab
        .exec_any(from, "ping", &["-n", "-q", "-c", "1", "-W", "8", dst]);
    let size = (mtu - 28).to_string();
    let (ok, out) = mesh
        .topo
        .lab
        .exec_any(
            from,
            "ping",
            &["-n", "-M", "do", "-s", &size, "-c", "3", "-W", "3", dst],
        )
        .unwrap();
    if !ok {
        mesh.topo.lab.dump_logs(60);
    }
    assert!(
        ok,
        "full-size ping (-M do -s {size}) {from} -> {dst}: {out}"
    );
}

#[test]
fn tun_mtu_follows_a_1400_byte_uplink_on_direct_and_relay_paths_over_ipv4() {
    let test = "tun_mtu_follows_a_1400_byte_uplink_on_direct_and_relay_paths_over_ipv4";
    if !tun_ready(test, &[]) {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    lower_uplink(&mesh, "a");
    up_pair(&mut mesh, "a1", "b1", &[]);
    mesh.wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    // Direct IPv4 over a 1400-byte link: 1400 - 20 - 8 - 32 = 1340 at most.
    for h in ["a1", "b1"] {
        let (path, tun, st) = wait_mtu(&mut mesh, h, 1340, is_direct);
        println!("{h}: path mtu {path}, {TUN} mtu {tun}");
        assert_eq!(link_mtu(&mesh, h), tun, "ip link vs status");
        assert!(tun < 1412);
        let peer = &st["peers"][0];
        assert!(
            peer["mtu"].as_u64().is_some_and(|m| m <= 1340),
            "peer mtu: {peer:#}"
        );
        assert_eq!(
            pair_outer(&st, is_direct),
            Some(u64::from(LINK_MTU)),
            "direct pair mtu: {peer:#}"
        );
    }
    let mtu_a = link_mtu(&mesh, "a1");
    full_size_ping(&mesh, "a1", "10.9.0.2", mtu_a);
    full_size_ping(&mesh, "b1", "10.9.0.1", link_mtu(&mesh, "b1"));
    // The default MTU's full-size packet does not fit the link: without following the path
    // it would blackhole. The interface refuses it now (EMSGSIZE locally: "message too long").
    let (ok, _) = mesh
        .topo
        .lab
        .exec_any(
            "a1",
            "ping",
            &[
                "-n", "-M", "do", "-s", "1384", "-c", "1", "-W", "2", "10.9.0.2",
            ],
        )
        .unwrap();
    assert!(!ok, "a 1412-byte packet passed a {mtu_a}-byte interface");
    let log = mesh.daemon_log("a1");
    assert!(
        log.contains("TUN interface MTU follows the smallest working path"),
        "{log}"
    );

    // Direct cut: the relay, still full-size packets of the followed MTU.
    mesh.topo.cut_both("a1", "b1").unwrap();
    mesh.wait_path("a1", "b1", &["relay"], Duration::from_secs(45))
        .unwrap();
    mesh.wait_path("b1", "a1", &["relay"], Duration::from_secs(45))
        .unwrap();
    for h in ["a1", "b1"] {
        let (path, tun, _) = wait_mtu(&mut mesh, h, 1340, |p| !is_direct(p));
        println!("{h} on the relay: path mtu {path}, {TUN} mtu {tun}");
    }
    full_size_ping(&mesh, "a1", "10.9.0.2", link_mtu(&mesh, "a1"));
    full_size_ping(&mesh, "b1", "10.9.0.1", link_mtu(&mesh, "b1"));
}

#[test]
fn tun_mtu_follows_a_1400_byte_uplink_on_a_direct_ipv6_path() {
    let test = "tun_mtu_follows_a_1400_byte_uplink_on_a_direct_ipv6_path";
    if !tun_ready(test, &["sysctl"]) {
        return;
    }
    let topo = TopologySpec::new()
        .site("s", Nat::Symmetric, 1)
        .site("t", Nat::Symmetric, 1)
        .build()
        .unwrap();
    let v6 = topo.enable_ipv6(true).unwrap();
    let t6 = v6["t1"];
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    lower_uplink(&mesh, "s");
    // No birthday search: the direct path is the IPv6 one.
    up_pair(
        &mut mesh,
        "s1",
        "t1",
        &["BirthdaySockets = 0", "BirthdayProbes = 0"],
    );
    let (v, _) = mesh
        .wait_path("s1", "t1", &["direct"], Duration::from_secs(30))
        .unwrap();
    assert!(
        v.remote
            .clone()
            .unwrap_or_default()
            .contains(&t6.to_string()),
        "direct path must be IPv6 ({t6}): {v:?}"
    );
    mesh.wait_path("t1", "s1", &["direct"], Duration::from_secs(30))
        .unwrap();
    // IPv6 over a 1400-byte link: 1400 - 40 - 8 - 32 = 1320 at most.
    for h in ["s1", "t1"] {
        let is_v6 = |p: &serde_json::Value| {
            p["remote"]["addr"]
                .as_str()
                .is_some_and(|a| a.starts_with('['))
        };
        let (path, tun, st) = wait_mtu(&mut mesh, h, 1320, is_v6);
        println!("{h}: path mtu {path}, {TUN} mtu {tun}");
        assert_eq!(link_mtu(&mesh, h), tun, "ip link vs status");
        assert_eq!(
            pair_outer(&st, is_v6),
            Some(u64::from(LINK_MTU)),
            "IPv6 pair mtu: {:#}",
            st["peers"][0]
        );
    }
    full_size_ping(&mesh, "s1", "10.9.0.2", link_mtu(&mesh, "s1"));
    full_size_ping(&mesh, "t1", "10.9.0.1", link_mtu(&mesh, "t1"));
}

#[test]
fn tun_mtu_follows_a_1400_byte_uplink_on_a_relay_path_reached_over_ipv6() {
    let test = "tun_mtu_follows_a_1400_byte_uplink_on_a_relay_path_reached_over_ipv6";
    if !tun_ready(test, &["sysctl"]) {
        return;
    }
    let topo = TopologySpec::new()
        .site("s", Nat::Symmetric, 1)
        .site("t", Nat::Symmetric, 1)
        .build()
        .unwrap();
    topo.enable_ipv6(true).unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    mesh.relay_over_ipv6().unwrap();
    let relay6 = Mesh::relay_v6_addr().to_string();
    lower_uplink(&mesh, "s");
    up_pair(
        &mut mesh,
        "s1",
        "t1",
        &["BirthdaySockets = 0", "BirthdayProbes = 0"],
    );
    // Forced relay: no direct path (IPv4 or IPv6) is used.
    for (h, peer) in [("s1", "t1"), ("t1", "s1")] {
        let ctl = mesh.node(h).unwrap().control.display().to_string();
        mesh.client(
            h,
            &[
                "--control-socket",
                &ctl,
                "debug",
                "block-direct",
                peer,
                "on",
            ],
        )
        .unwrap();
    }
    mesh.wait_path("s1", "t1", &["relay"], Duration::from_secs(45))
        .unwrap();
    mesh.wait_path("t1", "s1", &["relay"], Duration::from_secs(45))
        .unwrap();
    let via_relay = |p: &serde_json::Value| p["remote"]["via"] == "relay";
    // s1's relay leg is IPv6 over the 1400-byte link: 1400 - 40 - 8 - 4 - 32 = 1316 at most.
    let (path, tun, st) = wait_mtu(&mut mesh, "s1", 1316, via_relay);
    println!(
        "s1 on the relay over IPv6: path mtu {path}, {TUN} mtu {tun}, relay pair outer {:?}, home relay {}",
        pair_outer(&st, via_relay),
        st["home_relay"]
    );
    assert_eq!(link_mtu(&mesh, "s1"), tun, "ip link vs status");
    for h in ["s1", "t1"] {
        let st = if h == "s1" {
            st.clone()
        } else {
            mesh.status(h).unwrap()
        };
        assert_eq!(
            st["home_relay"]["server"].as_str(),
            Some(relay6.as_str()),
            "{h}: relay leg must be IPv6: {:#}",
            st["home_relay"]
        );
        assert_eq!(
            st["home_relay"]["transport"], "udp",
            "{:#}",
            st["home_relay"]
        );
        assert_eq!(st["peers"][0]["path"], "relay", "{:#}", st["peers"][0]);
    }
    assert!(
        st["peers"][0]["mtu"].as_u64().is_some_and(|m| m <= 1316),
        "peer mtu: {:#}",
        st["peers"][0]
    );
    // The first hop is the IPv6 leg to the relay (40-byte header), not the IPv4 relayed
    // address: counted with an IPv4 header, a 1400-byte packet would read as 1380.
    assert_eq!(
        pair_outer(&st, via_relay),
        Some(u64::from(LINK_MTU)),
        "relay pair mtu: {:#}",
        st["peers"][0]
    );
    // WireGuard's default 1420 (1504 bytes relayed over IPv6) and meshpunch's default 1412
    // would not fit; the followed MTU does.
    assert!(tun <= 1316, "{TUN} mtu {tun}");
    full_size_ping(&mesh, "s1", "10.9.0.2", link_mtu(&mesh, "s1"));
    full_size_ping(&mesh, "t1", "10.9.0.1", link_mtu(&mesh, "t1"));
    // Still on the relay, still reached over IPv6.
    for (h, peer) in [("s1", "t1"), ("t1", "s1")] {
        let v = mesh.peer(h, peer).unwrap();
        assert_eq!(v.path, "relay", "{h}: {v:?}");
        let st = mesh.status(h).unwrap();
        assert_eq!(st["home_relay"]["server"].as_str(), Some(relay6.as_str()));
    }
}
