//! Three `meshpunch-rendezvous` processes joined by `--redis URL --node-id ID` around one real
//! `redis-server`, driven by the client library over QUIC: peers on different nodes see each
//! other's presence and exchange offers; a killed node's peers expire within the presence TTL
//! and the same key can come back on another node; the newest connection of a key wins and the
//! old one is told why; a Redis outage degrades `/readyz` while local peers keep working, and
//! everything heals when Redis returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use meshpunch::rendezvous as client;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::{Client, ClientConfig, Event, Events};
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::wire::{Candidate, CandidateKind, PeerKey};
use redis_support::{eventually, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x25519_dalek::{PublicKey, StaticSecret};

/// Presence TTL of the test nodes (production default 30 s).
const TTL: Duration = Duration::from_secs(3);
/// Generous bound for anything that should happen soon on a loaded machine.
const SOON: Duration = Duration::from_secs(30);
/// Token secret shared by the nodes: a token minted by one is valid on all.
const TOKEN_SECRET: &str = "redis-nodes-test-secret-of-32-bytes-or-more";

/// One rendezvous node process.
struct Node {
    child: Child,
    connect: ConnectString,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(redis: &RedisServer, id: &str) -> Node {
        Node::start_with_data(redis, id, None)
    }

    /// `data`: a data dir shared with another node (same certificate, so one pin fits both,
    /// as in production where all nodes behind one name serve the same certificate).
    fn start_with_data(redis: &RedisServer, id: &str, data: Option<&std::path::Path>) -> Node {
        Node::start_at(&redis.url(), id, data)
    }

    /// A node on the Redis at `url` (which may carry `user:password@`).
    fn start_at(redis_url: &str, id: &str, data: Option<&std::path::Path>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data = data.map_or_else(|| dir.path().join("data"), |d| d.to_path_buf());
        let cfg = dir.path().join("rendezvous.toml");
        std::fs::write(
            &cfg,
            format!(
                "token_secret = \"{TOKEN_SECRET}\"\n\n[registry]\npresence_ttl = \"{}s\"\n",
                TTL.as_secs()
            ),
        )
        .unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshpunch-rendezvous"))
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--stun-listen",
                "127.0.0.1:0",
            ])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--redis", redis_url, "--node-id", id])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn meshpunch-rendezvous");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(cs) = line.strip_prefix("connect: ") {
                    let _ = tx.send(cs.to_string());
                }
            }
        });
        let cs = rx
            .recv_timeout(SOON)
            .expect("node prints its connect string");
        Node {
            child,
            connect: cs.parse().expect("connect string"),
            admin,
            _dir: dir,
        }
    }

    /// The node's QUIC address from its connect string.
    fn connect_addr(&self) -> SocketAddr {
        SocketAddr::new(self.connect.host.parse().unwrap(), self.connect.port)
    }

    /// SIGKILL: no drain, no unregister; its peers' presence must expire by TTL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Status code and body of an admin GET.
    async fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = tokio::net::TcpStream::connect(self.admin).await else {
            return (0, String::new());
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return (0, String::new());
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (code, body)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn new_key() -> (StaticSecret, PeerKey) {
    let sk = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let pk = PeerKey::from(PublicKey::from(&sk));
    (sk, pk)
}

async fn connect_with(node: &Node, sk: StaticSecret) -> (Client, Events) {
    tokio::time::timeout(
        SOON,
        Client::connect(ClientConfig::new(node.connect.clone(), sk)),
    )
    .await
    .expect("connect in time")
    .expect("connect ok")
}

async fn connect(node: &Node) -> (Client, Events, PeerKey) {
    let (sk, pk) = new_key();
    let (c, ev) = connect_with(node, sk).await;
    (c, ev, pk)
}

async fn wait_for<T>(ev: &mut Events, what: &str, mut f: impl FnMut(Event) -> Option<T>) -> T {
    tokio::time::timeout(SOON, async {
        loop {
            let e = ev.recv().await.expect("event stream open");
            if let Some(t) = f(e) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn presence(ev: &mut Events, key: PeerKey, online: bool, what: &str) {
    wait_for(ev, what, |e| match e {
        Event::Presence { key: k, online: o } if k == key && o == online => Some(()),
        _ => None,
    })
    .await
}

fn cand(port: u16) -> Vec<Candidate> {
    vec![Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], port)),
        kind: CandidateKind::Host,
        priority: 100,
    }]
}

/// `offerer` offers to `target_key`; the target (its events in `target_ev`) answers. Returns
/// both session secrets.
async fn offer_and_answer(
    offerer: &Client,
    target_key: PeerKey,
    target_ev: &mut Events,
) -> ([u8; 32], [u8; 32]) {
    let offering = offerer.offer(target_key, cand(1111));
    let answering = async {
        let offer = wait_for(target_ev, "incoming offer", |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        assert_eq!(offer.candidates, cand(1111));
        offer.answer(cand(2222)).await
    };
    let (a, b) = tokio::time::timeout(SOON, async { tokio::join!(offering, answering) })
        .await
        .expect("offer/answer in time");
    let (a, b) = (a.expect("offer"), b.expect("answer"));
    assert_eq!(a.peer_candidates, cand(2222));
    assert_eq!(b.peer_candidates, cand(1111));
    assert!(a.initiator && !b.initiator);
    (a.session_secret, b.session_secret)
}

async fn wait_ready(node: &Node, ready: bool) -> String {
    let want = if ready { 200 } else { 503 };
    let start = Instant::now();
    loop {
        let (code, body) = node.get("/readyz").await;
        if code == want {
            return body;
        }
        assert!(
            start.elapsed() < SOON,
            "/readyz never answered {want}: last {code} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn skip(test: &str) -> bool {
    !redis_support::available(test)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_peers_on_different_nodes_see_presence_and_exchange_offers() {
    if skip("redis_nodes_peers_on_different_nodes_see_presence_and_exchange_offers") {
        return;
    }
    let redis = RedisServer::start();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Node::start(&redis, id))
        .collect();
    for n in &nodes {
        let body = wait_ready(n, true).await;
        assert!(body.contains("redis ok"), "{body}");
    }
    let (a, mut a_ev, a_key) = connect(&nodes[0]).await;
    let (b, mut b_ev, b_key) = connect(&nodes[1]).await;
    let (c, mut c_ev, _) = connect(&nodes[2]).await;

    a.watch(vec![b_key]).await.unwrap();
    presence(&mut a_ev, b_key, true, "a (n1) sees b (n2) online").await;
    c.watch(vec![a_key, b_key]).await.unwrap();
    presence(&mut c_ev, a_key, true, "c (n3) sees a online").await;

    let (sa, sb) = offer_and_answer(&a, b_key, &mut b_ev).await;
    assert_eq!(sa, sb, "both sides share the session secret");
    // And the other way round, answered across nodes again.
    let (sb2, sa2) = offer_and_answer(&b, a_key, &mut a_ev).await;
    assert_eq!(sb2, sa2);
    assert_ne!(sa, sb2, "a fresh secret per session");

    // b leaves cleanly: watchers on both other nodes hear it.
    b.close();
    presence(&mut a_ev, b_key, false, "a sees b leave").await;
    presence(&mut c_ev, b_key, false, "c sees b leave").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_killed_node_peers_expire_and_newest_connection_wins() {
    if skip("redis_nodes_killed_node_peers_expire_and_newest_connection_wins") {
        return;
    }
    let redis = RedisServer::start();
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Node::start(&redis, id))
        .collect();
    for n in &nodes {
        wait_ready(n, true).await;
    }
    let (a, mut a_ev, _a_key) = connect(&nodes[0]).await;
    let (b_sk, b_key) = new_key();
    let (_b, _b_ev) = connect_with(&nodes[1], b_sk.clone()).await;
    a.watch(vec![b_key]).await.unwrap();
    presence(&mut a_ev, b_key, true, "b online").await;

    // n2 dies hard: b's presence expires within the TTL.
    let killed = Instant::now();
    nodes[1].kill();
    presence(
        &mut a_ev,
        b_key,
        false,
        "b offline after its node was killed",
    )
    .await;
    let took = killed.elapsed();
    eprintln!("peer of a killed node reported offline after {took:?} (presence TTL {TTL:?})");
    assert!(took < TTL * 4, "took {took:?}");

    // b reconnects to another node (as its client does through DNS) and is back.
    let (b2, mut b2_ev) = connect_with(&nodes[2], b_sk.clone()).await;
    presence(&mut a_ev, b_key, true, "b online again on n3").await;

    // The same key connects on n1 too: the newest connection wins, n3's is told and closed.
    let (b3, mut b3_ev) = connect_with(&nodes[0], b_sk).await;
    wait_for(&mut b2_ev, "b on n3 superseded", |e| {
        matches!(e, Event::Superseded).then_some(())
    })
    .await;
    eventually(SOON, "superseded client stops", || {
        let connected = b2.is_connected();
        async move { !connected }
    })
    .await;
    // Offers now reach the newest connection, and a saw no offline flap in between.
    let (sa, sb) = offer_and_answer(&a, b_key, &mut b3_ev).await;
    assert_eq!(sa, sb);
    b3.close();
    let online = wait_for(&mut a_ev, "next presence of b", |e| match e {
        Event::Presence { key, online } if key == b_key => Some(online),
        _ => None,
    })
    .await;
    assert!(
        !online,
        "b was reported offline only when its last connection closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_redis_outage_degrades_readyz_and_heals() {
    if skip("redis_nodes_redis_outage_degrades_readyz_and_heals") {
        return;
    }
    let mut redis = RedisServer::start();
    let nodes: Vec<Node> = ["n1", "n2"]
        .iter()
        .map(|id| Node::start(&redis, id))
        .collect();
    for n in &nodes {
        wait_ready(n, true).await;
    }
    let (a, mut a_ev, a_key) = connect(&nodes[0]).await;
    let (_a2, mut a2_ev, a2_key) = connect(&nodes[0]).await;
    let (c, mut c_ev, _c_key) = connect(&nodes[1]).await;
    c.watch(vec![a_key]).await.unwrap();
    presence(&mut c_ev, a_key, true, "c sees a").await;

    redis.stop();
    let body = wait_ready(&nodes[0], false).await;
    assert!(body.contains("degraded"), "{body}");
    assert_eq!(
        nodes[0].get("/healthz").await.0,
        200,
        "alive while degraded"
    );

    // Peers of one node keep working with each other.
    a.watch(vec![a2_key]).await.unwrap();
    presence(
        &mut a_ev,
        a2_key,
        true,
        "local presence while redis is down",
    )
    .await;
    let (s1, s2) = offer_and_answer(&a, a2_key, &mut a2_ev).await;
    assert_eq!(s1, s2);

    // Redis returns (empty: no persistence): both nodes reconnect and re-publish.
    redis.restart();
    let body = wait_ready(&nodes[0], true).await;
    assert!(body.contains("redis ok"), "{body}");
    wait_ready(&nodes[1], true).await;
    // A peer arriving now is seen across nodes, and offers cross nodes again.
    let (d, mut d_ev, d_key) = connect(&nodes[1]).await;
    a.watch(vec![a2_key, d_key]).await.unwrap();
    presence(&mut a_ev, d_key, true, "a (n1) sees d (n2) after recovery").await;
    let (s1, s2) = offer_and_answer(&c, a_key, &mut a_ev).await;
    assert_eq!(
        s1, s2,
        "c (n2) reaches a (n1): a's presence was re-published"
    );
    let (s1, s2) = offer_and_answer(&a, d_key, &mut d_ev).await;
    assert_eq!(s1, s2);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_client_moves_to_another_node_by_itself_when_its_node_dies() {
    if skip("redis_nodes_client_moves_to_another_node_by_itself_when_its_node_dies") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let redis = RedisServer::start();
    let shared = tempfile::tempdir().unwrap();
    let mut n1 = Node::start_with_data(&redis, "n1", Some(shared.path()));
    let n2 = Node::start_with_data(&redis, "n2", Some(shared.path()));
    wait_ready(&n1, true).await;
    wait_ready(&n2, true).await;
    assert_eq!(
        n1.connect.pins, n2.connect.pins,
        "one certificate for both nodes"
    );

    // The watcher sits on n2; the moving client knows both nodes, n1 first (as DNS would
    // list them) and lands there.
    let (w, mut w_ev, _w_key) = connect(&n2).await;
    let (c_sk, c_key) = new_key();
    let mut cfg = ClientConfig::new(n1.connect.clone(), c_sk);
    cfg.addresses = vec![n1.connect_addr(), n2.connect_addr()];
    cfg.max_backoff = Duration::from_secs(1);
    let (c, mut c_ev) = tokio::time::timeout(SOON, Client::connect(cfg))
        .await
        .expect("connect in time")
        .expect("connect ok");
    w.watch(vec![c_key]).await.unwrap();
    presence(&mut w_ev, c_key, true, "c online on n1").await;
    let (sa, sb) = offer_and_answer(&w, c_key, &mut c_ev).await;
    assert_eq!(sa, sb);

    // n1 dies hard. Nobody tells c where to go: its client must notice (QUIC idle timeout,
    // no close from a killed process) and find n2 on its own.
    let killed = Instant::now();
    n1.kill();
    let long = Duration::from_secs(90);
    let registered = tokio::time::timeout(long, async {
        let mut lost = false;
        loop {
            let e = c_ev.recv().await.expect("event stream open");
            eprintln!("c event at {:?}: {e:?}", killed.elapsed());
            match e {
                Event::Disconnected { .. } => lost = true,
                Event::Registered(r) if lost => break r,
                _ => {}
            }
        }
    })
    .await
    .expect("c re-registers on the surviving node");
    eprintln!(
        "c registered again {:?} after its node died: {registered:?}",
        killed.elapsed()
    );
    assert!(c.is_connected());
    // Offers from n2 reach c: it is registered there now.
    let (sa, sb) = offer_and_answer(&w, c_key, &mut c_ev).await;
    assert_eq!(sa, sb);
    eprintln!(
        "client moved to the surviving node and took offers {:?} after its node died",
        killed.elapsed()
    );
}

/// Redis run the way the deploy manifests run it: the default user off, one ACL user for the
/// rendezvous limited to its key prefix and channels.
fn acl_redis() -> (RedisServer, String) {
    let redis = RedisServer::start_args(&[
        "--user",
        "default",
        "off",
        "--user",
        "meshpunch",
        "on",
        ">acl-test-password",
        "~meshpunch:*",
        "&meshpunch:*",
        "+@all",
        "-@dangerous",
    ]);
    let url = format!(
        "redis://meshpunch:acl-test-password@127.0.0.1:{}/",
        redis.port()
    );
    (redis, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_revoking_a_member_token_on_node_1_closes_it_on_node_2_within_5s() {
    if skip("redis_nodes_revoking_a_member_token_on_node_1_closes_it_on_node_2_within_5s") {
        return;
    }
    let (redis, url) = acl_redis();
    let n1 = Node::start_at(&url, "n1", None);
    let n2 = Node::start_at(&url, "n2", None);
    for n in [&n1, &n2] {
        let body = wait_ready(n, true).await;
        assert!(body.contains("redis ok"), "{body}");
    }
    let expires = unix_now() + 3600;
    let (member_sk, member_key) = new_key();
    let member = meshpunch_proto::token::mint_for(
        TOKEN_SECRET.as_bytes(),
        "dev",
        expires,
        Some(member_key.0),
    )
    .unwrap();
    let (other_sk, other_key) = new_key();
    let other = meshpunch_proto::token::mint_for(
        TOKEN_SECRET.as_bytes(),
        "dev",
        expires,
        Some(other_key.0),
    )
    .unwrap();
    // The member is connected to node 2, another member to node 1.
    let mut cs2 = n2.connect.clone();
    cs2.token = member.clone();
    let (m, mut m_ev) =
        tokio::time::timeout(SOON, Client::connect(ClientConfig::new(cs2, member_sk)))
            .await
            .unwrap()
            .unwrap();
    let mut cs1 = n1.connect.clone();
    cs1.token = other;
    let (o, mut o_ev) =
        tokio::time::timeout(SOON, Client::connect(ClientConfig::new(cs1, other_sk)))
            .await
            .unwrap()
            .unwrap();
    o.watch(vec![member_key]).await.unwrap();
    presence(
        &mut o_ev,
        member_key,
        true,
        "the other member (n1) sees the member (n2)",
    )
    .await;

    // Revoked with the CLI against node 1's config (its Redis): no SIGHUP anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch-rendezvous"))
        .args(["--redis", &url, "token", "revoke", &member])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run token revoke");
    assert!(
        out.status.success(),
        "token revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    let failure = wait_for(
        &mut m_ev,
        "the member is told its token was revoked",
        |e| match e {
            Event::Unauthorized(f) => Some(f),
            _ => None,
        },
    )
    .await;
    let took = revoked_at.elapsed();
    assert_eq!(
        failure.reason,
        Some(meshpunch_proto::wire::ErrorReason::TokenRevoked)
    );
    assert!(
        took <= Duration::from_secs(5),
        "closed {took:?} after the revocation"
    );
    assert!(!m.is_connected());
    presence(
        &mut o_ev,
        member_key,
        false,
        "the member is gone for the others",
    )
    .await;
    // Only that member: the other one stays.
    assert!(o.is_connected());
    // Redis really enforces the ACL: without the credentials nothing is readable.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", redis.port()))
        .await
        .unwrap();
    s.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        answer.contains("NOAUTH") || answer.contains("AUTH"),
        "{answer}"
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
