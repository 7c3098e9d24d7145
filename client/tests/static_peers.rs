//! Two daemons on loopback with static candidates (no rendezvous): WireGuard-shaped traffic
//! through the proxy ports over the direct path, `ping`, status JSON.

mod support;

use std::time::Duration;

use meshpunch::config::PeerConfig;
use meshpunch::control::{self, Request};
use meshpunch::daemon::{self, Options};
use meshpunch::keys::{generate_private, Identity};
use meshpunch_proto::path::PathConfig;
use support::{free_udp_port, wait_path, FakeWg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_carry_wireguard_packets_directly() {
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let mk =
        |me: &Identity, other: &Identity, port: u16, other_port: u16, wg, name: &str| Options {
            identity: me.clone(),
            rendezvous: None,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            control_socket: dir.path().join(format!("{name}.sock")),
            wireguard_endpoint: Some(wg),
            host_candidates: false,
            peers: vec![PeerConfig {
                public_key: other.public,
                name: Some("other".into()),
                proxy_port: 0,
                candidates: vec![format!("127.0.0.1:{other_port}").parse().unwrap()],
            }],
            path: PathConfig::default(),
            exclude_interfaces: Vec::new(),
            ca_roots: Vec::new(),
        };
    let da = daemon::start(mk(&a, &b, pa, pb, wga.addr(), "a"))
        .await
        .unwrap();
    let db = daemon::start(mk(&b, &a, pb, pa, wgb.addr(), "b"))
        .await
        .unwrap();
    let st = wait_path(&da.control_socket, &["direct"], Duration::from_secs(20)).await;
    assert_eq!(
        st.peers[0].remote.as_deref(),
        Some(format!("127.0.0.1:{pb}").as_str())
    );
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(20)).await;

    let to_b = da.proxies[0].1;
    let to_a = db.proxies[0].1;
    let got = wga.exchange(to_b, &wgb, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "a->b {got}/50");
    let got = wgb.exchange(to_a, &wga, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "b->a {got}/50");

    let st = support::status(&da.control_socket).await;
    assert!(st.peers[0].tx_packets >= 45);
    assert!(st.peers[0].rx_packets >= 45);
    assert!(st.peers[0].rtt_ms.is_some());

    // ping by name over the control socket.
    let mut lines = Vec::new();
    control::request_lines(
        &da.control_socket,
        &Request::Ping {
            peer: "other".into(),
            count: 3,
            interval_ms: 50,
        },
        |v| {
            let done = v.get("done").is_some();
            lines.push(v);
            !done
        },
    )
    .await
    .unwrap();
    let ok = lines
        .iter()
        .filter(|l| l.get("rtt_ms").and_then(|r| r.as_f64()).is_some())
        .count();
    assert!(ok >= 2, "{lines:?}");
    assert_eq!(lines[0]["path"], "direct");

    // The CLI ends with a ping(8)-style summary; --until-direct stops at the first direct pong.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshpunch"))
            .arg("--control-socket")
            .arg(&da.control_socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = cli(&["ping", "other", "-c", "3", "-i", "0.05"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("--- other ping statistics: 3 sent, 3 received, 0% loss, rtt min/avg/max "),
        "{out}"
    );
    let (ok, out) = cli(&["ping", "other", "-c", "10", "-i", "0.05", "--until-direct"]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("pong from").count(), 1, "{out}");
    assert!(out.contains("1 sent, 1 received, 0% loss"), "{out}");
    let (ok, out) = cli(&["ping", "nobody", "-c", "1"]);
    assert!(!ok, "{out}");
    // `status`: one line per peer with name, short key, path, RTT and human byte counts.
    let (ok, out) = cli(&["status"]);
    assert!(ok, "{out}");
    let short = format!("{}…", &meshpunch::keys::format_key(&b.public)[..8]);
    let line = out
        .lines()
        .find(|l| l.starts_with("other "))
        .unwrap_or_else(|| panic!("no line for peer other: {out}"));
    assert!(line.contains(&short), "{line}");
    assert!(line.contains(" direct "), "{line}");
    assert!(line.contains(" KiB") || line.contains(" B "), "{line}");

    // Status JSON has the documented keys.
    let v = control::request(&da.control_socket, &Request::Status)
        .await
        .unwrap();
    for k in [
        "public_key",
        "path",
        "remote",
        "rtt_ms",
        "tx_bytes",
        "rx_bytes",
        "reason",
    ] {
        assert!(v["peers"][0].get(k).is_some(), "{k} missing: {v}");
    }
    assert_eq!(v["probes"]["unauthenticated"], 0);

    // A forged probe (right magic, garbage key id and tag) is dropped and counted.
    let mut forged = vec![0xE1u8, 1, 1, 0];
    forged.extend_from_slice(&[0x5A; 48]);
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&forged, da.data_addr).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = support::status(&da.control_socket).await;
        if st.probes.unauthenticated >= 1 {
            assert_eq!(st.peers[0].path.as_str(), "direct");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "forged probe not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rough forwarding rate and latency through two daemons on loopback (direct path).
/// Run with `cargo test -p meshpunch --release --test static_peers -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn measure_forwarding_rate_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let mk =
        |me: &Identity, other: &Identity, port: u16, other_port: u16, wg, name: &str| Options {
            identity: me.clone(),
            rendezvous: None,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            control_socket: dir.path().join(format!("{name}.sock")),
            wireguard_endpoint: Some(wg),
            host_candidates: false,
            peers: vec![PeerConfig {
                public_key: other.public,
                name: None,
                proxy_port: 0,
                candidates: vec![format!("127.0.0.1:{other_port}").parse().unwrap()],
            }],
            path: PathConfig::default(),
            exclude_interfaces: Vec::new(),
            ca_roots: Vec::new(),
        };
    let da = daemon::start(mk(&a, &b, pa, pb, wga.addr(), "a"))
        .await
        .unwrap();
    let db = daemon::start(mk(&b, &a, pb, pa, wgb.addr(), "b"))
        .await
        .unwrap();
    wait_path(&da.control_socket, &["direct"], Duration::from_secs(20)).await;
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(20)).await;
    let to_b = da.proxies[0].1;
    let to_a = db.proxies[0].1;
    // Latency: ping-pong through both daemons (a -> b, b echoes -> a).
    let mut buf = vec![0u8; 2048];
    let mut samples = Vec::new();
    for n in 0..500 {
        let t = std::time::Instant::now();
        wga.sock.send_to(&FakeWg::packet(n), to_b).await.unwrap();
        let (len, _) = wgb.sock.recv_from(&mut buf).await.unwrap();
        wgb.sock.send_to(&buf[..len], to_a).await.unwrap();
        wga.sock.recv_from(&mut buf).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "round trip through 4 daemon hops: p50 {:?} p99 {:?}",
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100]
    );
    // Rate: blast 1400-byte packets for 2 s, count what arrives.
    let pkt = {
        let mut p = FakeWg::packet(0);
        p.resize(1400, 0xAB);
        p
    };
    let recv = tokio::spawn(async move {
        let mut n = 0u64;
        let mut buf = vec![0u8; 2048];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), wgb.sock.recv_from(&mut buf)).await
        {
            n += 1;
        }
        n
    });
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..64 {
            let _ = wga.sock.send_to(&pkt, to_b).await;
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
    let got = recv.await.unwrap();
    println!(
        "sent {sent} ({:.0} pkt/s offered), delivered {got} ({:.0} pkt/s, {:.1} Mbit/s)",
        sent as f64 / 2.0,
        got as f64 / 2.0,
        got as f64 * 1400.0 * 8.0 / 2.0 / 1e6
    );
}
