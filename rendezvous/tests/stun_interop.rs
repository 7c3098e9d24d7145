//! The STUN server answers coturn's own tools correctly (RFC 8489 + RFC 5780 on
//! 127.0.0.1 with the alternate address 127.0.0.2; the loopback /8 works on Linux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use meshpunch_rendezvous::{Config, Server};

async fn run(cmd: &str, args: &[String]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(cmd)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} {args:?} hung"))
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{cmd} failed: {text}");
    text
}

async fn server(dir: &std::path::Path, alt: bool) -> Server {
    let mut cfg = Config::loopback(dir);
    if alt {
        cfg.stun_alt = Some(SocketAddr::from(([127, 0, 0, 2], 0)));
    }
    Server::start(cfg).await.unwrap()
}

#[tokio::test]
async fn coturn_stunclient_gets_rfc5780_answers() {
    if !natlab::testenv::require_commands(
        "coturn_stunclient_gets_rfc5780_answers",
        &["turnutils_stunclient"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), true).await;
    let addrs = s.stun_addrs().to_vec();
    assert_eq!(addrs.len(), 4, "{addrs:?}");
    let out = run(
        "turnutils_stunclient",
        &["-p".into(), addrs[0].port().to_string(), "127.0.0.1".into()],
    )
    .await;
    // First answer from the primary, then two CHANGE-REQUEST answers from the alternate
    // address (the second to the RESPONSE-PORT).
    assert!(out.contains("RFC 5780 response 3"), "{out}");
    assert!(
        out.contains(&format!("Response origin: : {}", addrs[0])),
        "{out}"
    );
    assert!(
        out.contains(&format!("Other addr: : {}", addrs[3])),
        "{out}"
    );
    assert!(
        out.contains(&format!("Response origin: : {}", addrs[3])),
        "{out}"
    );
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
}

#[tokio::test]
async fn coturn_stunclient_without_alternate_sees_plain_rfc8489() {
    if !natlab::testenv::require_commands(
        "coturn_stunclient_without_alternate_sees_plain_rfc8489",
        &["turnutils_stunclient"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), false).await;
    let port = s.stun_addrs()[0].port();
    let out = run(
        "turnutils_stunclient",
        &["-p".into(), port.to_string(), "127.0.0.1".into()],
    )
    .await;
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    assert!(
        !out.contains("RFC 5780"),
        "no OTHER-ADDRESS without an alternate: {out}"
    );
}

#[tokio::test]
async fn coturn_natdiscovery_classifies_loopback_as_endpoint_independent() {
    if !natlab::testenv::require_commands(
        "coturn_natdiscovery_classifies_loopback_as_endpoint_independent",
        &["turnutils_natdiscovery"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), true).await;
    let port = s.stun_addrs()[0].port();
    let out = run(
        "turnutils_natdiscovery",
        &[
            "-m".into(),
            "-f".into(),
            "-p".into(),
            port.to_string(),
            "127.0.0.1".into(),
        ],
    )
    .await;
    assert!(
        out.contains("NAT with Endpoint Independent Mapping!"),
        "{out}"
    );
    assert!(
        out.contains("NAT with Endpoint Independent Filtering!"),
        "{out}"
    );
}

#[tokio::test]
async fn proto_binding_client_talks_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), true).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let req = meshpunch_proto::stun::binding_request([9; 12], true, true);
    sock.send_to(&req, s.stun_addrs()[0]).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        from,
        s.stun_addrs()[3],
        "answer comes from the other IP and port"
    );
    let r = meshpunch_proto::stun::parse_binding_response(&buf[..n]).unwrap();
    assert_eq!(r.mapped, Some(me));
    assert_eq!(r.response_origin, Some(s.stun_addrs()[3]));
}

#[tokio::test]
async fn stun_answers_are_rate_limited_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.limits.stun_burst = 3;
    cfg.limits.stun_per_sec_per_ip = 0.001;
    let s = Server::start(cfg).await.unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..10u8 {
        let req = meshpunch_proto::stun::binding_request([i; 12], false, false);
        sock.send_to(&req, s.stun_addrs()[0]).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 1500];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
    {
        assert!(meshpunch_proto::stun::parse_binding_response(&buf[..n]).is_ok());
        answered += 1;
    }
    assert_eq!(answered, 3, "only the burst is answered");
}
