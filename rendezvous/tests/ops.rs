//! Operations: admin HTTP, limits, ownership, observed-address changes, and the binary's
//! `--dev` output, SIGHUP certificate reload and SIGTERM drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::client::{Client, ClientConfig, ClientError, Event};
use common::*;
use meshpunch_proto::wire::{ErrorCode, Message};
use meshpunch_rendezvous::{Config, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(SOON, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = Server::start(cfg).await.unwrap();
    let admin = server.admin_addr().unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let _c = connect(&cs).await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "meshpunch_rendezvous_registrations_total",
        "meshpunch_rendezvous_connections_total",
        "meshpunch_rendezvous_ready",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
    server.set_degraded(Some("registry lagging".into()));
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("registry lagging"), "{body}");
    server.set_degraded(None);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
}

#[tokio::test]
async fn newest_connection_for_a_key_wins() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (old, mut old_ev, sk, _) = connect(&cs).await;
    let (new, _new_ev) = Client::connect(ClientConfig::new(cs.clone(), sk))
        .await
        .unwrap();
    wait_for(&mut old_ev, |e| {
        matches!(e, Event::Superseded).then_some(())
    })
    .await;
    assert!(!old.is_connected());
    assert!(new.is_connected());
    // The superseded connection does not take the key offline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = meshpunch_rendezvous::registry::PeerId {
        network: "dev".into(),
        key: new.public_key(),
    };
    assert!(server.registry().is_online(&id).await.unwrap());
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.max_connections_per_ip = 2;
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let (a, _ae, _, _) = connect(&cs).await;
    let _b = connect(&cs).await;
    let (sk, _) = key();
    let err = Client::connect(ClientConfig::new(cs.clone(), sk.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    a.close();
    // The slot frees when the first connection is gone.
    tokio::time::timeout(SOON, async {
        loop {
            if Client::connect(ClientConfig::new(cs.clone(), sk.clone()))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn registrations_per_ip_are_rate_limited() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.registrations_burst = 2;
    cfg.limits.registrations_per_sec_per_ip = 0.001;
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let _a = connect(&cs).await;
    let _b = connect(&cs).await;
    let (sk, _) = key();
    let err = Client::connect(ClientConfig::new(cs.clone(), sk))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::RateLimited,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn observed_address_change_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    let Message::Registered(reg) = raw.register(&cs.token, &sk).await else {
        panic!("not registered")
    };
    // Rebind the client's UDP socket (like a NAT giving it a new port).
    let fresh = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let new_addr = fresh.local_addr().unwrap();
    raw.endpoint().rebind(fresh).unwrap();
    raw.send(&Message::Watch(vec![])).await;
    let seen = loop {
        match raw.recv().await {
            Some(Message::ObservedAddr(a)) => break a,
            Some(_) => continue,
            None => panic!("connection closed"),
        }
    };
    assert_ne!(seen, reg.observed);
    assert_eq!(seen, new_addr);
}

fn binary() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_meshpunch-rendezvous"))
}

#[tokio::test]
async fn dev_binary_prints_connect_reloads_cert_on_sighup_and_drains_on_sigterm() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(binary())
        .args(["--dev", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--stun-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(SOON, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let cs: meshpunch_proto::connect::ConnectString = line
        .strip_prefix("connect: ")
        .expect("connect line")
        .parse()
        .unwrap();
    let written = std::fs::read_to_string(dir.path().join("connect")).unwrap();
    assert_eq!(written.trim(), cs.to_string());
    assert!(cs.stun.is_some());

    let (client, mut ev, _, _) = connect(&cs).await;
    let pid = child.id().unwrap().to_string();

    // SIGHUP with a new certificate on disk: new handshakes use it, the old pin fails,
    // the open connection is untouched.
    std::fs::remove_file(dir.path().join("cert.pem")).unwrap();
    std::fs::remove_file(dir.path().join("key.pem")).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), generated.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        generated.signing_key.serialize_pem(),
    )
    .unwrap();
    let new_pin = meshpunch_proto::connect::Pin::Spki(
        meshpunch_proto::x509::spki_pin(generated.cert.der()).unwrap(),
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let mut new_cs = cs.clone();
    new_cs.pins = vec![new_pin];
    let (sk, _) = key();
    tokio::time::timeout(SOON, async {
        loop {
            if Client::connect(ClientConfig::new(new_cs.clone(), sk.clone()))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("new certificate served after SIGHUP");
    let (sk2, _) = key();
    let old = Client::connect(ClientConfig::new(cs.clone(), sk2)).await;
    assert!(
        matches!(old, Err(ClientError::Connect(_))),
        "old pin must fail"
    );
    assert!(client.is_connected());

    // SIGTERM: clients are told to go, the process exits cleanly.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(&mut ev, |e| match e {
        Event::Disconnected { reason } => Some(reason),
        _ => None,
    })
    .await;
    let exit = tokio::time::timeout(SOON, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    client.close();
}

#[test]
fn token_create_prints_a_verifiable_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "token",
            "create",
            "--network",
            "home",
            "--ttl",
            "30d",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let secret = std::fs::read_to_string(dir.path().join("token-secret")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t =
        meshpunch_proto::token::verify(secret.trim().as_bytes(), &token, now, |_| false).unwrap();
    assert_eq!(t.network, "home");
    assert!(t.expires_unix >= now + 29 * 86_400 && t.expires_unix <= now + 31 * 86_400);
    let bad = std::process::Command::new(binary())
        .args(["token", "create", "--network", "no.dots", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test]
async fn wildcard_stun_listener_is_announced_with_a_usable_ip() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.stun_listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let (c, _ev, _, _) = connect(&cs).await;
    let stun = c.registration().unwrap().stun;
    assert_eq!(stun.len(), 1);
    assert_eq!(stun[0].ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    assert_eq!(stun[0].port(), server.stun_addrs()[0].port());
}

#[tokio::test]
async fn revoking_a_token_closes_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut cs_a = server.dev_connect().unwrap().clone();
    cs_a.token = server.mint_token("dev", Duration::from_secs(3600));
    let cs_b = server.dev_connect().unwrap().clone();
    let (a, mut a_ev, _, _) = connect(&cs_a).await;
    let (b, _b_ev, _, _) = connect(&cs_b).await;
    server.set_revoked_tokens(&[cs_a.token.clone()]).unwrap();
    wait_for(&mut a_ev, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    assert!(!a.is_connected());
    // The client is told why, with the typed reason, and stops retrying every few seconds
    // (it waits for a new token); the other token is unaffected.
    let failure = wait_for(&mut a_ev, |e| match e {
        Event::Unauthorized(f) => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(
        failure.reason,
        Some(meshpunch_proto::wire::ErrorReason::TokenRevoked)
    );
    assert!(
        failure.describe().contains("revoked"),
        "{}",
        failure.describe()
    );
    assert_eq!(a.auth_failure(), Some(failure));
    assert!(!a.is_connected());
    assert!(b.is_connected());
    a.close();
}

#[tokio::test]
async fn idle_connections_are_closed() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    // The raw connection sends no keep-alives (the real client does, every 10 s).
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    assert!(matches!(
        raw.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    assert!(raw.recv().await.is_none(), "idle connection must be closed");
    tokio::time::timeout(SOON, async {
        while server.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn ipv6_connect_strings_work_end_to_end() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIP ipv6_connect_strings_work_end_to_end: no IPv6 loopback here");
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.listen = "[::1]:0".parse().unwrap();
    cfg.stun_listen = Some("[::1]:0".parse().unwrap());
    let server = Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    assert_eq!(cs.host, "::1");
    let text = cs.to_string();
    assert!(text.contains("@[::1]:"), "{text}");
    let parsed: meshpunch_proto::connect::ConnectString = text.parse().unwrap();
    let (c, _ev, _, _) = connect(&parsed).await;
    let reg = c.registration().unwrap();
    assert!(reg.observed.is_ipv6());
    assert_eq!(reg.stun, server.stun_addrs().to_vec());
}
