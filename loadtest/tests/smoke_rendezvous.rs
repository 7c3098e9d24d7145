//! Short rendezvous-mode runs against an in-process rendezvous server on loopback: clients
//! register, watch their partner and exchange offers. Output sanity only, never timing.

#![allow(clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use meshpunch_loadtest::rendezvous::{self, RendezvousOptions};
use meshpunch_rendezvous::{Config, Server};

fn start_server(dir: &std::path::Path) -> (tokio::runtime::Runtime, Server, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt
        .block_on(Server::start(Config::loopback(dir)))
        .expect("rendezvous starts");
    let connect = server
        .dev_connect()
        .expect("dev connect string")
        .to_string();
    (rt, server, connect)
}

#[test]
fn rendezvous_mode_registers_watches_and_exchanges_offers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_rt, _server, connect) = start_server(dir.path());
    let opts = RendezvousOptions {
        connect,
        clients: 20,
        offers: 10,
        clients_per_endpoint: 5,
        server_pid: Some(std::process::id()),
        ..RendezvousOptions::default()
    };
    let r = rendezvous::run(&opts).expect("rendezvous run");
    assert_eq!(r.registered, 20, "{r:?}");
    assert_eq!(r.failures, 0, "{r:?}");
    assert_eq!(r.offers, 10, "{r:?}");
    assert_eq!(r.offers_ok, 10, "{r:?}");
    assert!(
        r.offer_rtt_p50_us > 0 && r.offer_rtt_p50_us <= r.offer_rtt_p99_us,
        "{r:?}"
    );
    assert!(r.server_rss_after_kib.is_some(), "{r:?}");
    assert_eq!(r.endpoints, 4);
}

#[test]
fn rendezvous_binary_prints_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_rt, _server, connect) = start_server(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-loadtest"))
        .args([
            "rendezvous",
            "--connect",
            &connect,
            "--clients",
            "6",
            "--offers",
            "3",
        ])
        .arg("--json")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run meshpunch-loadtest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    for key in [
        "registered",
        "registrations_per_sec",
        "offer_rtt_p50_us",
        "offer_rtt_p99_us",
        "failures",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["registered"].as_u64(), Some(6), "{v}");
    assert_eq!(v["offers_ok"].as_u64(), Some(3), "{v}");
}

#[test]
fn rendezvous_mode_reports_a_bad_token_as_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_rt, _server, connect) = start_server(dir.path());
    // Same server and pin, a token signed with another secret.
    let (_, rest) = connect.split_once('@').expect("token@host");
    let bad = format!("meshpunch://mpt1.bogus@{rest}");
    let opts = RendezvousOptions {
        connect: bad,
        clients: 2,
        offers: 0,
        timeout: Duration::from_secs(10),
        ..RendezvousOptions::default()
    };
    let r = rendezvous::run(&opts).expect("run completes");
    assert_eq!(r.registered, 0, "{r:?}");
    assert_eq!(r.failures, 2, "{r:?}");
}

#[test]
fn punch_mode_gets_authenticated_direct_replies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_rt, _server, connect) = start_server(dir.path());
    let opts = meshpunch_loadtest::punch::PunchOptions {
        connect,
        pairs: 4,
        concurrency: 2,
        ..Default::default()
    };
    let r = meshpunch_loadtest::punch::run(&opts).expect("punch run");
    assert_eq!(r.direct, 4, "{r:?}");
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(r.ttd_p50_us > 0 && r.ttd_p50_us <= r.ttd_max_us, "{r:?}");
}

#[test]
fn punch_binary_prints_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_rt, _server, connect) = start_server(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-loadtest"))
        .args(["punch", "--connect", &connect, "--pairs", "2", "--json"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run meshpunch-loadtest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["direct"].as_u64(), Some(2), "{v}");
    assert!(v.get("ttd_p99_us").is_some(), "{v}");
}
