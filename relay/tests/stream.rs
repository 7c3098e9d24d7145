//! TURN over TCP and TLS against the real relay on loopback: a TURN client (the sans-IO
//! `proto::turn_client`) framed over a real TCP or TLS stream, peers on real UDP sockets.
//! The attacks of issue 17: a stream client must meet the same peer policy as a UDP one, and
//! bad stream input (framing errors, stalled frames, idle floods, slow handshakes) closes only
//! the connection it came on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshpunch_proto::turn::stream::{encode_channel_data, FrameKind, StreamFramer};
use meshpunch_proto::turn_client::{Input, TurnClient, TurnEvent};
use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};
use meshpunch_relay::Relay;

fn config(
    slot: u16,
    allow_loopback: bool,
    tls: Option<(&std::path::Path, &std::path::Path)>,
    file: FileConfig,
) -> RelayConfig {
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        ports: Some(port_range(slot)),
        realm: Some("meshpunch.test".into()),
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: allow_loopback,
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_listen: tls.map(|_| "127.0.0.1:0".parse().unwrap()),
        cert: tls.map(|(c, _)| c.to_path_buf()),
        key: tls.map(|(_, k)| k.to_path_buf()),
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

/// A TURN client over a byte stream: the sans-IO client's datagrams framed for a stream
/// (ChannelData padded to 4), answers cut by the proto framer.
struct StreamTurn<S: Read + Write> {
    client: TurnClient,
    stream: S,
    framer: StreamFramer,
    backlog: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<TurnEvent>,
    server: SocketAddr,
}

impl<S: Read + Write> StreamTurn<S> {
    fn new(stream: S, server: SocketAddr, user: &str) -> Self {
        StreamTurn {
            client: TurnClient::new(server, rest_creds(SECRET, user), Instant::now()),
            stream,
            framer: StreamFramer::default(),
            backlog: VecDeque::new(),
            events: VecDeque::new(),
            server,
        }
    }

    fn flush(&mut self) {
        while let Some(t) = self.client.poll_transmit() {
            let bytes = if t.payload.first().is_some_and(|b| b & 0xC0 == 0x40) {
                let ch = u16::from_be_bytes([t.payload[0], t.payload[1]]);
                let mut out = vec![0u8; t.payload.len() + 4];
                let n = encode_channel_data(ch, &t.payload[4..], &mut out).unwrap();
                out.truncate(n);
                out
            } else {
                t.payload
            };
            self.stream.write_all(&bytes).unwrap();
        }
        self.stream.flush().unwrap();
    }

    /// Reads once (with the socket's timeout); false when the server closed the stream.
    fn pump(&mut self) -> bool {
        self.flush();
        let space = self.framer.read_space();
        let n = match self.stream.read(space) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.client.handle_timeout(Instant::now());
                return true;
            }
            Err(_) => return false,
        };
        self.framer.commit(n);
        while let Some(f) = self.framer.next_frame().unwrap() {
            let kind = f.kind;
            let bytes = f.bytes.to_vec();
            if let Input::Data { peer, range } =
                self.client
                    .handle_input(Instant::now(), self.server, &bytes)
            {
                self.backlog.push_back((peer, bytes[range].to_vec()));
            } else if kind == FrameKind::ChannelData {
                panic!("ChannelData the client did not take");
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push_back(e);
        }
        true
    }

    fn event(&mut self, pred: impl Fn(&TurnEvent) -> bool) -> TurnEvent {
        let end = Instant::now() + T;
        while Instant::now() < end {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| pred(e) || matches!(e, TurnEvent::Failed { .. }))
            {
                return self.events.remove(i).unwrap();
            }
            assert!(self.pump(), "server closed the stream");
        }
        panic!("no event");
    }

    fn allocate(&mut self) -> SocketAddr {
        self.client.allocate(Instant::now());
        match self.event(|e| matches!(e, TurnEvent::Allocated { .. })) {
            TurnEvent::Allocated { relayed, .. } => relayed,
            other => panic!("{other:?}"),
        }
    }

    /// CreatePermission for `peer`: Ok, or the error code.
    fn permit(&mut self, peer: SocketAddr) -> Result<(), Option<u16>> {
        self.client
            .create_permission(peer.ip(), Instant::now())
            .unwrap();
        match self.event(|e| matches!(e, TurnEvent::PermissionCreated { .. })) {
            TurnEvent::PermissionCreated { .. } => Ok(()),
            TurnEvent::Failed { code, .. } => Err(code),
            other => panic!("{other:?}"),
        }
    }

    fn bind(&mut self, peer: SocketAddr) -> Result<u16, Option<u16>> {
        self.client.bind_channel(peer, Instant::now()).unwrap();
        match self.event(|e| matches!(e, TurnEvent::ChannelBound { .. })) {
            TurnEvent::ChannelBound { channel, .. } => Ok(channel),
            TurnEvent::Failed { code, .. } => Err(code),
            other => panic!("{other:?}"),
        }
    }

    fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut out = vec![0u8; data.len() + 64];
        let n = self.client.encode_send(peer, data, &mut out).unwrap();
        out.truncate(n);
        let bytes = if out[0] & 0xC0 == 0x40 {
            let mut padded = vec![0u8; n + 4];
            let m =
                encode_channel_data(u16::from_be_bytes([out[0], out[1]]), &out[4..], &mut padded)
                    .unwrap();
            padded.truncate(m);
            padded
        } else {
            out
        };
        self.stream.write_all(&bytes).unwrap();
        self.stream.flush().unwrap();
    }

    fn recv(&mut self) -> (SocketAddr, Vec<u8>) {
        let end = Instant::now() + T;
        while Instant::now() < end {
            if let Some(d) = self.backlog.pop_front() {
                return d;
            }
            assert!(self.pump(), "server closed the stream");
        }
        panic!("nothing relayed");
    }
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends, relays back, and checks both directions with Send/Data indications and a channel.
fn relay_both_ways<S: Read + Write>(c: &mut StreamTurn<S>, relayed: SocketAddr) {
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    let mut buf = [0u8; 2048];
    c.permit(peer_addr).unwrap();
    c.send(peer_addr, b"send indication over a stream");
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"send indication over a stream"[..], relayed)
    );
    peer.send_to(b"data indication down the stream", relayed)
        .unwrap();
    assert_eq!(
        c.recv(),
        (peer_addr, b"data indication down the stream".to_vec())
    );
    c.bind(peer_addr).unwrap();
    // Odd lengths: the stream padding must be written and skipped on both sides.
    for i in 0..50usize {
        let msg = vec![i as u8; 1 + i * 7];
        c.send(peer_addr, &msg);
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&msg[..], relayed));
        let back = vec![i as u8 ^ 0xFF; 3 + i * 5];
        peer.send_to(&back, relayed).unwrap();
        assert_eq!(c.recv(), (peer_addr, back));
    }
}

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + T;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn tcp_client_relays_both_ways_and_its_allocation_ends_with_the_connection() {
    let relay = Relay::start(config(0, true, None, FileConfig::default())).unwrap();
    let server = relay.tcp_addr().unwrap();
    let mut c = StreamTurn::new(tcp(server), server, &format!("tcp.{:016x}", 1));
    let relayed = c.allocate();
    assert_eq!(relayed.ip(), server.ip());
    assert_eq!(relay.ports_in_use(), 1);
    relay_both_ways(&mut c, relayed);
    drop(c);
    assert!(
        wait_for(|| relay.ports_in_use() == 0),
        "closing the connection frees the allocation"
    );
}

fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let g = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, g.cert.pem()).unwrap();
    std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
    (cert, key, g.cert.der().to_vec())
}

fn tls_client(
    addr: SocketAddr,
    der: &[u8],
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "relay.test".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp(addr))
}

#[test]
fn tls_13_and_12_clients_relay_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let relay = Relay::start(config(1, true, Some((&cert, &key)), FileConfig::default())).unwrap();
    let server = relay.tls_addr().unwrap();
    for (k, v) in [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .enumerate()
    {
        let mut c = StreamTurn::new(
            tls_client(server, &der, v),
            server,
            &format!("tls.{k:016x}"),
        );
        let relayed = c.allocate();
        relay_both_ways(&mut c, relayed);
        assert_eq!(c.stream.conn.protocol_version(), Some(v.version));
    }
}

/// Attack (coturn once shipped a TCP path that skipped its address checks): over TCP, a
/// permission or channel to a denied CIDR, loopback, the relay's own listening ports (UDP and
/// TCP) or a relayed port without a live allocation is refused with 403, exactly as over UDP;
/// a live allocation's relayed address (allocation to allocation) still works.
#[test]
fn stream_client_cannot_reach_denied_peers_loopback_or_the_relays_own_addresses() {
    let relay = Relay::start(config(
        2,
        false,
        None,
        FileConfig {
            denied_peers: Some(vec!["192.0.2.0/24".into()]),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.tcp_addr().unwrap();
    let mut c = StreamTurn::new(tcp(server), server, &format!("evil.{:016x}", 2));
    let relayed = c.allocate();
    for denied in [
        "192.0.2.7:9",
        "[::ffff:192.0.2.7]:9",
        "127.0.0.2:9",
        "[::ffff:127.0.0.2]:9",
    ] {
        let p: SocketAddr = denied.parse().unwrap();
        assert_eq!(c.bind(p), Err(Some(403)), "{denied}");
    }
    assert_eq!(c.permit("192.0.2.7:9".parse().unwrap()), Err(Some(403)));
    assert_eq!(c.permit("127.0.0.2:9".parse().unwrap()), Err(Some(403)));
    // Own addresses: the UDP and TCP listening ports, a free relayed port.
    let free_relayed = SocketAddr::new(
        relayed.ip(),
        if relayed.port() % 2 == 0 {
            relayed.port() + 1
        } else {
            relayed.port() - 1
        },
    );
    for own in [relay.listen_addr(), server, free_relayed] {
        assert_eq!(c.bind(own), Err(Some(403)), "{own}");
    }
    // Control: another live allocation's relayed address (over UDP) is reachable.
    let mut other = meshpunch_relay::client::TurnSocket::new(
        any_local(),
        relay.listen_addr(),
        rest_creds(SECRET, &format!("ok.{:016x}", 2)),
    )
    .unwrap();
    let other_relayed = other.allocate(T).unwrap();
    assert!(c.bind(other_relayed).is_ok());
}

fn read_closed(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + within;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Whether the relay has closed `s` already (non-blocking look).
fn closed_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

fn binding_request(tag: u8) -> Vec<u8> {
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[tag; 12]);
    req
}

/// Bad input on one connection closes that connection only: a bad first byte, a ChannelData
/// whose length runs past what is sent (a stalled half-sent frame), a message split across
/// many reads (answered), a TLS port that never sees a handshake.
#[test]
fn bad_stream_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let relay = Relay::start(config(
        3,
        true,
        Some((&cert, &key)),
        FileConfig {
            stream_stall_timeout: Some(1),
            stream_first_message_timeout: Some(2),
            tls_handshake_timeout: Some(1),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.tcp_addr().unwrap();
    // A client that keeps working through all of it.
    let mut good = StreamTurn::new(tcp(server), server, &format!("good.{:016x}", 3));
    let relayed = good.allocate();

    let mut bad = tcp(server);
    bad.write_all(&[0xC0, 0, 0, 0]).unwrap();
    assert!(
        read_closed(&mut bad, Duration::from_secs(2)),
        "bad first byte closes"
    );

    let mut stalled = tcp(server);
    stalled.write_all(&binding_request(1)).unwrap();
    stalled
        .write_all(&[0x40, 0x00, 0x01, 0x00, 1, 2, 3])
        .unwrap();
    assert!(
        read_closed(&mut stalled, Duration::from_secs(4)),
        "stalled half frame closes"
    );

    let mut split = tcp(server);
    for b in binding_request(2) {
        split.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut f = StreamFramer::default();
    let end = Instant::now() + T;
    let answer = loop {
        assert!(Instant::now() < end, "no Binding answer");
        let space = f.read_space();
        if let Ok(n) = split.read(space) {
            assert!(n > 0);
            f.commit(n);
        }
        if let Some(fr) = f.next_frame().unwrap() {
            break fr.bytes.to_vec();
        }
    };
    assert_eq!(
        &answer[..2],
        &[0x01, 0x01],
        "Binding success over a split message"
    );

    let mut no_handshake = tcp(relay.tls_addr().unwrap());
    assert!(
        read_closed(&mut no_handshake, Duration::from_secs(4)),
        "handshake timeout closes"
    );

    let mut idle = tcp(server);
    assert!(
        read_closed(&mut idle, Duration::from_secs(5)),
        "no first message closes"
    );

    // The good client and a new TLS client are unaffected.
    relay_both_ways(&mut good, relayed);
    let tls_server = relay.tls_addr().unwrap();
    let mut t = StreamTurn::new(
        tls_client(tls_server, &der, &rustls::version::TLS13),
        tls_server,
        &format!("good.{:016x}", 4),
    );
    t.allocate();
}

/// 10,000 idle TCP connections: beyond the connection cap they are closed at once, the rest
/// after the first-message timeout; a real client then allocates as usual.
#[test]
fn ten_thousand_idle_connections_do_not_lock_out_a_client() {
    let relay = Relay::start(config(
        4,
        true,
        None,
        FileConfig {
            stream_max_connections: Some(2_000),
            stream_first_message_timeout: Some(2),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.tcp_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..10_000 {
        match TcpStream::connect(server) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect: {e}"),
        }
        // Rejected connections are closed by the relay: drop ours so descriptors stay bounded.
        if idle.len() >= 4_000 && idle.len() % 500 == 0 {
            idle.retain_mut(|s| !closed_now(s));
        }
    }
    // All closed by the relay within the first-message timeout (+ slack).
    let end = Instant::now() + Duration::from_secs(10);
    while !idle.is_empty() && Instant::now() < end {
        idle.retain_mut(|s| !closed_now(s));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(idle.is_empty(), "{} connections still open", idle.len());
    let mut c = StreamTurn::new(tcp(server), server, &format!("real.{:016x}", 5));
    c.allocate();
}

/// A client that stops reading while its peer floods: the relay queues at most
/// `stream_write_queue` messages for it and drops the rest (never unbounded memory); once the
/// client reads again the connection still works.
#[test]
fn a_client_that_does_not_read_gets_drops_not_unbounded_queues() {
    let relay = Relay::start(config(
        5,
        true,
        None,
        FileConfig {
            stream_write_queue: Some(8),
            bandwidth_limit: Some(0),
            network_bandwidth_limit: Some(0),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.tcp_addr().unwrap();
    let mut c = StreamTurn::new(tcp(server), server, &format!("slow.{:016x}", 6));
    let relayed = c.allocate();
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    c.bind(peer_addr).unwrap();
    let sent = 20_000usize;
    let payload = [0x5Au8; 1000];
    for _ in 0..sent {
        let _ = peer.send_to(&payload, relayed);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut got = 0usize;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        match c.backlog.pop_front() {
            Some((from, data)) => {
                assert_eq!((from, data.len()), (peer_addr, 1000));
                got += 1;
            }
            None => {
                assert!(c.pump(), "connection must stay open");
            }
        }
    }
    assert!(
        got > 0 && got < sent,
        "received {got} of {sent}: the queue must drop, not grow"
    );
    // Still usable afterwards.
    peer.send_to(b"after the flood", relayed).unwrap();
    loop {
        let (from, data) = c.recv();
        if data == b"after the flood" {
            assert_eq!(from, peer_addr);
            break;
        }
    }
}

/// TLS handshakes are bounded in count: with `tls_max_handshakes = 2` and two handshakes
/// pending, a third connection is closed at once; once the slow ones time out, a real TLS
/// client gets in.
#[test]
fn tls_handshakes_beyond_the_limit_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let relay = Relay::start(config(
        6,
        true,
        Some((&cert, &key)),
        FileConfig {
            tls_max_handshakes: Some(2),
            tls_handshake_timeout: Some(2),
            ..Default::default()
        },
    ))
    .unwrap();
    let server = relay.tls_addr().unwrap();
    let mut slow: Vec<TcpStream> = (0..2).map(|_| tcp(server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = tcp(server);
    assert!(
        read_closed(&mut third, Duration::from_secs(1)),
        "third handshake refused at once"
    );
    for s in slow.iter_mut() {
        assert!(!closed_now(s), "pending handshakes are not cut short");
    }
    for s in slow.iter_mut() {
        assert!(
            read_closed(s, Duration::from_secs(4)),
            "slow handshakes time out"
        );
    }
    let mut c = StreamTurn::new(
        tls_client(server, &der, &rustls::version::TLS13),
        server,
        &format!("late.{:016x}", 7),
    );
    c.allocate();
}
