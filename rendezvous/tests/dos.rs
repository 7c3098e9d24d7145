//! Denial-of-service attacks on the rendezvous that must fail: half-open QUIC handshakes from
//! one address, the handshake cap, Watch floods, many IPv6 addresses of one /64, and stalled
//! admin HTTP requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::client::{Client, ClientConfig};
use common::*;
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::wire::{ErrorCode, Message};
use meshpunch_rendezvous::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A QUIC client that stops after its first flight: quinn-proto builds a real, correctly
/// protected Initial (TLS ClientHello), the test sends it from a plain UDP socket and never
/// reads the server's answer.
struct HalfOpen {
    ep: quinn_proto::Endpoint,
    cfg: quinn::ClientConfig,
}

impl HalfOpen {
    fn new(cs: &ConnectString) -> HalfOpen {
        HalfOpen {
            ep: quinn_proto::Endpoint::new(
                Arc::new(quinn::EndpointConfig::default()),
                None,
                false,
                None,
            ),
            cfg: client::quic_client_config(cs.pin).unwrap(),
        }
    }

    /// The first datagram of a new connection attempt to `server`, and the connection.
    fn initial(
        &mut self,
        server: SocketAddr,
    ) -> (
        Vec<u8>,
        quinn_proto::ConnectionHandle,
        quinn_proto::Connection,
    ) {
        let now = Instant::now();
        let (h, mut conn) = self
            .ep
            .connect(now, self.cfg.clone(), server, "meshpunch")
            .unwrap();
        let mut buf = Vec::new();
        let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
        buf.truncate(t.size);
        (buf, h, conn)
    }
}

fn server_addr(cs: &ConnectString) -> SocketAddr {
    format!("{}:{}", cs.host, cs.port).parse().unwrap()
}

async fn metrics_text() -> String {
    meshpunch_rendezvous::metrics::install().unwrap().render()
}

fn counter(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_initials_from_one_address_do_not_lock_out_a_real_client() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Default limits: 256 connections per source. Half-open handshakes are given a minute, so
    // the real client has to get in while all of them are still pending.
    let mut cfg = Config::loopback(dir.path());
    assert_eq!(cfg.limits.max_connections_per_ip, 256);
    cfg.limits.handshake_timeout = Duration::from_secs(60);
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let to = server_addr(&cs);
    let retries_before = counter(&metrics_text().await, "meshpunch_rendezvous_retries_total");

    // 256 handshakes from 127.0.0.1 that never get past the first flight.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut half = HalfOpen::new(&cs);
    let mut held = Vec::new();
    for _ in 0..256 {
        let (initial, h, conn) = half.initial(to);
        sock.send_to(&initial, to).unwrap();
        held.push((h, conn));
    }
    // Let the server take every one of them in before the real client comes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A real client from the same address connects and registers.
    let (sk, _) = key();
    let client = tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect(ClientConfig::new(cs.clone(), sk)),
    )
    .await;
    assert!(
        matches!(client, Ok(Ok(_))),
        "real client did not get in while the half-open handshakes were pending: {:?}",
        client.map(|r| r.err())
    );

    // Every half-open attempt got a stateless Retry and nothing else.
    let retries =
        counter(&metrics_text().await, "meshpunch_rendezvous_retries_total") - retries_before;
    assert!(retries >= 256, "retries sent: {retries}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_cap_drops_initials_until_a_handshake_slot_frees() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.max_handshakes_in_flight = 1;
    cfg.limits.handshake_timeout = Duration::from_secs(3);
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let to = server_addr(&cs);

    // A client that answers the Retry (its address is real) and then stalls: one validated
    // handshake in flight, held until handshake_timeout.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut half = HalfOpen::new(&cs);
    let (initial, h, mut conn) = half.initial(to);
    sock.send_to(&initial, to).unwrap();
    let mut rx = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut rx).unwrap();
    let mut buf = Vec::new();
    let now = Instant::now();
    match half
        .ep
        .handle(now, from, None, None, BytesMut::from(&rx[..n]), &mut buf)
    {
        Some(quinn_proto::DatagramEvent::ConnectionEvent(ch, ev)) => {
            assert_eq!(ch, h);
            conn.handle_event(ev);
        }
        _ => panic!("expected the server's Retry"),
    }
    let mut out = Vec::new();
    let t = conn
        .poll_transmit(now, 1, &mut out)
        .expect("Initial with the Retry token");
    sock.send_to(&out[..t.size], to).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = |text: &str| {
        counter(
            text,
            "meshpunch_rendezvous_limit_hits_total{limit=\"handshakes_in_flight\"}",
        )
    };
    let hits_before = hits(&metrics_text().await);

    // While it stalls, a real client's Initials are dropped: no connection within 1.5 s.
    let (sk, _) = key();
    let blocked = tokio::time::timeout(
        Duration::from_millis(1500),
        Client::connect(ClientConfig::new(cs.clone(), sk.clone())),
    )
    .await;
    assert!(
        blocked.is_err() || blocked.unwrap().is_err(),
        "cap not applied"
    );
    assert!(hits(&metrics_text().await) > hits_before);

    // Once the stalled handshake times out, the client gets in.
    let ok = tokio::time::timeout(SOON, async {
        loop {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_secs(5),
                Client::connect(ClientConfig::new(cs.clone(), sk.clone())),
            )
            .await
            {
                return c;
            }
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "client never got in after the stalled handshake ended"
    );
}

