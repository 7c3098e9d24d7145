//! `meshpunch up --wg-interface` on an interface whose life meshpunch does not control:
//! boringtun-cli (userspace WireGuard, which hides its private key in `wg show dump`) on two
//! hosts behind NATs.
//!
//! * the bare form `meshpunch up --connect CS --wg-interface IFACE` fails with a message that
//!   names the fix; with `--private-key-file` it runs;
//! * the interface is deleted and re-created (what `wg-quick down; wg-quick up` does): the
//!   daemon re-points the peer at its proxy port within 5 s and traffic flows again;
//! * a peer added to the interface while meshpunch runs is carried (no restart); removed, it
//!   is dropped, added back, carried again;
//! * a1 is a wg-quick-style full tunnel: meshpunch marks its sockets with the fwmark;
//! * someone changes the peer's endpoint (what `wg syncconf` does): re-pointed again;
//! * SIGTERM puts back the endpoint the peer had (the last one someone else set);
//! * `meshpunch down` stops the other daemon cleanly and restores its endpoint; a second
//!   `meshpunch down` says that no daemon runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use natlab::mesh::{Mesh, UpOptions};
use natlab::wg::WgIface;
use natlab::{Nat, TopologySpec};

/// The endpoint a1's WireGuard config gives b1 (TEST-NET-1: never answered; meshpunch
/// replaces it while it runs and must put it back).
const CONFIG_ENDPOINT: &str = "192.0.2.7:51820";
/// The endpoint "`wg syncconf`" sets later (TEST-NET-2).
const SYNCED_ENDPOINT: &str = "198.51.100.9:51820";

/// The endpoint `dump` shows for peer `key`.
fn endpoint_of(dump: &str, key: &str) -> Option<String> {
    dump.lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&key))
        .and_then(|f| f.get(2).map(|s| s.to_string()))
}

