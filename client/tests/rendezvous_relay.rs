//! End to end on loopback: a real rendezvous (in-process) and a real meshpunch-relay
//! (in-process, loopback peers allowed), two daemons, WireGuard-shaped traffic through the
//! proxy ports. Direct path first; with direct blocked (debug knob) the relay; unblocked,
//! back to direct.

mod support;

use std::time::{Duration, Instant};

use meshpunch::control::{self, Request};
use support::{start_relay, start_rendezvous, status, wait_path, FakeWg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_then_forced_relay_then_back_to_direct() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();

    let (da, db, wga, wgb) = support::start_rendezvous_pair(&connect, dir.path()).await;
    let (ca, cb) = (da.control_socket.clone(), db.control_socket.clone());
    let (to_b, to_a) = (da.proxies[0].1, db.proxies[0].1);

    // 1. Direct.
    let t = Instant::now();
    wait_path(&ca, &["direct", "lan"], Duration::from_secs(30)).await;
    wait_path(&cb, &["direct", "lan"], Duration::from_secs(30)).await;
    println!("direct path after {:?}", t.elapsed());
    assert!(wga.exchange(to_b, &wgb, 40, Duration::from_secs(10)).await >= 36);
    assert!(wgb.exchange(to_a, &wga, 40, Duration::from_secs(10)).await >= 36);

    // The relay allocation is up and both sides know the other's relayed candidate.
    // (The allocation usually completes after the first offer/answer: the new relayed
    // candidate must reach the peer at once, not at the next periodic re-offer 20 s later.)
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let sa = status(&ca).await;
        let sb = status(&cb).await;
        let relay_ok = |s: &control::Status| {
            s.home_relay
                .as_ref()
                .is_some_and(|r| r.state == "allocated")
                && s.peers[0].pairs.iter().any(|p| {
                    (p.remote.via == meshpunch_proto::path::Via::Relay
                        || p.kind == meshpunch_proto::path::CandidateKind::Relayed)
                        && p.state == meshpunch_proto::path::PairState::Valid
                })
        };
        if relay_ok(&sa) && relay_ok(&sb) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay pair not valid: {}\n{}",
            serde_json::to_string_pretty(&sa).unwrap(),
            serde_json::to_string_pretty(&sb).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!(
        "relay pairs valid on both sides {:?} after start",
        t.elapsed()
    );

    // 2. Block direct on A only: both sides end on the relay while traffic flows.
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
    let pump = {
        let stop = Instant::now() + Duration::from_secs(20);
        async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            while Instant::now() < stop {
                let _ = s.send_to(&FakeWg::packet(0), to_a).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let pump = tokio::spawn(pump);
    wait_path(&ca, &["relay"], Duration::from_secs(20)).await;
    wait_path(&cb, &["relay"], Duration::from_secs(20)).await;
    println!("relay on both sides after {:?}", t.elapsed());
    pump.abort();
    let sa = status(&ca).await;
    assert!(sa.peers[0]
        .remote
        .as_deref()
        .unwrap_or("")
        .starts_with("relay:"));
    assert!(wga.exchange(to_b, &wgb, 40, Duration::from_secs(10)).await >= 36);
    assert!(wgb.exchange(to_a, &wga, 40, Duration::from_secs(10)).await >= 36);

    // 3. Unblock: back to direct.
    let v = control::request(
        &ca,
        &Request::Debug {
            peer: "other".into(),
            knob: "force-relay".into(),
            on: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(v["ok"], true);
    let t = Instant::now();
    wait_path(&ca, &["direct", "lan"], Duration::from_secs(30)).await;
    wait_path(&cb, &["direct", "lan"], Duration::from_secs(30)).await;
    println!("back to direct after {:?}", t.elapsed());
    assert!(wga.exchange(to_b, &wgb, 40, Duration::from_secs(10)).await >= 36);
    drop(da);
    drop(db);
    relay.control().stop();
}
