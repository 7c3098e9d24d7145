//! Unit tests of the server core, driven by the real client state machine.

use super::*;
use crate::creds;
use crate::turn::codec::{encode_xor_addr, MAX_DATAGRAM};
use crate::turn::{PortPool, PortRequest, BUSY_RETRY, EVICTION_SAMPLE, RESERVATION_LIFETIME};
use crate::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent, TurnOp};
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use sha1::Sha1;
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use stun_rs::attributes::stun::UserName;
use stun_rs::{Algorithm, AlgorithmId};

const SECRET: &[u8] = b"north-secret";
const UNIX0: u64 = 1_800_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Net {
    server: TurnServer<PortPool>,
    server_addr: SocketAddr,
    now: Instant,
    out: Vec<u8>,
}

fn config(policy: PeerPolicy) -> ServerConfig {
    let mut cfg = ServerConfig::new(
        "meshpunch.test",
        Auth {
            secrets: vec![SECRET.to_vec()],
            users: HashMap::from([("static".to_owned(), "pw".to_owned())]),
        },
        [7u8; 32],
    );
    cfg.policy = policy;
    cfg
}

impl Net {
    fn new() -> Self {
        Self::with(
            config(PeerPolicy::default()),
            PortPool::new(
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
                50000,
                50009,
                0,
            ),
        )
    }
    fn with(cfg: ServerConfig, pool: PortPool) -> Self {
        let now = Instant::now();
        Net {
            server: TurnServer::new(cfg, pool, now, UNIX0),
            server_addr: sa("203.0.113.1:3478"),
            now,
            out: vec![0u8; 2048],
        }
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
    }
    fn client(&self, user: &str) -> TurnClient {
        let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
        TurnClient::new(
            self.server_addr,
            TurnCredentials {
                username: c.username,
                password: c.password,
            },
            self.now,
        )
    }
    /// Delivers everything the client wants to send, and the answers back, until quiet.
    fn drive(&mut self, c: &mut TurnClient, from: SocketAddr) -> Vec<TurnEvent> {
        for _ in 0..20 {
            let Some(t) = c.poll_transmit() else { break };
            if let ClientAction::Reply(n) =
                self.server
                    .handle_client(self.now, from, &t.payload, &mut self.out)
            {
                let reply = self.out[..n].to_vec();
                assert_eq!(
                    c.handle_input(self.now, self.server_addr, &reply),
                    Input::Consumed
                );
            }
        }
        std::iter::from_fn(|| c.poll_event()).collect()
    }
    fn allocated(&mut self, user: &str, from: SocketAddr) -> TurnClient {
        let mut c = self.client(user);
        c.allocate(self.now);
        let ev = self.drive(&mut c, from);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
            "{ev:?}"
        );
        c
    }
    fn raw(&mut self, from: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
        match self
            .server
            .handle_client(self.now, from, packet, &mut self.out)
        {
            ClientAction::Reply(n) => Some(self.out[..n].to_vec()),
            _ => None,
        }
    }
}

fn error_code(reply: &[u8]) -> Option<u16> {
    let (msg, _) = MessageDecoder::default().decode(reply).ok()?;
    match msg.get::<ErrorCode>() {
        Some(StunAttribute::ErrorCode(e)) => Some(e.error_code().error_code()),
        _ => None,
    }
}

/// An authenticated request built by hand (for what the client never sends).
fn signed_request(
    net: &mut Net,
    from: SocketAddr,
    method: stun_rs::MessageMethod,
    attrs: Vec<StunAttribute>,
    user: &str,
) -> Vec<u8> {
    let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
    signed_request_with(net, from, method, attrs, &c)
}

/// [`signed_request`] under given REST-API credentials (another expiry of the same user).
fn signed_request_with(
    net: &mut Net,
    from: SocketAddr,
    method: stun_rs::MessageMethod,
    attrs: Vec<StunAttribute>,
    c: &creds::RestCredentials,
) -> Vec<u8> {
    let nonce = net.server.make_nonce(from.ip(), net.now);
    let key = HMACKey::new_long_term(
        &c.username,
        "meshpunch.test",
        &c.password,
        Algorithm::from(AlgorithmId::MD5),
    )
    .unwrap();
    let mut b = StunMessageBuilder::new(method, MessageClass::Request);
    for a in attrs {
        b = b.with_attribute(a);
    }
    let msg = b
        .with_attribute(UserName::new(&c.username).unwrap())
        .with_attribute(Realm::new("meshpunch.test").unwrap())
        .with_attribute(Nonce::new(nonce).unwrap())
        .with_attribute(MessageIntegrity::new(key))
        .build();
    let mut buf = vec![0u8; 1024];
    let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
    buf.truncate(n);
    buf
}

/// Recomputes MESSAGE-INTEGRITY after a test patched a signed request.
fn resign(req: &mut [u8], user: &str) {
    let c = creds::rest_credentials(SECRET, UNIX0 + 86_400, user);
    let key = HMACKey::new_long_term(
        &c.username,
        "meshpunch.test",
        &c.password,
        Algorithm::from(AlgorithmId::MD5),
    )
    .unwrap();
    let input = stun_rs::get_input_text::<MessageIntegrity>(req).unwrap();
    let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(&input);
    let (_, r) = RawAttrs::new(req).find(|(t, _)| *t == 0x0008).unwrap();
    req[r].copy_from_slice(&mac.finalize().into_bytes());
}

#[test]
fn allocate_bind_and_relay_both_directions_over_channels() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40000");
    let peer = sa("192.0.2.10:5000");
    let mut c = net.allocated("alice", me);
    let relayed = c.relayed_addr().unwrap();
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
    assert_eq!(c.mapped_addr(), Some(me));
    let ch = c.bind_channel(peer, net.now).unwrap();
    let ev = net.drive(&mut c, me);
    assert_eq!(ev, vec![TurnEvent::ChannelBound { peer, channel: ch }]);

    let mut buf = [0u8; 256];
    let n = c.encode_send(peer, b"wireguard", &mut buf).unwrap();
    assert_eq!(n, 4 + 9, "ChannelData once bound");
    match net
        .server
        .handle_client(net.now, me, &buf[..n], &mut net.out)
    {
        ClientAction::Relay {
            relayed: r,
            peer: p,
            range,
        } => {
            assert_eq!((r, p), (relayed, peer));
            assert_eq!(&buf[range], b"wireguard");
        }
        other => panic!("{other:?}"),
    }
    // Peer answers: ChannelData header goes in front of the payload.
    let mut pkt = [0u8; 64];
    pkt[4..9].copy_from_slice(b"reply");
    match net
        .server
        .handle_peer(net.now, relayed, peer, &pkt[4..9], &mut net.out)
    {
        PeerAction::ChannelData { client, channel } => {
            assert_eq!((client, channel), (me, ch));
            channeldata::write_header(channel, 5, &mut pkt).unwrap();
        }
        other => panic!("{other:?}"),
    }
    match c.handle_input(net.now, net.server_addr, &pkt[..9]) {
        Input::Data { peer: p, range } => {
            assert_eq!(p, peer);
            assert_eq!(&pkt[range], b"reply");
        }
        other => panic!("{other:?}"),
    }
    // A peer without permission is dropped.
    assert_eq!(
        net.server
            .handle_peer(net.now, relayed, sa("192.0.2.99:5000"), b"x", &mut net.out),
        PeerAction::Drop
    );
    let s = net.server.stats();
    assert_eq!(
        (s.packets_to_peer, s.packets_to_client, s.no_permission),
        (1, 1, 1)
    );
    assert_eq!(
        net.server.gauges(net.now),
        Gauges {
            allocations: 1,
            permissions: 1,
            channels: 1
        }
    );
}

