//! The Redis registry on the other topologies its URL forms name: a Sentinel-managed master
//! (including a failover to the replica, after which nodes re-resolve the master and re-publish)
//! and a three-shard Redis Cluster (hash-tagged keys and scripts, pub/sub across shards).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::process::Command;
use std::time::Duration;

use meshpunch_proto::wire::PeerKey;
use meshpunch_rendezvous::registry::redis::{RedisRegistry, RedisRegistryConfig};
use meshpunch_rendezvous::registry::{Delivery, Inbox, PeerId, Registry};
use redis_support::{eventually, RedisServer};

const WAIT: Duration = Duration::from_secs(40);

fn node(url: &str, id: &str) -> (RedisRegistry, Inbox) {
    let mut cfg = RedisRegistryConfig::new(url.parse().expect("url"), id);
    cfg.presence_ttl = Duration::from_secs(3);
    RedisRegistry::start(cfg)
}

fn pid(net: &str, b: u8) -> PeerId {
    PeerId {
        network: net.into(),
        key: PeerKey([b; 32]),
    }
}

async fn next(inbox: &mut Inbox, what: &str) -> meshpunch_rendezvous::registry::Envelope {
    tokio::time::timeout(WAIT, inbox.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("inbox open")
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(natlab::testenv::which("redis-cli").expect("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_url_follows_a_failover() {
    if !natlab::testenv::require_commands(
        "redis_sentinel_url_follows_a_failover",
        &["redis-server", "redis-cli"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut master = RedisServer::start();
    let replica_of = format!("127.0.0.1 {}", master.port());
    let replica = RedisServer::start_args(&["--replicaof", &replica_of]);
    let sentinel = RedisServer::start_sentinel(dir.path(), "mp", master.port());
    let url = format!("redis+sentinel://127.0.0.1:{}/mp", sentinel.port());
    let (n1, _in1) = node(&url, "s1");
    let (n2, mut in2) = node(&url, "s2");
    eventually(WAIT, "nodes ready through sentinel", || async {
        n1.health().await.ready && n2.health().await.ready
    })
    .await;
    let a = pid("net", 1);
    let b = pid("net", 2);
    n1.register(&a, 1).await.unwrap();
    n2.register(&b, 2).await.unwrap();
    n1.deliver(
        &b,
        Delivery::Presence {
            key: a.key,
            online: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut in2, "delivery via sentinel master").await.to, b);
    // The replica has the data before the master dies.
    eventually(WAIT, "replica in sync", || {
        let info = redis_cli(replica.port(), &["info", "replication"]);
        async move { info.contains("master_link_status:up") }
    })
    .await;

    // The master dies; Sentinel promotes the replica; the nodes find it and carry on.
    master.stop();
    eventually(WAIT, "sentinel promoted the replica", || {
        let r = redis_cli(
            sentinel.port(),
            &["sentinel", "get-master-addr-by-name", "mp"],
        );
        let want = replica.port().to_string();
        async move { r.contains(&want) }
    })
    .await;
    eventually(WAIT, "nodes ready on the new master", || async {
        n1.health().await.ready && n2.health().await.ready
    })
    .await;
    eventually(WAIT, "presence on the new master", || async {
        n2.is_online(&a).await.unwrap_or(false) && n1.is_online(&b).await.unwrap_or(false)
    })
    .await;
    n1.deliver(
        &b,
        Delivery::Presence {
            key: a.key,
            online: false,
        },
    )
    .await
    .unwrap();
    let e = next(&mut in2, "delivery after failover").await;
    assert_eq!(
        e.delivery,
        Delivery::Presence {
            key: a.key,
            online: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_url_spreads_networks_over_shards() {
    if !natlab::testenv::require_commands(
        "redis_cluster_url_spreads_networks_over_shards",
        &["redis-server", "redis-cli"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<RedisServer> = (0..3)
        .map(|i| {
            let conf = dir.path().join(format!("nodes-{i}.conf"));
            let bus = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .to_string();
            RedisServer::start_args(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-port",
                &bus,
                "--dir",
                dir.path().to_str().unwrap(),
            ])
        })
        .collect();
    let addrs: Vec<String> = shards
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port()))
        .collect();
    let mut args = vec!["--cluster", "create"];
    args.extend(addrs.iter().map(String::as_str));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    redis_cli(shards[0].port(), &args);
    eventually(WAIT, "cluster ok", || {
        let ok = shards
            .iter()
            .all(|s| redis_cli(s.port(), &["cluster", "info"]).contains("cluster_state:ok"));
        async move { ok }
    })
    .await;

    let url = format!("redis+cluster://{},{}", addrs[0], addrs[1]);
    let (n1, mut in1) = node(&url, "c1");
    let (n2, mut in2) = node(&url, "c2");
    eventually(WAIT, "nodes ready on the cluster", || async {
        n1.health().await.ready && n2.health().await.ready
    })
    .await;
    // Networks hash to different slots (and so shards); each one's keys stay in one slot.
    let networks: Vec<String> = (0..12).map(|i| format!("tenant-{i}")).collect();
    let slots: std::collections::HashSet<String> = networks
        .iter()
        .map(|n| {
            redis_cli(
                shards[0].port(),
                &["cluster", "keyslot", &format!("{{{n}}}")],
            )
        })
        .collect();
    assert!(slots.len() > 3, "networks spread over slots");
    for net in &networks {
        let a = pid(net, 1);
        let b = pid(net, 2);
        n1.register(&a, 10).await.unwrap();
        assert_eq!(n1.watch(&a, &[b.key]).await.unwrap(), vec![(b.key, false)]);
        n2.register(&b, 20).await.unwrap();
        let e = next(&mut in1, "presence across shards").await;
        assert_eq!(e.to, a);
        assert_eq!(
            e.delivery,
            Delivery::Presence {
                key: b.key,
                online: true
            }
        );
        n1.deliver(
            &b,
            Delivery::Presence {
                key: a.key,
                online: true,
            },
        )
        .await
        .unwrap();
        assert_eq!(next(&mut in2, "delivery across shards").await.to, b);
        n2.unregister(&b, 20).await.unwrap();
        let e = next(&mut in1, "offline across shards").await;
        assert_eq!(
            e.delivery,
            Delivery::Presence {
                key: b.key,
                online: false
            }
        );
    }
}
