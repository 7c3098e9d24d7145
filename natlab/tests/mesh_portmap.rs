//! Port mapping behind a real home router: Debian's miniupnpd (UPnP IGD, NAT-PMP, PCP) on the
//! router of a random-port symmetric NAT. `meshpunch netcheck` must report all three and the
//! mapped address, delete its mapping on exit, and send nothing to the gateway's port-mapping
//! ports (5351, 1900) with `--no-port-mapping`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use natlab::mesh::{Mesh, UpOptions};
use natlab::{Nat, TopologySpec};

/// Site `pm`: symmetric NAT with miniupnpd; site `sy`: the same NAT without it.
fn spec() -> TopologySpec {
    TopologySpec::new()
        .site("pm", Nat::Symmetric, 1)
        .with_port_mapping()
        .site("sy", Nat::Symmetric, 1)
        .server_delay(Duration::from_millis(5))
}

#[test]
fn netcheck_behind_miniupnpd_reports_pcp_pmp_upnp_and_the_mapping_then_deletes_it() {
    let test = "netcheck_behind_miniupnpd_reports_pcp_pmp_upnp_and_the_mapping_then_deletes_it";
    if support::mesh_ready(test, &["miniupnpd", "conntrack"]).is_none() {
        return;
    }
    let mesh = Mesh::start_with(spec().build().unwrap(), support::relay_impl()).unwrap();
    let wan = mesh.topo.host("pm1").unwrap().public_ip;
    let host_ip = mesh.topo.host("pm1").unwrap().ip;

    let r = mesh.netcheck("pm1").unwrap();
    println!("pm1 portmap: {}", r["portmap"]);
    let p = &r["portmap"];
    assert_eq!(
        (&p["pcp"], &p["pmp"], &p["upnp"]),
        (&true.into(), &true.into(), &true.into()),
        "{p}"
    );
    let mapped = p["mapped"].as_str().expect("a mapped address");
    assert!(
        mapped.starts_with(&format!("{wan}:")),
        "{mapped} is on the router's WAN {wan}"
    );
    assert_eq!(
        r["mapping"], "address-and-port-dependent",
        "the NAT itself stays symmetric"
    );
    // Deleted on exit: miniupnpd holds no mapping for pm1 any more.
    let rules = mesh.topo.port_mappings("pm").unwrap();
    assert!(
        !rules.contains(&host_ip.to_string()),
        "mapping left behind: {rules}"
    );

    // The text report says the same in one line.
    let text = mesh
        .client("pm1", &["netcheck", "--connect", &mesh.connect])
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("Port mapping"))
        .unwrap_or_default()
        .to_string();
    println!("{line}");
    assert!(line.contains("PCP, NAT-PMP, UPnP; mapped"), "{text}");
    assert!(line.contains(&format!("{wan}:")), "{line}");

    // Without miniupnpd: nothing offered, nothing mapped.
    let r = mesh.netcheck("sy1").unwrap();
    println!("sy1 portmap: {}", r["portmap"]);
    let p = &r["portmap"];
    assert_eq!(
        (&p["pcp"], &p["pmp"], &p["upnp"], &p["mapped"]),
        (
            &false.into(),
            &false.into(),
            &false.into(),
            &serde_json::Value::Null
        ),
        "{p}"
    );
}

/// Packets from the LAN to UDP 5351 / 1900 the router `pm` has seen (an nftables counter).
fn portmap_packets(mesh: &Mesh) -> u64 {
    let out = mesh
        .topo
        .lab
        .exec("pm", "nft", &["list", "counter", "inet", "pmcount", "pm"])
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out}"))
}

#[test]
fn netcheck_with_port_mapping_off_sends_nothing_to_5351_or_1900() {
    let test = "netcheck_with_port_mapping_off_sends_nothing_to_5351_or_1900";
    if support::mesh_ready(test, &["miniupnpd", "conntrack"]).is_none() {
        return;
    }
    let mesh = Mesh::start_with(spec().build().unwrap(), support::relay_impl()).unwrap();
    mesh.topo
        .lab
        .nft(
            "pm",
            "table inet pmcount {\n counter pm { }\n \
             chain pre { type filter hook prerouting priority raw; policy accept;\n  \
             iifname \"lan\" udp dport { 5351, 1900 } counter name \"pm\"\n }\n}\n",
        )
        .unwrap();
    let out = mesh
        .client(
            "pm1",
            &[
                "netcheck",
                "--connect",
                &mesh.connect,
                "--json",
                "--no-port-mapping",
            ],
        )
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["portmap"], serde_json::Value::Null, "{out}");
    assert_eq!(
        portmap_packets(&mesh),
        0,
        "--no-port-mapping sent to 5351/1900"
    );
    // The counter does count: the default run asks the gateway.
    let r = mesh.netcheck("pm1").unwrap();
    assert_eq!(r["portmap"]["pcp"], true);
    let n = portmap_packets(&mesh);
    println!("default netcheck: {n} packets to 5351/1900");
    assert!(n > 0);
}

