//! NAT binding lifetime: the daemon measures how long its NAT keeps an idle UDP mapping and
//! sets the keepalive interval from it, so an idle direct path survives a NAT that forgets
//! mappings after 10 s — where the default 25 s keepalive loses it.
//!
//! Four port-restricted sites whose routers' UDP conntrack timeouts are cut to 10 s
//! (`nf_conntrack_udp_timeout` and `_stream`, per network namespace). Pair a1–b1 measures
//! (test schedule `BindingLifetimeProbe = 4,8,12,16` instead of the default 15,30,60,120 s so
//! the search takes ~15 s; 2 s margins on both sides of the 10 s timeout for a loaded box); pair c1–d1 has measuring off (`default`, 25 s). Both pairs go
//! direct, then stay idle: a1–b1 must stay direct the whole time, c1–d1 must lose its direct
//! path at least once. A restarted a1 takes the value from its cache (`cached`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use natlab::mesh::{Mesh, UpOptions};
use natlab::{Nat, TopologySpec};

/// UDP conntrack timeout set on every NAT router (seconds).
const NAT_TIMEOUT_S: u64 = 10;
/// How long both pairs are watched while idle.
const WATCH: Duration = Duration::from_secs(45);

fn nat_of(st: &serde_json::Value) -> serde_json::Value {
    st.get("nat").cloned().unwrap_or(serde_json::Value::Null)
}

