//! `meshpunch up --wg-interface wg0` against a stand-in `wg` (a script first in PATH that
//! prints a `wg show wg0 dump` and records `wg set` calls): peers and the private key come from
//! the dump, and every peer's endpoint is pointed at its proxy port.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshpunch::keys::{format_key, generate_private, public_of};

#[test]
fn wg_interface_peers_get_proxy_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let sk = generate_private();
    let peers: Vec<String> = (0..2)
        .map(|_| format_key(&public_of(&generate_private())))
        .collect();
    let log = dir.path().join("wg.log");
    let dump = format!(
        "{}\t{}\t51820\toff\n{}\t(none)\t(none)\t10.9.0.2/32\t0\t0\t0\toff\n{}\t(none)\t192.0.2.9:51820\t10.9.0.3/32\t0\t0\t0\toff\n",
        format_key(&sk),
        format_key(&public_of(&sk)),
        peers[0],
        peers[1]
    );
    std::fs::write(dir.path().join("dump.txt"), dump).unwrap();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = show ]; then cat '{}'; exit 0; fi\necho \"$@\" >> '{}'\n",
        dir.path().join("dump.txt").display(),
        log.display()
    );
    let wg = dir.path().join("wg");
    std::fs::write(&wg, script).unwrap();
    std::fs::set_permissions(&wg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A rendezvous that is not there: the daemon starts anyway and keeps retrying.
    let connect = format!("meshpunch://tok@127.0.0.1:9?pin={}", "00".repeat(32));
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
        .args([
            "up",
            "--json",
            "--wg-interface",
            "wg0",
            "--connect",
            &connect,
        ])
        .args(["--listen-ip", "127.0.0.1", "--control-socket"])
        .arg(dir.path().join("ctl.sock"))
        .env("PATH", path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ready["public_key"], format_key(&public_of(&sk)));
    let proxies = ready["peers"].as_array().unwrap().clone();
    assert_eq!(proxies.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let calls = loop {
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        if calls.lines().count() >= 4 || Instant::now() > deadline {
            break calls;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    for p in &proxies {
        let k = p["public_key"].as_str().unwrap();
        let ips = if *k == *peers[0].as_str() {
            "10.9.0.2/32"
        } else {
            "10.9.0.3/32"
        };
        // Two calls, remove then add: one call would leave boringtun with no peer.
        let remove = format!("set wg0 peer {k} remove");
        let add = format!(
            "set wg0 peer {k} allowed-ips {ips} endpoint {}",
            p["proxy"].as_str().unwrap()
        );
        let lines: Vec<&str> = calls.lines().collect();
        let r = lines.iter().position(|l| *l == remove);
        let a = lines.iter().position(|l| *l == add);
        assert!(
            matches!((r, a), (Some(r), Some(a)) if r < a),
            "want `{remove}` then `{add}` in {calls}"
        );
        assert!(p["proxy"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    for k in &peers {
        assert!(proxies.iter().any(|p| p["public_key"] == *k.as_str()));
    }
}
