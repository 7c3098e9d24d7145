//! Interop: the client relays through coturn (`turnserver --no-udp`) over TURN-over-TCP. A
//! real rendezvous (in-process) hands out a region whose UDP URI nobody answers and a
//! `?transport=tcp` URI to coturn; two daemons, direct blocked on one side, exchange
//! WireGuard-shaped packets through coturn over TCP.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshpunch::control::{self, Request};
use support::{status, SECRET};

struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_relay_through_coturn_over_tcp() {
    let test = "two_clients_relay_through_coturn_over_tcp";
    if !natlab::testenv::require_commands(test, &["turnserver"]) {
        return;
    }
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let secret = format!("--static-auth-secret={SECRET}");
    let mut cmd = Command::new("turnserver");
    cmd.args(["-c", "/dev/null", "-n", "--listening-ip", "127.0.0.1"])
        .args(["--listening-port", &port.to_string()])
        .args(["--relay-ip", "127.0.0.1", "--use-auth-secret", &secret])
        .args([
            "--realm",
            "meshpunch",
            "--fingerprint",
            "--no-udp",
            "--no-tls",
        ])
        .args([
            "--no-dtls",
            "--no-cli",
            "--allow-loopback-peers",
            "--no-rfc5780",
        ])
        .arg("--pidfile")
        .arg(dir.path().join("turnserver.pid"))
        .args(["--log-file", "stdout", "--simple-log"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _coturn = Reaper(cmd.spawn().expect("spawn turnserver"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "turnserver did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = support::free_udp_port();
    let mut rcfg = meshpunch_rendezvous::Config::loopback(dir.path().join("rdv"));
    rcfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "coturn".into(),
        urls: vec![
            format!("turn:127.0.0.1:{dead}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp"),
        ],
        secret: SECRET.into(),
    }];
    let rdv = meshpunch_rendezvous::Server::start(rcfg).await.unwrap();
    let connect = rdv.dev_connect().unwrap().to_string();
    let (da, db, wga, wgb) = support::start_rendezvous_pair(&connect, dir.path()).await;
    let (ca, cb) = (da.control_socket.clone(), db.control_socket.clone());
    let (to_b, to_a) = (da.proxies[0].1, db.proxies[0].1);
    let v = control::request(
        &ca,
        &Request::Debug {
            peer: "other".into(),
            knob: "force-relay".into(),
            on: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let t = Instant::now();
    let mut n = 0;
    loop {
        let _ = wga
            .exchange(to_b, &wgb, 5, Duration::from_millis(300))
            .await;
        let sa = status(&ca).await;
        let sb = status(&cb).await;
        if sa.peers[0].path.as_str() == "relay" && sb.peers[0].path.as_str() == "relay" {
            assert_eq!(sa.peers[0].relay_transport.as_deref(), Some("tcp"));
            assert_eq!(sb.peers[0].relay_transport.as_deref(), Some("tcp"));
            assert_eq!(sa.home_relay.as_ref().unwrap().transport, "tcp");
            break;
        }
        n += 1;
        assert!(
            n < 150,
            "not on the relay: {}\n{}",
            serde_json::to_string_pretty(&sa).unwrap(),
            serde_json::to_string_pretty(&sb).unwrap()
        );
    }
    println!("relay over TCP through coturn after {:?}", t.elapsed());
    let ab = wga.exchange(to_b, &wgb, 100, Duration::from_secs(10)).await;
    let ba = wgb.exchange(to_a, &wga, 100, Duration::from_secs(10)).await;
    println!("through coturn over TCP: a->b {ab}/100, b->a {ba}/100");
    assert!(ab >= 95 && ba >= 95, "a->b {ab}, b->a {ba}");
}
