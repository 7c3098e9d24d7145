//! Scenario 4: failover. Constant-rate traffic (100 datagrams/s, WireGuard-sized gaps matter
//! to a call or a song) flows a1 -> b1 on a punched direct path; the direct path is cut with
//! nftables; the flow must move to the relay within 2 s (goal: 1 s). Then the path is restored
//! and the flow must move back to direct. Gaps are measured at the receiver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natlab::mesh::{Mesh, UpOptions};
use natlab::traffic::Flow;
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;
const WG_PORT: u16 = 51820;

#[test]
fn cut_direct_path_fails_over_to_relay_within_two_seconds_and_back() {
    let test = "cut_direct_path_fails_over_to_relay_within_two_seconds_and_back";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .server_delay(Duration::from_millis(25))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let sink = support::up_flow_pair(&mut mesh, PROXY_PORT, WG_PORT);
    let wg_a = SocketAddr::from((Ipv4Addr::LOCALHOST, WG_PORT));
    let (v, took) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 -> b1 direct via {:?} after {}",
        v.remote,
        support::secs(took)
    );

    // Failover needs the peer's relayed candidate. The daemons exchange candidates before their
    // TURN allocation may be ready and only re-offer ~20 s later (a client bug, tested by
    // relay_candidate_reaches_the_peer_within_seconds below); wait for it so the gap measured is
    // the failover's, not that race's.
    for (h, p) in [("a1", "b1"), ("b1", "a1")] {
        let t = mesh.wait_relay_pair(h, p, Duration::from_secs(40)).unwrap();
        println!(
            "{h} knows a relay pair towards {p} after {}",
            support::secs(t)
        );
    }

    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT));
    let interval = Duration::from_millis(10);
    let flow_start = Instant::now();
    let flow = Flow::start(&mesh.topo.lab, "a1", wg_a, proxy, interval).unwrap();
    assert!(
        sink.wait_arrival_after(Instant::now(), Duration::from_secs(5))
            .is_some(),
        "flow never arrived"
    );
    std::thread::sleep(Duration::from_secs(1));

    // Cut the direct path.
    let cut_at = Instant::now();
    mesh.topo.cut_both("a1", "b1").unwrap();
    let (rv, to_relay) = mesh
        .wait_path("a1", "b1", &["relay"], Duration::from_secs(10))
        .unwrap();
    let resumed =
        sink.wait_arrival_after(cut_at + Duration::from_millis(300), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let span = sink.max_gap_span(cut_at, Instant::now());
    let gap_fail = span.map(|(a, b)| b - a).unwrap_or(Duration::ZERO);
    let rel = |t: Instant| {
        if t >= cut_at {
            format!("+{:.3} s", (t - cut_at).as_secs_f64())
        } else {
            format!("-{:.3} s", (cut_at - t).as_secs_f64())
        }
    };
    println!(
        "cut: status says relay ({:?}) after {}; flow: last datagram before the gap {}, first after {}; gap {}",
        rv.remote,
        support::secs(to_relay),
        span.map(|s| rel(s.0)).unwrap_or_default(),
        span.map(|s| rel(s.1)).unwrap_or_default(),
        support::secs(gap_fail)
    );

    // Restore the direct path.
    let restore_at = Instant::now();
    mesh.topo.restore_both("a1", "b1").unwrap();
    let (dv, to_direct) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let gap_back = sink.max_gap(restore_at, Instant::now());
    let sent = flow.sent();
    drop(flow);
    std::thread::sleep(Duration::from_millis(300));
    let lost = sink.lost(sent);
    println!(
        "restore: back on direct ({:?}) after {}, largest gap while moving back {}",
        dv.remote,
        support::secs(to_direct),
        support::secs(gap_back)
    );
    println!(
        "flow: {sent} datagrams at {} ms intervals, {lost} lost in total",
        interval.as_millis()
    );

    // Timeline for bench/plot.py: every arrival relative to the cut, with its one-way delay
    // (arrival − scheduled send time flow_start + seq × interval), and the path changes.
    let rel_s = |t: Instant| {
        if t >= cut_at {
            (t - cut_at).as_secs_f64()
        } else {
            -(cut_at - t).as_secs_f64()
        }
    };
    let arrivals: Vec<serde_json::Value> = sink
        .arrivals()
        .iter()
        .map(|(at, seq)| {
            let scheduled = flow_start + interval * u32::try_from(*seq).unwrap_or(u32::MAX);
            serde_json::json!({
                "t_s": rel_s(*at),
                "seq": seq,
                "delay_ms": at.saturating_duration_since(scheduled).as_secs_f64() * 1e3,
            })
        })
        .collect();
    support::write_result(
        "mesh_failover",
        &serde_json::json!({
            "scenario": "mesh_failover",
            "unix_time": support::unix_now(),
            "relay": format!("{:?}", support::relay_impl()),
            "interval_ms": interval.as_millis() as u64,
            "server_delay_ms": 25,
            "events": [
                {"t_s": 0.0, "what": "direct path cut"},
                {"t_s": to_relay.as_secs_f64(), "what": "status: relay"},
                {"t_s": rel_s(restore_at), "what": "direct path restored"},
                {"t_s": rel_s(restore_at) + to_direct.as_secs_f64(), "what": "status: direct"},
            ],
            "paths": [
                {"from_s": rel_s(flow_start), "to_s": 0.0, "path": "direct"},
                {"from_s": 0.0, "to_s": to_relay.as_secs_f64(), "path": "none"},
                {"from_s": to_relay.as_secs_f64(), "to_s": rel_s(restore_at) + to_direct.as_secs_f64(), "path": "relay"},
                {"from_s": rel_s(restore_at) + to_direct.as_secs_f64(), "to_s": null, "path": "direct"},
            ],
            "gap_failover_s": gap_fail.as_secs_f64(),
            "gap_back_s": gap_back.as_secs_f64(),
            "sent": sent,
            "lost": lost,
            "arrivals": arrivals,
        }),
    );

    assert!(resumed.is_some(), "the flow never resumed over the relay");
    assert!(
        gap_fail < Duration::from_secs(2),
        "failover gap {gap_fail:?} >= 2 s"
    );
    assert!(
        gap_back < Duration::from_secs(2),
        "gap moving back to direct {gap_back:?}"
    );
}