#[test]
fn send_and_data_indications_with_a_plain_permission() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40001");
    let peer = sa("192.0.2.20:6000");
    let mut c = net.allocated("bob", me);
    let relayed = c.relayed_addr().unwrap();
    let mut buf = [0u8; 256];
    // Without permission the Send indication is dropped.
    let n = c.encode_send(peer, b"early", &mut buf).unwrap();
    assert_eq!(
        net.server
            .handle_client(net.now, me, &buf[..n], &mut net.out),
        ClientAction::None
    );
    c.create_permission(peer.ip(), net.now).unwrap();
    assert_eq!(
        net.drive(&mut c, me),
        vec![TurnEvent::PermissionCreated { peer_ip: peer.ip() }]
    );
    let n = c.encode_send(peer, b"hello peer", &mut buf).unwrap();
    match net
        .server
        .handle_client(net.now, me, &buf[..n], &mut net.out)
    {
        ClientAction::Relay {
            relayed: r,
            peer: p,
            range,
        } => {
            assert_eq!((r, p), (relayed, peer));
            assert_eq!(&buf[range], b"hello peer");
        }
        other => panic!("{other:?}"),
    }
    // Any port of a permitted IP may answer; it arrives as a Data indication.
    let other_port = sa("192.0.2.20:6001");
    let PeerAction::Indication { client, len } =
        net.server
            .handle_peer(net.now, relayed, other_port, b"back at you", &mut net.out)
    else {
        panic!("expected Data indication")
    };
    assert_eq!(client, me);
    let ind = net.out[..len].to_vec();
    match c.handle_input(net.now, net.server_addr, &ind) {
        Input::Data { peer: p, range } => {
            assert_eq!(p, other_port);
            assert_eq!(&ind[range], b"back at you");
        }
        other => panic!("{other:?}"),
    }
}

fn permission_result(
    net: &mut Net,
    c: &mut TurnClient,
    me: SocketAddr,
    ip: &str,
) -> Vec<TurnEvent> {
    c.create_permission(ip.parse().unwrap(), net.now).unwrap();
    net.drive(c, me)
}

#[test]
fn security_defaults_refuse_dangerous_peers_with_403() {
    let mut net = Net::with(
        config(PeerPolicy {
            own_addrs: vec!["203.0.113.1".parse().unwrap()],
            ..Default::default()
        }),
        PortPool::new(
            vec![
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("198.51.100.7:40002");
    let mut c = net.allocated("carol", me);
    for ip in [
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "10.0.0.1",
        "0.0.0.0",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "203.0.113.1",
        "::ffff:203.0.113.1",
    ] {
        let ev = permission_result(&mut net, &mut c, me, ip);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    op: TurnOp::Permission,
                    code: Some(403),
                    ..
                }]
            ),
            "{ip}: {ev:?}"
        );
    }
    // ChannelBind is refused the same way.
    c.bind_channel(sa("127.0.0.1:9"), net.now).unwrap();
    let ev = net.drive(&mut c, me);
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                op: TurnOp::ChannelBind,
                code: Some(403),
                ..
            }]
        ),
        "{ev:?}"
    );
    // IPv6 allocation: ::1, ::, fe80::1, fc00::1 refused too.
    let me6 = sa("[2001:db8::99]:40000");
    let mut c6 = net.client("carol6");
    c6.set_requested_family(Some(Family::V6));
    c6.allocate(net.now);
    let ev = net.drive(&mut c6, me6);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::Allocated { relayed, .. }] if relayed.is_ipv6()),
        "{ev:?}"
    );
    for ip in ["::1", "::", "fe80::1", "fc00::1", "ff02::1"] {
        let ev = permission_result(&mut net, &mut c6, me6, ip);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(403),
                    ..
                }]
            ),
            "{ip}: {ev:?}"
        );
    }
    assert!(net.server.stats().denied.iter().sum::<u64>() >= 16);
    assert_eq!(
        net.server.stats().denied[deny_index(DenyReason::RelaySelf)],
        2
    );
    // A public peer is fine.
    let ev = permission_result(&mut net, &mut c, me, "192.0.2.1");
    assert!(
        matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }]),
        "{ev:?}"
    );
}

#[test]
fn two_clients_of_one_relay_reach_each_other_allocation_to_allocation() {
    let mut cfg = config(PeerPolicy {
        own_addrs: vec!["203.0.113.1".parse().unwrap()],
        ..Default::default()
    });
    cfg.self_relay_ports = Some((50000, 50009));
    let mut net = Net::with(
        cfg,
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        ),
    );
    let (ma, mb) = (sa("198.51.100.7:1"), sa("198.51.100.8:1"));
    let mut a = net.allocated("a", ma);
    let mut b = net.allocated("b", mb);
    let (ra, rb) = (a.relayed_addr().unwrap(), b.relayed_addr().unwrap());
    // Permission for the relay's own IP (ports ignored) and channels to the other's relayed
    // address are fine ...
    b.create_permission(ra.ip(), net.now).unwrap();
    assert!(matches!(
        net.drive(&mut b, mb).as_slice(),
        [TurnEvent::PermissionCreated { .. }]
    ));
    let ch = a.bind_channel(rb, net.now).unwrap();
    assert!(matches!(
        net.drive(&mut a, ma).as_slice(),
        [TurnEvent::ChannelBound { .. }]
    ));
    let mut buf = [0u8; 64];
    let n = a.encode_send(rb, b"a to b", &mut buf).unwrap();
    assert_eq!(buf[..2], ch.to_be_bytes());
    let ClientAction::Relay {
        relayed,
        peer,
        range,
    } = net
        .server
        .handle_client(net.now, ma, &buf[..n], &mut net.out)
    else {
        panic!("not relayed")
    };
    assert_eq!((relayed, peer), (ra, rb));
    // ... and B's relayed socket hands it to B.
    let payload = buf[range].to_vec();
    let PeerAction::Indication { client, len } =
        net.server
            .handle_peer(net.now, rb, ra, &payload, &mut net.out)
    else {
        panic!("not delivered to b")
    };
    assert_eq!(client, mb);
    let ind = net.out[..len].to_vec();
    assert!(
        matches!(b.handle_input(net.now, net.server_addr, &ind), Input::Data { peer, .. } if peer == ra)
    );
    // Other ports of the relay's own address stay closed: the listening port, SSH.
    for port in [3478, 22] {
        a.bind_channel(SocketAddr::new(ra.ip(), port), net.now)
            .unwrap();
        let ev = net.drive(&mut a, ma);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(403),
                    ..
                }]
            ),
            "{port}: {ev:?}"
        );
    }
    b.create_permission(ra.ip(), net.now).unwrap();
    net.drive(&mut b, mb);
    let n = b
        .encode_send(SocketAddr::new(ra.ip(), 22), b"ssh?", &mut buf)
        .unwrap();
    assert_eq!(
        net.server
            .handle_client(net.now, mb, &buf[..n], &mut net.out),
        ClientAction::None
    );
}

#[test]
fn allowed_classes_open_when_configured() {
    let policy = PeerPolicy {
        allow_loopback: true,
        allow_private: true,
        own_addrs: vec![],
        denied: vec![],
    };
    let mut net = Net::with(
        config(policy),
        PortPool::new(
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("127.0.0.1:40003");
    let mut c = net.allocated("dave", me);
    for ip in [
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
    ] {
        let ev = permission_result(&mut net, &mut c, me, ip);
        assert!(
            matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }] | []),
            "{ip}: {ev:?}"
        );
    }
    // Unspecified, link-local, multicast stay refused whatever the flags.
    for ip in ["0.0.0.0", "169.254.1.1", "224.0.0.1"] {
        let ev = permission_result(&mut net, &mut c, me, ip);
        assert!(
            matches!(
                ev.as_slice(),
                [TurnEvent::Failed {
                    code: Some(403),
                    ..
                }]
            ),
            "{ip}: {ev:?}"
        );
    }
    let me6 = sa("[::1]:40000");
    let mut c6 = net.client("dave6");
    c6.set_requested_family(Some(Family::V6));
    c6.allocate(net.now);
    assert!(matches!(
        net.drive(&mut c6, me6).as_slice(),
        [TurnEvent::Allocated { .. }]
    ));
    let ev = permission_result(&mut net, &mut c6, me6, "::1");
    assert!(
        matches!(ev.as_slice(), [TurnEvent::PermissionCreated { .. }]),
        "{ev:?}"
    );
    // ::1 on an IPv4 allocation: allowed by policy but the wrong family (443).
    assert_eq!(
        c.create_permission("::1".parse().unwrap(), net.now),
        Err(crate::turn_client::TurnClientError::FamilyMismatch)
    );
}

