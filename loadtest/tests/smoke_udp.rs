//! Short loopback runs of the packet modes that need no external server: direct (generator
//! alone) and the bare forwarder, through the library and through the binary's JSON.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use meshpunch_loadtest::forwarder::Forwarder;
use meshpunch_loadtest::load::{self, LoadOptions, Target};

fn short() -> LoadOptions {
    LoadOptions {
        clients: 4,
        rate: 2_000,
        size: 100,
        duration: Duration::from_secs(1),
        ..LoadOptions::default()
    }
}

#[test]
fn direct_mode_delivers_stamped_packets() {
    let r = load::run_once(&Target::Direct, &short()).expect("direct run");
    assert_eq!(r.mode, "direct");
    assert!(r.sent > 0, "{r:?}");
    assert!(r.received > 0, "{r:?}");
    assert!(r.received <= r.sent, "{r:?}");
    assert!(
        r.p50_us > 0 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us,
        "{r:?}"
    );
}

#[test]
fn bare_forwarder_relays_channel_data_to_bound_peers() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 2).expect("forwarder");
    let opts = LoadOptions {
        size: 1200,
        peers: 2,
        ..short()
    };
    let r = load::run_once(&Target::Bare(fwd.local_addr()), &opts).expect("bare run");
    assert_eq!(r.mode, "bare");
    assert_eq!(r.size, 1200);
    assert!(r.received > 0, "{r:?}");
    assert!(
        fwd.forwarded() >= r.received,
        "{} < {}",
        fwd.forwarded(),
        r.received
    );
}

#[test]
fn bare_find_max_reports_trials_and_a_best_rate() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 1).expect("forwarder");
    let opts = LoadOptions {
        rate: 1_000,
        duration: Duration::from_millis(300),
        ..short()
    };
    // A low ceiling keeps this short: 1000 → 2000 → 4000 (ceiling), three trials at most
    // plus bisection if the loaded machine drops packets.
    let r = load::run_find_max(&Target::Bare(fwd.local_addr()), &opts, 0.5, 4_000, |_| {})
        .expect("find-max");
    let trials = r.trials.expect("trials listed");
    assert!(!trials.is_empty());
    assert!(trials.iter().all(|t| t.rate <= 4_000));
}

#[test]
fn binary_prints_json_with_the_documented_keys() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 1).expect("forwarder");
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-loadtest"))
        .args(["bare", "--server", &fwd.local_addr().to_string()])
        .args([
            "--clients",
            "2",
            "--rate",
            "1000",
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .expect("run meshpunch-loadtest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    for key in [
        "sent", "received", "pps", "mbps", "loss", "p50_us", "p99_us",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["received"].as_u64().unwrap_or(0) > 0, "{v}");
}