/// Right after start both daemons must know a relay pair for each other (so a failover has
/// somewhere to go), also when the servers are far (50 ms) and the TURN allocation completes
/// after the first offer/answer.
#[test]
fn relay_candidate_reaches_the_peer_within_seconds() {
    let test = "relay_candidate_reaches_the_peer_within_seconds";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .server_delay(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    for (h, p) in [("a1", "b1"), ("b1", "a1")] {
        let opts = UpOptions {
            peers: vec![p.to_string()],
            ..Default::default()
        };
        mesh.up(h, &opts).unwrap();
    }
    for (h, p) in [("a1", "b1"), ("b1", "a1")] {
        let t = mesh.wait_relay_pair(h, p, Duration::from_secs(5)).unwrap();
        println!(
            "{h} knows a relay pair towards {p} after {}",
            support::secs(t)
        );
    }
}

/// A daemon restarted on the same `ListenPort` behind the same NAT mapping reaches the relay
/// from the same 5-tuple as its previous run. After a clean stop (SIGTERM) it deleted its
/// allocation; after a crash (SIGKILL) the allocation is still there and the new run deletes
/// it (437, Refresh with lifetime 0 under the same user's new credentials, Allocate again).
/// Either way the relay is back at once, not after a retry every 15 s that meets the stale
/// allocation until its lifetime (10 min) runs out. With `NATLAB_RELAY=coturn`: coturn keeps a
/// released 5-tuple for a few seconds (the retry after a 437 comes after 3 s) and refuses to
/// delete a crashed run's allocation under a new username (441), so only the clean restart
/// is checked there, within 8 s.
#[test]
fn a_restarted_daemon_gets_its_relay_at_once() {
    let test = "a_restarted_daemon_gets_its_relay_at_once";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let relay = support::relay_impl();
    let coturn = matches!(relay, natlab::mesh::RelayImpl::Coturn);
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, relay).unwrap();
    let opts = |p: &str| UpOptions {
        peers: vec![p.to_string()],
        ..Default::default()
    };
    mesh.up("a1", &opts("b1")).unwrap();
    mesh.up("b1", &opts("a1")).unwrap();
    let allocated = |mesh: &mut Mesh, within: Duration| -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let home = mesh
                .status("a1")
                .ok()
                .and_then(|s| s.get("home_relay").cloned());
            let state = home
                .as_ref()
                .and_then(|h| h.get("state"))
                .and_then(|s| s.as_str())
                .map(str::to_owned);
            if state.as_deref() == Some("allocated") {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                return Err(format!(
                    "a1: no relay allocation after {within:?}: {home:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let first = allocated(&mut mesh, Duration::from_secs(10)).unwrap();
    println!("first run: allocated after {}", support::secs(first));
    let cases: &[&str] = if coturn {
        &["SIGTERM"]
    } else {
        &["SIGTERM", "SIGKILL"]
    };
    for how in cases {
        if *how == "SIGKILL" {
            let pid = mesh.daemon_pid("a1").expect("a1's daemon pid");
            // SAFETY: kill(2) on the daemon the lab started and has not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        mesh.down("a1");
        mesh.up("a1", &opts("b1")).unwrap();
        let within = Duration::from_secs(if coturn { 8 } else { 5 });
        let t = allocated(&mut mesh, within).unwrap_or_else(|e| {
            mesh.topo.lab.dump_logs(30);
            panic!("after {how}: {e}")
        });
        println!("restart after {how}: allocated after {}", support::secs(t));
        // The peer's relayed candidate is usable again: b1 knows a relay pair towards a1.
        mesh.wait_relay_pair("b1", "a1", Duration::from_secs(10))
            .unwrap();
    }
}
