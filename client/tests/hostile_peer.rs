//! Attack from a configured peer (issue 12): over a real rendezvous on loopback, a peer
//! offers candidates naming services on our own host (`127.0.0.1:V`, `[::ffff:127.0.0.1]:V`,
//! `0.0.0.0:V` — which Linux delivers locally), multicast and broadcast. The daemon, whose data
//! socket is not on loopback, must not send a single datagram to any of them.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshpunch::keys::{generate_private, Identity};
use meshpunch::rendezvous::{Client, ClientConfig, Event};
use meshpunch_proto::wire::{self, PeerKey};
use support::{start_relay, start_rendezvous, status, FakeWg};
use tokio::net::UdpSocket;

fn cand(addr: SocketAddr, kind: wire::CandidateKind) -> wire::Candidate {
    wire::Candidate {
        addr,
        kind,
        priority: 100,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_candidates_naming_our_own_host_multicast_or_broadcast_get_no_packet() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();

    // Local services the peer wants us to hit.
    let victims = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("0.0.0.0:0").await.unwrap(),
    ];
    let ports: Vec<u16> = victims
        .iter()
        .map(|v| v.local_addr().unwrap().port())
        .collect();
    let mut hostile = Vec::new();
    for kind in [
        wire::CandidateKind::Host,
        wire::CandidateKind::ServerReflexive,
        wire::CandidateKind::ServerReflexiveDependent,
        wire::CandidateKind::Relayed,
    ] {
        hostile.push(cand(
            format!("127.0.0.1:{}", ports[0]).parse().unwrap(),
            kind,
        ));
        hostile.push(cand(
            format!("[::ffff:127.0.0.1]:{}", ports[1]).parse().unwrap(),
            kind,
        ));
        hostile.push(cand(format!("0.0.0.0:{}", ports[2]).parse().unwrap(), kind));
        hostile.push(cand("224.0.0.1:9".parse().unwrap(), kind));
        hostile.push(cand("255.255.255.255:9".parse().unwrap(), kind));
    }

    // Our daemon: data socket on 0.0.0.0 (not loopback-only, so loopback is refused).
    let me = Identity::from_private(generate_private());
    let evil = Identity::from_private(generate_private());
    let wg = FakeWg::new().await;
    let mut opts =
        support::rendezvous_peer_options(&me, &evil, &connect, dir.path(), wg.addr(), "a");
    opts.listen = "0.0.0.0:0".parse().unwrap();
    let d = meshpunch::daemon::start(opts).await.unwrap();

    // The hostile peer: a plain rendezvous client that answers every offer with, and offers,
    // the hostile candidates.
    let mut cfg = ClientConfig::new(
        connect.parse().unwrap(),
        x25519_dalek::StaticSecret::from(evil.private),
    );
    cfg.max_backoff = Duration::from_secs(1);
    let (client, mut events) = Client::connect(cfg).await.unwrap();
    let answers = hostile.clone();
    let answering = tokio::spawn(async move {
        let mut punches = 0u32;
        while let Some(ev) = events.recv().await {
            if let Event::IncomingOffer(o) = ev {
                if o.answer(answers.clone()).await.is_ok() {
                    punches += 1;
                }
            }
        }
        punches
    });
    let mut offered = false;
    for _ in 0..40 {
        if client
            .offer(PeerKey(me.public), hostile.clone())
            .await
            .is_ok()
        {
            offered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(offered, "the hostile peer's offer never completed");

    // Punching runs for a few seconds: nothing may reach the victims.
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    for v in &victims {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let got = tokio::time::timeout(left, v.recv_from(&mut buf)).await;
        assert!(
            got.is_err(),
            "a datagram reached {} : {got:?}",
            v.local_addr().unwrap()
        );
    }
    let st = status(&d.control_socket).await;
    assert!(
        st.probes.refused_candidates >= 20,
        "refused {}",
        st.probes.refused_candidates
    );
    assert!(
        st.peers[0].session,
        "a session exists (the offer was taken)"
    );
    client.close();
    answering.abort();
    relay.control().stop();
}
