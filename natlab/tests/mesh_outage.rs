//! Scenario 5: control-plane outage. With a direct path carrying a constant flow, the
//! rendezvous is stopped: the flow must not lose a datagram. It is started again: both
//! daemons must re-register within seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natlab::mesh::Mesh;
use natlab::traffic::Flow;
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;
const WG_PORT: u16 = 51820;
const OUTAGE: Duration = Duration::from_secs(6);

fn rendezvous_state(mesh: &mut Mesh, host: &str) -> String {
    mesh.status(host)
        .ok()
        .and_then(|s| {
            s.get("rendezvous")?
                .get("state")?
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

#[test]
fn rendezvous_outage_keeps_direct_paths_and_clients_reregister() {
    let test = "rendezvous_outage_keeps_direct_paths_and_clients_reregister";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::FullCone, 1)
        .server_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let sink = support::up_flow_pair(&mut mesh, PROXY_PORT, WG_PORT);
    let wg_a = SocketAddr::from((Ipv4Addr::LOCALHOST, WG_PORT));
    mesh.wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();

    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT));
    let flow = Flow::start(&mesh.topo.lab, "a1", wg_a, proxy, Duration::from_millis(10)).unwrap();
    assert!(
        sink.wait_arrival_after(Instant::now(), Duration::from_secs(5))
            .is_some(),
        "flow never arrived"
    );
    std::thread::sleep(Duration::from_millis(500));

    let before_stop = sink.received();
    let stop_at = Instant::now();
    mesh.stop_rendezvous();
    std::thread::sleep(OUTAGE);
    let received_during = sink.received() - before_stop;
    let during = mesh.peer("a1", "b1").unwrap();
    let gap = sink.max_gap(stop_at, Instant::now());
    let state_during = rendezvous_state(&mut mesh, "a1");

    let restart_at = Instant::now();
    mesh.start_rendezvous().unwrap();
    let mut reregistered = BTreeMap::new();
    while reregistered.len() < 2 && restart_at.elapsed() < Duration::from_secs(30) {
        for h in ["a1", "b1"] {
            if !reregistered.contains_key(h) && rendezvous_state(&mut mesh, h) == "connected" {
                reregistered.insert(h, restart_at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = flow.sent();
    drop(flow);
    std::thread::sleep(Duration::from_millis(300));
    let lost = sink.lost(sent);
    let after = mesh.peer("a1", "b1").unwrap();

    println!(
        "rendezvous down {}: path stayed {} ({:?}), rendezvous state seen by a1: {state_during}, \
         largest gap {}, {} datagrams received during the outage",
        support::secs(OUTAGE),
        during.path,
        during.remote,
        support::secs(gap),
        received_during
    );
    for (h, d) in &reregistered {
        println!("{h} re-registered {} after the restart", support::secs(*d));
    }
    println!("flow: {sent} sent, {lost} lost; path after: {}", after.path);

    assert_eq!(
        during.path, "direct",
        "the outage disturbed the direct path"
    );
    assert_eq!(lost, 0, "datagrams lost while the rendezvous was down");
    assert_eq!(
        reregistered.len(),
        2,
        "not re-registered within 30 s: {reregistered:?}"
    );
    assert!(
        reregistered.values().all(|d| *d < Duration::from_secs(15)),
        "{reregistered:?}"
    );
}
