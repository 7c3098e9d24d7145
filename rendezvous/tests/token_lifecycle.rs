//! Token lifecycle on live connections, attacked the way a tenant with bad intent would: a
//! short-lived token must not keep its connection (or its relay credentials) past expiry, a
//! client that ignores re-authentication is closed, a proof recorded on another connection or
//! for an earlier challenge is refused, a member token admits only its key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use meshpunch_proto::wire::{self, ErrorCode, ErrorReason, Message, PeerKey};
use meshpunch_rendezvous::config::RelayConfig;
use meshpunch_rendezvous::{Config, Server};
use x25519_dalek::PublicKey;

async fn start_with(dir: &std::path::Path, f: impl FnOnce(&mut Config)) -> Server {
    init_tracing();
    let mut cfg = Config::loopback(dir);
    cfg.relays = vec![RelayConfig {
        region: "test".into(),
        urls: vec!["turn:127.0.0.1:3478".into()],
        secret: "relay-secret".into(),
    }];
    f(&mut cfg);
    Server::start(cfg).await.expect("server starts")
}

fn unix_now() -> u64 {
    meshpunch_rendezvous::server::unix_now()
}

/// Reads until an error arrives (skipping other traffic) and then expects the stream to end.
async fn expect_closed_with(raw: &mut Raw, reason: ErrorReason) {
    loop {
        match raw.recv().await {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unauthorized, "{e:?}");
                assert_eq!(e.reason, Some(reason), "{e:?}");
                break;
            }
            Some(_) => continue,
            None => panic!("closed without the typed error ({reason:?})"),
        }
    }
    assert!(
        raw.recv().await.is_none(),
        "the server closes after the error"
    );
}

#[tokio::test]
async fn a_token_valid_for_3s_is_closed_with_unauthorized_expired_by_5s() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |_| {}).await;
    let mut cs = server.dev_connect().unwrap().clone();
    let minted = Instant::now();
    cs.token = server.mint_token("dev", Duration::from_secs(3));
    let token_expiry = meshpunch_proto::token::parse(&cs.token)
        .unwrap()
        .expires_unix;
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    let Message::Registered(reg) = raw.register(&cs.token, &sk).await else {
        panic!("registration refused")
    };
    // No relay credential outlives the token (credential_ttl is 1 h).
    assert!(!reg.relays.is_empty());
    for r in &reg.relays {
        assert!(
            r.expires_unix <= token_expiry,
            "credential expires at {} after the token ({token_expiry})",
            r.expires_unix
        );
        let user_expiry: u64 = r.username.split(':').next().unwrap().parse().unwrap();
        assert!(user_expiry <= token_expiry);
    }
    expect_closed_with(&mut raw, ErrorReason::TokenExpired).await;
    let took = minted.elapsed();
    assert!(took <= Duration::from_secs(5), "closed only after {took:?}");
    assert!(unix_now() > token_expiry || took >= Duration::from_secs(2));
}

#[tokio::test]
async fn a_client_that_ignores_the_reauth_challenge_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.reauth_interval = Duration::from_secs(1);
        c.limits.reauth_timeout = Duration::from_secs(2);
    })
    .await;
    let cs = server.dev_connect().unwrap().clone();
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    assert!(matches!(
        raw.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    // The challenge arrives on the live connection; the client ignores it.
    let challenged = loop {
        match raw.recv().await {
            Some(Message::Challenge(_)) => break Instant::now(),
            Some(_) => continue,
            None => panic!("closed before any re-authentication challenge"),
        }
    };
    expect_closed_with(&mut raw, ErrorReason::ReauthTimeout).await;
    let waited = challenged.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(5),
        "closed {waited:?} after the challenge"
    );
}

/// Computes the proof for `ch` as if on the connection with TLS exporter `exporter`.
fn proof(sk: &x25519_dalek::StaticSecret, exporter: &[u8; 32], ch: &wire::Challenge) -> Message {
    let pk = PeerKey::from(PublicKey::from(sk));
    let dh = sk
        .diffie_hellman(&PublicKey::from(ch.server_ephemeral))
        .to_bytes();
    let mac = wire::key_proof(&dh, exporter, &ch.nonce, &pk, &ch.server_ephemeral);
    Message::KeyProof(wire::KeyProof { mac })
}

fn exporter(raw: &Raw) -> [u8; 32] {
    let mut e = [0u8; 32];
    raw.conn
        .export_keying_material(&mut e, wire::EXPORTER_LABEL, b"")
        .unwrap();
    e
}

async fn next_challenge(raw: &mut Raw) -> wire::Challenge {
    loop {
        match raw.recv().await {
            Some(Message::Challenge(c)) => return c,
            Some(_) => continue,
            None => panic!("closed before the re-authentication challenge"),
        }
    }
}

