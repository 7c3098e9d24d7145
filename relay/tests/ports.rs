//! The relayed-port pool against a busy host: ports another program holds are skipped, not
//! reported as capacity (the allocator used to answer 508 after 64 failed binds in a row).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::UdpSocket;

use common::*;
use meshpunch_relay::client::TurnSocket;
use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};
use meshpunch_relay::Relay;

/// A 160-port range of its own for this test binary (outside the 50-port slots of the others).
fn range() -> (u16, u16) {
    let lo = 40_000 + (std::process::id() % 50) as u16 * 200;
    (lo, lo + 159)
}

#[test]
fn ports_busy_on_the_host_do_not_make_the_relay_look_full() {
    let (lo, hi) = range();
    // Another program holds the first 150 ports of the range (those it can get).
    let mut held = Vec::new();
    for p in lo..lo + 150 {
        if let Ok(s) = UdpSocket::bind(("127.0.0.1", p)) {
            held.push(s);
        }
    }
    assert!(held.len() > 100, "could hold only {} ports", held.len());
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        ports: Some(format!("{lo}-{hi}")),
        realm: Some("meshpunch.test".into()),
        auth_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let cfg = RelayConfig::resolve(
        FileConfig {
            workers: Some(2),
            ..Default::default()
        },
        o,
        None,
    )
    .unwrap();
    let relay = Relay::start(cfg).unwrap();
    let mut clients = Vec::new();
    for k in 0..5u32 {
        let mut c = TurnSocket::new(
            any_local(),
            relay.listen_addr(),
            rest_creds(SECRET, &format!("busy{k}.{:016x}", k)),
        )
        .unwrap();
        let relayed = c.allocate(T).expect("a free port behind the busy ones");
        assert!(
            relayed.port() >= lo + 150 || held.iter().all(|s| s.local_addr().unwrap() != relayed)
        );
        clients.push(c);
    }
    assert_eq!(relay.ports_in_use(), 5);
}
