//! The `meshpunch-relay` binary: command line, admin endpoints, graceful drain on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshpunch_relay::client::{TurnSocket, TurnSocketError};

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn binary_relays_serves_metrics_and_drains_on_sigterm() {
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_meshpunch-relay"))
            .args(["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"])
            .args(["--ports", &port_range(6), "--realm", "bin.test"])
            .args(["--auth-secret", SECRET, "--allow-loopback-peers"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn meshpunch-relay"),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let listen: SocketAddr = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let admin: SocketAddr = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("admin on ")
        .unwrap()
        .parse()
        .unwrap();

    let mut c = TurnSocket::new(any_local(), listen, rest_creds(SECRET, "bin")).unwrap();
    c.allocate(T).unwrap();
    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    c.bind_channel(peer_addr, T).unwrap();
    c.send_to(peer_addr, b"through the binary").unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"through the binary");
    // A denied peer shows up as a denial by reason.
    assert!(matches!(
        c.create_permission("10.1.2.3".parse().unwrap(), T),
        Err(TurnSocketError::Failed {
            code: Some(403),
            ..
        })
    ));

    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert!(
        wait_for(T, || {
            let (_, body) = http_get(admin, "/metrics");
            body.contains("meshpunch_relay_allocations 1")
                && body.contains("meshpunch_relay_packets_total{direction=\"to_peer\"} 1")
                && body.contains("meshpunch_relay_peer_denied_total{reason=\"private\"} 1")
                && body.contains("meshpunch_relay_channels 1")
                && body.contains("meshpunch_relay_ports_in_use 1")
        }),
        "metrics: {}",
        http_get(admin, "/metrics").1
    );

    // SIGTERM: drain. Health turns 503, new allocations get 508, the existing one still relays.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert!(wait_for(T, || http_get(admin, "/healthz").0 == 503));
    let mut late = TurnSocket::new(any_local(), listen, rest_creds(SECRET, "late")).unwrap();
    assert!(matches!(
        late.allocate(T),
        Err(TurnSocketError::Failed {
            code: Some(508),
            ..
        })
    ));
    c.send_to(peer_addr, b"still relaying").unwrap();
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still relaying");
    // Releasing the last allocation lets the process finish well before the drain period.
    c.release(T).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "relay did not exit after draining");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}
