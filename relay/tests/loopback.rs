//! The relay in-process on loopback, driven by our TURN client and plain UDP peers.

mod common;

use std::time::Duration;

use common::*;
use meshpunch_relay::client::{TurnSocket, TurnSocketError};
use meshpunch_relay::Relay;

#[test]
fn relays_channel_data_and_indications_both_ways() {
    let relay = Relay::start(relay_config(true, 0)).unwrap();
    let server = relay.listen_addr();
    let mut c = TurnSocket::new(any_local(), server, rest_creds(SECRET, "alice")).unwrap();
    let relayed = c.allocate(T).unwrap();
    assert_eq!(relayed.ip(), server.ip());
    assert_eq!(relay.ports_in_use(), 1);

    // Channel path.
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    c.bind_channel(peer_addr, T).unwrap();
    c.send_to(peer_addr, b"hello over a channel").unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over a channel");
    assert_eq!(from, relayed);
    peer.send_to(b"reply", relayed).unwrap();
    let (p, n) = c.recv_from(&mut buf, T).unwrap();
    assert_eq!((p, &buf[..n]), (peer_addr, &b"reply"[..]));

    // Send/Data indication path: a second peer on the same IP (permission covers it), no channel.
    let peer2 = peer_socket();
    let peer2_addr = peer2.local_addr().unwrap();
    c.send_to(peer2_addr, b"via send indication").unwrap();
    let (n, from) = peer2.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"via send indication"[..], relayed));
    peer2.send_to(b"via data indication", relayed).unwrap();
    let (p, n) = c.recv_from(&mut buf, T).unwrap();
    assert_eq!((p, &buf[..n]), (peer2_addr, &b"via data indication"[..]));

    // Bursts of 50 (the peer's default socket buffer holds ~250 small datagrams) arrive
    // complete and in order.
    for burst in 0..10u32 {
        for i in 0..50u32 {
            c.send_to(peer_addr, &(burst * 50 + i).to_be_bytes())
                .unwrap();
        }
        for i in 0..50u32 {
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &(burst * 50 + i).to_be_bytes());
        }
    }
    // Large datagrams (loopback MTU is 64 KiB) in both framings.
    let big: Vec<u8> = (0..8000u32).map(|i| i as u8).collect();
    for p in [&peer, &peer2] {
        let addr = p.local_addr().unwrap();
        c.send_to(addr, &big).unwrap();
        let mut rx = vec![0u8; 65_536];
        let (n, _) = p.recv_from(&mut rx).unwrap();
        assert_eq!(&rx[..n], &big[..]);
        p.send_to(&big, relayed).unwrap();
        let (from, n) = c.recv_from(&mut rx, T).unwrap();
        assert_eq!((from, &rx[..n]), (addr, &big[..]));
    }
    c.release(T).unwrap();
    // Released ports return to the pool.
    let deadline = std::time::Instant::now() + T;
    while relay.ports_in_use() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(relay.ports_in_use(), 0);
}

#[test]
fn loopback_peers_are_refused_by_default() {
    let relay = Relay::start(relay_config(false, 1)).unwrap();
    let mut c =
        TurnSocket::new(any_local(), relay.listen_addr(), rest_creds(SECRET, "bob")).unwrap();
    c.allocate(T).unwrap();
    // The relay itself sits on 127.0.0.1 here, which makes 127.0.0.1 one of its own addresses
    // (reachable only on relayed ports, see the allocation-to-allocation test); the rest of
    // loopback and every other spelling are refused outright.
    for ip in [
        "127.0.0.2",
        "::ffff:127.0.0.2",
        "::127.0.0.2",
        "127.255.255.254",
        "10.0.0.1",
        "0.0.0.0",
    ] {
        match c.create_permission(ip.parse().unwrap(), T) {
            Err(TurnSocketError::Failed {
                code: Some(403), ..
            }) => {}
            other => panic!("{ip}: {other:?}"),
        }
    }
}