#[test]
fn permissions_expire_after_300_seconds() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40004");
    let peer = sa("192.0.2.30:7000");
    let mut c = net.allocated("erin", me);
    let relayed = c.relayed_addr().unwrap();
    c.create_permission(peer.ip(), net.now).unwrap();
    net.drive(&mut c, me);
    net.advance(Duration::from_secs(299));
    assert!(matches!(
        net.server
            .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
        PeerAction::Indication { .. }
    ));
    net.advance(Duration::from_secs(2));
    assert_eq!(
        net.server
            .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
        PeerAction::Drop
    );
    assert_eq!(net.server.gauges(net.now).permissions, 0);
    // The client's own timer refreshes it before expiry.
    let mut net = Net::new();
    let mut c = net.allocated("erin", me);
    let relayed = c.relayed_addr().unwrap();
    c.create_permission(peer.ip(), net.now).unwrap();
    net.drive(&mut c, me);
    for _ in 0..4 {
        let t = c.poll_timeout().unwrap();
        net.now = net.now.max(t);
        net.server.handle_timeout(net.now);
        c.handle_timeout(net.now);
        net.drive(&mut c, me);
    }
    assert!(net.now > net.server.epoch + Duration::from_secs(400));
    assert!(matches!(
        net.server
            .handle_peer(net.now, relayed, peer, b"x", &mut net.out),
        PeerAction::Indication { .. }
    ));
}

#[test]
fn channels_expire_and_cool_down_before_rebinding() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40005");
    let peer = sa("192.0.2.40:7000");
    let other = sa("192.0.2.41:7000");
    let mut c = net.allocated("frank", me);
    let ch = c.bind_channel(peer, net.now).unwrap();
    net.drive(&mut c, me);
    let mut cd = [0u8; 16];
    let n = channeldata::encode(ch, b"hi", &mut cd).unwrap();
    // Keep the permission alive separately so only the channel ages.
    let keep_perm = |net: &mut Net| {
        let req = signed_request(
            net,
            me,
            CREATE_PERMMISSION,
            vec![XorPeerAddress::from(peer).into()],
            "frank",
        );
        assert!(error_code(&net.raw(me, &req).unwrap()).is_none());
        let req = signed_request(net, me, REFRESH, vec![LifeTime::new(3600).into()], "frank");
        assert!(error_code(&net.raw(me, &req).unwrap()).is_none());
    };
    net.advance(Duration::from_secs(250));
    keep_perm(&mut net);
    net.advance(Duration::from_secs(250));
    keep_perm(&mut net);
    net.advance(Duration::from_secs(99));
    assert!(matches!(
        net.server
            .handle_client(net.now, me, &cd[..n], &mut net.out),
        ClientAction::Relay { .. }
    ));
    net.advance(Duration::from_secs(2));
    assert_eq!(
        net.server
            .handle_client(net.now, me, &cd[..n], &mut net.out),
        ClientAction::None,
        "channel expired"
    );
    assert!(net.server.stats().unbound_channel >= 1);
    // Within 5 minutes of expiry the number cannot go to another peer, nor the peer to
    // another number.
    let bind = |net: &mut Net, number: u16, p: SocketAddr| {
        let req = signed_request(
            net,
            me,
            CHANNEL_BIND,
            vec![
                ChannelNumber::new(number).into(),
                XorPeerAddress::from(p).into(),
            ],
            "frank",
        );
        error_code(&net.raw(me, &req).unwrap())
    };
    assert_eq!(bind(&mut net, ch, other), Some(400));
    assert_eq!(bind(&mut net, ch + 1, peer), Some(400));
    net.advance(Duration::from_secs(300));
    assert_eq!(
        bind(&mut net, ch, other),
        None,
        "free again after the cool-down"
    );
    // Same pair rebinding (refresh) is always fine.
    assert_eq!(bind(&mut net, ch, other), None);
}

#[test]
fn allocations_expire_and_refresh_zero_frees() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40006");
    let c = net.allocated("gina", me);
    let relayed = c.relayed_addr().unwrap();
    assert_eq!(net.server.allocator().in_use(), 1);
    net.advance(Duration::from_secs(599));
    assert_eq!(net.server.relayed_addr(me, net.now), Some(relayed));
    net.advance(Duration::from_secs(2));
    assert_eq!(net.server.relayed_addr(me, net.now), None);
    assert_eq!(
        net.server.allocator().in_use(),
        0,
        "port returned on expiry"
    );
    assert_eq!(net.server.stats().allocations_expired, 1);
    assert!(net.server.is_idle());

    let mut c = net.allocated("gina", me);
    // The client refreshes on its own before expiry.
    let t = c.poll_timeout().unwrap();
    net.now = t;
    c.handle_timeout(net.now);
    let ev = net.drive(&mut c, me);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::Refreshed { .. }]),
        "{ev:?}"
    );
    c.release(net.now);
    assert_eq!(net.drive(&mut c, me), vec![TurnEvent::Released]);
    assert_eq!(net.server.allocator().in_use(), 0);
    assert_eq!(net.server.stats().allocations_released, 1);
}

#[test]
fn external_ip_is_advertised_for_a_relay_behind_nat() {
    let mut cfg = config(PeerPolicy::default());
    cfg.external_ips = vec![("10.0.0.5".parse().unwrap(), "203.0.113.50".parse().unwrap())];
    let mut net = Net::with(
        cfg,
        PortPool::new(vec!["10.0.0.5".parse().unwrap()], 50000, 50009, 0),
    );
    let c = net.allocated("nat", sa("198.51.100.7:40020"));
    assert_eq!(
        c.relayed_addr().unwrap().ip(),
        "203.0.113.50".parse::<IpAddr>().unwrap()
    );
    // The driver still talks about the bound address.
    assert_eq!(
        net.server
            .relayed_addr(sa("198.51.100.7:40020"), net.now)
            .unwrap()
            .ip(),
        "10.0.0.5".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn client_retransmits_then_gives_up_when_nothing_answers() {
    let net = Net::new();
    let start = net.now;
    let mut c = net.client("silent");
    c.allocate(start);
    let mut sends = 0;
    let mut t = start;
    let failure = loop {
        while c.poll_transmit().is_some() {
            sends += 1;
        }
        if let Some(ev) = c.poll_event() {
            break ev;
        }
        t = c.poll_timeout().unwrap();
        c.handle_timeout(t);
    };
    assert!(
        matches!(
            failure,
            TurnEvent::Failed {
                op: TurnOp::Allocate,
                code: None,
                ..
            }
        ),
        "{failure:?}"
    );
    assert_eq!(sends, crate::turn_client::MAX_TRANSMISSIONS);
    assert!(t - start >= Duration::from_secs(30), "{:?}", t - start);
    assert!(!c.is_allocated());
}

#[test]
fn lost_answers_are_recovered_by_retransmission() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40021");
    let mut c = net.client("lossy");
    c.allocate(net.now);
    // Drop the first answer of every request once.
    let mut dropped = 0;
    for _ in 0..50 {
        while let Some(t) = c.poll_transmit() {
            if let ClientAction::Reply(n) =
                net.server
                    .handle_client(net.now, me, &t.payload, &mut net.out)
            {
                if dropped < 2 {
                    dropped += 1;
                    continue;
                }
                let reply = net.out[..n].to_vec();
                c.handle_input(net.now, net.server_addr, &reply);
            }
        }
        if c.is_allocated() {
            break;
        }
        net.now = c.poll_timeout().unwrap();
        c.handle_timeout(net.now);
    }
    assert!(c.is_allocated());
    assert_eq!(
        net.server.stats().allocations_created,
        1,
        "the retransmission reused it"
    );
}

#[test]
fn lifetime_is_clamped_to_the_maximum() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40007");
    let _c = net.allocated("hal", me);
    let req = signed_request(
        &mut net,
        me,
        REFRESH,
        vec![LifeTime::new(100_000).into()],
        "hal",
    );
    let reply = net.raw(me, &req).unwrap();
    let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
    match msg.get::<LifeTime>() {
        Some(StunAttribute::LifeTime(l)) => assert_eq!(l.as_u32(), 3600),
        other => panic!("{other:?}"),
    }
}

