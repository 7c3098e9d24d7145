//! Tunnel throughput per path kind (issue 16): TCP (iperf3, one stream) through WireGuard
//! between two lab hosts over
//!
//! - **lan**: two hosts on one LAN behind one NAT (café);
//! - **direct**: a host behind a port-restricted NAT and a host with a public address (no
//!   NAT), the NATed host's traffic crossing its NAT and the lab's internet router;
//! - **relay**: the same pair with the direct path cut both ways, so the tunnel runs through
//!   the relay on the server host;
//!
//! for `meshpunch up --tun` (built-in WireGuard) and for plain WireGuard with no meshpunch
//! (boringtun-cli, `--threads 1`, static endpoints: the peer's real address on the LAN; the
//! public host's address from behind the NAT, the public host learning the NATed one from its
//! handshake). Plain WireGuard cannot take the relay path (no TURN in WireGuard): for it the
//! report gives meshpunch's relay-vs-direct ratio. Every round measures every set-up (the
//! order alternates by round), in one run; CPU = user+system seconds of the tunnel processes
//! on both hosts (`/proc/<pid>/stat`; meshpunch daemons or boringtun-cli, not iperf3), and on
//! the relay path also of the relay, per GB received.
//!
//! A functional test with the default 2 s × 1 round (every path carries TCP); a measurement
//! with `TUNNEL_SECS` / `TUNNEL_ROUNDS` and release binaries (`loadtest/bench/tunnel.sh`).
//! Writes `tunnel_paths.json` to `$NATLAB_RESULTS_DIR` (default `target/natlab-results/`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use natlab::mesh::Mesh;
use natlab::wg::WgIface;
use natlab::{Nat, TopologySpec};
use serde_json::json;

const TUN: &str = "mptun0";
const WG_PORT: u16 = 51820;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// user+system CPU seconds of `pids` so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces) start at state (field 3).
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / hz // utime, stime: fields 14 and 15
        })
        .sum()
}

