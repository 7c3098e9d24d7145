//! Scenario 3: real WireGuard. boringtun-cli + wg on two hosts behind different NATs
//! (port-restricted and carrier-grade double NAT), wired through `meshpunch up --wg-interface`:
//! ping across the tunnel works on the direct path and, with the direct path cut, on the relay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use natlab::mesh::{Mesh, UpOptions};
use natlab::wg::WgIface;
use natlab::{Nat, TopologySpec};

#[test]
fn wireguard_through_meshpunch_pings_on_direct_and_on_relay() {
    let test = "wireguard_through_meshpunch_pings_on_direct_and_on_relay";
    if support::mesh_ready(test, &["wg", "boringtun-cli"]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::DoubleNat, 1)
        .server_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut mesh = Mesh::start(topo).unwrap();
    let wa = WgIface::start(
        &mut mesh.topo,
        "a1",
        Ipv4Addr::new(10, 77, 0, 1),
        51820,
        None,
    )
    .unwrap();
    let wb = WgIface::start(
        &mut mesh.topo,
        "b1",
        Ipv4Addr::new(10, 77, 0, 2),
        51820,
        None,
    )
    .unwrap();
    // Plain WireGuard peers without endpoints: meshpunch points them at its proxy ports.
    wa.set_peer(&mesh.topo, &wb, None, 0).unwrap();
    wb.set_peer(&mesh.topo, &wa, None, 0).unwrap();
    for (h, w, peer) in [("a1", &wa, "b1"), ("b1", &wb, "a1")] {
        let opts = UpOptions {
            peers: vec![peer.to_string()],
            wg_interface: Some(w.name.clone()),
            keys: Some((w.private_key.clone(), w.public_key.clone())),
            ..Default::default()
        };
        mesh.up(h, &opts).unwrap();
    }
    let (v, took) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 -> b1: direct via {:?} after {}",
        v.remote,
        support::secs(took)
    );
    let dump = wa.dump(&mesh.topo).unwrap();
    assert!(
        dump.contains("127.0.0.1:"),
        "WireGuard endpoint not pointed at the proxy: {dump}"
    );

    let direct = mesh.topo.ping("a1", wb.addr, 10).unwrap();
    println!("ping over WireGuard, direct path:  {direct}");

    mesh.topo.cut_both("a1", "b1").unwrap();
    let (rv, rtook) = mesh
        .wait_path("a1", "b1", &["relay"], Duration::from_secs(20))
        .unwrap();
    println!(
        "direct cut: relay via {:?} after {}",
        rv.remote,
        support::secs(rtook)
    );
    let relay = mesh.topo.ping("a1", wb.addr, 10).unwrap();
    println!("ping over WireGuard, forced relay: {relay}");

    assert!(direct.received >= 9, "{direct}");
    assert!(relay.received >= 8, "{relay}");
    assert!(
        relay.min_ms > direct.min_ms,
        "relay {relay} vs direct {direct}"
    );
}