/// Starts pm1 and sy1 as each other's peers; `pm1_extra` goes into pm1's `[Interface]`.
fn up_pair(mesh: &mut Mesh, pm1_extra: &[&str]) {
    let pm = UpOptions {
        peers: vec!["sy1".into()],
        interface_extra: pm1_extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let sy = UpOptions {
        peers: vec!["pm1".into()],
        ..Default::default()
    };
    mesh.up("pm1", &pm).unwrap();
    mesh.up("sy1", &sy).unwrap();
}

/// How long the pair gets to go direct (and, with port mapping off, must not).
const PAIR_WAIT: Duration = Duration::from_secs(30);

#[test]
fn symmetric_with_port_mapping_against_symmetric_ends_direct() {
    let test = "symmetric_with_port_mapping_against_symmetric_ends_direct";
    if support::mesh_ready(test, &["miniupnpd", "conntrack"]).is_none() {
        return;
    }
    let mut mesh = Mesh::start_with(spec().build().unwrap(), support::relay_impl()).unwrap();
    let wan = mesh.topo.host("pm1").unwrap().public_ip;
    up_pair(&mut mesh, &[]);
    let r = mesh.wait_path("sy1", "pm1", &["direct"], PAIR_WAIT);
    if r.is_err() {
        mesh.topo.lab.dump_logs(60);
    }
    let (v, took) = r.unwrap();
    println!(
        "sy1 -> pm1 direct after {} via {:?}",
        support::secs(took),
        v.remote
    );
    assert!(
        v.remote
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("{wan}:")),
        "{v:?}"
    );
    let (v, took) = mesh
        .wait_path("pm1", "sy1", &["direct"], PAIR_WAIT)
        .unwrap();
    println!(
        "pm1 -> sy1 direct after {} via {:?}",
        support::secs(took),
        v.remote
    );
    // status shows the mapping.
    let st = mesh.status("pm1").unwrap();
    println!("pm1 status portmap: {}", st["portmap"]);
    assert_eq!(st["portmap"]["pcp"], true, "{}", st["portmap"]);
    let mapped = st["portmap"]["mapped"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(mapped.starts_with(&format!("{wan}:")), "{mapped}");
    // The daemon's clean exit deletes the mapping on the router.
    let host_ip = mesh.topo.host("pm1").unwrap().ip;
    mesh.down("pm1");
    let rules = mesh.topo.port_mappings("pm").unwrap();
    assert!(
        !rules.contains(&host_ip.to_string()),
        "mapping left behind: {rules}"
    );
}

#[test]
fn symmetric_pair_with_port_mapping_off_stays_on_the_relay_and_sends_nothing_to_5351_or_1900() {
    let test =
        "symmetric_pair_with_port_mapping_off_stays_on_the_relay_and_sends_nothing_to_5351_or_1900";
    if support::mesh_ready(test, &["miniupnpd", "conntrack"]).is_none() {
        return;
    }
    let mut mesh = Mesh::start_with(spec().build().unwrap(), support::relay_impl()).unwrap();
    mesh.topo
        .lab
        .nft(
            "pm",
            "table inet pmcount {\n counter pm { }\n \
             chain pre { type filter hook prerouting priority raw; policy accept;\n  \
             iifname \"lan\" udp dport { 5351, 1900 } counter name \"pm\"\n }\n}\n",
        )
        .unwrap();
    up_pair(&mut mesh, &["PortMapping = off"]);
    mesh.wait_path("sy1", "pm1", &["relay"], PAIR_WAIT).unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < PAIR_WAIT {
        let v = mesh.peer("sy1", "pm1").unwrap();
        assert_ne!(v.path, "direct", "direct without port mapping: {v:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = mesh.status("pm1").unwrap();
    assert_eq!(st["portmap"], serde_json::Value::Null, "{}", st["portmap"]);
    assert_eq!(
        portmap_packets(&mesh),
        0,
        "PortMapping = off sent to 5351/1900"
    );
}