/// One iperf3 run: `from` → `to_ip` (server on `to`), with the CPU of `pids` (tunnel) and
/// `relay` (relay server) over it.
fn transfer(
    mesh: &mut Mesh,
    from: &str,
    to: &str,
    to_ip: &str,
    secs: u64,
    pids: &[u32],
    relay: &[u32],
) -> serde_json::Value {
    let iperf = natlab::testenv::which("iperf3").unwrap();
    let name = format!("iperf3-{to}");
    // A ping first: the WireGuard handshake is not part of the transfer.
    let _ = mesh
        .topo
        .lab
        .exec_any(from, "ping", &["-n", "-q", "-c", "2", "-W", "8", to_ip]);
    mesh.topo
        .lab
        .spawn(
            to,
            &name,
            &iperf,
            &["-s".into(), "-1".into(), "-B".into(), to_ip.into()],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (c0, r0) = (cpu_seconds(pids), cpu_seconds(relay));
    let out = mesh
        .topo
        .lab
        .exec_any(
            from,
            "iperf3",
            &["-c", to_ip, "-t", &secs.to_string(), "-J"],
        )
        .unwrap()
        .1;
    let (c1, r1) = (cpu_seconds(pids), cpu_seconds(relay));
    mesh.topo.lab.stop(&name);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 output ({e}): {out}"));
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().unwrap_or(0);
    let gb = bytes as f64 / 1e9;
    let per_gb = |c: f64| if gb > 0.0 { Some(c / gb) } else { None };
    json!({
        "bytes": bytes,
        "mbps": sum["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        "retransmits": v["end"]["sum_sent"]["retransmits"].as_u64(),
        "tunnel_cpu_s": c1 - c0,
        "tunnel_cpu_s_per_gb": per_gb(c1 - c0),
        "relay_cpu_s": if relay.is_empty() { None } else { Some(r1 - r0) },
        "relay_cpu_s_per_gb": if relay.is_empty() { None } else { per_gb(r1 - r0) },
    })
}

fn up_tun_pair(mesh: &mut Mesh, h1: &str, h2: &str) {
    support::up_tun_pair(mesh, TUN, h1, h2, &[]);
}

fn pids(mesh: &Mesh, hosts: &[&str]) -> Vec<u32> {
    hosts.iter().filter_map(|h| mesh.daemon_pid(h)).collect()
}

/// meshpunch --tun on both pairs: lan, direct, then relay (direct cut). One row per path.
fn meshpunch_round(mesh: &mut Mesh, secs: u64, rows: &mut Vec<serde_json::Value>, round: u64) {
    up_tun_pair(mesh, "lan1", "lan2");
    up_tun_pair(mesh, "a1", "o1");
    let wait = Duration::from_secs(45);
    for (h, p, want) in [
        ("lan1", "lan2", "lan"),
        ("lan2", "lan1", "lan"),
        ("a1", "o1", "direct"),
        ("o1", "a1", "direct"),
    ] {
        mesh.wait_path(h, p, &[want], wait)
            .unwrap_or_else(|e| panic!("{h} -> {p}: no {want} path: {e}"));
    }
    let p = pids(mesh, &["lan1", "lan2"]);
    let r = transfer(mesh, "lan1", "lan2", "10.9.0.2", secs, &p, &[]);
    rows.push(json!({"setup": "meshpunch", "path": "lan", "round": round, "result": r}));
    let p = pids(mesh, &["a1", "o1"]);
    let r = transfer(mesh, "a1", "o1", "10.9.0.2", secs, &p, &[]);
    rows.push(json!({"setup": "meshpunch", "path": "direct", "round": round, "result": r}));
    mesh.topo.cut_both("a1", "o1").unwrap();
    for (h, peer) in [("a1", "o1"), ("o1", "a1")] {
        mesh.wait_path(h, peer, &["relay"], wait)
            .unwrap_or_else(|e| panic!("{h} -> {peer}: no relay path after the cut: {e}"));
    }
    let relay: Vec<u32> = mesh.relay_pid().into_iter().collect();
    let r = transfer(mesh, "a1", "o1", "10.9.0.2", secs, &p, &relay);
    rows.push(json!({"setup": "meshpunch", "path": "relay", "round": round, "result": r}));
    mesh.topo.restore_both("a1", "o1").unwrap();
    for h in ["lan1", "lan2", "a1", "o1"] {
        mesh.down(h);
    }
}

/// Plain WireGuard (boringtun-cli) with static endpoints: lan and direct.
fn plain_round(mesh: &mut Mesh, secs: u64, rows: &mut Vec<serde_json::Value>, round: u64) {
    for (path, h1, h2) in [("lan", "lan1", "lan2"), ("direct", "a1", "o1")] {
        let w1 = WgIface::start(
            &mut mesh.topo,
            h1,
            "10.8.0.1".parse().unwrap(),
            WG_PORT,
            None,
        )
        .unwrap();
        let w2 = WgIface::start(
            &mut mesh.topo,
            h2,
            "10.8.0.2".parse().unwrap(),
            WG_PORT,
            None,
        )
        .unwrap();
        let h2_addr = SocketAddr::new(mesh.topo.host(h2).unwrap().ip.into(), WG_PORT);
        // h1 knows h2's real address (on the LAN, or h2 is public); h2 learns h1's (mapped,
        // on the direct path) from the handshake. The keepalive holds h1's NAT mapping.
        w1.set_peer(&mesh.topo, &w2, Some(h2_addr), 5).unwrap();
        w2.set_peer(&mesh.topo, &w1, None, 0).unwrap();
        let p: Vec<u32> = [w1.pid(&mesh.topo), w2.pid(&mesh.topo)]
            .into_iter()
            .flatten()
            .collect();
        let r = transfer(mesh, h1, h2, "10.8.0.2", secs, &p, &[]);
        rows.push(json!({"setup": "plain-wireguard", "path": path, "round": round, "result": r}));
        w1.stop(&mut mesh.topo);
        w2.stop(&mut mesh.topo);
    }
}

#[test]
fn tcp_through_wireguard_on_lan_direct_and_relay_paths() {
    let test = "tcp_through_wireguard_on_lan_direct_and_relay_paths";
    let Some(bins) = support::mesh_ready(test, &["iperf3", "wg", "boringtun-cli"]) else {
        return;
    };
    let secs = env_num("TUNNEL_SECS", 2).max(1);
    let rounds = env_num("TUNNEL_ROUNDS", 1).max(1);
    let topo = TopologySpec::new()
        .site("lan", Nat::PortRestricted, 2)
        .site("a", Nat::PortRestricted, 1)
        .site("o", Nat::Open, 1)
        .build()
        .unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();
    let mut rows = Vec::new();
    for round in 1..=rounds {
        if round % 2 == 1 {
            meshpunch_round(&mut mesh, secs, &mut rows, round);
            plain_round(&mut mesh, secs, &mut rows, round);
        } else {
            plain_round(&mut mesh, secs, &mut rows, round);
            meshpunch_round(&mut mesh, secs, &mut rows, round);
        }
    }
    for r in &rows {
        println!(
            "{:<16} {:<7} round {}: {:>8.1} Mbit/s  {:>6} CPU s/GB  relay {} CPU s/GB",
            r["setup"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["round"],
            r["result"]["mbps"].as_f64().unwrap_or(0.0),
            r["result"]["tunnel_cpu_s_per_gb"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.2}")),
            r["result"]["relay_cpu_s_per_gb"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.2}")),
        );
        let bytes = r["result"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 100_000, "too little TCP through the tunnel: {r}");
    }
    support::write_result(
        "tunnel_paths",
        &json!({
            "secs": secs,
            "rounds": rounds,
            "unix_time": support::unix_now(),
            "client": bins.client.display().to_string(),
            "relay": format!("{:?}", support::relay_impl()),
            "boringtun_threads": 1,
            "load": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "rows": rows,
        }),
    );
}
