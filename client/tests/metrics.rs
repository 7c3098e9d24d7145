//! `meshpunch up --metrics-listen`: two real daemons on loopback with static candidates carry
//! WireGuard-shaped packets; the metrics endpoint shows the path kind, the bytes by path kind and
//! the failover when the direct path is blocked.

#![allow(clippy::unwrap_used, clippy::too_many_arguments)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshpunch::keys::{format_key, generate_private, Identity};
use support::{free_udp_port, wait_path, FakeWg};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_paths_bytes_by_path_kind_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (generate_private(), generate_private());
    let (a, b) = (Identity::from_private(ka), Identity::from_private(kb));
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let (wga, wgb) = (FakeWg::new().await, FakeWg::new().await);
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let start = |name: &str,
                 key: &[u8; 32],
                 other: &Identity,
                 port: u16,
                 other_port: u16,
                 wg: std::net::SocketAddr,
                 proxy: u16,
                 metrics: Option<&str>| {
        let conf = dir.path().join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {}\nListenPort = {port}\nWireGuardEndpoint = {wg}\n\n[Peer]\nPublicKey = {}\nName = other\nProxyPort = {proxy}\nCandidate = 127.0.0.1:{other_port}\n",
                format_key(key),
                format_key(&other.public)
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshpunch"));
        cmd.arg("--control-socket")
            .arg(dir.path().join(format!("{name}.sock")))
            .args([
                "up",
                "--no-host-candidates",
                "--no-port-mapping",
                "--listen-ip",
                "127.0.0.1",
                "--config",
            ])
            .arg(&conf)
            .stdout(std::fs::File::create(dir.path().join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
        if let Some(m) = metrics {
            cmd.args(["--metrics-listen", m]);
        }
        Child(cmd.spawn().unwrap())
    };
    let (xa, xb) = (free_udp_port(), free_udp_port());
    let _da = start("a", &ka, &b, pa, pb, wga.addr(), xa, Some(&metrics_addr));
    let _db = start("b", &kb, &a, pb, pa, wgb.addr(), xb, None);
    let sa = dir.path().join("a.sock");
    for name in ["a", "b"] {
        let sock = dir.path().join(format!("{name}.sock"));
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log =
            std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
        assert!(sock.exists(), "daemon {name} did not start:\n{log}");
    }
    wait_path(&sa, &["direct"], Duration::from_secs(20)).await;
    wait_path(
        &dir.path().join("b.sock"),
        &["direct"],
        Duration::from_secs(20),
    )
    .await;
    let to_b = format!("127.0.0.1:{xa}").parse().unwrap();
    let got = wga.exchange(to_b, &wgb, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "a->b {got}/50");

    // Without --json, `up` says in one line what it runs.
    let up = std::fs::read_to_string(dir.path().join("a.out")).unwrap();
    assert!(
        up.starts_with("meshpunch up: ")
            && up.contains(" 1 peer, proxy ports for WireGuard, data socket 127.0.0.1:")
            && up.lines().count() == 1,
        "{up}"
    );
    let m = scrape(&metrics_addr);
    assert_eq!(
        value(&m, "meshpunch_client_peers{path=\"direct\"}"),
        1,
        "{m}"
    );
    assert_eq!(value(&m, "meshpunch_client_peers{path=\"relay\"}"), 0);
    assert!(
        value(
            &m,
            "meshpunch_client_bytes_total{direction=\"tx\",path=\"direct\"}"
        ) >= 45 * 80,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "meshpunch_client_bytes_total{direction=\"tx\",path=\"relay\"}"
        ),
        0
    );
    assert!(value(&m, "meshpunch_client_path_changes_total") >= 1);
    assert_eq!(value(&m, "meshpunch_client_failovers_total"), 0);
    assert!(value(&m, "meshpunch_client_probes_total{result=\"accepted\"}") > 0);
    assert!(m.contains("# TYPE meshpunch_client_bytes_total counter"));

    // Blocking the direct path (no relay configured) is a failover to no path.
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
        .arg("--control-socket")
        .arg(&sa)
        .args(["debug", "block-direct", "other", "on"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_path(&sa, &["none"], Duration::from_secs(10)).await;
    let m = scrape(&metrics_addr);
    assert_eq!(value(&m, "meshpunch_client_peers{path=\"none\"}"), 1, "{m}");
    assert_eq!(value(&m, "meshpunch_client_failovers_total"), 1, "{m}");

    // Anything but /metrics is a 404; a second daemon on the same port says what to fix.
    let mut s = TcpStream::connect(&metrics_addr).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    let conf = dir.path().join("c.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\n\n[Peer]\nPublicKey = {}\nCandidate = 127.0.0.1:9\n",
            format_key(&generate_private()),
            format_key(&a.public)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
        .arg("--control-socket")
        .arg(dir.path().join("c.sock"))
        .args([
            "up",
            "--no-port-mapping",
            "--listen-ip",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--metrics-listen",
            &metrics_addr,
            "--config",
        ])
        .arg(&conf)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"),
        "{out:?}"
    );
}
