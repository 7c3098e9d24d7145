//! The Redis registry with three nodes sharing one real `redis-server`: presence and deliveries
//! across nodes, newest connection wins, a dead node's peers expire, a Redis outage degrades
//! but keeps local service and heals. Drives `RedisRegistry` directly (the server-level tests
//! are in redis_nodes.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::time::Duration;

use meshpunch_proto::wire::{ErrorCode, PeerKey};
use meshpunch_rendezvous::registry::redis::{RedisRegistry, RedisRegistryConfig};
use meshpunch_rendezvous::registry::{Delivery, Envelope, Inbox, PeerId, Registry, RegistryError};
use redis_support::{eventually, RedisServer};

/// Short TTL so expiry is observable; heartbeats run every TTL/3.
const TTL: Duration = Duration::from_secs(3);
/// Generous: the machine may be loaded.
const WAIT: Duration = Duration::from_secs(30);

fn node(redis: &RedisServer, id: &str) -> (RedisRegistry, Inbox) {
    let mut cfg = RedisRegistryConfig::new(redis.url().parse().expect("url"), id);
    cfg.presence_ttl = TTL;
    RedisRegistry::start(cfg)
}

fn pid(net: &str, b: u8) -> PeerId {
    PeerId {
        network: net.into(),
        key: PeerKey([b; 32]),
    }
}

