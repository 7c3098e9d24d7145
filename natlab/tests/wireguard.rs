//! Real WireGuard (userspace boringtun + `wg`) inside the lab.
//!
//! Needs root, `ip`, `nft`, `ping`, `wg`, `boringtun-cli`; skips otherwise (fails in CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};

use natlab::wg::WgIface;
use natlab::{Nat, TopologySpec};

fn ready(test: &str) -> bool {
    natlab::testenv::require_root(test)
        && natlab::testenv::require_commands(test, &["ip", "nft", "ping", "wg", "boringtun-cli"])
}

/// The baseline the meshpunch scenarios build on: boringtun + wg work in lab namespaces, and
/// a host behind a port-restricted NAT reaches an open host through its NAT.
#[test]
fn wireguard_tunnel_from_behind_a_nat_to_an_open_host() {
    if !ready("wireguard_tunnel_from_behind_a_nat_to_an_open_host") {
        return;
    }
    let mut t = TopologySpec::new()
        .site("op", Nat::Open, 1)
        .site("pr", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    let a = WgIface::start(&mut t, "op1", Ipv4Addr::new(10, 99, 0, 1), 51820, None).unwrap();
    let b = WgIface::start(&mut t, "pr1", Ipv4Addr::new(10, 99, 0, 2), 51821, None).unwrap();
    a.set_peer(&t, &b, None, 0).unwrap();
    let open = SocketAddr::from((t.host("op1").unwrap().ip, 51820));
    b.set_peer(&t, &a, Some(open), 1).unwrap();
    let rtt = t.ping("pr1", a.addr, 5).unwrap();
    println!("ping over WireGuard pr1 -> op1: {rtt}");
    assert!(rtt.received >= 4, "{rtt}");
    // The open side learned the NAT's public address as the peer's endpoint.
    let dump = a.dump(&t).unwrap();
    assert!(
        dump.contains(&t.host("pr1").unwrap().public_ip.to_string()),
        "{dump}"
    );
}
