//! Loopback integration tests of the rendezvous server with the real client library.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::client::{ClientError, Event};
use common::*;
use meshpunch_proto::wire::{Candidate, CandidateKind, ErrorCode, Message};

fn cand(port: u16) -> Vec<Candidate> {
    vec![Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], port)),
        kind: CandidateKind::Host,
        priority: 100,
    }]
}

#[tokio::test]
async fn two_clients_watch_and_exchange_offers_with_one_session_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (a, mut a_ev, _, a_key) = connect(&cs).await;
    let reg = a.registration().unwrap();
    assert_eq!(reg.network, "dev");
    assert!(reg.observed.ip().is_loopback());
    assert_eq!(reg.stun, server.stun_addrs().to_vec());

    let (_, b_key) = key();
    a.watch(vec![b_key]).await.unwrap();
    let online = wait_for(&mut a_ev, |e| match e {
        Event::Presence { key, online } if key == b_key => Some(online),
        _ => None,
    })
    .await;
    assert!(!online, "b is not connected yet");

    // b connects with the key a watches.
    let (b_sk, _) = key();
    let b_key = meshpunch_proto::wire::PeerKey::from(x25519_dalek::PublicKey::from(&b_sk));
    a.watch(vec![b_key]).await.unwrap();
    let (b, mut b_ev) =
        common::client::Client::connect(common::client::ClientConfig::new(cs.clone(), b_sk))
            .await
            .unwrap();
    wait_for(&mut a_ev, |e| match e {
        Event::Presence { key, online: true } if key == b_key => Some(()),
        _ => None,
    })
    .await;

    let answering = tokio::spawn(async move {
        let offer = wait_for(&mut b_ev, |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        assert_eq!(offer.from, a_key);
        assert_eq!(offer.candidates, cand(1111));
        let punch = offer.answer(cand(2222)).await.unwrap();
        (punch, b_ev)
    });
    let a_punch = a.offer(b_key, cand(1111)).await.unwrap();
    let (b_punch, mut b_ev) = answering.await.unwrap();
    assert_eq!(a_punch.peer, b_key);
    assert_eq!(b_punch.peer, a_key);
    assert_eq!(a_punch.peer_candidates, cand(2222));
    assert_eq!(b_punch.peer_candidates, cand(1111));
    assert_eq!(a_punch.session_secret, b_punch.session_secret);
    assert!(a_punch.initiator && !b_punch.initiator);
    // Each side learns where the rendezvous itself sees the other (the only IP a birthday
    // search may target, whatever candidates the peer claims).
    assert_eq!(a_punch.peer_observed, b.observed_addr());
    assert_eq!(b_punch.peer_observed, a.observed_addr());
    assert!(a_punch.peer_observed.is_some() && b_punch.peer_observed.is_some());
    let skew = if a_punch.start_at > b_punch.start_at {
        a_punch.start_at - b_punch.start_at
    } else {
        b_punch.start_at - a_punch.start_at
    };
    assert!(
        skew < std::time::Duration::from_secs(2),
        "start skew {skew:?}"
    );

    // b leaves: a sees it go.
    b.close();
    wait_for(&mut a_ev, |e| match e {
        Event::Presence { key, online: false } if key == b_key => Some(()),
        _ => None,
    })
    .await;
    drop(b_ev.recv());
}

