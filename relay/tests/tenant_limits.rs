//! Tenant limits and the peer policy against the real relay (two `SO_REUSEPORT` workers) on
//! loopback sockets: the attacks of issue 11.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;

use common::*;
use meshpunch_relay::client::{TurnSocket, TurnSocketError};
use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};
use meshpunch_relay::Relay;

fn config(slot: u16, file: FileConfig) -> RelayConfig {
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        ports: Some(port_range(slot)),
        realm: Some("meshpunch.test".into()),
        auth_secret: Some(SECRET.into()),
        ..Default::default()
    };
    RelayConfig::resolve(
        FileConfig {
            workers: Some(2),
            ..file
        },
        o,
        None,
    )
    .unwrap()
}

/// Attack: throw-away keys of one network (one username each, as the rendezvous mints them),
/// several allocations per key from separate sockets (spread over both workers): the network
/// quota holds for the whole process; other networks are unaffected.
#[test]
fn network_quota_holds_across_workers() {
    let relay = Relay::start(config(
        7,
        FileConfig {
            user_quota: Some(3),
            network_quota: Some(8),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.listen_addr();
    let mut held = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for key in 0..4u32 {
        for _ in 0..3 {
            let user = format!("evil.{key:016x}");
            let mut c = TurnSocket::new(any_local(), server, rest_creds(SECRET, &user)).unwrap();
            match c.allocate(T) {
                Ok(_) => ok += 1,
                Err(TurnSocketError::Failed {
                    code: Some(486), ..
                }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
            held.push(c);
        }
    }
    assert_eq!((ok, refused), (8, 4), "12 asked, network quota 8");
    let mut other = TurnSocket::new(
        any_local(),
        server,
        rest_creds(SECRET, &format!("office.{:016x}", 1)),
    )
    .unwrap();
    other.allocate(T).expect("another network still allocates");
    assert_eq!(relay.ports_in_use(), 9);
}

/// Attack: a channel or permission to the relay's own IP on a relayed port that no live
/// allocation holds (and on the listening port) is refused with 403; the port of a live
/// allocation works, until that allocation ends.
#[test]
fn own_address_only_on_a_live_allocations_port() {
    let relay = Relay::start(config(8, FileConfig::default())).unwrap();
    let server = relay.listen_addr();
    let mut a = TurnSocket::new(any_local(), server, rest_creds(SECRET, "self-a")).unwrap();
    let mut b = TurnSocket::new(any_local(), server, rest_creds(SECRET, "self-b")).unwrap();
    let ra = a.allocate(T).unwrap();
    let rb = b.allocate(T).unwrap();
    let (lo, hi) = meshpunch_relay::config::parse_ports(&port_range(8)).unwrap();
    let free = (lo..=hi)
        .map(|p| SocketAddr::new(server.ip(), p))
        .find(|p| *p != ra && *p != rb)
        .unwrap();
    for target in [free, server] {
        match b.bind_channel(target, T) {
            Err(TurnSocketError::Failed {
                code: Some(403), ..
            }) => {}
            other => panic!("{target}: {other:?}"),
        }
    }
    a.bind_channel(rb, T).unwrap();
    b.bind_channel(ra, T).unwrap();
    b.send_to(ra, b"b to a").unwrap();
    let mut buf = [0u8; 64];
    let (from, n) = a.recv_from(&mut buf, T).unwrap();
    assert_eq!((from, &buf[..n]), (rb, &b"b to a"[..]));
    // A ends its allocation: B's channel to the freed port carries nothing any more.
    a.release(T).unwrap();
    let mut c = TurnSocket::new(any_local(), server, rest_creds(SECRET, "self-c")).unwrap();
    match c.bind_channel(ra, T) {
        Err(_) => {}
        Ok(_) => panic!("bound without an allocation"),
    }
    let _ = c.allocate(T).unwrap();
    match c.bind_channel(ra, T) {
        Err(TurnSocketError::Failed {
            code: Some(403), ..
        }) => {}
        other => panic!("freed port still reachable: {other:?}"),
    }
}

/// Attack: `denied_peers` (file and flag) refuses a CIDR in its IPv6 spellings too.
#[test]
fn denied_peers_from_config_are_refused() {
    let mut cfg = config(
        9,
        FileConfig {
            denied_peers: Some(vec!["127.0.0.0/8".into()]),
            allow_loopback_peers: Some(true),
            relay_to_self: Some(false),
            ..Default::default()
        },
    );
    assert_eq!(cfg.server.policy.denied.len(), 1);
    cfg.workers = 1;
    let relay = Relay::start(cfg).unwrap();
    let mut c =
        TurnSocket::new(any_local(), relay.listen_addr(), rest_creds(SECRET, "deny")).unwrap();
    c.allocate(T).unwrap();
    let peer = peer_socket();
    let port = peer.local_addr().unwrap().port();
    for ip in ["127.0.0.1", "127.9.9.9"] {
        let target = SocketAddr::new(ip.parse().unwrap(), port);
        match c.bind_channel(target, T) {
            Err(TurnSocketError::Failed {
                code: Some(403), ..
            }) => {}
            other => panic!("{target}: {other:?}"),
        }
    }
    // A bad entry is a start-up error naming it.
    let err = RelayConfig::resolve(
        FileConfig {
            denied_peers: Some(vec!["10.0.0.0/33".into()]),
            ..Default::default()
        },
        Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            auth_secret: Some(SECRET.into()),
            ..Default::default()
        },
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("10.0.0.0/33"), "{err:#}");
}