/// Waits until the endpoint of `peer` on `w` satisfies `ok`; returns how long it took.
fn wait_endpoint(
    mesh: &Mesh,
    w: &WgIface,
    peer: &str,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let dump = w.dump(&mesh.topo).unwrap_or_default();
        if endpoint_of(&dump, peer).is_some_and(|e| ok(&e)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(dump);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wg syncconf`-style endpoint change on boringtun (it cannot modify a peer in place:
/// remove, then add with the new endpoint).
fn set_endpoint(mesh: &Mesh, w: &WgIface, peer: &WgIface, ep: &str) {
    mesh.topo
        .lab
        .exec(
            &w.host,
            "wg",
            &["set", &w.name, "peer", &peer.public_key, "remove"],
        )
        .unwrap();
    let allowed = format!("{}/32", peer.addr);
    mesh.topo
        .lab
        .exec(
            &w.host,
            "wg",
            &[
                "set",
                &w.name,
                "peer",
                &peer.public_key,
                "allowed-ips",
                &allowed,
                "endpoint",
                ep,
            ],
        )
        .unwrap();
}

/// What wg-quick does for `AllowedIPs = 0.0.0.0/0` (the IPv4 part): fwmark 51820 on the
/// interface, a default route into it in table 51820 for every packet without that mark, the
/// main table (minus its default route) first.
fn full_tunnel(mesh: &Mesh, w: &WgIface) {
    let lab = &mesh.topo.lab;
    lab.exec(&w.host, "wg", &["set", &w.name, "fwmark", "51820"])
        .unwrap();
    lab.ip(
        &w.host,
        &[
            "-4",
            "route",
            "replace",
            "0.0.0.0/0",
            "dev",
            &w.name,
            "table",
            "51820",
        ],
    )
    .unwrap();
    let rules = lab.ip(&w.host, &["-4", "rule", "show"]).unwrap();
    if !rules.contains("lookup 51820") {
        lab.ip(
            &w.host,
            &[
                "-4", "rule", "add", "not", "fwmark", "51820", "table", "51820",
            ],
        )
        .unwrap();
        lab.ip(
            &w.host,
            &[
                "-4",
                "rule",
                "add",
                "table",
                "main",
                "suppress_prefixlength",
                "0",
            ],
        )
        .unwrap();
    }
}

fn ping_ok(mesh: &Mesh, dst: Ipv4Addr, what: &str) {
    // One ping that may wait for a WireGuard handshake (and its 5 s retry).
    let _ = mesh.topo.lab.exec_any(
        "a1",
        "ping",
        &["-n", "-q", "-c", "1", "-W", "8", &dst.to_string()],
    );
    let r = mesh.topo.ping("a1", dst, 10);
    match r {
        Ok(r) if r.received >= 8 => println!("ping over WireGuard, {what}: {r}"),
        other => {
            mesh.topo.lab.dump_logs(30);
            panic!("ping over WireGuard, {what}: {other:?}");
        }
    }
}

#[test]
fn wg_interface_is_kept_pointed_and_restored() {
    let test = "wg_interface_is_kept_pointed_and_restored";
    let Some(bins) = support::mesh_ready(test, &["wg", "boringtun-cli", "timeout"]) else {
        return;
    };
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .server_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let wa = WgIface::start(
        &mut mesh.topo,
        "a1",
        Ipv4Addr::new(10, 78, 0, 1),
        51820,
        None,
    )
    .unwrap();
    let wb = WgIface::start(
        &mut mesh.topo,
        "b1",
        Ipv4Addr::new(10, 78, 0, 2),
        51820,
        None,
    )
    .unwrap();
    mesh.set_keys("a1", (wa.private_key.clone(), wa.public_key.clone()))
        .unwrap();
    mesh.set_keys("b1", (wb.private_key.clone(), wb.public_key.clone()))
        .unwrap();
    // a1 starts without peers; b1 is added to it once meshpunch runs.
    wb.set_peer(&mesh.topo, &wa, None, 0).unwrap();
    // a1 is a wg-quick full tunnel: fwmark 51820 on the interface, every packet without that
    // mark routed into the tunnel. meshpunch must take the mark from `wg show` and put it on
    // its own sockets, or its packets to the rendezvous and to b1 vanish into the tunnel.
    full_tunnel(&mesh, &wa);

    // The bare form on boringtun: no key anywhere, and the message says how to fix it.
    let ctl = mesh.node("a1").unwrap().control;
    let client = bins.client.display().to_string();
    let ctl_s = ctl.display().to_string();
    let bare = mesh.topo.lab.exec(
        "a1",
        "timeout",
        &[
            "20",
            &client,
            "up",
            "--connect",
            &mesh.connect.clone(),
            "--wg-interface",
            &wa.name,
            "--control-socket",
            &ctl_s,
        ],
    );
    let err = format!("{:?}", bare.expect_err("bare form without a key must fail"));
    assert!(
        err.contains("does not show its private key")
            && err.contains("--private-key-file")
            && err.contains("PrivateKeyFile"),
        "{err}"
    );

    mesh.up(
        "a1",
        &UpOptions {
            wg_interface: Some(wa.name.clone()),
            key_file: true,
            host_candidates: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    mesh.up(
        "b1",
        &UpOptions {
            wg_interface: Some(wb.name.clone()),
            host_candidates: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    let is_proxy = |e: &str| e.starts_with("127.0.0.1:");
    // A peer added to the interface while meshpunch runs is carried without a restart.
    wa.set_peer(&mesh.topo, &wb, Some(CONFIG_ENDPOINT.parse().unwrap()), 0)
        .unwrap();
    let took = wait_endpoint(&mesh, &wa, &wb.public_key, Duration::from_secs(5), is_proxy)
        .unwrap_or_else(|dump| panic!("added peer not pointed at a proxy within 5 s: {dump}"));
    println!("added peer carried after {took:?}");
    mesh.wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    ping_ok(&mesh, wb.addr, "start (full tunnel)");
    let st = mesh.status("a1").unwrap();
    assert_eq!(st["wg_interface"]["fwmark"], 51820, "{st}");
    assert!(mesh.daemon_log("a1").contains("data socket marked"));

    // wg-quick down: gone for a while; status says so, the log says it once.
    wa.stop(&mut mesh.topo);
    let start = Instant::now();
    loop {
        let st = mesh.status("a1").unwrap();
        if st["wg_interface"]["state"] == "gone" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "gone not noticed: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        mesh.daemon_log("a1")
            .matches("WireGuard interface gone")
            .count(),
        1,
        "logged once"
    );
    // wg-quick up: the interface comes back with its config's endpoint.
    wa.recreate(&mut mesh.topo).unwrap();
    full_tunnel(&mesh, &wa);
    wa.set_peer(&mesh.topo, &wb, Some(CONFIG_ENDPOINT.parse().unwrap()), 0)
        .unwrap();
    let took = wait_endpoint(&mesh, &wa, &wb.public_key, Duration::from_secs(5), is_proxy)
        .unwrap_or_else(|dump| panic!("not re-pointed within 5 s after re-creation: {dump}"));
    println!("re-created interface re-pointed after {took:?}");
    ping_ok(&mesh, wb.addr, "after re-creation");
    let st = mesh.status("a1").unwrap();
    assert_eq!(st["wg_interface"]["state"], "up", "{st}");
    assert!(
        st["wg_interface"]["reapplied_total"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert!(mesh
        .daemon_log("a1")
        .contains("WireGuard interface is back"));

    // `wg syncconf` changes the endpoint: re-pointed; it becomes the one to restore.
    set_endpoint(&mesh, &wa, &wb, SYNCED_ENDPOINT);
    let took = wait_endpoint(&mesh, &wa, &wb.public_key, Duration::from_secs(5), is_proxy)
        .unwrap_or_else(|dump| panic!("not re-pointed within 5 s after a change: {dump}"));
    println!("changed endpoint re-pointed after {took:?}");
    ping_ok(&mesh, wb.addr, "after an endpoint change");

    // The peer removed from the interface: dropped (the daemon keeps running), then added
    // back: carried again.
    mesh.topo
        .lab
        .exec(
            "a1",
            "wg",
            &["set", &wa.name, "peer", &wb.public_key, "remove"],
        )
        .unwrap();
    let start = Instant::now();
    loop {
        let st = mesh.status("a1").unwrap();
        if st["peers"].as_array().is_some_and(|p| p.is_empty()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "removed peer still carried: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("removed peer dropped after {:?}", start.elapsed());
    let allowed = format!("{}/32", wb.addr);
    mesh.topo
        .lab
        .exec(
            "a1",
            "wg",
            &[
                "set",
                &wa.name,
                "peer",
                &wb.public_key,
                "allowed-ips",
                &allowed,
                "endpoint",
                SYNCED_ENDPOINT,
            ],
        )
        .unwrap();
    wait_endpoint(&mesh, &wa, &wb.public_key, Duration::from_secs(5), is_proxy)
        .unwrap_or_else(|dump| panic!("re-added peer not carried within 5 s: {dump}"));
    ping_ok(&mesh, wb.addr, "after remove and re-add");

    // SIGTERM: the endpoint someone else set last is back.
    mesh.down("a1");
    let dump = wa.dump(&mesh.topo).unwrap();
    assert_eq!(
        endpoint_of(&dump, &wb.public_key).as_deref(),
        Some(SYNCED_ENDPOINT),
        "{dump}"
    );

    // `meshpunch down` on b1: one line, the daemon exits, b1's peer has no endpoint again.
    let ctl_b = mesh.node("b1").unwrap().control.display().to_string();
    let out = mesh
        .client("b1", &["down", "--control-socket", &ctl_b])
        .unwrap();
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let dump = wb.dump(&mesh.topo).unwrap();
    assert_eq!(
        endpoint_of(&dump, &wa.public_key).as_deref(),
        Some("(none)"),
        "{dump}"
    );
    let again = mesh.client("b1", &["down", "--control-socket", &ctl_b]);
    let err = format!("{:?}", again.expect_err("no daemon runs any more"));
    assert!(err.contains("no daemon is running"), "{err}");
}
