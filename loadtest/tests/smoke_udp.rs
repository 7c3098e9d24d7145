//! Short loopback runs of the packet modes that need no external server: direct (generator
//! alone) and the bare forwarder, through the library and through the binary's JSON; and the
//! accounting checks: a forwarder that drops, duplicates and reorders on purpose must be
//! caught, datagram for datagram.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshpunch_loadtest::engine::{Pattern, Sizes};
use meshpunch_loadtest::forwarder::{Faults, Forwarder};
use meshpunch_loadtest::load::{self, LoadOptions, Target};

fn short() -> LoadOptions {
    LoadOptions {
        clients: 4,
        peers_per_client: 2,
        peers: 8,
        rate: 2_000,
        duration: Duration::from_secs(1),
        ..LoadOptions::realistic()
    }
}

#[test]
fn direct_mode_delivers_stamped_packets() {
    let r = load::run_once(&Target::Direct, &short()).expect("direct run");
    assert_eq!(r.mode, "direct");
    let t = &r.trial;
    assert_eq!(t.pattern, "realistic");
    assert_eq!(t.sizes, "wg-mix");
    assert!(t.sent > 0, "{r:?}");
    assert!(t.received > 0, "{r:?}");
    assert!(t.received <= t.sent, "{r:?}");
    assert_eq!(t.lost, t.sent - t.received);
    assert_eq!((t.duplicates, t.misrouted, t.late), (0, 0, 0), "{r:?}");
    assert!(
        t.p50_us > 0 && t.p50_us <= t.p99_us && t.p99_us <= t.max_us,
        "{r:?}"
    );
    assert!(t.generator_cpus >= 1);
}

/// Both directions: every other visit the peer answers its client; each direction's datagrams
/// reach exactly the socket they are meant for.
#[test]
fn direct_mode_carries_both_directions() {
    let opts = LoadOptions {
        bidirectional: true,
        ..short()
    };
    let r = load::run_once(&Target::Direct, &opts).expect("direct run");
    let t = &r.trial;
    assert!(r.bidirectional);
    assert!(t.reverse_sent > 0 && t.reverse_sent < t.sent, "{r:?}");
    assert!(t.reverse_received > 0, "{r:?}");
    assert!(t.received > t.reverse_received, "{r:?}");
    assert_eq!((t.misrouted, t.duplicates), (0, 0), "{r:?}");
}

#[test]
fn bare_forwarder_refuses_bidirectional_load() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 1).expect("forwarder");
    let opts = LoadOptions {
        bidirectional: true,
        ..short()
    };
    let err = load::run_once(&Target::Bare(fwd.local_addr()), &opts).expect_err("one-way");
    assert!(err.to_string().contains("--bidirectional"), "{err}");
}

#[test]
fn bare_forwarder_relays_channel_data_to_bound_peers() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 2).expect("forwarder");
    let opts = LoadOptions {
        sizes: Sizes::Fixed(1200),
        pattern: Pattern::Bulk,
        ..short()
    };
    let r = load::run_once(&Target::Bare(fwd.local_addr()), &opts).expect("bare run");
    assert_eq!(r.mode, "bare");
    assert_eq!(r.trial.size, 1200);
    assert_eq!(r.trial.pattern, "bulk");
    assert!(r.trial.received > 0, "{r:?}");
    assert_eq!(r.trial.misrouted, 0, "{r:?}");
    assert!(
        fwd.forwarded() >= r.trial.received,
        "{} < {}",
        fwd.forwarded(),
        r.trial.received
    );
}

/// One client, one channel, a low rate: every datagram the faulty forwarder drops, copies or
/// swaps must show up in exactly one of loss, duplicates and reordering — and nowhere else.
/// (The old generator computed loss as 1 − received/sent: the copies hid the drops.)
#[test]
fn injected_drops_duplicates_and_swaps_are_counted_exactly() {
    let faults = Faults {
        drop_every: 7,
        dup_every: 5,
        swap_every: 3,
    };
    let fwd =
        Forwarder::start_with_faults("127.0.0.1:0".parse().unwrap(), 1, faults).expect("forwarder");
    let opts = LoadOptions {
        clients: 1,
        peers_per_client: 1,
        peers: 1,
        rate: 3_000,
        burst: 8,
        ..short()
    };
    let r = load::run_once(&Target::Bare(fwd.local_addr()), &opts).expect("bare run");
    let t = &r.trial;
    let f = fwd.faults();
    let dropped = f.dropped.load(Ordering::Relaxed);
    let duplicated = f.duplicated.load(Ordering::Relaxed);
    let reordered = f.reordered.load(Ordering::Relaxed);
    assert!(t.sent > 500 && dropped > 50 && duplicated > 50, "{r:?}");
    assert!(
        reordered > 0,
        "bursts put several datagrams in one batch: {r:?}"
    );
    assert_eq!(t.lost, dropped, "{r:?}");
    assert_eq!(t.received, t.sent - dropped, "{r:?}");
    assert_eq!(t.duplicates, duplicated, "{r:?}");
    assert_eq!(t.reordered, reordered, "{r:?}");
    assert!((t.loss - dropped as f64 / t.sent as f64).abs() < 1e-12);
}