#[test]
fn second_allocation_on_a_five_tuple_gets_437_and_other_user_441() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40008");
    let first = net.allocated("ivan", me);
    let old_relayed = first.relayed_addr().unwrap();
    // On the wire: a second Allocate (new transaction) on a held 5-tuple is a 437 (RFC 8656 §7.2).
    let req = signed_request(
        &mut net,
        me,
        ALLOCATE,
        vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
        "ivan",
    );
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(437));
    // Another user cannot touch it: 441, to the Allocate and to the Refresh that would delete it.
    let mut other = net.client("mallory");
    other.allocate(net.now);
    let ev = net.drive(&mut other, me);
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                op: TurnOp::Allocate,
                code: Some(441),
                ..
            }]
        ),
        "{ev:?}"
    );
    let req = signed_request(
        &mut net,
        me,
        REFRESH,
        vec![LifeTime::new(0).into()],
        "mallory",
    );
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(441));
    assert_eq!(net.server.relayed_addr(me, net.now), Some(old_relayed));
    // Refresh without an allocation: 437.
    let stranger = sa("198.51.100.8:1");
    let req = signed_request(&mut net, stranger, REFRESH, vec![], "ivan");
    assert_eq!(error_code(&net.raw(stranger, &req).unwrap()), Some(437));
}

/// A host that restarts (crash, upgrade) behind a NAT that maps it to the same address finds
/// its previous run's allocation on the 5-tuple. With fresh credentials of the same user (a
/// REST-API username with a later expiry) the client deletes it and allocates again, instead of
/// being refused until the stale allocation's lifetime runs out.
#[test]
fn a_restarted_client_replaces_its_stale_allocation() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40010");
    let _stale = net.allocated("ivan", me);
    let c = creds::rest_credentials(SECRET, UNIX0 + 90_000, "ivan");
    let mut again = TurnClient::new(
        net.server_addr,
        TurnCredentials {
            username: c.username,
            password: c.password,
        },
        net.now,
    );
    again.allocate(net.now);
    let ev = net.drive(&mut again, me);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
        "{ev:?}"
    );
    let relayed = again.relayed_addr().unwrap();
    assert_eq!(net.server.relayed_addr(me, net.now), Some(relayed));
    assert_eq!(
        net.server.gauges(net.now).allocations,
        1,
        "the stale one is gone"
    );
    // Someone else's allocation on the 5-tuple stays: the Allocate fails with 437 after one try.
    let other_me = sa("198.51.100.7:40011");
    let _held = net.allocated("judy", other_me);
    let mut intruder = net.client("mallory");
    intruder.allocate(net.now);
    let ev = net.drive(&mut intruder, other_me);
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                op: TurnOp::Allocate,
                code: Some(441),
                ..
            }]
        ),
        "{ev:?}"
    );
}

/// Credentials rotate (the rendezvous hands out a username with a later expiry): the refresh of
/// the existing allocation under the new username is the same user and succeeds.
#[test]
fn a_refresh_under_a_renewed_username_of_the_same_user_succeeds() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40012");
    let _c = net.allocated("oscar", me);
    let c = creds::rest_credentials(SECRET, UNIX0 + 172_800, "oscar");
    let req = signed_request_with(&mut net, me, REFRESH, vec![LifeTime::new(600).into()], &c);
    let reply = net.raw(me, &req).unwrap();
    assert_eq!(error_code(&reply), None, "refresh refused");
}

#[test]
fn retransmitted_allocate_gets_the_same_answer() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40009");
    let req = signed_request(
        &mut net,
        me,
        ALLOCATE,
        vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
        "judy",
    );
    let first = net.raw(me, &req).unwrap();
    let second = net.raw(me, &req).unwrap();
    assert_eq!(error_code(&first), None);
    assert_eq!(first, second);
    assert_eq!(net.server.stats().allocations_created, 1);
}

#[test]
fn quota_and_capacity_are_enforced() {
    let mut net = Net::with(
        config(PeerPolicy::default()),
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50001,
            1,
        ),
    );
    let _a = net.allocated("kim", sa("198.51.100.7:1"));
    let mut again = net.client("kim");
    again.allocate(net.now);
    let ev = net.drive(&mut again, sa("198.51.100.7:2"));
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                code: Some(486),
                ..
            }]
        ),
        "{ev:?}"
    );
    let _b = net.allocated("lea", sa("198.51.100.7:3"));
    let mut third = net.client("max");
    third.allocate(net.now);
    let ev = net.drive(&mut third, sa("198.51.100.7:4"));
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                code: Some(508),
                ..
            }]
        ),
        "{ev:?}"
    );
    assert_eq!(
        (
            net.server.stats().quota_hits,
            net.server.stats().capacity_hits
        ),
        (1, 1)
    );
}

#[test]
fn wrong_integrity_is_401_and_stale_nonce_is_438() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40010");
    let mut bad = TurnClient::new(
        net.server_addr,
        TurnCredentials {
            username: format!("{}:x", UNIX0 + 999),
            password: "wrong".into(),
        },
        net.now,
    );
    bad.allocate(net.now);
    let ev = net.drive(&mut bad, me);
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                code: Some(401),
                ..
            }]
        ),
        "{ev:?}"
    );
    assert!(net.server.stats().auth_failures >= 1);
    // Expired REST credentials: 401 too.
    let old = creds::rest_credentials(SECRET, UNIX0 - 1, "old");
    let mut expired = TurnClient::new(
        net.server_addr,
        TurnCredentials {
            username: old.username,
            password: old.password,
        },
        net.now,
    );
    expired.allocate(net.now);
    let ev = net.drive(&mut expired, me);
    assert!(
        matches!(
            ev.as_slice(),
            [TurnEvent::Failed {
                code: Some(401),
                ..
            }]
        ),
        "{ev:?}"
    );
    // Tampered byte after signing: 401.
    let mut req = signed_request(
        &mut net,
        me,
        ALLOCATE,
        vec![
            RequestedTrasport::new(stun_rs::protocols::UDP).into(),
            LifeTime::new(700).into(),
        ],
        "nick",
    );
    let (_, r) = RawAttrs::new(&req).find(|(t, _)| *t == 0x000D).unwrap();
    req[r.start + 3] ^= 1;
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(401));
    // Stale nonce: the request signed now is refused after the nonce lifetime.
    let req = signed_request(
        &mut net,
        me,
        ALLOCATE,
        vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
        "nick",
    );
    net.advance(Duration::from_secs(601));
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(438));
    assert_eq!(net.server.stats().stale_nonces, 1);
    // The client recovers from 438 by itself.
    let mut c = net.allocated("nick", me);
    let req = signed_request(
        &mut net,
        me,
        REFRESH,
        vec![LifeTime::new(3600).into()],
        "nick",
    );
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), None);
    net.advance(Duration::from_secs(700));
    c.bind_channel(sa("192.0.2.50:1"), net.now).unwrap();
    let ev = net.drive(&mut c, me);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::ChannelBound { .. }]),
        "{ev:?}"
    );
    assert_eq!(net.server.stats().stale_nonces, 2);
}

#[test]
fn sha256_integrity_is_accepted_and_answered_in_kind() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40011");
    let mut c = net.client("olga");
    c.set_integrity_sha256(true);
    c.allocate(net.now);
    let ev = net.drive(&mut c, me);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
        "{ev:?}"
    );
    c.bind_channel(sa("192.0.2.60:1"), net.now).unwrap();
    assert!(matches!(
        net.drive(&mut c, me).as_slice(),
        [TurnEvent::ChannelBound { .. }]
    ));
}

#[test]
fn static_users_authenticate() {
    let mut net = Net::new();
    let mut c = TurnClient::new(
        net.server_addr,
        TurnCredentials {
            username: "static".into(),
            password: "pw".into(),
        },
        net.now,
    );
    c.allocate(net.now);
    assert!(matches!(
        net.drive(&mut c, sa("198.51.100.7:40012")).as_slice(),
        [TurnEvent::Allocated { .. }]
    ));
}

