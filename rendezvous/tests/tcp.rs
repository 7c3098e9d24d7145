//! The TLS-over-TCP fallback: a client whose QUIC gets no answer registers over TCP (client
//! and server in one process, on loopback; "UDP blocked" = the connect string's QUIC port is a
//! socket that never answers, or a test proxy that drops datagrams until told otherwise), moves
//! back to QUIC when UDP works again, and the stream attacks that must fail: idle TCP
//! connections, a stalled half-sent frame, an oversized frame, a TLS handshake that never
//! finishes, the shared handshake cap, non-TLS bytes and a client without ALPN.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{Client, ClientConfig, Event, Transport};
use common::*;
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::session::{ClientEvent, ClientSession};
use meshpunch_proto::wire::{self, ErrorCode, FrameDecoder, Message};
use meshpunch_rendezvous::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The value of a metric series (exact name with labels) in the process' Prometheus output.
fn metric(series: &str) -> f64 {
    let text = meshpunch_rendezvous::metrics::install()
        .expect("recorder")
        .render();
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

fn limit(name: &str) -> f64 {
    metric(&format!(
        "meshpunch_rendezvous_limit_hits_total{{limit=\"{name}\"}}"
    ))
}

/// Waits until `f` holds (polling), or panics with `what`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A UDP socket that never answers: the QUIC port of a network that drops UDP.
async fn black_hole() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// The server's connect string with QUIC pointed at `quic_port` (TCP stays the server's).
fn cs_with_quic_port(server: &Server, quic_port: u16) -> ConnectString {
    let mut cs = server.dev_connect().unwrap().clone();
    cs.port = quic_port;
    cs.tcp_port = Some(server.tcp_addr().unwrap().port());
    cs
}

async fn start_with(dir: &std::path::Path, f: impl FnOnce(&mut Config)) -> Server {
    init_tracing();
    let mut cfg = Config::loopback(dir);
    f(&mut cfg);
    Server::start(cfg).await.expect("server starts")
}

#[tokio::test]
async fn tcp_listens_on_the_quic_port_number_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let tcp = server.tcp_addr().expect("TCP on by default");
    // Same address; same port unless the OS-chosen UDP port was taken on TCP.
    assert_eq!(tcp.ip(), server.quic_addr().ip());
    let cs = server.dev_connect().unwrap();
    assert_eq!(cs.tcp_port(), tcp.port());
    let off = start_with(dir.path(), |c| c.tcp = false).await;
    assert_eq!(off.tcp_addr(), None);
}