/// Every other datagram copied, nothing dropped: the old 1 − received/sent said "0 % loss,
/// pass"; now the copies are counted apart and fail the trial.
#[test]
fn duplicates_fail_a_trial_even_without_loss() {
    let faults = Faults {
        dup_every: 2,
        ..Faults::default()
    };
    let fwd =
        Forwarder::start_with_faults("127.0.0.1:0".parse().unwrap(), 1, faults).expect("forwarder");
    let r = load::run_once(&Target::Bare(fwd.local_addr()), &short()).expect("bare run");
    let t = &r.trial;
    assert_eq!(t.lost, 0, "{r:?}");
    assert_eq!(t.received, t.sent, "{r:?}");
    assert_eq!(
        t.duplicates,
        fwd.faults().duplicated.load(Ordering::Relaxed)
    );
    assert!(t.duplicates * 3 > t.sent, "{r:?}");
    assert!(!meshpunch_loadtest::engine::passes(t, 0.1), "{r:?}");
}

/// Many flows interleaved through the faulty forwarder: drops and copies hit different flows,
/// the totals still match.
#[test]
fn faults_over_many_interleaved_flows_are_counted_exactly() {
    let faults = Faults {
        drop_every: 11,
        dup_every: 13,
        swap_every: 0,
    };
    let fwd =
        Forwarder::start_with_faults("127.0.0.1:0".parse().unwrap(), 1, faults).expect("forwarder");
    let r = load::run_once(&Target::Bare(fwd.local_addr()), &short()).expect("bare run");
    let t = &r.trial;
    let f = fwd.faults();
    assert_eq!(r.flows, 8);
    assert_eq!(t.lost, f.dropped.load(Ordering::Relaxed), "{r:?}");
    assert_eq!(t.duplicates, f.duplicated.load(Ordering::Relaxed), "{r:?}");
    assert_eq!(t.misrouted, 0, "{r:?}");
}

#[test]
fn bare_find_max_needs_two_passing_trials_per_rate() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 1).expect("forwarder");
    let opts = LoadOptions {
        rate: 1_000,
        duration: Duration::from_millis(300),
        ..short()
    };
    // A low ceiling keeps this short: 1000 → 2000 → 4000 (ceiling).
    let r = load::run_find_max(&Target::Bare(fwd.local_addr()), &opts, 0.5, 4_000, |_| {})
        .expect("find-max");
    let trials = r.trials.expect("trials listed");
    assert!(trials.iter().all(|t| t.rate <= 4_000));
    if r.found == Some(true) {
        let passing_at_best = trials
            .iter()
            .filter(|t| t.rate == r.trial.rate && t.loss < 0.5)
            .count();
        assert!(passing_at_best >= 2, "{trials:?}");
    }
}

#[test]
fn find_max_fails_a_rate_that_loses_too_much() {
    // Every 4th datagram dropped: 25 % loss at every rate, so no rate passes a 10 % limit;
    // after the first rate fails the search bisects down, failing every rate it tries.
    let faults = Faults {
        drop_every: 4,
        ..Faults::default()
    };
    let fwd =
        Forwarder::start_with_faults("127.0.0.1:0".parse().unwrap(), 1, faults).expect("forwarder");
    let opts = LoadOptions {
        rate: 1_000,
        duration: Duration::from_millis(300),
        ..short()
    };
    let r = load::run_find_max(&Target::Bare(fwd.local_addr()), &opts, 0.1, 4_000, |_| {})
        .expect("find-max");
    assert_eq!(r.found, Some(false));
    let trials = r.trials.expect("trials listed");
    assert!(trials.iter().all(|t| t.loss > 0.2), "{trials:?}");
    // A failing trial is never run twice: each rate appears once.
    let mut rates: Vec<u64> = trials.iter().map(|t| t.rate).collect();
    rates.dedup();
    assert_eq!(rates.len(), trials.len(), "{trials:?}");
}

#[test]
fn binary_prints_json_with_the_documented_keys() {
    let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), 1).expect("forwarder");
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-loadtest"))
        .args(["bare", "--server", &fwd.local_addr().to_string()])
        .args([
            "--clients",
            "2",
            "--peers",
            "4",
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
        "pattern",
        "sizes",
        "sent",
        "received",
        "lost",
        "duplicates",
        "reordered",
        "late",
        "misrouted",
        "pps",
        "mbps",
        "loss",
        "p50_us",
        "p99_us",
        "generator_limited",
        "generator_limits",
        "generator_rx_drops",
        "host_udp_rcvbuf_errors",
        "sender_cpu_percent",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["received"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["flows"].as_u64(), Some(8), "{v}");
    assert_eq!(v["peers"].as_u64(), Some(4), "{v}");
}