#[test]
fn bad_requests_get_400_420_442() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40013");
    let mut c = net.allocated("pat", me);
    // Channel number outside 0x4000-0x7FFF (the default accepts RFC 5766's range).
    for number in [0x3FFF, 0x8000, 0xFFFF] {
        let req = signed_request(
            &mut net,
            me,
            CHANNEL_BIND,
            vec![
                ChannelNumber::new(number).into(),
                XorPeerAddress::from(sa("192.0.2.1:1")).into(),
            ],
            "pat",
        );
        assert_eq!(
            error_code(&net.raw(me, &req).unwrap()),
            Some(400),
            "{number:#x}"
        );
    }
    // ChannelBind without a peer, CreatePermission without any.
    let req = signed_request(
        &mut net,
        me,
        CHANNEL_BIND,
        vec![ChannelNumber::new(0x4000).into()],
        "pat",
    );
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(400));
    let req = signed_request(&mut net, me, CREATE_PERMMISSION, vec![], "pat");
    assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(400));
    // An unknown RESERVATION-TOKEN: 508 (RFC 8656 §7.2); EVEN-PORT beside a token: 400;
    // DONT-FRAGMENT (which we cannot honour) with 420.
    let other = sa("198.51.100.7:40014");
    let req = signed_request(
        &mut net,
        other,
        ALLOCATE,
        vec![
            RequestedTrasport::new(stun_rs::protocols::UDP).into(),
            stun_rs::attributes::turn::ReservationToken::from([1u8; 8]).into(),
        ],
        "pat",
    );
    assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(508));
    let req = signed_request(
        &mut net,
        other,
        ALLOCATE,
        vec![
            RequestedTrasport::new(stun_rs::protocols::UDP).into(),
            stun_rs::attributes::turn::EvenPort::new(true).into(),
            stun_rs::attributes::turn::ReservationToken::from([1u8; 8]).into(),
        ],
        "pat",
    );
    assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(400));
    let req = signed_request(
        &mut net,
        other,
        ALLOCATE,
        vec![
            RequestedTrasport::new(stun_rs::protocols::UDP).into(),
            stun_rs::attributes::turn::DontFragment::default().into(),
        ],
        "pat",
    );
    assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(420));
    // EVEN-PORT without R: an even port.
    for k in 0..3u16 {
        let from = SocketAddr::new(other.ip(), 41000 + k);
        let req = signed_request(
            &mut net,
            from,
            ALLOCATE,
            vec![
                RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                stun_rs::attributes::turn::EvenPort::new(false).into(),
            ],
            "pat",
        );
        let reply = net.raw(from, &req).unwrap();
        let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
        match msg.get::<XorRelayedAddress>() {
            Some(StunAttribute::XorRelayedAddress(a)) => {
                assert_eq!(a.socket_address().port() % 2, 0)
            }
            other => panic!("{other:?}"),
        }
    }
    // TCP relaying is not offered.
    let mut req = signed_request(
        &mut net,
        other,
        ALLOCATE,
        vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()],
        "pat",
    );
    let (_, r) = RawAttrs::new(&req).find(|(t, _)| *t == 0x0019).unwrap();
    req[r.start] = 6; // TCP
    resign(&mut req, "pat");
    assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(442));
    // No REQUESTED-TRANSPORT.
    let req = signed_request(&mut net, other, ALLOCATE, vec![], "pat");
    assert_eq!(error_code(&net.raw(other, &req).unwrap()), Some(400));
    // ChannelData on a channel never bound, and from a stranger: silently dropped.
    let mut cd = [0u8; 8];
    let n = channeldata::encode(0x4321, b"zz", &mut cd).unwrap();
    assert_eq!(
        net.server
            .handle_client(net.now, me, &cd[..n], &mut net.out),
        ClientAction::None
    );
    assert_eq!(
        net.server
            .handle_client(net.now, other, &cd[..n], &mut net.out),
        ClientAction::None
    );
    assert_eq!(net.server.stats().unbound_channel, 2);
    // The allocation still works afterwards.
    c.bind_channel(sa("192.0.2.1:1"), net.now).unwrap();
    assert!(matches!(
        net.drive(&mut c, me).as_slice(),
        [TurnEvent::ChannelBound { .. }]
    ));
}

#[test]
fn strict_rfc8656_channel_range_refuses_0x5000() {
    let mut cfg = config(PeerPolicy::default());
    cfg.channel_max = channeldata::CHANNEL_MAX;
    let mut net = Net::with(
        cfg,
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("198.51.100.7:40019");
    let _c = net.allocated("strict", me);
    for (number, code) in [(0x4FFF, None), (0x5000, Some(400)), (0x7FFF, Some(400))] {
        let req = signed_request(
            &mut net,
            me,
            CHANNEL_BIND,
            vec![
                ChannelNumber::new(number).into(),
                XorPeerAddress::from(SocketAddr::new("192.0.2.1".parse().unwrap(), number)).into(),
            ],
            "strict",
        );
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), code, "{number:#x}");
    }
    let mut cd = [0u8; 8];
    cd[..4].copy_from_slice(&[0x50, 0x00, 0x00, 0x01]);
    assert_eq!(
        net.server
            .handle_client(net.now, me, &cd[..5], &mut net.out),
        ClientAction::None
    );
    assert_eq!(net.server.stats().malformed, 1);
}

#[test]
fn truncated_oversized_and_garbage_datagrams_are_dropped() {
    let mut net = Net::new();
    let me = sa("198.51.100.7:40015");
    let _c = net.allocated("quinn", me);
    let valid = signed_request(
        &mut net,
        me,
        REFRESH,
        vec![LifeTime::new(600).into()],
        "quinn",
    );
    for cut in [0, 1, 19, 20, 21, valid.len() - 1] {
        let _ = net
            .server
            .handle_client(net.now, me, &valid[..cut], &mut net.out);
    }
    let mut huge = vec![0u8; MAX_DATAGRAM];
    huge[..valid.len()].copy_from_slice(&valid);
    let _ = net.server.handle_client(net.now, me, &huge, &mut net.out);
    for garbage in [
        &b"\xff\xff\xff\xff\xff"[..],
        &[0x40, 0x00, 0xff, 0xff],
        &[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xa4, 0x42],
    ] {
        let _ = net.server.handle_client(net.now, me, garbage, &mut net.out);
    }
    assert!(net.server.stats().malformed >= 4);
    assert_eq!(net.server.gauges(net.now).allocations, 1);
}

#[test]
fn binding_is_answered_with_the_reflexive_address() {
    let mut net = Net::new();
    let me = sa("198.51.100.9:1234");
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).build();
    let mut buf = [0u8; 64];
    let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
    let reply = net.raw(me, &buf[..n]).unwrap();
    let (msg, _) = MessageDecoder::default().decode(&reply).unwrap();
    match msg.get::<XorMappedAddress>() {
        Some(StunAttribute::XorMappedAddress(a)) => assert_eq!(*a.socket_address(), me),
        other => panic!("{other:?}"),
    }
    assert!(reply.len() <= 32, "small answer");
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut net = Net::new();
    let me = sa("198.51.100.10:1");
    let msg = StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
        .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
        .build();
    let mut buf = [0u8; 64];
    let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
    let mut answered = 0;
    for _ in 0..1000 {
        if let Some(r) = net.raw(me, &buf[..n]) {
            assert_eq!(error_code(&r), Some(401));
            assert!(r.len() <= 90, "401 stays small: {}", r.len());
            answered += 1;
        }
    }
    assert_eq!(answered, 400, "burst of the unauthenticated limit");
    assert!(net.server.stats().rate_limited >= 600);
    // Another source is unaffected; the first recovers with time.
    assert!(net.raw(sa("198.51.100.11:1"), &buf[..n]).is_some());
    net.advance(Duration::from_secs(1));
    assert!(net.raw(me, &buf[..n]).is_some());
}

