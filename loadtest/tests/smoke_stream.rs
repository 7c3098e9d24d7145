//! Relay mode over TURN-over-TCP and TURN-over-TLS against the real meshpunch-relay on
//! loopback: each client's allocation on its own stream, peers on UDP. Delivery and sequence
//! accounting only, never timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshpunch_loadtest::engine::Sizes;
use meshpunch_loadtest::load::{self, LoadOptions, Target};
use meshpunch_loadtest::stream::{TlsOptions, Transport};
use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};

const SECRET: &str = "smoke-secret";

/// A self-signed certificate for `relay.test` and 127.0.0.1: (cert.pem, key.pem).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let g =
        rcgen::generate_simple_self_signed(vec!["relay.test".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, g.cert.pem()).unwrap();
    std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn start_relay(cert: &Path, key: &Path) -> meshpunch_relay::Relay {
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        realm: Some("loadtest.test".into()),
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        ..Default::default()
    };
    let file = FileConfig {
        workers: Some(1),
        ..Default::default()
    };
    let cfg = RelayConfig::resolve(file, o, None).expect("relay config");
    meshpunch_relay::Relay::start(cfg).expect("relay starts")
}

fn trivial() -> LoadOptions {
    LoadOptions {
        clients: 4,
        peers_per_client: 2,
        peers: 8,
        rate: 500,
        duration: Duration::from_secs(1),
        ..LoadOptions::realistic()
    }
}

#[test]
fn relay_mode_over_tcp_and_tls_delivers_everything_at_a_trivial_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = start_relay(&cert, &key);
    let tls = TlsOptions::from_ca_file(&cert, "relay.test").unwrap();
    let cases = [
        (relay.tcp_addr().unwrap(), Transport::Tcp, "tcp"),
        (relay.tls_addr().unwrap(), Transport::Tls(tls), "tls"),
    ];
    for (server, transport, name) in cases {
        let target = Target::Turn {
            server,
            secret: SECRET.into(),
            transport,
        };
        // Odd sizes too: the stream form pads ChannelData to 4 bytes and the relay must
        // strip exactly that padding for every datagram to arrive with its own stamp.
        for sizes in [Sizes::Fixed(101), Sizes::Fixed(1200), Sizes::WireguardMix] {
            let opts = LoadOptions { sizes, ..trivial() };
            let r = common::retry(Duration::from_secs(15), || load::run_once(&target, &opts));
            let t = &r.trial;
            assert_eq!((r.mode.as_str(), r.transport.as_str()), ("relay", name));
            assert!(t.sent > 0 && t.received > 0, "{name}: {r:?}");
            assert_eq!(
                t.received, t.sent,
                "{name} {sizes:?}: loss at a trivial rate: {r:?}"
            );
            assert_eq!(t.lost, 0, "{name}: {r:?}");
            assert_eq!(t.stream_backed_up, 0, "{name}: {r:?}");
            assert_eq!((t.misrouted, t.duplicates), (0, 0), "{name}: {r:?}");
            // A stream delivers in order, and the relay forwards one connection in order.
            assert_eq!(t.reordered, 0, "{name}: {r:?}");
        }
    }
    relay.control().stop();
}

#[test]
fn tls_with_an_untrusted_certificate_fails_setup_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = start_relay(&cert, &key);
    let other = tempfile::tempdir().unwrap();
    let (wrong_ca, _) = self_signed(other.path());
    let target = Target::Turn {
        server: relay.tls_addr().unwrap(),
        secret: SECRET.into(),
        transport: Transport::Tls(TlsOptions::from_ca_file(&wrong_ca, "relay.test").unwrap()),
    };
    let opts = LoadOptions {
        clients: 1,
        ..trivial()
    };
    let err = load::run_once(&target, &opts).expect_err("an untrusted certificate must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("setup of client 0") && msg.contains("tls connect"),
        "{msg}"
    );
    let bidi = LoadOptions {
        bidirectional: true,
        ..trivial()
    };
    let err = load::run_once(&target, &bidi).expect_err("bidirectional is UDP only");
    assert!(err.to_string().contains("UDP only"), "{err}");
    relay.control().stop();
}

#[test]
fn binary_json_over_tls_and_its_flag_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = start_relay(&cert, &key);
    let server = relay.tls_addr().unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_meshpunch-loadtest");
    let v: serde_json::Value = common::retry(Duration::from_secs(15), || {
        let out = Command::new(bin)
            .args(["relay", "--server", &server, "--secret", SECRET])
            .args(["--transport", "tls", "--ca"])
            .arg(&cert)
            .args(["--clients", "2", "--rate", "500", "--size", "1200"])
            .args(["--duration", "1s", "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    });
    assert_eq!(v["transport"], "tls", "{v}");
    assert!(v["received"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["stream_backed_up"].as_u64(), Some(0), "{v}");
    let out = Command::new(bin)
        .args(["relay", "--server", &server, "--secret", SECRET])
        .args(["--transport", "tls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--transport tls needs --ca FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    relay.control().stop();
}