async fn next(inbox: &mut Inbox, what: &str) -> Envelope {
    tokio::time::timeout(WAIT, inbox.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("inbox open")
}

/// Waits for the next delivery matching `pred`, skipping others.
async fn next_matching(
    inbox: &mut Inbox,
    what: &str,
    pred: impl Fn(&Envelope) -> bool,
) -> Envelope {
    loop {
        let e = next(inbox, what).await;
        if pred(&e) {
            return e;
        }
    }
}

async fn wait_ready(reg: &RedisRegistry) {
    eventually(WAIT, "registry ready", || async {
        reg.health().await.ready
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_peers_on_different_nodes_see_presence_and_exchange_offers() {
    if !redis_support::available("redis_peers_on_different_nodes_see_presence_and_exchange_offers")
    {
        return;
    }
    let redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    let (n2, mut in2) = node(&redis, "n2");
    let (n3, _in3) = node(&redis, "n3");
    for n in [&n1, &n2, &n3] {
        wait_ready(n).await;
    }
    let a = pid("net", 1);
    let b = pid("net", 2);

    n1.register(&a, 100).await.expect("register a");
    assert_eq!(
        n1.watch(&a, &[b.key]).await.expect("watch"),
        vec![(b.key, false)]
    );
    n2.register(&b, 200).await.expect("register b");
    let e = next(&mut in1, "presence of b on n1").await;
    assert_eq!(e.to, a);
    assert_eq!(
        e.delivery,
        Delivery::Presence {
            key: b.key,
            online: true
        }
    );
    assert!(n3.is_online(&a).await.expect("is_online"));
    assert!(n3.is_online(&b).await.expect("is_online"));

    // a (on n1) offers to b (on n2); b answers.
    let offer = Delivery::Offer {
        from: a.key,
        offer_id: 7,
        request_id: 1,
        candidates: vec![],
        initiator_rtt_ms: 12,
        observed: Some("198.51.100.7:4000".parse().unwrap()),
    };
    n1.deliver(&b, offer.clone()).await.expect("offer a -> b");
    let e = next(&mut in2, "offer on n2").await;
    assert_eq!((e.to, e.delivery), (b.clone(), offer));
    let answer = Delivery::Answer {
        from: b.key,
        request_id: 1,
        candidates: vec![],
        session_secret: [9; 32],
        start_at_unix_ms: 1234,
        observed: None,
    };
    n2.deliver(&a, answer.clone()).await.expect("answer b -> a");
    let e = next(&mut in1, "answer on n1").await;
    assert_eq!((e.to, e.delivery), (a.clone(), answer));

    // Unknown peers and other networks: NotFound, from any node.
    let stranger = pid("net", 9);
    let fail = Delivery::OfferFailed {
        from: a.key,
        request_id: 1,
        code: ErrorCode::NotFound,
        message: String::new(),
    };
    assert_eq!(
        n3.deliver(&stranger, fail.clone()).await,
        Err(RegistryError::NotFound)
    );
    assert_eq!(
        n3.deliver(&pid("other", 2), fail).await,
        Err(RegistryError::NotFound)
    );
    assert!(!n3.is_online(&pid("other", 1)).await.expect("is_online"));

    // b leaves cleanly: a hears it at once.
    n2.unregister(&b, 200).await.expect("unregister");
    let e = next(&mut in1, "offline of b").await;
    assert_eq!(
        e.delivery,
        Delivery::Presence {
            key: b.key,
            online: false
        }
    );
    assert!(!n3.is_online(&b).await.expect("is_online"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_newest_connection_wins_across_nodes() {
    if !redis_support::available("redis_newest_connection_wins_across_nodes") {
        return;
    }
    let redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    let (n2, mut in2) = node(&redis, "n2");
    let (n3, mut in3) = node(&redis, "n3");
    for n in [&n1, &n2, &n3] {
        wait_ready(n).await;
    }
    let a = pid("net", 1);
    let b = pid("net", 2);
    n1.register(&a, 100).await.expect("register a");
    n1.watch(&a, &[b.key]).await.expect("watch");
    n2.register(&b, 200).await.expect("register b on n2");
    next_matching(&mut in1, "b online", |e| {
        e.delivery
            == Delivery::Presence {
                key: b.key,
                online: true,
            }
    })
    .await;

    // The same key connects to n3: n2 is told to close its connection 200.
    n3.register(&b, 300).await.expect("register b on n3");
    let e = next(&mut in2, "superseded on n2").await;
    assert_eq!(
        (e.to, e.delivery),
        (b.clone(), Delivery::Superseded { conn: 200 })
    );
    // The old connection's unregister changes nothing; deliveries go to the new one.
    n2.unregister(&b, 200).await.expect("stale unregister");
    assert!(n1.is_online(&b).await.expect("is_online"));
    let offer = Delivery::Offer {
        from: a.key,
        offer_id: 1,
        request_id: 2,
        candidates: vec![],
        initiator_rtt_ms: 1,
        observed: Some("198.51.100.7:4000".parse().unwrap()),
    };
    n1.deliver(&b, offer.clone())
        .await
        .expect("deliver to new owner");
    let e = next(&mut in3, "offer on n3").await;
    assert_eq!(e.delivery, offer);
    // Watchers saw no offline flap: the next presence event for b is its real departure.
    n3.unregister(&b, 300).await.expect("unregister");
    let e = next_matching(&mut in1, "b offline", |e| {
        matches!(e.delivery, Delivery::Presence { .. })
    })
    .await;
    assert_eq!(
        e.delivery,
        Delivery::Presence {
            key: b.key,
            online: false
        }
    );
    // n2 kept nothing of b.
    assert_eq!(n2.local_peers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_node_presence_expires_within_ttl() {
    if !redis_support::available("redis_dead_node_presence_expires_within_ttl") {
        return;
    }
    let redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    let (n2, _in2) = node(&redis, "n2");
    let (n3, _in3) = node(&redis, "n3");
    for n in [&n1, &n2, &n3] {
        wait_ready(n).await;
    }
    let a = pid("net", 1);
    let b = pid("net", 2);
    n1.register(&a, 100).await.expect("register a");
    n1.watch(&a, &[b.key]).await.expect("watch");
    n2.register(&b, 200).await.expect("register b");
    next_matching(&mut in1, "b online", |e| {
        e.delivery
            == Delivery::Presence {
                key: b.key,
                online: true,
            }
    })
    .await;

    // Outlive a few heartbeats: the presence must not expire while n2 lives.
    tokio::time::sleep(TTL * 2).await;
    assert!(
        n3.is_online(&b).await.expect("is_online"),
        "presence expired while its node was alive"
    );

    // n2 dies without unregistering anything.
    let died = std::time::Instant::now();
    drop(n2);
    let e = next_matching(&mut in1, "b offline after n2 died", |e| {
        e.delivery
            == Delivery::Presence {
                key: b.key,
                online: false,
            }
    })
    .await;
    let took = died.elapsed();
    assert_eq!(e.to, a);
    assert!(!n3.is_online(&b).await.expect("is_online"));
    eprintln!("presence of a dead node's peer gone after {took:?} (presence TTL {TTL:?})");
    // By construction at most TTL (key life 3/4 TTL + sweep 1/4 TTL); the bound here only
    // catches "never expires" on a loaded machine, it is not a timing measurement.
    assert!(took < TTL * 4, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_local_service_and_republishes() {
    if !redis_support::available("redis_outage_keeps_local_service_and_republishes") {
        return;
    }
    let mut redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    let (n2, mut in2) = node(&redis, "n2");
    wait_ready(&n1).await;
    wait_ready(&n2).await;
    let a = pid("net", 1);
    let b = pid("net", 2);
    let c = pid("net", 3);
    let d = pid("net", 4);
    n1.register(&a, 100).await.expect("register a");
    n1.register(&b, 101).await.expect("register b");
    n2.register(&c, 200).await.expect("register c");
    n2.watch(&c, &[a.key, d.key]).await.expect("watch");

    redis.stop();
    eventually(WAIT, "n1 degraded", || async { !n1.health().await.ready }).await;
    let h = n1.health().await;
    assert!(h.detail.contains("degraded"), "{h:?}");

    // Local peers keep being served: presence and deliveries on n1.
    n1.watch(&a, &[b.key, d.key])
        .await
        .expect("watch while degraded");
    let offer = Delivery::Offer {
        from: a.key,
        offer_id: 5,
        request_id: 5,
        candidates: vec![],
        initiator_rtt_ms: 3,
        observed: Some("198.51.100.7:4000".parse().unwrap()),
    };
    n1.deliver(&b, offer.clone())
        .await
        .expect("local delivery while redis is down");
    let e = next_matching(&mut in1, "local offer", |e| {
        matches!(e.delivery, Delivery::Offer { .. })
    })
    .await;
    assert_eq!((e.to, e.delivery), (b.clone(), offer));
    // A peer that connects during the outage is seen by local watchers at once...
    n1.register(&d, 102)
        .await
        .expect("register d while redis is down");
    next_matching(&mut in1, "d online (local)", |e| {
        e.delivery
            == Delivery::Presence {
                key: d.key,
                online: true,
            }
    })
    .await;
    // ...and a remote peer can't be reached.
    assert!(n1
        .deliver(
            &c,
            Delivery::Presence {
                key: a.key,
                online: true
            }
        )
        .await
        .is_err());

    // Redis comes back empty: both nodes reconnect and re-publish their peers.
    redis.restart();
    wait_ready(&n1).await;
    wait_ready(&n2).await;
    eventually(WAIT, "n1's peers re-published", || async {
        n2.is_online(&a).await.unwrap_or(false)
            && n2.is_online(&b).await.unwrap_or(false)
            && n2.is_online(&d).await.unwrap_or(false)
    })
    .await;
    assert!(n1.is_online(&c).await.expect("is_online"));
    // c's watch of d (registered on n1 during the outage) reports it online now.
    next_matching(&mut in2, "d online seen from n2", |e| {
        e.delivery
            == Delivery::Presence {
                key: d.key,
                online: true,
            }
    })
    .await;
    // Cross-node delivery works again.
    n2.deliver(
        &a,
        Delivery::Presence {
            key: c.key,
            online: true,
        },
    )
    .await
    .expect("deliver after recovery");
    next_matching(&mut in1, "delivery from n2", |e| {
        e.to == a
            && e.delivery
                == Delivery::Presence {
                    key: c.key,
                    online: true,
                }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_heartbeat_notices_a_key_taken_while_its_message_was_lost() {
    if !redis_support::available("redis_heartbeat_notices_a_key_taken_while_its_message_was_lost") {
        return;
    }
    let redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    wait_ready(&n1).await;
    let a = pid("net", 1);
    n1.register(&a, 100).await.expect("register");
    // Another node took the key, but its "superseded" message never arrived (e.g. published
    // while this node's subscription was reconnecting): write the newer owner directly.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let owner = r#"{"node":"elsewhere","conn":"999","since":1,"info":""}"#;
    let _: () = redis::cmd("SET")
        .arg(format!("meshpunch:{{net}}:peer:{}", a.key))
        .arg(owner)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .expect("SET");
    // The next heartbeat finds it and closes the local connection.
    let e = next_matching(&mut in1, "superseded by heartbeat", |e| {
        matches!(e.delivery, Delivery::Superseded { .. })
    })
    .await;
    assert_eq!(
        (e.to, e.delivery),
        (a.clone(), Delivery::Superseded { conn: 100 })
    );
    assert_eq!(n1.local_peers(), 0);
    // The newer owner's key is left alone.
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("meshpunch:{{net}}:peer:{}", a.key))
        .query_async(&mut c)
        .await
        .expect("GET");
    assert_eq!(v.as_deref(), Some(owner));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_server_times_out_to_degraded_and_recovers() {
    if !redis_support::available("redis_frozen_server_times_out_to_degraded_and_recovers") {
        return;
    }
    let redis = RedisServer::start();
    let (n1, mut in1) = node(&redis, "n1");
    let (n2, _in2) = node(&redis, "n2");
    wait_ready(&n1).await;
    wait_ready(&n2).await;
    let a = pid("net", 1);
    let b = pid("net", 2);
    n1.register(&a, 100).await.expect("register a");
    n1.register(&b, 101).await.expect("register b");

    // Connections stay up but nothing answers: command timeouts must take the node to degraded
    // (not hang it), and local service must go on.
    redis.freeze(true);
    eventually(WAIT, "n1 degraded by timeouts", || async {
        !n1.health().await.ready
    })
    .await;
    let offer = Delivery::Offer {
        from: a.key,
        offer_id: 1,
        request_id: 1,
        candidates: vec![],
        initiator_rtt_ms: 1,
        observed: Some("198.51.100.7:4000".parse().unwrap()),
    };
    tokio::time::timeout(WAIT, n1.deliver(&b, offer.clone()))
        .await
        .expect("local delivery does not wait for a frozen redis")
        .expect("local delivery");
    let e = next_matching(&mut in1, "local offer", |e| {
        matches!(e.delivery, Delivery::Offer { .. })
    })
    .await;
    assert_eq!(e.delivery, offer);

    redis.freeze(false);
    wait_ready(&n1).await;
    wait_ready(&n2).await;
    eventually(WAIT, "n1's peers visible from n2 again", || async {
        n2.is_online(&a).await.unwrap_or(false) && n2.is_online(&b).await.unwrap_or(false)
    })
    .await;
}