#[test]
fn request_rate_limit_is_per_source_and_spares_relayed_data() {
    let mut cfg = config(PeerPolicy::default());
    cfg.request_rate = Rate {
        per_sec: 5,
        burst: 5,
    };
    cfg.unauth_rate = Rate::UNLIMITED;
    let mut net = Net::with(
        cfg,
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("198.51.100.12:1");
    let peer = sa("192.0.2.80:1");
    let mut c = net.client("busy");
    c.allocate(net.now);
    net.drive(&mut c, me); // 2 requests (401 round trip)
    let ch = c.bind_channel(peer, net.now).unwrap();
    net.drive(&mut c, me); // 3rd request
    assert!(c.channel_for(peer).is_some());
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).build();
    let mut buf = [0u8; 64];
    let n = MessageEncoder::default().encode(&mut buf, &msg).unwrap();
    let answered = (0..10).filter(|_| net.raw(me, &buf[..n]).is_some()).count();
    assert_eq!(answered, 2, "burst of 5 minus the 3 TURN requests");
    assert!(net.server.stats().rate_limited >= 8);
    // Relayed data is not a request: it still flows.
    let mut cd = [0u8; 16];
    let n = channeldata::encode(ch, b"data", &mut cd).unwrap();
    for _ in 0..20 {
        assert!(matches!(
            net.server
                .handle_client(net.now, me, &cd[..n], &mut net.out),
            ClientAction::Relay { .. }
        ));
    }
    // Other sources are unaffected.
    assert!(net.raw(sa("198.51.100.13:1"), &buf[..20]).is_some());
}

#[test]
fn bandwidth_limit_drops_excess() {
    let mut cfg = config(PeerPolicy::default());
    cfg.bandwidth = Rate {
        per_sec: 10_000,
        burst: 10_000,
    };
    let mut net = Net::with(
        cfg,
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("198.51.100.7:40016");
    let peer = sa("192.0.2.70:1");
    let mut c = net.allocated("rob", me);
    let ch = c.bind_channel(peer, net.now).unwrap();
    net.drive(&mut c, me);
    let mut cd = [0u8; 1100];
    let n = channeldata::encode(ch, &[0u8; 1000], &mut cd).unwrap();
    let relayed = (0..20)
        .filter(|_| {
            matches!(
                net.server
                    .handle_client(net.now, me, &cd[..n], &mut net.out),
                ClientAction::Relay { .. }
            )
        })
        .count();
    assert_eq!(relayed, 10);
    assert_eq!(net.server.stats().bandwidth_dropped, 10);
}

#[test]
fn release_all_returns_every_port() {
    let mut net = Net::new();
    let _a = net.allocated("s1", sa("198.51.100.7:1"));
    let _b = net.allocated("s2", sa("198.51.100.7:2"));
    assert_eq!(net.server.allocator().in_use(), 2);
    net.server.release_all();
    assert_eq!(net.server.allocator().in_use(), 0);
    assert!(net.server.is_idle());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40017");
        let _ = net.server.handle_client(net.now, me, &bytes, &mut net.out);
        let relayed = sa("203.0.113.1:50000");
        let _ = net.server.handle_peer(net.now, relayed, sa("192.0.2.1:1"), &bytes, &mut net.out);
        let mut c = net.client("fuzz");
        let _ = c.handle_input(net.now, net.server_addr, &bytes);
    }

    #[test]
    fn mutated_requests_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
        let mut net = Net::new();
        let me = sa("198.51.100.7:40018");
        let _c = net.allocated("mut", me);
        let mut req = signed_request(&mut net, me, CHANNEL_BIND, vec![ChannelNumber::new(0x4000).into(), XorPeerAddress::from(sa("192.0.2.1:1")).into()], "mut");
        let p = pos % req.len();
        req[p] = val;
        let end = req.len() - cut % req.len();
        let _ = net.server.handle_client(net.now, me, &req[..end], &mut net.out);
    }

    #[test]
    fn xor_address_round_trip(v6 in any::<bool>(), a in any::<u128>(), port in any::<u16>(), txid in any::<[u8; 12]>()) {
        let ip = if v6 { IpAddr::V6(Ipv6Addr::from(a)) } else { IpAddr::V4(Ipv4Addr::from(a as u32)) };
        let addr = SocketAddr::new(ip, port);
        let mut buf = [0u8; 20];
        let n = encode_xor_addr(addr, &txid, &mut buf).unwrap();
        prop_assert_eq!(decode_xor_addr(&buf[..n], &txid), Some(addr));
    }
}

// ---- tenant limits and peer policy (issue 11), unauthenticated flood (issue 12) -------------

/// A client of `network` with key number `key` (a meshpunch REST user id `network.<16 hex>`).
fn member(net: &Net, network: &str, key: u32) -> TurnClient {
    net.client(&format!("{network}.{key:016x}"))
}

fn allocate_result(net: &mut Net, c: &mut TurnClient, from: SocketAddr) -> Result<(), Option<u16>> {
    c.allocate(net.now);
    match net.drive(c, from).as_slice() {
        [TurnEvent::Allocated { .. }] => Ok(()),
        [TurnEvent::Failed { code, .. }] => Err(*code),
        other => panic!("{other:?}"),
    }
}

/// Attack: one network token, 11 throw-away keys (11 usernames), 10 allocations each. The
/// quota is per network: allocations beyond it get 486, whatever the key.
#[test]
fn eleven_keys_of_one_network_hit_the_network_quota() {
    let pool = PortPool::new(
        vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
        50000,
        50999,
        10,
    )
    .with_network_limits(100, Rate::UNLIMITED);
    let mut net = Net::with(config(PeerPolicy::default()), pool);
    let (mut ok, mut refused) = (0, 0);
    for key in 0..11u32 {
        for k in 0..10u16 {
            let from = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, key as u8 + 1)),
                40000 + k,
            );
            let mut c = member(&net, "evil", key);
            match allocate_result(&mut net, &mut c, from) {
                Ok(()) => ok += 1,
                Err(Some(486)) => refused += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    }
    assert_eq!((ok, refused), (100, 10));
    assert_eq!(net.server.stats().network_quota_hits, 10);
    assert_eq!(net.server.stats().quota_hits, 0);
    // The 11th username of the network is refused; a member of another network is not.
    let mut other = member(&net, "office", 1);
    assert_eq!(
        allocate_result(&mut net, &mut other, sa("192.0.2.9:1")),
        Ok(())
    );
    // The username quota still holds inside a network: key 0 of "office" gets 10, not 11.
    for k in 0..10u16 {
        let mut c = member(&net, "office", 0);
        let r = allocate_result(
            &mut net,
            &mut c,
            SocketAddr::new(sa("192.0.2.10:1").ip(), 1 + k),
        );
        assert_eq!(r, Ok(()));
    }
    let mut c = member(&net, "office", 0);
    assert_eq!(
        allocate_result(&mut net, &mut c, sa("192.0.2.10:99")),
        Err(Some(486))
    );
    assert_eq!(net.server.stats().quota_hits, 1);
}

/// The relay's defaults are finite: a config built with `ServerConfig::new` limits an
/// allocation's bandwidth (it used to be unlimited).
#[test]
fn bandwidth_is_limited_by_default() {
    let cfg = config(PeerPolicy::default());
    assert_eq!(cfg.bandwidth, crate::turn::DEFAULT_ALLOCATION_BANDWIDTH);
    assert!(cfg.bandwidth.per_sec > 0);
}