#[test]
fn wrong_secret_is_refused() {
    let relay = Relay::start(relay_config(true, 2)).unwrap();
    let mut c = TurnSocket::new(
        any_local(),
        relay.listen_addr(),
        rest_creds("not-the-secret", "eve"),
    )
    .unwrap();
    match c.allocate(T) {
        Err(TurnSocketError::Failed {
            code: Some(401), ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn drain_refuses_new_allocations_and_finishes_when_idle() {
    let relay = Relay::start(relay_config(true, 3)).unwrap();
    let server = relay.listen_addr();
    let mut c = TurnSocket::new(any_local(), server, rest_creds(SECRET, "carl")).unwrap();
    c.allocate(T).unwrap();
    let control = relay.control();
    control.drain();
    let mut late = TurnSocket::new(any_local(), server, rest_creds(SECRET, "dora")).unwrap();
    match late.allocate(T) {
        Err(TurnSocketError::Failed {
            code: Some(508), ..
        }) => {}
        other => panic!("{other:?}"),
    }
    c.release(T).unwrap();
    // Workers exit once idle; join returns.
    relay.join();
}

#[test]
fn many_clients_spread_over_workers_all_relay() {
    let relay = Relay::start(relay_config(true, 7)).unwrap();
    let server = relay.listen_addr();
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    let mut clients = Vec::new();
    for i in 0..16 {
        let mut c =
            TurnSocket::new(any_local(), server, rest_creds(SECRET, &format!("u{i}"))).unwrap();
        let relayed = c.allocate(T).unwrap();
        c.bind_channel(peer_addr, T).unwrap();
        clients.push((c, relayed));
    }
    let mut buf = [0u8; 64];
    for (i, (c, relayed)) in clients.iter_mut().enumerate() {
        c.send_to(peer_addr, &[i as u8]).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&[i as u8][..], *relayed));
        peer.send_to(&[i as u8, 1], *relayed).unwrap();
        let (p, n) = c.recv_from(&mut buf, T).unwrap();
        assert_eq!((p, &buf[..n]), (peer_addr, &[i as u8, 1][..]));
    }
    let relayed: std::collections::HashSet<_> = clients.iter().map(|(_, r)| *r).collect();
    assert_eq!(relayed.len(), 16, "one relayed port per allocation");
    assert_eq!(relay.ports_in_use(), 16);
}

#[test]
fn ipv6_clients_and_peers_over_a_second_listening_address() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIP ipv6_clients_and_peers_over_a_second_listening_address: no ::1 here");
        return;
    }
    let file = meshpunch_relay::config::FileConfig {
        workers: Some(2),
        also_listen: Some(vec!["[::1]:0".parse().unwrap()]),
        ..Default::default()
    };
    let o = meshpunch_relay::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        ports: Some(port_range(8)),
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        ..Default::default()
    };
    let relay = Relay::start(meshpunch_relay::config::RelayConfig::resolve(file, o, None).unwrap())
        .unwrap();
    let v6 = relay.listen_addrs()[1];
    assert!(v6.is_ipv6());
    let mut c = TurnSocket::new("[::1]:0".parse().unwrap(), v6, rest_creds(SECRET, "six")).unwrap();
    c.client_mut()
        .set_requested_family(Some(meshpunch_proto::turn::Family::V6));
    let relayed = c.allocate(T).unwrap();
    assert!(relayed.is_ipv6());
    let peer = std::net::UdpSocket::bind("[::1]:0").unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    c.bind_channel(peer_addr, T).unwrap();
    c.send_to(peer_addr, b"over six").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"over six"[..], relayed));
    peer.send_to(b"back over six", relayed).unwrap();
    let (p, n) = c.recv_from(&mut buf, T).unwrap();
    assert_eq!((p, &buf[..n]), (peer_addr, &b"back over six"[..]));
}

#[test]
fn two_clients_of_one_relay_talk_allocation_to_allocation_but_not_to_other_ports() {
    // Loopback peers NOT allowed: only the relay's own relayed ports are reachable.
    let relay = Relay::start(relay_config(false, 9)).unwrap();
    let server = relay.listen_addr();
    let mut a = TurnSocket::new(any_local(), server, rest_creds(SECRET, "ta")).unwrap();
    let mut b = TurnSocket::new(any_local(), server, rest_creds(SECRET, "tb")).unwrap();
    let ra = a.allocate(T).unwrap();
    let rb = b.allocate(T).unwrap();
    a.bind_channel(rb, T).unwrap();
    b.bind_channel(ra, T).unwrap();
    a.send_to(rb, b"a to b through one relay").unwrap();
    let mut buf = [0u8; 128];
    let (from, n) = b.recv_from(&mut buf, T).unwrap();
    assert_eq!((from, &buf[..n]), (ra, &b"a to b through one relay"[..]));
    b.send_to(ra, b"b to a").unwrap();
    let (from, n) = a.recv_from(&mut buf, T).unwrap();
    assert_eq!((from, &buf[..n]), (rb, &b"b to a"[..]));
    // The listening port and any non-relayed port of the relay's address stay closed.
    for port in [server.port(), 22] {
        match a.bind_channel(std::net::SocketAddr::new(server.ip(), port), T) {
            Err(TurnSocketError::Failed {
                code: Some(403), ..
            }) => {}
            other => panic!("{port}: {other:?}"),
        }
    }
}
