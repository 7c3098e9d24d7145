//! Shared by the meshpunch scenario tests: requirements and small helpers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use natlab::mesh::MeshBins;

/// Root, the system tools, and the meshpunch binaries (built if missing). Skips with a printed
/// reason otherwise (a missing system requirement fails in CI, see `natlab::testenv`).
pub(crate) fn mesh_ready(test: &str, extra: &[&str]) -> Option<MeshBins> {
    let mut cmds = vec!["ip", "nft", "ping", "ss"];
    if relay_impl() == natlab::mesh::RelayImpl::Coturn {
        cmds.push("turnserver");
    }
    cmds.extend_from_slice(extra);
    if !natlab::testenv::require_root(test) || !natlab::testenv::require_commands(test, &cmds) {
        return None;
    }
    let bins = match MeshBins::find() {
        Ok(b) => b,
        Err(e) => panic!("{test}: meshpunch binaries: {e}"),
    };
    // A flag the lab needs is missing: a skip outside CI, a failure in CI.
    if !natlab::testenv::require_features(test, bins.missing_features()) {
        return None;
    }
    Some(bins)
}

/// Writes a scenario's measurements as JSON to `$NATLAB_RESULTS_DIR/<name>.json` (default
/// `target/natlab-results/`), the input of `bench/plot.py` (copy it to `bench/results/natlab/`
/// to commit it). Best effort: a failed write is printed and never fails the scenario.
pub(crate) fn write_result(name: &str, value: &serde_json::Value) {
    let dir = std::env::var_os("NATLAB_RESULTS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/natlab-results")
        });
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text)) {
        Ok(()) => println!("results written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

/// Seconds since the Unix epoch, for result files.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `1.234 s` style.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The relay the scenarios run: `meshpunch-relay`, or coturn with `NATLAB_RELAY=coturn` (any
/// RFC 8656 server must do; `mesh_wireguard` also runs its relay leg through coturn).
pub(crate) fn relay_impl() -> natlab::mesh::RelayImpl {
    match std::env::var("NATLAB_RELAY").as_deref() {
        Ok("coturn") => natlab::mesh::RelayImpl::Coturn,
        _ => natlab::mesh::RelayImpl::Meshpunch,
    }
}

/// Starts the daemons of a1 and b1 for a one-way flow a1 → b1: b1's "WireGuard" is a sink on
/// 127.0.0.1:`wg_port`, a1 reaches b1 through its proxy port `proxy_port`. Returns the sink.
pub(crate) fn up_flow_pair(
    mesh: &mut natlab::mesh::Mesh,
    proxy_port: u16,
    wg_port: u16,
) -> natlab::traffic::Sink {
    use std::net::{Ipv4Addr, SocketAddr};
    let wg = SocketAddr::from((Ipv4Addr::LOCALHOST, wg_port));
    let sink = natlab::traffic::Sink::start(&mesh.topo.lab, "b1", wg).unwrap();
    let oa = natlab::mesh::UpOptions {
        peers: vec!["b1".into()],
        wireguard_endpoint: Some(wg),
        proxy_ports: std::collections::BTreeMap::from([("b1".to_string(), proxy_port)]),
        ..Default::default()
    };
    let ob = natlab::mesh::UpOptions {
        peers: vec!["a1".into()],
        wireguard_endpoint: Some(sink.addr()),
        ..Default::default()
    };
    mesh.up("a1", &oa).unwrap();
    mesh.up("b1", &ob).unwrap();
    sink
}

/// [`mesh_ready`] plus a client built with `meshpunch up --tun` (the built-in WireGuard).
pub(crate) fn tun_ready(test: &str, extra: &[&str]) -> bool {
    let Some(bins) = mesh_ready(test, extra) else {
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

/// Starts `--tun` daemons (interface `tun`) on `h1` (10.9.0.1) and `h2` (10.9.0.2), each the
/// other's peer, with `extra` lines in both `[Interface]` sections.
pub(crate) fn up_tun_pair(
    mesh: &mut natlab::mesh::Mesh,
    tun: &str,
    h1: &str,
    h2: &str,
    extra: &[&str],
) {
    for (h, me, peer, peer_ip) in [
        (h1, "10.9.0.1/24", h2, "10.9.0.2/32"),
        (h2, "10.9.0.2/24", h1, "10.9.0.1/32"),
    ] {
        let opts = natlab::mesh::UpOptions {
            peers: vec![peer.to_string()],
            tun: Some(natlab::mesh::TunOptions {
                name: tun.into(),
                address: me.into(),
                allowed_ips: std::collections::BTreeMap::from([(
                    peer.to_string(),
                    peer_ip.to_string(),
                )]),
            }),
            interface_extra: extra.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        };
        mesh.up(h, &opts).unwrap();
    }
}
