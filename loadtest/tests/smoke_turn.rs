//! Short relay-mode runs against real TURN servers on loopback: coturn's `turnserver` and
//! meshpunch-relay. Output sanity only (keys, delivery), never timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use meshpunch_loadtest::engine::Sizes;
use meshpunch_loadtest::load::{self, LoadOptions, Target};
use meshpunch_loadtest::stream::Transport;

const SECRET: &str = "smoke-secret";

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
fn relay_mode_pushes_channel_data_through_coturn() {
    if !natlab::testenv::require_commands(
        "relay_mode_pushes_channel_data_through_coturn",
        &["turnserver"],
    ) {
        return;
    }
    let coturn = common::start_coturn(SECRET, 1);
    let target = Target::Turn {
        server: coturn.addr,
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    let opts = LoadOptions {
        server_pid: Some(coturn.pid()),
        ..short()
    };
    let r = common::retry(Duration::from_secs(15), || load::run_once(&target, &opts));
    assert_eq!(r.mode, "relay");
    assert!(r.trial.sent > 0 && r.trial.received > 0, "{r:?}");
    assert_eq!(r.flows, 8);
    assert_eq!(r.trial.misrouted, 0, "{r:?}");
    assert!(r.server_cpu_percent.is_some(), "{r:?}");
}

#[test]
fn relay_mode_binary_json_against_coturn() {
    if !natlab::testenv::require_commands("relay_mode_binary_json_against_coturn", &["turnserver"])
    {
        return;
    }
    let coturn = common::start_coturn(SECRET, 1);
    let v: serde_json::Value = common::retry(Duration::from_secs(15), || {
        let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-loadtest"))
            .args([
                "relay",
                "--server",
                &coturn.addr.to_string(),
                "--secret",
                SECRET,
            ])
            .args(["--clients", "2", "--rate", "1000", "--size", "1200"])
            .args(["--duration", "1s", "--json"])
            .env("RUST_BACKTRACE", "0")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    });
    for key in [
        "sent", "received", "pps", "mbps", "loss", "p50_us", "p99_us",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["received"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["size"].as_u64(), Some(1200));
}

#[test]
fn relay_mode_rejects_a_wrong_secret() {
    if !natlab::testenv::require_commands("relay_mode_rejects_a_wrong_secret", &["turnserver"]) {
        return;
    }
    let coturn = common::start_coturn(SECRET, 1);
    let target = Target::Turn {
        server: coturn.addr,
        secret: "not-the-secret".into(),
        transport: Transport::Udp,
    };
    // Wait until coturn listens (a good secret succeeds), then check the bad one fails.
    let good = Target::Turn {
        server: coturn.addr,
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    let opts = LoadOptions {
        clients: 1,
        duration: Duration::from_millis(200),
        ..short()
    };
    common::retry(Duration::from_secs(15), || load::run_once(&good, &opts));
    let err = load::run_once(&target, &opts).expect_err("a wrong secret must fail setup");
    assert!(err.to_string().contains("setup of client 0"), "{err}");
}

fn start_meshpunch_relay() -> meshpunch_relay::Relay {
    use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        realm: Some("loadtest.test".into()),
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        ..Default::default()
    };
    let file = FileConfig {
        workers: Some(1),
        ..Default::default()
    };
    let cfg = RelayConfig::resolve(file, o, None).expect("relay config");
    meshpunch_relay::Relay::start(cfg).expect("relay starts")
}

#[test]
fn relay_mode_pushes_channel_data_through_meshpunch_relay() {
    let relay = start_meshpunch_relay();
    let target = Target::Turn {
        server: relay.listen_addr(),
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    for sizes in [Sizes::Fixed(100), Sizes::Fixed(1200), Sizes::WireguardMix] {
        let opts = LoadOptions { sizes, ..short() };
        let r = common::retry(Duration::from_secs(15), || load::run_once(&target, &opts));
        assert_eq!(r.mode, "relay");
        if let Sizes::Fixed(n) = sizes {
            assert_eq!(r.trial.size, n);
        }
        assert!(r.trial.sent > 0 && r.trial.received > 0, "{r:?}");
        // Every flow (4 clients × 2 channels) reaches the peer it is bound to.
        assert_eq!(r.trial.misrouted, 0, "{r:?}");
        assert_eq!(r.trial.duplicates, 0, "{r:?}");
    }
    relay.control().stop();
}

/// Both directions through the relay: peers send to the clients' relayed addresses, the
/// clients get ChannelData on their own sockets, each datagram at the socket it is meant for.
#[test]
fn bidirectional_load_through_meshpunch_relay() {
    let relay = start_meshpunch_relay();
    let target = Target::Turn {
        server: relay.listen_addr(),
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    let opts = LoadOptions {
        bidirectional: true,
        ..short()
    };
    let r = common::retry(Duration::from_secs(15), || load::run_once(&target, &opts));
    let t = &r.trial;
    assert!(t.reverse_sent > 0 && t.reverse_received > 0, "{r:?}");
    assert!(t.received > t.reverse_received, "{r:?}");
    assert_eq!((t.misrouted, t.duplicates), (0, 0), "{r:?}");
    relay.control().stop();
}

#[test]
fn bidirectional_load_through_coturn() {
    if !natlab::testenv::require_commands("bidirectional_load_through_coturn", &["turnserver"]) {
        return;
    }
    let coturn = common::start_coturn(SECRET, 1);
    let target = Target::Turn {
        server: coturn.addr,
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    let opts = LoadOptions {
        bidirectional: true,
        ..short()
    };
    let r = common::retry(Duration::from_secs(15), || load::run_once(&target, &opts));
    let t = &r.trial;
    assert!(t.reverse_received > 0, "{r:?}");
    assert_eq!(t.misrouted, 0, "{r:?}");
}

#[test]
fn find_max_against_meshpunch_relay_reports_a_passing_rate() {
    let relay = start_meshpunch_relay();
    let target = Target::Turn {
        server: relay.listen_addr(),
        secret: SECRET.into(),
        transport: Transport::Udp,
    };
    let opts = LoadOptions {
        rate: 1_000,
        duration: Duration::from_millis(300),
        ..short()
    };
    let r = common::retry(Duration::from_secs(15), || {
        load::run_find_max(&target, &opts, 0.5, 4_000, |_| {})
    });
    let trials = r.trials.expect("trials listed");
    assert!(!trials.is_empty());
    relay.control().stop();
}