#[tokio::test]
async fn self_offer_and_unknown_peer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (a, _a_ev, _, a_key) = connect(&cs).await;
    let err = a.offer(a_key, vec![]).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::SelfOffer,
                ..
            }
        ),
        "{err:?}"
    );
    let (_, nobody) = key();
    let err = a.offer(nobody, vec![]).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_network_cannot_see_peers_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut cs_x = server.dev_connect().unwrap().clone();
    cs_x.token = server.mint_token("net-x", std::time::Duration::from_secs(3600));
    let mut cs_y = cs_x.clone();
    cs_y.token = server.mint_token("net-y", std::time::Duration::from_secs(3600));
    let (x, mut x_ev, _, _) = connect(&cs_x).await;
    let (_y, _y_ev, _, y_key) = connect(&cs_y).await;
    let (_, unknown) = key();
    let to_y = x.offer(y_key, vec![]).await.unwrap_err();
    let to_unknown = x.offer(unknown, vec![]).await.unwrap_err();
    assert_eq!(
        std::mem::discriminant(&to_y),
        std::mem::discriminant(&to_unknown)
    );
    match (&to_y, &to_unknown) {
        (
            ClientError::Server {
                code: c1,
                message: m1,
                ..
            },
            ClientError::Server {
                code: c2,
                message: m2,
                ..
            },
        ) => {
            assert_eq!((c1, m1), (c2, m2), "indistinguishable answers");
            assert_eq!(*c1, ErrorCode::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // Presence of y is "offline" for x.
    x.watch(vec![y_key]).await.unwrap();
    let online = wait_for(&mut x_ev, |e| match e {
        Event::Presence { key, online } if key == y_key => Some(online),
        _ => None,
    })
    .await;
    assert!(!online);
}

#[tokio::test]
async fn forged_key_proof_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (_victim_sk, victim) = key();
    let mut raw = Raw::connect(&cs).await;
    raw.send(&Message::Hello(meshpunch_proto::wire::Hello {
        token: cs.token.clone(),
        key: victim,
        software: "attacker".into(),
    }))
    .await;
    let Some(Message::Challenge(ch)) = raw.recv().await else {
        panic!("expected challenge")
    };
    // The attacker does not hold the victim's secret: it proves with its own.
    let (attacker_sk, _) = key();
    let mut exporter = [0u8; 32];
    raw.conn
        .export_keying_material(&mut exporter, meshpunch_proto::wire::EXPORTER_LABEL, b"")
        .unwrap();
    let dh = attacker_sk
        .diffie_hellman(&x25519_dalek::PublicKey::from(ch.server_ephemeral))
        .to_bytes();
    let mac =
        meshpunch_proto::wire::key_proof(&dh, &exporter, &ch.nonce, &victim, &ch.server_ephemeral);
    raw.send(&Message::KeyProof(meshpunch_proto::wire::KeyProof { mac }))
        .await;
    match raw.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let reg = server.registry();
    let id = meshpunch_rendezvous::registry::PeerId {
        network: "dev".into(),
        key: victim,
    };
    assert!(!reg.is_online(&id).await.unwrap());

    // A proof replayed on another TLS session fails too.
    let (sk, _) = key();
    let mut first = Raw::connect(&cs).await;
    assert!(matches!(
        first.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));
    let pk = meshpunch_proto::wire::PeerKey::from(x25519_dalek::PublicKey::from(&sk));
    let mut second = Raw::connect(&cs).await;
    second
        .send(&Message::Hello(meshpunch_proto::wire::Hello {
            token: cs.token.clone(),
            key: pk,
            software: "replay".into(),
        }))
        .await;
    let Some(Message::Challenge(_)) = second.recv().await else {
        panic!("expected challenge")
    };
    second
        .send(&Message::KeyProof(meshpunch_proto::wire::KeyProof { mac }))
        .await;
    assert!(
        matches!(second.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::Unauthorized)
    );
}

#[tokio::test]
async fn expired_revoked_and_foreign_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let revoked = {
        // Mint with the server's secret: start once to create it.
        let s = start(dir.path()).await;
        let t = s.mint_token("dev", std::time::Duration::from_secs(3600));
        drop(s);
        t
    };
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path());
    cfg.revoked_tokens = vec![format!(
        "sha256:{}",
        meshpunch_proto::token::token_hash(&revoked)
    )];
    let server = meshpunch_rendezvous::Server::start(cfg).await.unwrap();
    let base = server.dev_connect().unwrap().clone();
    let secret = std::fs::read_to_string(dir.path().join("token-secret")).unwrap();
    let expired = meshpunch_proto::token::mint(secret.trim().as_bytes(), "dev", 1000).unwrap();
    let foreign = meshpunch_proto::token::mint(b"another server", "dev", u64::MAX / 2).unwrap();
    for (name, token) in [
        ("expired", expired),
        ("revoked", revoked),
        ("foreign", foreign),
        ("garbage", "x".to_string()),
    ] {
        let mut cs = base.clone();
        cs.token = token;
        let (sk, _) = key();
        let err = common::client::Client::connect(common::client::ClientConfig::new(cs, sk))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Server {
                    code: ErrorCode::Unauthorized,
                    ..
                }
            ),
            "{name}: {err:?}"
        );
    }
    // The dev token still works.
    let _ok = connect(&base).await;
}

#[tokio::test]
async fn bad_frames_get_typed_errors_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let (good, _good_ev, _, good_key) = connect(&cs).await;

    // Unknown kind and unknown version: typed errors, the connection stays usable.
    let (sk, _) = key();
    let mut raw = Raw::connect(&cs).await;
    let mut unknown_kind = Message::Watch(vec![]).encode();
    unknown_kind[5] = 250;
    raw.send_bytes(&unknown_kind).await;
    assert!(
        matches!(raw.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::Unsupported)
    );
    let mut unknown_version = Message::Watch(vec![]).encode();
    unknown_version[4] = 99;
    raw.send_bytes(&unknown_version).await;
    assert!(
        matches!(raw.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::Unsupported)
    );
    // Malformed body.
    raw.send_bytes(&[0, 0, 0, 5, 1, 9, 0xff, 0xff, 0xff]).await;
    assert!(matches!(raw.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::BadRequest));
    // Out of order: a watch before registering.
    raw.send(&Message::Watch(vec![])).await;
    assert!(matches!(raw.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::BadRequest));
    assert!(matches!(
        raw.register(&cs.token, &sk).await,
        Message::Registered(_)
    ));

    // Oversized frame: TooLarge, then the server closes this connection only.
    let mut big = Raw::connect(&cs).await;
    big.send_bytes(&(10_000_000u32).to_be_bytes()).await;
    assert!(matches!(big.recv().await, Some(Message::Error(e)) if e.code == ErrorCode::TooLarge));
    assert!(big.recv().await.is_none());

    // Everyone else carries on.
    let (_, nobody) = key();
    assert!(matches!(
        good.offer(nobody, vec![]).await,
        Err(ClientError::Server {
            code: ErrorCode::NotFound,
            ..
        })
    ));
    assert!(good.is_connected());
    let id = meshpunch_rendezvous::registry::PeerId {
        network: "dev".into(),
        key: good_key,
    };
    assert!(server.registry().is_online(&id).await.unwrap());
}