#[tokio::test]
async fn reauth_proofs_from_an_older_connection_or_challenge_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.reauth_interval = Duration::from_secs(1);
    })
    .await;
    let cs = server.dev_connect().unwrap().clone();
    let (sk, _) = key();

    // An honest answer keeps the connection.
    let mut honest = Raw::connect(&cs).await;
    assert!(matches!(
        honest.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    let ch = next_challenge(&mut honest).await;
    let good = proof(&sk, &exporter(&honest), &ch);
    honest.send(&good).await;
    // Replaying that proof for the next challenge (an older nonce) is refused.
    let _next = next_challenge(&mut honest).await;
    honest.send(&good).await;
    expect_closed_with(&mut honest, ErrorReason::BadProof).await;

    // A proof for the current challenge but bound to an older connection's TLS session (an
    // attacker relaying challenges to a connection that holds the key) is refused.
    let older = Raw::connect(&cs).await;
    let older_exporter = exporter(&older);
    let mut raw = Raw::connect(&cs).await;
    assert!(matches!(
        raw.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    let ch = next_challenge(&mut raw).await;
    raw.send(&proof(&sk, &older_exporter, &ch)).await;
    expect_closed_with(&mut raw, ErrorReason::BadProof).await;
}

#[tokio::test]
async fn the_client_library_answers_reauth_and_stays_connected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.reauth_interval = Duration::from_secs(1);
        c.limits.reauth_timeout = Duration::from_secs(2);
    })
    .await;
    let cs = server.dev_connect().unwrap().clone();
    let (client, mut events, _, _) = connect(&cs).await;
    let (_, other) = key();
    // Several re-authentications pass; the connection is never dropped.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
        {
            assert!(
                !matches!(ev, client::Event::Disconnected { .. }),
                "dropped: {ev:?}"
            );
        }
    }
    assert!(client.is_connected());
    client.watch(vec![other]).await.unwrap();
    assert_eq!(server.open_connections(), 1);
}

#[tokio::test]
async fn a_member_token_admits_only_its_key_and_revocation_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |_| {}).await;
    let base = server.dev_connect().unwrap().clone();
    let secret = std::fs::read_to_string(dir.path().join("token-secret")).unwrap();
    let (sk, pk) = key();
    let member = meshpunch_proto::token::mint_for(
        secret.trim().as_bytes(),
        "dev",
        unix_now() + 3600,
        Some(pk.0),
    )
    .unwrap();
    let (_, other_key) = key();
    assert_eq!(
        hello(&base, &member, other_key).await,
        Some(ErrorReason::KeyNotAllowed),
        "another key was admitted"
    );
    let mut raw = Raw::connect(&base).await;
    assert!(matches!(
        raw.register(&member, &sk).await,
        Message::Registered(_)
    ));
    // Revoked through the registry (what `token revoke` does): the live connection closes.
    let revoked_at = Instant::now();
    server.revoke(&member).await.unwrap();
    expect_closed_with(&mut raw, ErrorReason::TokenRevoked).await;
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    // And it cannot come back.
    assert_eq!(
        hello(&base, &member, pk).await,
        Some(ErrorReason::TokenRevoked)
    );
}

/// Sends a Hello and returns the reason of the refusal (`None` if challenged).
async fn hello(
    cs: &meshpunch_proto::connect::ConnectString,
    token: &str,
    key: PeerKey,
) -> Option<ErrorReason> {
    let mut raw = Raw::connect(cs).await;
    raw.send(&Message::Hello(wire::Hello {
        token: token.into(),
        key,
        software: "test".into(),
    }))
    .await;
    match raw.recv().await {
        Some(Message::Error(e)) => e.reason,
        _ => None,
    }
}

#[tokio::test]
async fn a_short_token_secret_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.token_secret = Some("short".into());
    let err = Server::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("at least 32 bytes"), "{err}");
    let file = dir.path().join("secret");
    std::fs::write(&file, "also-short\n").unwrap();
    let mut cfg = Config::loopback(dir.path());
    cfg.token_secret_file = Some(file.clone());
    let err = Server::start(cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("at least 32 bytes") && err.contains(&file.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_client_stops_retrying_and_a_reloaded_token_reconnects_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |_| {}).await;
    let mut cs = server.dev_connect().unwrap().clone();
    cs.token = server.mint_token("dev", Duration::from_secs(2));
    let (client, mut events, _, _) = connect(&cs).await;
    let failure = wait_for(&mut events, |e| match e {
        client::Event::Unauthorized(f) => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(failure.reason, Some(ErrorReason::TokenExpired));
    assert_eq!(failure.network.as_deref(), Some("dev"));
    let described = failure.describe();
    assert!(
        described.contains("expired at") && described.contains(" UTC"),
        "{described}"
    );
    // No reconnect storm: nothing registers during the next seconds.
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet_until {
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
        {
            assert!(
                !matches!(
                    ev,
                    client::Event::Registered(_) | client::Event::Unauthorized(_)
                ),
                "retried: {ev:?}"
            );
        }
    }
    assert_eq!(server.open_connections(), 0);
    // The operator rotates the token (the daemon does this on SIGHUP): back at once.
    let mut fresh = cs.clone();
    fresh.token = server.mint_token("dev", Duration::from_secs(3600));
    client.reload(fresh).await.unwrap();
    wait_for(&mut events, |e| match e {
        client::Event::Registered(_) => Some(()),
        _ => None,
    })
    .await;
    assert!(client.is_connected());
    assert_eq!(client.auth_failure(), None);
}