/// Attack: traffic above the per-allocation limit (the default one) is dropped and counted;
/// two allocations of one network together above the network limit likewise.
#[test]
fn traffic_above_the_allocation_and_network_limits_is_dropped_and_counted() {
    let pool = PortPool::new(
        vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
        50000,
        50009,
        10,
    )
    .with_network_limits(
        100,
        Rate {
            per_sec: 1_000_000,
            burst: 3_000_000,
        },
    );
    let mut net = Net::with(config(PeerPolicy::default()), pool);
    let peer = sa("192.0.2.70:1");
    let (ma, mb) = (sa("198.51.100.7:1"), sa("198.51.100.8:1"));
    let mut a = net.client(&format!("acme.{:016x}", 1));
    allocate_result(&mut net, &mut a, ma).unwrap();
    let mut b = net.client(&format!("acme.{:016x}", 2));
    allocate_result(&mut net, &mut b, mb).unwrap();
    let cha = a.bind_channel(peer, net.now).unwrap();
    net.drive(&mut a, ma);
    let chb = b.bind_channel(peer, net.now).unwrap();
    net.drive(&mut b, mb);
    let mut cd = vec![0u8; 1300];
    let send = |net: &mut Net, from: SocketAddr, ch: u16, cd: &mut Vec<u8>, count: usize| {
        let n = channeldata::encode(ch, &[0u8; 1200], cd).unwrap();
        (0..count)
            .filter(|_| {
                matches!(
                    net.server
                        .handle_client(net.now, from, &cd[..n], &mut net.out),
                    ClientAction::Relay { .. }
                )
            })
            .count()
    };
    // Per allocation (default burst 2.5 MB): 2,500 datagrams of 1,200 B pass at one instant
    // of the 2,500,000 / 1200 = 2083 that fit; the rest is dropped and counted.
    let passed_a = send(&mut net, ma, cha, &mut cd, 2_500);
    assert_eq!(passed_a, 2_500_000 / 1200);
    assert_eq!(
        net.server.stats().bandwidth_dropped,
        (2_500 - passed_a) as u64
    );
    // B's own bucket is full, but the network's 3 MB burst is nearly spent by A.
    let passed_b = send(&mut net, mb, chb, &mut cd, 1_000);
    assert_eq!(passed_a + passed_b, 3_000_000 / 1200);
    assert_eq!(
        net.server.stats().network_bandwidth_dropped,
        (1_000 - passed_b) as u64
    );
    // Peer → client traffic draws from the same buckets.
    let ra = a.relayed_addr().unwrap();
    assert_eq!(
        net.server
            .handle_peer(net.now, ra, peer, &[0u8; 1200], &mut net.out),
        PeerAction::Drop
    );
}

fn peer_attr(addr: SocketAddr) -> StunAttribute {
    XorPeerAddress::from(addr).into()
}

/// Attack: a permission to the relay's own IP on a port that is no live allocation's relayed
/// address is refused (403) and counted; the live allocation's port is fine.
#[test]
fn permission_to_own_ip_without_a_live_allocation_is_refused_and_counted() {
    let own = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
    let mut cfg = config(PeerPolicy {
        own_addrs: vec![own],
        ..Default::default()
    });
    cfg.self_relay_ports = Some((50000, 50009));
    let mut net = Net::with(cfg, PortPool::new(vec![own], 50000, 50009, 0));
    let (ma, mb) = (sa("198.51.100.7:1"), sa("198.51.100.8:1"));
    let mut a = net.allocated("a", ma);
    let _b = net.allocated("b", mb);
    let ra = a.relayed_addr().unwrap();
    let relay_self = DENY_LABELS.iter().position(|l| *l == "relay_self").unwrap();
    let free = (50000..=50009)
        .map(|p| SocketAddr::new(own, p))
        .find(|p| *p != ra && net.server.relayed_addr(mb, net.now) != Some(*p))
        .unwrap();
    for target in [free, SocketAddr::new(own, 3478), SocketAddr::new(own, 22)] {
        let before = net.server.stats().denied[relay_self];
        let req = signed_request(
            &mut net,
            mb,
            CREATE_PERMMISSION,
            vec![peer_attr(target)],
            "b",
        );
        let reply = net.raw(mb, &req).unwrap();
        assert_eq!(error_code(&reply), Some(403), "{target}");
        assert_eq!(
            net.server.stats().denied[relay_self],
            before + 1,
            "{target}"
        );
        let req = signed_request(
            &mut net,
            mb,
            CHANNEL_BIND,
            vec![peer_attr(target), ChannelNumber::new(0x4001).into()],
            "b",
        );
        assert_eq!(
            error_code(&net.raw(mb, &req).unwrap()),
            Some(403),
            "{target}"
        );
    }
    // A's live relayed address is a fine peer.
    let req = signed_request(&mut net, mb, CREATE_PERMMISSION, vec![peer_attr(ra)], "b");
    assert_eq!(error_code(&net.raw(mb, &req).unwrap()), None);
    // Once A's allocation ends, its port is refused again.
    a.release(net.now);
    net.drive(&mut a, ma);
    let req = signed_request(&mut net, mb, CREATE_PERMMISSION, vec![peer_attr(ra)], "b");
    assert_eq!(error_code(&net.raw(mb, &req).unwrap()), Some(403));
}

/// Attack: a `denied_peers` CIDR reached through every IPv6 spelling of an address inside it,
/// in CreatePermission, ChannelBind and Send: refused and counted as `denied`.
#[test]
fn denied_peers_are_refused_in_every_spelling() {
    let cfg = config(PeerPolicy {
        denied: vec!["192.0.2.0/24".parse().unwrap()],
        ..Default::default()
    });
    let mut net = Net::with(
        cfg,
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        ),
    );
    let me = sa("198.51.100.7:1");
    let mut c = net.allocated("eve", me);
    let denied = DENY_LABELS.iter().position(|l| *l == "denied").unwrap();
    // 192.0.2.80 = c000:0250; Teredo stores it inverted: 3fff:fdaf.
    let spellings = [
        "192.0.2.80",
        "::ffff:192.0.2.80",
        "::ffff:0:192.0.2.80",
        "::192.0.2.80",
        "2002:c000:250::1",
        "64:ff9b::192.0.2.80",
        "64:ff9b:1::192.0.2.80",
        "2001:0:4136:e378:8000:63bf:3fff:fdaf",
    ];
    for (k, s) in spellings.iter().enumerate() {
        let ip: IpAddr = s.parse().unwrap();
        let target = SocketAddr::new(ip, 9);
        let before = net.server.stats().denied[denied];
        let req = signed_request(
            &mut net,
            me,
            CREATE_PERMMISSION,
            vec![peer_attr(target)],
            "eve",
        );
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(403), "{s}");
        let req = signed_request(
            &mut net,
            me,
            CHANNEL_BIND,
            vec![
                peer_attr(target),
                ChannelNumber::new(0x4000 + k as u16).into(),
            ],
            "eve",
        );
        assert_eq!(error_code(&net.raw(me, &req).unwrap()), Some(403), "{s}");
        assert_eq!(net.server.stats().denied[denied], before + 2, "{s}");
    }
    // A public neighbour outside the CIDR is fine, and nothing was installed for the denied one.
    c.create_permission("192.0.3.80".parse().unwrap(), net.now)
        .unwrap();
    assert!(matches!(
        net.drive(&mut c, me).as_slice(),
        [TurnEvent::PermissionCreated { .. }]
    ));
    let mut buf = [0u8; 128];
    let n = c.encode_send(sa("192.0.2.80:9"), b"x", &mut buf).unwrap();
    assert_eq!(
        net.server
            .handle_client(net.now, me, &buf[..n], &mut net.out),
        ClientAction::None
    );
}

/// Attack: 100,000 unauthenticated requests from 100,000 distinct (spoofed) sources fill the
/// per-source table; then a real client from a new address still gets its 401 and allocates,
/// and every insert into the full table examined at most EVICTION_SAMPLE entries.
#[test]
fn flood_from_100k_spoofed_sources_does_not_lock_out_a_real_client() {
    let mut net = Net::new();
    let mut probe = net.client("probe");
    probe.allocate(net.now);
    let unauth = probe.poll_transmit().unwrap().payload;
    let mut answered = 0;
    for i in 0..100_000u32 {
        let from = SocketAddr::new(IpAddr::from((0x0b00_0000u32 + i).to_be_bytes()), 5000);
        if net.raw(from, &unauth).is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 100_000, "every new source gets its challenge");
    let table = net.server.unauth_limit.clone();
    assert!(table.len() <= table.capacity());
    let inserts_into_full = table.evictions();
    assert!(inserts_into_full > 0);
    assert_eq!(table.probes(), inserts_into_full * EVICTION_SAMPLE as u64);
    // The real client, same instant.
    let me = sa("198.51.100.200:4000");
    let mut c = net.client("alice");
    c.allocate(net.now);
    let t = c.poll_transmit().unwrap();
    let reply = net.raw(me, &t.payload).expect("401 for the real client");
    assert_eq!(error_code(&reply), Some(401));
    assert_eq!(
        c.handle_input(net.now, net.server_addr, &reply),
        Input::Consumed
    );
    let ev = net.drive(&mut c, me);
    assert!(
        matches!(ev.as_slice(), [TurnEvent::Allocated { .. }]),
        "{ev:?}"
    );
}

