//! Interop with coturn in both directions:
//! * coturn's `turnutils_uclient` relays through our relay to `turnutils_peer`;
//! * our TURN client (`proto::turn_client` driven by `client::TurnSocket`) relays through
//!   coturn's `turnserver`.
//!
//! Skipped (with a reason) outside CI when coturn is not installed; a failure in CI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshpunch_relay::client::TurnSocket;
use meshpunch_relay::Relay;
use natlab::testenv::require_commands;

/// Kills the child on drop so a failing test leaves nothing behind.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binding_answered(server: SocketAddr) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // STUN Binding request, fixed transaction id.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7u8; 12]);
    let _ = s.send_to(&req, server);
    let mut buf = [0u8; 512];
    matches!(s.recv_from(&mut buf), Ok((n, _)) if n >= 20 && buf[0] == 0x01 && buf[1] == 0x01)
}

fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn run_uclient(relay_port: u16, peer_port: u16, user: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-c", "-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .args(["-p", &relay_port.to_string(), "-W", SECRET, "-u", user])
        .args(["-n", "50", "-m", "4", "-l", "100", "-z", "5"])
        .args(extra)
        .arg("127.0.0.1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaper(cmd.spawn().expect("spawn turnutils_uclient"));
    let mut out = String::new();
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        match child.0.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!("turnutils_uclient did not finish"),
        }
    }
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_string(&mut out).unwrap();
    }
    out
}

#[test]
fn turnutils_uclient_relays_through_meshpunch_relay_without_loss() {
    if !require_commands(
        "turnutils_uclient_relays_through_meshpunch_relay_without_loss",
        &["turnutils_uclient", "turnutils_peer"],
    ) {
        return;
    }
    let relay = Relay::start(relay_config(true, 4)).unwrap();
    let relay_port = relay.listen_addr().port();
    let peer_port = free_udp_port();
    let _peer = Reaper(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnutils_peer"),
    );
    std::thread::sleep(Duration::from_millis(300));
    // ChannelData (default) and Send/Data indications (-s).
    for (user, extra) in [("uclient-ch", &[][..]), ("uclient-send", &["-s"][..])] {
        let out = run_uclient(relay_port, peer_port, user, extra);
        assert!(
            out.contains("tot_send_msgs=200, tot_recv_msgs=200"),
            "{user}: not all echoed:\n{out}"
        );
        assert!(
            out.contains("Total lost packets 0 "),
            "{user}: loss:\n{out}"
        );
    }
}

#[test]
fn our_turn_client_relays_through_coturn_turnserver() {
    if !require_commands(
        "our_turn_client_relays_through_coturn_turnserver",
        &["turnserver"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (lo, hi) = meshpunch_relay::config::parse_ports(&port_range(5)).unwrap();
    let _coturn = Reaper(
        Command::new("turnserver")
            .args([
                "-n",
                "--listening-ip",
                "127.0.0.1",
                "--relay-ip",
                "127.0.0.1",
            ])
            .args(["--listening-port", &port.to_string()])
            .args([
                "--use-auth-secret",
                "--static-auth-secret",
                SECRET,
                "--realm",
                "coturn.test",
            ])
            .args([
                "--allow-loopback-peers",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
            ])
            .args(["--min-port", &lo.to_string(), "--max-port", &hi.to_string()])
            .arg("--pidfile")
            .arg(dir.path().join("pid"))
            .arg("--userdb")
            .arg(dir.path().join("db"))
            .args(["--log-file", "stdout"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnserver"),
    );
    assert!(
        wait_until(Duration::from_secs(15), || binding_answered(server)),
        "coturn did not come up on {server}"
    );
    let mut c = TurnSocket::new(any_local(), server, rest_creds(SECRET, "meshpunch")).unwrap();
    let relayed = c.allocate(T).expect("allocate on coturn");
    assert_eq!(relayed.ip(), server.ip());

    let peer = peer_socket();
    let peer_addr = peer.local_addr().unwrap();
    let mut buf = [0u8; 2048];
    // Send indication first (permission only), then a bound channel.
    c.create_permission(peer_addr.ip(), T).unwrap();
    c.send_to(peer_addr, b"send indication via coturn").unwrap();
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"send indication via coturn"[..], relayed)
    );
    peer.send_to(b"data indication back", relayed).unwrap();
    let (p, n) = c.recv_from(&mut buf, T).unwrap();
    assert_eq!((p, &buf[..n]), (peer_addr, &b"data indication back"[..]));

    let ch = c.bind_channel(peer_addr, T).unwrap();
    assert!((0x4000..=0x4FFF).contains(&ch));
    for i in 0..100u32 {
        c.send_to(peer_addr, &i.to_be_bytes()).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&i.to_be_bytes()[..], relayed));
        peer.send_to(&(i + 1000).to_be_bytes(), relayed).unwrap();
        let (p, n) = c.recv_from(&mut buf, T).unwrap();
        assert_eq!((p, &buf[..n]), (peer_addr, &(i + 1000).to_be_bytes()[..]));
    }
    c.release(T).unwrap();
}