fn wait_source(mesh: &mut Mesh, host: &str, source: &str, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let nat = mesh.status(host).map(|s| nat_of(&s)).unwrap_or_default();
        if nat.get("source").and_then(|s| s.as_str()) == Some(source)
            && nat.get("measuring").and_then(|m| m.as_bool()) == Some(false)
        {
            return nat;
        }
        if start.elapsed() > timeout {
            mesh.topo.lab.dump_logs(40);
            panic!("{host}: nat.source not {source:?} after {timeout:?}: {nat}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn measured_keepalive_keeps_an_idle_direct_path_through_a_short_lived_nat() {
    let test = "measured_keepalive_keeps_an_idle_direct_path_through_a_short_lived_nat";
    if support::mesh_ready(test, &["sysctl"]).is_none() {
        return;
    }
    let t0 = Instant::now();
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::PortRestricted, 1)
        .site("c", Nat::PortRestricted, 1)
        .site("d", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    topo.set_nat_udp_timeout(NAT_TIMEOUT_S).unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let measure = vec!["BindingLifetimeProbe = 4,8,12,16".to_string()];
    let off = vec!["BindingLifetimeProbe = off".to_string()];
    for (host, peer, extra) in [
        ("a1", "b1", &measure),
        ("b1", "a1", &measure),
        ("c1", "d1", &off),
        ("d1", "c1", &off),
    ] {
        let o = UpOptions {
            peers: vec![peer.into()],
            interface_extra: extra.clone(),
            ..Default::default()
        };
        mesh.up(host, &o).unwrap();
    }
    for (h, p) in [("a1", "b1"), ("c1", "d1")] {
        let (v, took) = mesh
            .wait_path(h, p, &["direct"], Duration::from_secs(30))
            .unwrap();
        println!("{h} -> {p}: {} after {}", v.path, support::secs(took));
    }

    // a1 and b1 measure; c1 and d1 keep the default.
    let mut measured_keepalive = 0.0;
    for h in ["a1", "b1"] {
        let nat = wait_source(&mut mesh, h, "measured", Duration::from_secs(45));
        println!("{h}: nat = {nat}");
        let at_least = nat["binding_lifetime_s"].as_u64().unwrap();
        let at_most = nat["binding_lifetime_max_s"].as_u64().unwrap();
        let keepalive = nat["keepalive_interval_s"].as_f64().unwrap();
        // Expected 8-12 s; a late check on a loaded box can only turn "alive" into "expired".
        assert!(
            (4..=NAT_TIMEOUT_S).contains(&at_least)
                && (8..=16).contains(&at_most)
                && at_least < at_most,
            "{h}: measured {at_least}-{at_most} s for a {NAT_TIMEOUT_S} s NAT timeout"
        );
        assert!(
            keepalive < NAT_TIMEOUT_S as f64 && keepalive >= 2.0,
            "{h}: keepalive {keepalive} s"
        );
        measured_keepalive = keepalive;
    }
    for h in ["c1", "d1"] {
        let nat = nat_of(&mesh.status(h).unwrap());
        assert_eq!(nat["source"], "default", "{h}: {nat}");
        assert_eq!(
            nat["keepalive_interval_s"].as_f64(),
            Some(25.0),
            "{h}: {nat}"
        );
    }

    // Idle watch. A binding may have expired while a1/b1 were still on the default (their
    // paths are re-checked at once when the interval shrinks): let that settle, then start from
    // direct everywhere.
    std::thread::sleep(Duration::from_secs(3));
    for (h, p) in [("a1", "b1"), ("b1", "a1"), ("c1", "d1"), ("d1", "c1")] {
        mesh.wait_path(h, p, &["direct"], Duration::from_secs(30))
            .unwrap();
    }
    // Path changes are counted in the daemons' logs (a flap can be shorter than a status
    // poll: the lost keepalive is noticed and the path re-validated within a second).
    let changes = |mesh: &Mesh, h: &str| mesh.daemon_log(h).matches("path changed").count();
    let before: Vec<usize> = ["a1", "b1", "c1", "d1"]
        .iter()
        .map(|h| changes(&mesh, h))
        .collect();
    // Meanwhile `netcheck --long` on c1 (own sockets) must see the 10 s timeout too.
    let netcheck_long = std::process::Command::new("ip")
        .args(["netns", "exec", &mesh.topo.lab.ns("c1")])
        .arg(&mesh.bins.client)
        .args(["netcheck", "--connect", &mesh.connect, "--json", "--long"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watch_start = Instant::now();
    let mut left_direct: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    while watch_start.elapsed() < WATCH {
        for (h, p) in [("a1", "b1"), ("b1", "a1"), ("c1", "d1"), ("d1", "c1")] {
            if let Ok(v) = mesh.peer(h, p) {
                if v.path != "direct" {
                    left_direct.entry(h).or_default().push(format!(
                        "{:.1}s {} ({})",
                        watch_start.elapsed().as_secs_f64(),
                        v.path,
                        v.reason
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let flaps: Vec<usize> = ["a1", "b1", "c1", "d1"]
        .iter()
        .zip(&before)
        .map(|(h, b)| changes(&mesh, h) - b)
        .collect();
    println!(
        "idle {} s behind a {NAT_TIMEOUT_S} s NAT: measured keepalive {measured_keepalive} s -> \
         path changes a1 {} / b1 {}, samples off direct {} / {}; default 25 s -> path changes \
         c1 {} / d1 {}, samples off direct {} / {}",
        WATCH.as_secs(),
        flaps[0],
        flaps[1],
        left_direct.get("a1").map_or(0, Vec::len),
        left_direct.get("b1").map_or(0, Vec::len),
        flaps[2],
        flaps[3],
        left_direct.get("c1").map_or(0, Vec::len),
        left_direct.get("d1").map_or(0, Vec::len),
    );
    for (h, v) in &left_direct {
        println!("  {h}: first off-direct samples {:?}", &v[..v.len().min(3)]);
    }
    assert!(
        !left_direct.contains_key("a1")
            && !left_direct.contains_key("b1")
            && flaps[0] == 0
            && flaps[1] == 0,
        "the measured keepalive must hold the idle direct path: {left_direct:?} {flaps:?}"
    );
    assert!(
        flaps[2] + flaps[3] > 0,
        "control: with the default 25 s keepalive the 10 s NAT should have dropped the idle \
         direct path at least once"
    );

    let out = netcheck_long.wait_with_output().unwrap();
    let nc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    println!(
        "netcheck --long on c1: binding_lifetime = {}",
        nc["binding_lifetime"]
    );
    let at_most = nc["binding_lifetime"]["at_most_s"].as_u64();
    assert!(
        at_most.is_some_and(|m| m > NAT_TIMEOUT_S && m <= 30)
            && nc["binding_lifetime"]["at_least_s"].as_u64() <= Some(NAT_TIMEOUT_S),
        "netcheck --long: {nc}"
    );

    // A restart behind the same public IP takes the value from the cache, at once.
    let cache = mesh.topo.lab.log_dir().join("a1.lifetime.json");
    assert!(cache.exists(), "no cache file {}", cache.display());
    mesh.down("a1");
    let o = UpOptions {
        peers: vec!["b1".into()],
        interface_extra: measure.clone(),
        ..Default::default()
    };
    let restarted = Instant::now();
    mesh.up("a1", &o).unwrap();
    let nat = wait_source(&mut mesh, "a1", "cached", Duration::from_secs(20));
    println!(
        "a1 restarted: nat = {nat} after {}",
        support::secs(restarted.elapsed())
    );
    assert_eq!(
        nat["keepalive_interval_s"].as_f64(),
        Some(measured_keepalive)
    );
    println!("scenario took {}", support::secs(t0.elapsed()));
}
