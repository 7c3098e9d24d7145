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
    cmd.args(["-e", "127.0.0.1", "-r", &peer_port.to_string()])
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

/// `tot_send_msgs=N, tot_recv_msgs=M` from uclient's summary.
fn sent_received(out: &str) -> Option<(u64, u64)> {
    let at = out.rfind("tot_send_msgs=")?;
    let rest = &out[at + "tot_send_msgs=".len()..];
    let sent: u64 = rest.split(',').next()?.trim().parse().ok()?;
    let at = rest.find("tot_recv_msgs=")?;
    let recv: u64 = rest[at + "tot_recv_msgs=".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((sent, recv))
}

/// coturn's uclient over UDP, TCP (`-t`) and TLS (`-S`), each in its default RTP/RTCP mode
/// (EVEN-PORT with the R bit, then RESERVATION-TOKEN for the odd port: 508 before issue 17)
/// and with `-c` (no RTCP), with ChannelData and (over UDP) Send/Data indications: every
/// message echoed by turnutils_peer comes back.
#[test]
fn turnutils_uclient_relays_through_meshpunch_relay_without_loss() {
    if !require_commands(
        "turnutils_uclient_relays_through_meshpunch_relay_without_loss",
        &["turnutils_uclient", "turnutils_peer"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, g.cert.pem()).unwrap();
    std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
    let mut cfg = relay_config(true, 4);
    cfg.stream.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.stream.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.stream.cert = Some(cert);
    cfg.stream.key = Some(key);
    let relay = Relay::start(cfg).unwrap();
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
    let udp = relay.listen_addr().port();
    let tcp = relay.tcp_addr().unwrap().port();
    let tls = relay.tls_addr().unwrap().port();
    let runs: [(&str, u16, &[&str]); 7] = [
        ("udp-rtp", udp, &[]),
        ("udp-ch", udp, &["-c"]),
        ("udp-send", udp, &["-c", "-s"]),
        ("tcp-rtp", tcp, &["-t"]),
        ("tcp-ch", tcp, &["-t", "-c"]),
        ("tls-rtp", tls, &["-t", "-S"]),
        ("tls-ch", tls, &["-t", "-S", "-c"]),
    ];
    for (user, port, extra) in runs {
        let out = run_uclient(port, peer_port, user, extra);
        let (sent, recv) =
            sent_received(&out).unwrap_or_else(|| panic!("{user}: no summary:\n{out}"));
        assert!(
            sent >= 200 && recv == sent,
            "{user}: sent {sent}, received {recv}:\n{out}"
        );
        assert!(
            out.contains("Total lost packets 0 "),
            "{user}: loss:\n{out}"
        );
        assert!(!out.contains("error 508"), "{user}: 508:\n{out}");
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