/// QUIC blocked: the client registers over TLS/TCP after the fallback delay, its observed
/// address is marked TCP (never a UDP candidate), and it exchanges offers with a QUIC client.
#[tokio::test]
async fn client_registers_over_tcp_when_quic_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (_hole, port) = black_hole().await;
    let cs = cs_with_quic_port(&server, port);
    let tcp_regs = metric("meshpunch_rendezvous_registrations_total{transport=\"tcp\"}");
    let started = Instant::now();
    let (tcp_client, mut tcp_ev, _, tcp_pk) = connect(&cs).await;
    let took = started.elapsed();
    let reg = tcp_client.registration().unwrap();
    assert_eq!(reg.transport, Transport::Tcp);
    assert!(
        !reg.shared_socket,
        "an address observed over TCP is no UDP mapping"
    );
    assert_eq!(reg.server, server.tcp_addr().unwrap());
    assert!(
        took >= client::TCP_FALLBACK_DELAY,
        "TCP must wait for QUIC's head start ({took:?})"
    );
    println!("time to registration with UDP blocked: {took:?}");
    assert!(metric("meshpunch_rendezvous_registrations_total{transport=\"tcp\"}") > tcp_regs);

    // A QUIC client and the TCP client punch through the same server.
    let quic_cs = server.dev_connect().unwrap().clone();
    let (quic_client, _quic_ev, _, _) = connect(&quic_cs).await;
    assert_eq!(
        quic_client.registration().unwrap().transport,
        Transport::Quic
    );
    let answerer = tokio::spawn(async move {
        let offer = wait_for(&mut tcp_ev, |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        offer.answer(vec![]).await.unwrap()
    });
    let punch = tokio::time::timeout(SOON, quic_client.offer(tcp_pk, vec![]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(punch.peer, tcp_pk);
    assert!(answerer.await.unwrap().peer_observed.is_some());
}

/// A UDP proxy in front of the server's QUIC port that drops every datagram until opened.
struct UdpGate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl UdpGate {
    async fn new(upstream: SocketAddr) -> UdpGate {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let gate = open.clone();
        let task = tokio::spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if !gate.load(Ordering::SeqCst) {
                    continue;
                }
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        b.connect(upstream).await.unwrap();
                        let (b2, front2, gate2) = (b.clone(), front.clone(), gate.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 2048];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if gate2.load(Ordering::SeqCst) {
                                    let _ = front2.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        backs.insert(from, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        UdpGate {
            addr,
            open,
            _task: task,
        }
    }
}

/// UDP comes back: the client's background QUIC retry registers over QUIC and the client
/// moves there, keeping its watch set (presence of a watched peer still arrives).
#[tokio::test]
async fn client_moves_back_to_quic_when_udp_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let gate = UdpGate::new(server.quic_addr()).await;
    let cs = cs_with_quic_port(&server, gate.addr.port());
    let (sk, _) = key();
    let mut cfg = ClientConfig::new(cs, sk);
    cfg.quic_retry = Duration::from_millis(500);
    // As the daemon does: QUIC on a given endpoint (its data socket). Over TCP the
    // registration must still say the observed address is not that socket's mapping.
    cfg.endpoint = Some(quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap());
    let (c, mut ev) = tokio::time::timeout(SOON, Client::connect(cfg))
        .await
        .unwrap()
        .unwrap();
    let reg = c.registration().unwrap();
    assert_eq!(reg.transport, Transport::Tcp);
    assert!(!reg.shared_socket, "observed over TCP is no UDP mapping");
    // A watched peer, online.
    let (peer, _peer_ev, _, peer_pk) = connect(server.dev_connect().unwrap()).await;
    c.watch(vec![peer_pk]).await.unwrap();
    wait_for(&mut ev, |e| {
        matches!(e, Event::Presence { key, online: true } if key == peer_pk).then_some(())
    })
    .await;

    gate.open.store(true, Ordering::SeqCst);
    let reg = wait_for(&mut ev, |e| match e {
        Event::Registered(r) => Some(r),
        Event::Superseded => panic!("superseded by its own QUIC retry"),
        _ => None,
    })
    .await;
    assert_eq!(reg.transport, Transport::Quic);
    assert_eq!(reg.server, gate.addr);
    assert!(reg.shared_socket, "back on QUIC over the given endpoint");
    assert!(c.is_connected());
    // The watch set moved along: the peer leaving is reported on the QUIC connection.
    peer.close();
    wait_for(&mut ev, |e| {
        matches!(e, Event::Presence { key, online: false } if key == peer_pk).then_some(())
    })
    .await;
    assert_eq!(c.registration().unwrap().transport, Transport::Quic);
}

/// A TLS client speaking the protocol by hand over TCP (pinned to the dev certificate).
struct RawTcp {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    dec: FrameDecoder,
}

fn tls_connector(cs: &ConnectString, alpn: bool) -> tokio_rustls::TlsConnector {
    let (mut tls, _) = meshpunch::tls::client_crypto(&cs.pins, &[]).unwrap();
    if !alpn {
        tls.alpn_protocols.clear();
    }
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

impl RawTcp {
    async fn connect(server: &Server) -> RawTcp {
        Self::try_connect(server, true)
            .await
            .expect("TLS handshake")
    }

    async fn try_connect(server: &Server, alpn: bool) -> std::io::Result<RawTcp> {
        let cs = server.dev_connect().unwrap();
        let tcp = TcpStream::connect(server.tcp_addr().unwrap()).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = tls_connector(cs, alpn).connect(name, tcp).await?;
        Ok(RawTcp {
            stream,
            dec: FrameDecoder::new(wire::MAX_FRAME_LEN),
        })
    }

    async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next message, or `None` when the server closed the connection.
    async fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Some(m)) = self.dec.next_message() {
                return Some(m);
            }
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
            }
        }
    }

    /// Registers with the dev token (key proof bound to this TLS session's exporter).
    async fn register(&mut self, server: &Server) {
        let (sk, _) = key();
        let (_, conn) = self.stream.get_ref();
        let exporter = conn
            .export_keying_material([0u8; 32], wire::EXPORTER_LABEL, Some(b""))
            .unwrap();
        let token = server.dev_connect().unwrap().token.clone();
        let mut core = ClientSession::new(token, sk, "raw-tcp".into(), exporter);
        loop {
            while let Some(m) = core.poll_transmit() {
                self.send_bytes(&m.encode()).await;
            }
            match core.poll_event() {
                Some(ClientEvent::Registered(_)) => return,
                Some(e) => panic!("not registered: {e:?}"),
                None => {}
            }
            let m = self.recv().await.expect("server answers");
            core.handle_message(m);
        }
    }

    /// Whether the server closes the connection within `within` (reading and dropping
    /// whatever it sends first).
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// 2,000 TCP connections that never send a byte hold no handshake slot: a real client
/// (QUIC blocked, so over TCP) registers at once although the cap is 8; the idle ones are
/// closed at the handshake deadline and counted.
#[tokio::test]
async fn idle_tcp_connections_do_not_starve_real_clients() {
    const IDLE: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.limits.max_connections_per_ip = 100_000;
        c.limits.max_handshakes_in_flight = 8;
        c.limits.handshake_timeout = Duration::from_secs(4);
    })
    .await;
    let before = limit("tls_handshake_timeout");
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(
            TcpStream::connect(server.tcp_addr().unwrap())
                .await
                .unwrap(),
        );
    }
    let (_hole, port) = black_hole().await;
    let started = Instant::now();
    let (c, _ev, _, _) = connect(&cs_with_quic_port(&server, port)).await;
    assert_eq!(c.registration().unwrap().transport, Transport::Tcp);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the real client waited for the idle connections to expire ({:?})",
        started.elapsed()
    );
    // Every idle connection is closed by the server (EOF) and counted.
    for mut s in idle {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(SOON, s.read(&mut b)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    assert!(limit("tls_handshake_timeout") >= before + IDLE as f64);
    assert!(
        c.is_connected(),
        "closing the idle ones left the real client alone"
    );
}

/// A TLS handshake begun but never finished is closed at the deadline; beyond the shared
/// handshake cap a new one is closed at once. Each counts.
#[tokio::test]
async fn stalled_tls_handshakes_are_bounded_in_time_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.limits.max_handshakes_in_flight = 2;
        c.limits.handshake_timeout = Duration::from_secs(3);
    })
    .await;
    let addr = server.tcp_addr().unwrap();
    let (t0, c0) = (
        limit("tls_handshake_timeout"),
        limit("handshakes_in_flight"),
    );
    // The first bytes of a TLS record header, then nothing.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        stalled.push(s);
    }
    eventually("both stalled handshakes hold a slot", || {
        metric("meshpunch_rendezvous_handshakes_in_flight") >= 2.0
    })
    .await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), third.read(&mut b))
        .await
        .expect("closed at once beyond the cap");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(limit("handshakes_in_flight") > c0);
    for mut s in stalled {
        let r = tokio::time::timeout(SOON, s.read(&mut b)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    assert!(limit("tls_handshake_timeout") >= t0 + 2.0);
    // The slots are free again: a real handshake completes.
    let mut ok = RawTcp::connect(&server).await;
    ok.register(&server).await;
}

/// A registered client that sends half a frame and stops is closed after
/// `limits.frame_timeout` with a typed error; another client is untouched.
#[tokio::test]
async fn stalled_half_sent_frame_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.limits.frame_timeout = Duration::from_secs(2);
    })
    .await;
    let (bystander, _bev, _, _) = connect(server.dev_connect().unwrap()).await;
    let before = limit("stalled_frame");
    let mut raw = RawTcp::connect(&server).await;
    raw.register(&server).await;
    // Length prefix of a 100-byte frame, and 10 of its bytes.
    let mut half = 100u32.to_be_bytes().to_vec();
    half.extend_from_slice(&[1u8; 10]);
    raw.send_bytes(&half).await;
    let err = tokio::time::timeout(SOON, raw.recv())
        .await
        .unwrap()
        .expect("a typed error before the close");
    assert!(
        matches!(&err, Message::Error(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
    assert!(raw.closed_within(SOON).await);
    assert!(limit("stalled_frame") > before);
    assert!(bystander.is_connected());
}

/// A frame longer than `limits.max_frame_bytes` gets a typed error and the close of that
/// connection only.
#[tokio::test]
async fn oversized_frame_over_tcp_is_refused_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| c.limits.max_frame_bytes = 1024).await;
    let (bystander, _bev, _, _) = connect(server.dev_connect().unwrap()).await;
    let before = limit("frame_size");
    let mut raw = RawTcp::connect(&server).await;
    raw.send_bytes(&(1_000_000u32).to_be_bytes()).await;
    let err = tokio::time::timeout(SOON, raw.recv()).await.unwrap();
    assert!(matches!(err, Some(Message::Error(_))), "{err:?}");
    assert!(raw.closed_within(SOON).await);
    assert!(limit("frame_size") > before);
    assert!(bystander.is_connected());
}

