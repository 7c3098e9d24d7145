//! Shared helpers of the loopback integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use meshpunch::control::{self, Request, Status};
use tokio::net::UdpSocket;

/// A free UDP port on 127.0.0.1 (from the OS).
pub(crate) fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status over the control socket.
pub(crate) async fn status(sock: &Path) -> Status {
    let v = control::request(sock, &Request::Status).await.unwrap();
    serde_json::from_value(v).unwrap()
}

/// Polls until the first peer's path is one of `paths`.
pub(crate) async fn wait_path(sock: &Path, paths: &[&str], timeout: Duration) -> Status {
    let start = Instant::now();
    loop {
        let st = status(sock).await;
        if st
            .peers
            .first()
            .is_some_and(|p| paths.contains(&p.path.as_str()))
        {
            return st;
        }
        if start.elapsed() > timeout {
            panic!(
                "path not in {paths:?} after {timeout:?}: {}",
                serde_json::to_string_pretty(&st).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fake WireGuard endpoint: a UDP socket that sends WireGuard-shaped transport packets to a
/// proxy port and counts what comes back.
pub(crate) struct FakeWg {
    pub(crate) sock: UdpSocket,
}

impl FakeWg {
    pub(crate) async fn new() -> Self {
        FakeWg {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }
    pub(crate) fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }
    /// A WireGuard transport-data-shaped packet (type 4) carrying `n`.
    pub(crate) fn packet(n: u32) -> Vec<u8> {
        let mut p = vec![4u8, 0, 0, 0];
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(&u64::from(n).to_le_bytes());
        p.extend_from_slice(&[0xAB; 64]);
        p
    }
    /// Sends `count` packets to `to` and waits until `peer` received them all (or timeout);
    /// returns how many arrived unchanged.
    pub(crate) async fn exchange(
        &self,
        to: SocketAddr,
        peer: &FakeWg,
        count: u32,
        timeout: Duration,
    ) -> u32 {
        let mut got = 0;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        for n in 0..count {
            self.sock.send_to(&Self::packet(n), to).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while got < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, peer.sock.recv_from(&mut buf)).await {
                Ok(Ok((len, _))) => {
                    let p = &buf[..len];
                    if p.len() == 80 && p[..4] == [4, 0, 0, 0] && p[16..] == [0xAB; 64] {
                        got += 1;
                    }
                }
                _ => break,
            }
        }
        got
    }
}

pub(crate) const SECRET: &str = "loopback-test-turn-secret";

pub(crate) fn start_relay() -> meshpunch_relay::Relay {
    start_relay_with_secret(SECRET)
}

pub(crate) fn start_relay_with_secret(secret: &str) -> meshpunch_relay::Relay {
    let o = meshpunch_relay::config::Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        auth_secret: Some(secret.into()),
        allow_loopback_peers: true,
        ..Default::default()
    };
    let cfg = meshpunch_relay::config::RelayConfig::resolve(Default::default(), o, None).unwrap();
    meshpunch_relay::Relay::start(cfg).unwrap()
}

pub(crate) async fn start_rendezvous(
    dir: &std::path::Path,
    relay: std::net::SocketAddr,
) -> meshpunch_rendezvous::Server {
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir);
    cfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "loopback".into(),
        urls: vec![format!("turn:{relay}?transport=udp")],
        secret: SECRET.into(),
    }];
    meshpunch_rendezvous::Server::start(cfg).await.unwrap()
}

/// Test logging to the test's captured output (`RUST_LOG`, default `warn`).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Daemon options for a loopback test: one peer named `other` without static candidates, no
/// host candidates, data socket on 127.0.0.1:0, control socket `DIR/NAME.sock`, our fake
/// WireGuard at `wg`, the rendezvous `connect`.
pub(crate) fn rendezvous_peer_options(
    me: &meshpunch::keys::Identity,
    other: &meshpunch::keys::Identity,
    connect: &str,
    dir: &Path,
    wg: SocketAddr,
    name: &str,
) -> meshpunch::daemon::Options {
    meshpunch::daemon::Options {
        identity: me.clone(),
        rendezvous: Some(connect.to_string()),
        listen: "127.0.0.1:0".parse().unwrap(),
        control_socket: dir.join(format!("{name}.sock")),
        wireguard_endpoint: Some(wg),
        host_candidates: false,
        peers: vec![meshpunch::config::PeerConfig {
            public_key: other.public,
            name: Some("other".into()),
            proxy_port: 0,
            candidates: vec![],
        }],
        path: meshpunch_proto::path::PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    }
}

/// Two daemons `a` and `b` (fresh keys, each the other's only peer) on the rendezvous
/// `connect`, each with a fake WireGuard; control sockets `DIR/a.sock` and `DIR/b.sock`.
/// Returns `(daemon a, daemon b, a's WireGuard, b's WireGuard)`.
pub(crate) async fn start_rendezvous_pair(
    connect: &str,
    dir: &Path,
) -> (
    meshpunch::daemon::Daemon,
    meshpunch::daemon::Daemon,
    FakeWg,
    FakeWg,
) {
    use meshpunch::keys::{generate_private, Identity};
    let a = Identity::from_private(generate_private());
    let b = Identity::from_private(generate_private());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;
    let da = meshpunch::daemon::start(rendezvous_peer_options(
        &a,
        &b,
        connect,
        dir,
        wga.addr(),
        "a",
    ))
    .await
    .unwrap();
    let db = meshpunch::daemon::start(rendezvous_peer_options(
        &b,
        &a,
        connect,
        dir,
        wgb.addr(),
        "b",
    ))
    .await
    .unwrap();
    (da, db, wga, wgb)
}