#[tokio::test]
async fn watch_flood_is_rate_limited() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    // Burst of 10 (the default), next token only in 100 s: exactly 10 pass.
    cfg.limits.watches_per_sec = 0.01;
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    assert!(matches!(
        raw.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    let hits = |t: &str| {
        counter(
            t,
            "meshpunch_rendezvous_limit_hits_total{limit=\"watch_rate\"}",
        )
    };
    let before = hits(&metrics_text().await);
    let (_, other) = key();
    for _ in 0..50 {
        raw.send(&Message::Watch(vec![other])).await;
    }
    let mut limited = 0;
    let mut presence = 0;
    while limited + presence < 50 {
        match raw.recv().await {
            Some(Message::Error(e)) if e.code == ErrorCode::RateLimited => limited += 1,
            Some(Message::Presence { .. }) => presence += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("connection closed"),
        }
    }
    // The burst passes, the rest of the flood is refused.
    assert_eq!(presence, 10, "watches served");
    assert_eq!(limited, 40);
    assert!(hits(&metrics_text().await) >= before + 40);
    // The connection stays usable.
    raw.send(&Message::Watch(vec![])).await;
}

/// quinn follows a client to a new address (NAT rebinding); its per-source slot follows it:
/// moving to a free source keeps the connection and frees the old source, moving to a full
/// source closes it with RateLimited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_connections_count_against_their_new_source() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.max_connections_per_ip = 1;
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 0);

    let mut a = Raw::connect_from(&cs, at("127.0.0.2")).await;
    let (ska, _) = key();
    assert!(matches!(
        a.register(&cs.token, &ska).await,
        Message::Registered(_)
    ));
    let mut b = Raw::connect_from(&cs, at("127.0.0.1")).await;
    let (skb, _) = key();
    assert!(matches!(
        b.register(&cs.token, &skb).await,
        Message::Registered(_)
    ));

    // a moves to a free source: still served, told its new address.
    let fresh = UdpSocket::bind(at("127.0.0.3")).unwrap();
    let moved_to = fresh.local_addr().unwrap();
    a.endpoint().rebind(fresh).unwrap();
    a.send(&Message::Watch(vec![])).await;
    loop {
        match a.recv().await {
            Some(Message::ObservedAddr(addr)) => {
                assert_eq!(addr, moved_to);
                break;
            }
            Some(_) => continue,
            None => panic!("migrated connection closed"),
        }
    }
    // Its old source has a free slot again.
    let again = tokio::time::timeout(SOON, async {
        loop {
            let ep = quinn::Endpoint::client(at("127.0.0.2")).unwrap();
            let cfg = client::quic_client_config(cs.pin).unwrap();
            if let Ok(c) = ep
                .connect_with(cfg, server.quic_addr(), "meshpunch")
                .unwrap()
                .await
            {
                return (ep, c);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        again.is_ok(),
        "old source still counted after the migration"
    );

    // a moves onto b's source, which is full: closed with RateLimited.
    let full = UdpSocket::bind(at("127.0.0.1")).unwrap();
    a.endpoint().rebind(full).unwrap();
    a.send(&Message::Watch(vec![])).await;
    let reason = tokio::time::timeout(SOON, a.conn.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from(u16::from(ErrorCode::RateLimited))
            );
        }
        other => panic!("unexpected close: {other:?}"),
    }
    // b is untouched.
    b.send(&Message::Watch(vec![])).await;
    assert!(b.conn.close_reason().is_none());
}

