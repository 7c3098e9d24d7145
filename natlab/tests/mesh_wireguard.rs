//! Scenario 3: real WireGuard. boringtun-cli + wg on two hosts behind different NATs
//! (port-restricted and carrier-grade double NAT), wired through `meshpunch up`: each daemon
//! uses the WireGuard key pair, delivers to WireGuard's listen port (`WireGuardEndpoint`), and
//! WireGuard's peer endpoint is the daemon's proxy port (`ProxyPort`). Ping across the tunnel
//! works on the direct path and, with the direct path cut, on the relay.
//!
//! (`meshpunch up --wg-interface` is not used here: it re-sets the endpoint of an existing
//! peer, which boringtun 0.7 does not support — it panics "Modifying existing peers is not yet
//! supported" — so the peers are added once, already pointing at the proxy ports.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use natlab::mesh::{Mesh, RelayImpl, UpOptions};
use natlab::wg::WgIface;
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;

/// Host candidates off: only server-reflexive and relayed candidates, so the tunnel's own
/// address cannot be offered whatever the daemon does (the next test covers the default).
#[test]
fn wireguard_through_meshpunch_pings_on_direct_and_on_relay() {
    let test = "wireguard_through_meshpunch_pings_on_direct_and_on_relay";
    if support::mesh_ready(test, &["wg", "boringtun-cli"]).is_none() {
        return;
    }
    scenario(false, support::relay_impl());
}

/// The relay leg through coturn instead of meshpunch-relay: the client must work with any
/// standard TURN server (REST-API credentials from the rendezvous, `use-auth-secret`).
#[test]
fn wireguard_relay_leg_through_coturn() {
    let test = "wireguard_relay_leg_through_coturn";
    if support::mesh_ready(test, &["wg", "boringtun-cli", "turnserver"]).is_none() {
        return;
    }
    scenario(false, RelayImpl::Coturn);
}

/// The same with the daemon's default host candidates: it must not offer the WireGuard
/// tunnel address (10.77.0.x) as a candidate — a path to the peer's tunnel address runs
/// inside the tunnel meshpunch itself carries, and the path flaps lan <-> direct.
#[test]
fn wireguard_tunnel_address_is_never_a_path() {
    let test = "wireguard_tunnel_address_is_never_a_path";
    if support::mesh_ready(test, &["wg", "boringtun-cli"]).is_none() {
        return;
    }
    scenario(true, support::relay_impl());
}

/// `meshpunch up --wg-interface`: the daemon takes the peers and the listen port from
/// `wg show IFACE dump` and points each WireGuard peer at its proxy port itself (remove and
/// re-add in one `wg set`, which boringtun supports).
#[test]
fn wireguard_peers_taken_from_the_interface_with_wg_interface() {
    let test = "wireguard_peers_taken_from_the_interface_with_wg_interface";
    if support::mesh_ready(test, &["wg", "boringtun-cli"]).is_none() {
        return;
    }
    scenario_with(false, support::relay_impl(), true);
}

fn scenario(host_candidates: bool, relay: RelayImpl) {
    scenario_with(host_candidates, relay, false);
}

fn scenario_with(host_candidates: bool, relay: RelayImpl, wg_interface: bool) {
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::DoubleNat, 1)
        .server_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, relay).unwrap();
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
    // Each daemon's identity is its WireGuard key pair (set both before writing any config).
    mesh.set_keys("a1", (wa.private_key.clone(), wa.public_key.clone()))
        .unwrap();
    mesh.set_keys("b1", (wb.private_key.clone(), wb.public_key.clone()))
        .unwrap();
    let proxy = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)));
    if wg_interface {
        // Plain WireGuard peers without endpoints; the daemons re-point them.
        wa.set_peer(&mesh.topo, &wb, None, 0).unwrap();
        wb.set_peer(&mesh.topo, &wa, None, 0).unwrap();
    }
    for (h, w, peer) in [("a1", &wa, "b1"), ("b1", &wb, "a1")] {
        let opts = if wg_interface {
            UpOptions {
                wg_interface: Some(w.name.clone()),
                host_candidates: (!host_candidates).then_some(false),
                ..Default::default()
            }
        } else {
            UpOptions {
                peers: vec![peer.to_string()],
                wireguard_endpoint: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, w.listen_port))),
                proxy_ports: BTreeMap::from([(peer.to_string(), PROXY_PORT)]),
                host_candidates: (!host_candidates).then_some(false),
                ..Default::default()
            }
        };
        mesh.up(h, &opts).unwrap();
    }
    if !wg_interface {
        // WireGuard reaches each peer through the local daemon's proxy port.
        wa.set_peer(&mesh.topo, &wb, proxy, 0).unwrap();
        wb.set_peer(&mesh.topo, &wa, proxy, 0).unwrap();
    }
    let (v, took) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 -> b1: direct via {:?} after {}",
        v.remote,
        support::secs(took)
    );
    // The answering side must have its path too, or WireGuard's first handshake response is
    // dropped ("no path") and WireGuard only retries after 5 s.
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    warm_up(&mesh, wb.addr);
    let dump = wa.dump(&mesh.topo).unwrap();
    assert!(
        dump.contains("127.0.0.1:"),
        "WireGuard endpoint not pointed at the proxy: {dump}"
    );

    let direct = match mesh.topo.ping("a1", wb.addr, 10) {
        Ok(r) => r,
        Err(e) => {
            for (h, w) in [("a1", &wa), ("b1", &wb)] {
                eprintln!("--- {h} status: {:?}", mesh.status(h));
                eprintln!("--- {h} wg: {:?}", w.dump(&mesh.topo));
                eprintln!("--- {h} addr: {:?}", mesh.topo.lab.ip(h, &["-4", "addr"]));
                eprintln!("--- {h} route: {:?}", mesh.topo.lab.ip(h, &["-4", "route"]));
            }
            panic!("ping over WireGuard on the direct path: {e}");
        }
    };
    println!("ping over WireGuard, direct path:  {direct}");

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
    warm_up(&mesh, wb.addr);
    let relay = mesh.topo.ping("a1", wb.addr, 10).unwrap();
    println!("ping over WireGuard, forced relay: {relay}");

    assert!(direct.received >= 8, "{direct}");
    assert!(relay.received >= 7, "{relay}");
    assert!(
        relay.min_ms > direct.min_ms,
        "relay {relay} vs direct {direct}"
    );
}

/// One ping that may wait for a WireGuard handshake (and its 5 s retry) before measuring.
fn warm_up(mesh: &Mesh, dst: Ipv4Addr) {
    let _ = mesh.topo.lab.exec_any(
        "a1",
        "ping",
        &["-n", "-q", "-c", "1", "-W", "8", &dst.to_string()],
    );
}