#[tokio::test]
async fn clients_rejoin_a_restarted_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let port = server.quic_addr().port();
    let (a, mut a_ev, _, _) = connect(&cs).await;
    let (b, mut b_ev, _, b_key) = connect(&cs).await;
    a.watch(vec![b_key]).await.unwrap();
    wait_for(&mut a_ev, |e| match e {
        Event::Presence { key, online: true } if key == b_key => Some(()),
        _ => None,
    })
    .await;
    drop(server);
    wait_for(&mut a_ev, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    wait_for(&mut b_ev, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;

    // Same data dir and port: same certificate, same token secret.
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path());
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server2 = {
        let mut tries = 0;
        loop {
            match meshpunch_rendezvous::Server::start(cfg.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("restart: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
    };
    assert_eq!(server2.dev_connect().unwrap().pins, cs.pins);
    wait_for(&mut a_ev, |e| {
        matches!(e, Event::Registered(_)).then_some(())
    })
    .await;
    wait_for(&mut b_ev, |e| {
        matches!(e, Event::Registered(_)).then_some(())
    })
    .await;
    assert!(a.is_connected() && b.is_connected());
    // a re-sent its watch set: it learns that b is back.
    wait_for(&mut a_ev, |e| match e {
        Event::Presence { key, online: true } if key == b_key => Some(()),
        _ => None,
    })
    .await;
    // They can reach each other again.
    let answering = tokio::spawn(async move {
        let o = wait_for(&mut b_ev, |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        o.answer(vec![]).await.unwrap()
    });
    let p = a.offer(b_key, vec![]).await.unwrap();
    let q = answering.await.unwrap();
    assert_eq!(p.session_secret, q.session_secret);
    drop(b);
}

#[tokio::test]
async fn connect_string_with_a_host_name_connects() {
    // The client resolves the host and races handshakes over every address it gets (where
    // "localhost" also maps to ::1, the IPv4 listener still wins quickly).
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut cs = server.dev_connect().unwrap().clone();
    cs.host = "localhost".into();
    let started = std::time::Instant::now();
    let (c, _ev, _, _) = connect(&cs).await;
    assert_eq!(c.registration().unwrap().server, server.quic_addr());
    eprintln!("connected via localhost in {:?}", started.elapsed());
}

#[tokio::test]
async fn unanswered_offer_times_out_and_relay_credentials_are_handed_out() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path());
    cfg.limits.offer_timeout = std::time::Duration::from_secs(1);
    cfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "eu".into(),
        urls: vec!["turn:127.0.0.1:3478".into()],
        secret: "s3cret".into(),
    }];
    let server = meshpunch_rendezvous::Server::start(cfg).await.unwrap();
    let cs = server.dev_connect().unwrap().clone();
    let (a, _a_ev, _, _) = connect(&cs).await;
    let (_b, mut b_ev, _, b_key) = connect(&cs).await;

    let relays = a.registration().unwrap().relays;
    assert_eq!(relays.len(), 1);
    let r = &relays[0];
    assert_eq!(r.region, "eu");
    assert_eq!(r.urls, vec!["turn:127.0.0.1:3478".to_string()]);
    assert_eq!(
        r.password,
        meshpunch_proto::creds::rest_password(b"s3cret", &r.username)
    );
    let now = meshpunch_rendezvous::server::unix_now();
    let expiry = meshpunch_proto::creds::check_rest_username(&r.username, now).unwrap();
    assert_eq!(expiry, r.expires_unix);
    // credential_ttl defaults to 1 h (the dev token lives a year, so it does not cap it).
    assert!(
        expiry + 60 >= now + 3600 && expiry <= now + 3600,
        "{expiry} vs {now}"
    );

    // b sees the offer but never answers.
    let offer = a.offer(b_key, cand(1));
    let seen = wait_for(&mut b_ev, |e| match e {
        Event::IncomingOffer(o) => Some(o.offer_id),
        _ => None,
    });
    let (result, _) = tokio::join!(offer, seen);
    assert!(
        matches!(
            result,
            Err(ClientError::Server {
                code: ErrorCode::Timeout,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn client_can_bring_its_own_udp_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cs = server.dev_connect().unwrap().clone();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let (sk, _) = key();
    let mut cfg = common::client::ClientConfig::new(cs, sk);
    cfg.socket = Some(sock);
    let (c, _ev) = common::client::Client::connect(cfg).await.unwrap();
    assert_eq!(c.observed_addr(), Some(local));
}