/// Runs in a fresh network namespace (loopback with addresses from two IPv6 /64s): clients
/// from three addresses of one /64 share one per-source limit, a fourth from another /64 has
/// its own.
#[test]
fn ipv6_addresses_of_one_64_share_one_connection_limit() {
    if !natlab::testenv::require_root("ipv6_addresses_of_one_64_share_one_connection_limit")
        || !natlab::testenv::require_commands(
            "ipv6_addresses_of_one_64_share_one_connection_limit",
            &["ip", "sysctl"],
        )
    {
        return;
    }
    init_tracing();
    let mut lab = natlab::Lab::new().unwrap();
    lab.add_node("h", false).unwrap();
    lab.exec(
        "h",
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.lo.disable_ipv6=0",
        ],
    )
    .unwrap();
    for a in [
        "fd00:64:1:1::1/64",
        "fd00:64:1:1::a/64",
        "fd00:64:1:1:ffff::b/64",
        "fd00:64:1:1:1234:5678:9abc:c/64",
        "fd00:64:1:2::d/64",
    ] {
        lab.ip("h", &["-6", "addr", "add", a, "dev", "lo", "nodad"])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    lab.in_ns("h", move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut cfg = Config::loopback(&data);
            cfg.listen = "[fd00:64:1:1::1]:0".parse().unwrap();
            cfg.stun_listen = None;
            cfg.limits.max_connections_per_ip = 2;
            let server = Server::start(cfg).await.unwrap();
            let cs = server.dev_connect().unwrap().clone();
            let to = server.quic_addr();
            let cfg = client::quic_client_config(cs.pin).unwrap();
            let connect = |from: &str| {
                let cfg = cfg.clone();
                let from: IpAddr = from.parse().unwrap();
                async move {
                    let ep = quinn::Endpoint::client(SocketAddr::new(from, 0)).unwrap();
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        ep.connect_with(cfg, to, "meshpunch").unwrap(),
                    )
                    .await
                    .expect("connect settles in time");
                    (ep, r)
                }
            };
            let (_ea, a) = connect("fd00:64:1:1::a").await;
            let (_eb, b) = connect("fd00:64:1:1:ffff::b").await;
            assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
            let (_ec, c) = connect("fd00:64:1:1:1234:5678:9abc:c").await;
            assert!(
                matches!(c, Err(quinn::ConnectionError::ConnectionClosed(_))),
                "third address of the same /64 must be refused: {c:?}"
            );
            let (_ed, d) = connect("fd00:64:1:2::d").await;
            assert!(d.is_ok(), "another /64 has its own limit: {d:?}");
            drop((a, b, d));
            drop(server);
        });
    })
    .unwrap();
}

/// Sends half a request line and waits: the server must close the connection within 10 s.
pub async fn assert_stalled_request_closed(admin: SocketAddr) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metr").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "stalled admin request still open after 10 s");
    eprintln!("stalled request closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn stalled_admin_requests_are_closed_and_connections_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = Server::start(cfg).await.unwrap();
    let admin = server.admin_addr().unwrap();
    assert_stalled_request_closed(admin).await;

    // A connection that sends nothing at all is closed too.
    let mut idle = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection open: {r:?}"
    );

    // 64 stalled connections fill the admin server; the 65th is closed at once and the
    // metric says why; when the stalled ones are gone, /healthz answers again.
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "over-cap connection served: {r:?}"
    );
    drop(stalled);
    let text = tokio::time::timeout(SOON, async {
        loop {
            let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        counter(
            &text,
            "meshpunch_rendezvous_limit_hits_total{limit=\"admin_connections\"}"
        ) >= 1
    );
    assert!(
        counter(
            &text,
            "meshpunch_rendezvous_limit_hits_total{limit=\"admin_header_timeout\"}"
        ) >= 1
    );
}