/// The per-source tables are per process: two cores built with the same `SharedLimits` (two
/// workers) share one source's budget.
#[test]
fn rate_limits_are_shared_between_workers() {
    let mut cfg = config(PeerPolicy::default());
    cfg.unauth_rate = Rate {
        per_sec: 1,
        burst: 4,
    };
    let limits = crate::turn::SharedLimits::new(&cfg);
    let now = Instant::now();
    let pool = || {
        PortPool::new(
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
            50000,
            50009,
            0,
        )
    };
    let mut w1 = TurnServer::with_limits(cfg.clone(), pool(), limits.clone(), now, UNIX0);
    let mut w2 = TurnServer::with_limits(cfg, pool(), limits, now, UNIX0);
    let net = Net::new();
    let mut probe = net.client("probe");
    probe.allocate(now);
    let unauth = probe.poll_transmit().unwrap().payload;
    let from = sa("198.51.100.1:1");
    let mut out = vec![0u8; 1500];
    let mut answers = 0;
    for k in 0..10 {
        let w = if k % 2 == 0 { &mut w1 } else { &mut w2 };
        if matches!(
            w.handle_client(now, from, &unauth, &mut out),
            ClientAction::Reply(_)
        ) {
            answers += 1;
        }
    }
    assert_eq!(answers, 4, "one burst for the process, not one per worker");
}

fn allocate_reply(net: &mut Net, from: SocketAddr, attrs: Vec<StunAttribute>) -> StunMessage {
    let mut all: Vec<StunAttribute> = vec![RequestedTrasport::new(stun_rs::protocols::UDP).into()];
    all.extend(attrs);
    let req = signed_request(net, from, ALLOCATE, all, "rtp");
    let reply = net.raw(from, &req).unwrap();
    MessageDecoder::default().decode(&reply).unwrap().0
}

fn relayed_of(msg: &StunMessage) -> Option<SocketAddr> {
    match msg.get::<XorRelayedAddress>() {
        Some(StunAttribute::XorRelayedAddress(a)) => Some(*a.socket_address()),
        _ => None,
    }
}

fn code_of(msg: &StunMessage) -> Option<u16> {
    match msg.get::<ErrorCode>() {
        Some(StunAttribute::ErrorCode(e)) => Some(e.error_code().error_code()),
        _ => None,
    }
}

fn token_of(msg: &StunMessage) -> Option<[u8; 8]> {
    match msg.get::<ReservationToken>() {
        Some(StunAttribute::ReservationToken(t)) => t.token().try_into().ok(),
        _ => None,
    }
}

#[test]
fn even_port_with_r_bit_reserves_the_next_port_under_a_token() {
    // What turnutils_uclient does in its default RTP/RTCP mode.
    let mut net = Net::new();
    let rtp = sa("198.51.100.7:41000");
    let rtcp = sa("198.51.100.7:41001");
    let first = allocate_reply(
        &mut net,
        rtp,
        vec![stun_rs::attributes::turn::EvenPort::new(true).into()],
    );
    let even = relayed_of(&first).expect("even port allocated");
    assert_eq!(even.port() % 2, 0);
    let token = token_of(&first).expect("RESERVATION-TOKEN in the answer");
    assert_eq!(net.server.allocator().reserved(), 1);
    // The reserved port is not handed to anyone else meanwhile.
    for k in 0..8u16 {
        let m = allocate_reply(&mut net, sa(&format!("192.0.2.9:{}", 42000 + k)), vec![]);
        if let Some(r) = relayed_of(&m) {
            assert_ne!(r.port(), even.port() + 1);
        }
    }
    // The token gets exactly the next port, once.
    let second = allocate_reply(&mut net, rtcp, vec![ReservationToken::from(token).into()]);
    assert_eq!(
        relayed_of(&second),
        Some(SocketAddr::new(even.ip(), even.port() + 1))
    );
    let again = allocate_reply(
        &mut net,
        sa("198.51.100.7:41002"),
        vec![ReservationToken::from(token).into()],
    );
    assert_eq!(code_of(&again), Some(508));
    assert_eq!(net.server.allocator().reserved(), 0);
}

#[test]
fn a_reservation_expires_after_30_seconds() {
    let mut net = Net::new();
    let first = allocate_reply(
        &mut net,
        sa("198.51.100.7:41000"),
        vec![stun_rs::attributes::turn::EvenPort::new(true).into()],
    );
    let token = token_of(&first).unwrap();
    let even = relayed_of(&first).unwrap();
    net.advance(RESERVATION_LIFETIME + Duration::from_secs(1));
    let late = allocate_reply(
        &mut net,
        sa("198.51.100.7:41001"),
        vec![ReservationToken::from(token).into()],
    );
    assert_eq!(relayed_of(&late), None);
    let expired = net.server.allocator_mut().expire_reservations(net.now);
    // The driver learns which reserved address to close.
    assert_eq!(expired, vec![SocketAddr::new(even.ip(), even.port() + 1)]);
    assert_eq!(net.server.allocator().reserved(), 0);
}

#[test]
fn ports_busy_on_the_host_are_skipped_not_reported_as_capacity() {
    // 200 ports, the first 150 held by another program: the old allocator gave up after 64
    // failed binds and answered 508.
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
    let mut pool = PortPool::new(vec![ip], 50000, 50199, 0);
    let t = Tenant::of("1:net.0123456789abcdef", true);
    let now = Instant::now();
    let busy = |a: SocketAddr| a.port() < 50150;
    let mut tried = 0;
    let r = pool
        .reserve(&t, Family::V4, PortRequest::Any, now, |a| {
            tried += 1;
            !busy(a)
        })
        .expect("a free port is found behind 150 busy ones");
    assert_eq!(r.relayed.port(), 50150);
    assert_eq!(tried, 151);
    // Busy ports are remembered: the next allocation does not try them again.
    let mut tried = 0;
    let r = pool
        .reserve(&t, Family::V4, PortRequest::Any, now, |a| {
            tried += 1;
            !busy(a)
        })
        .unwrap();
    assert_eq!((r.relayed.port(), tried), (50151, 1));
    // After BUSY_RETRY they are tried again.
    let later = now + BUSY_RETRY + Duration::from_secs(1);
    let mut seen = Vec::new();
    let _ = pool.reserve(&t, Family::V4, PortRequest::Any, later, |a| {
        seen.push(a.port());
        true
    });
    assert_eq!(seen, vec![50152]);
    // Every port busy: capacity, after one bounded scan.
    let mut full = PortPool::new(vec![ip], 50000, 50199, 0);
    let mut tried = 0;
    assert_eq!(
        full.reserve(&t, Family::V4, PortRequest::Any, now, |_| {
            tried += 1;
            false
        })
        .unwrap_err(),
        AllocateError::Capacity
    );
    assert_eq!(tried, 200);
}

proptest! {
    #[test]
    fn even_reservations_never_hand_out_a_port_twice(ops in proptest::collection::vec(0u8..4, 1..60)) {
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
        let mut pool = PortPool::new(vec![ip], 50000, 50015, 0);
        let t = Tenant::of("1:net.0123456789abcdef", true);
        let now = Instant::now();
        let mut held: HashSet<SocketAddr> = HashSet::new();
        let mut tokens = Vec::new();
        for op in ops {
            let req = match op {
                0 => PortRequest::Any,
                1 => PortRequest::Even,
                2 => PortRequest::EvenReserveNext,
                _ => match tokens.pop() { Some(t) => PortRequest::Token(t), None => PortRequest::Any },
            };
            if let Ok(r) = pool.reserve(&t, Family::V4, req, now, |_| true) {
                prop_assert!(held.insert(r.relayed), "{:?} handed out twice", r.relayed);
                if let Some((tok, next)) = r.reserved_next {
                    prop_assert!(!held.contains(&next));
                    prop_assert_eq!(next.port(), r.relayed.port() + 1);
                    tokens.push(tok);
                }
                if matches!(req, PortRequest::Even | PortRequest::EvenReserveNext) {
                    prop_assert_eq!(r.relayed.port() % 2, 0);
                }
            }
        }
    }
}