/// Bytes that are not TLS, and a TLS client without ALPN `meshpunch/1`, are refused and
/// counted; neither gets a session.
#[tokio::test]
async fn non_tls_bytes_and_missing_alpn_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let failures = || metric("meshpunch_rendezvous_tcp_handshake_failures_total");
    let before = failures();
    let mut s = TcpStream::connect(server.tcp_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(SOON, s.read_to_end(&mut buf))
        .await
        .unwrap();
    eventually("the HTTP request counted", || failures() > before).await;
    let before = failures();
    // rustls completes the handshake without ALPN; the server then closes.
    if let Ok(mut raw) = RawTcp::try_connect(&server, false).await {
        raw.send_bytes(&Message::Watch(vec![]).encode()).await;
        assert!(raw.closed_within(SOON).await);
    }
    eventually("the no-ALPN client counted", || failures() > before).await;
}

/// Drain reaches TCP sessions too: GoAway, then close.
#[tokio::test]
async fn drain_sends_goaway_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut raw = RawTcp::connect(&server).await;
    raw.register(&server).await;
    let drain = tokio::spawn(async move {
        server.drain(Duration::from_secs(5)).await;
    });
    let msg = loop {
        match tokio::time::timeout(SOON, raw.recv()).await.unwrap() {
            Some(m @ Message::GoAway { .. }) => break m,
            Some(_) => continue,
            None => panic!("closed without GoAway"),
        }
    };
    assert!(matches!(
        msg,
        Message::GoAway {
            reason: wire::GoAwayReason::Draining,
            ..
        }
    ));
    drain.await.unwrap();
}

/// QUIC and TCP connections of one source share `limits.max_connections_per_ip`: with a limit
/// of 2, one QUIC and one TCP client fill it and a further TCP connection is closed at accept.
#[tokio::test]
async fn quic_and_tcp_share_the_per_source_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| c.limits.max_connections_per_ip = 2).await;
    let (quic, _qev, _, _) = connect(server.dev_connect().unwrap()).await;
    assert_eq!(quic.registration().unwrap().transport, Transport::Quic);
    let mut tcp = RawTcp::connect(&server).await;
    tcp.register(&server).await;
    let before = limit("connections_per_ip");
    match RawTcp::try_connect(&server, true).await {
        Err(_) => {}
        Ok(mut third) => assert!(third.closed_within(SOON).await, "third connection kept"),
    }
    assert!(limit("connections_per_ip") > before);
    // Closing the TCP one frees its slot for a new connection.
    drop(tcp);
    let deadline = Instant::now() + SOON;
    loop {
        if let Ok(mut again) = RawTcp::try_connect(&server, true).await {
            again.register(&server).await;
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(quic.is_connected());
}
