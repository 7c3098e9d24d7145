//! The QUIC connection to the rendezvous shares the daemon's UDP data socket (demultiplexed by
//! source): the address the rendezvous observes is the data socket's STUN mapping, the daemon
//! has no UDP socket but the data socket and its proxy ports, punching still works, and the
//! rendezvous client on a shared socket moves between nodes (happy eyeballs, reconnect) on
//! that one socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshpunch::keys::{format_key, generate_private, Identity};
use meshpunch::rendezvous::{endpoint_on, Client, ClientConfig, Event, Events, Registration};
use meshpunch::shared_socket::SharedSocket;
use meshpunch_proto::addr::unmap as canonical;
use support::{start_relay, start_rendezvous, status, wait_path};
use tokio::net::UdpSocket;

/// Polls `sock`'s status until the rendezvous is connected and STUN answered the data socket.
async fn wait_stun_and_rendezvous(sock: &std::path::Path) -> meshpunch::control::Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(sock).await;
        if st.rendezvous.state == "connected" && st.public_addr_source.as_deref() == Some("stun") {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "no registration + STUN mapping in 30 s: {}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_observes_the_data_socket_and_punching_still_works() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();

    let (da, db, wga, wgb) = support::start_rendezvous_pair(&connect, dir.path()).await;

    for d in [&da, &db] {
        let st = wait_stun_and_rendezvous(&d.control_socket).await;
        let r = &st.rendezvous;
        println!(
            "data {} STUN mapping {:?} rendezvous observed {:?} QUIC local {:?} shared {}",
            st.data_addr, st.public_addr, r.observed_addr, r.quic_local_addr, r.shares_data_socket
        );
        assert!(r.shares_data_socket, "QUIC has a socket of its own: {r:?}");
        assert_eq!(r.quic_local_addr, Some(d.data_addr), "QUIC local address");
        // No NAT on loopback: the mapping is the data socket's own address, and the
        // rendezvous sees exactly what STUN sees.
        assert_eq!(st.public_addr, Some(d.data_addr));
        assert_eq!(r.observed_addr.map(canonical), st.public_addr);
        assert!(
            r.quic_rx > 0,
            "no QUIC datagram went through the engine: {r:?}"
        );
        assert_eq!(r.quic_rx_dropped, 0);
    }

    // Punching still works on the shared socket, and WireGuard traffic flows both ways.
    let t = Instant::now();
    wait_path(
        &da.control_socket,
        &["direct", "lan"],
        Duration::from_secs(30),
    )
    .await;
    wait_path(
        &db.control_socket,
        &["direct", "lan"],
        Duration::from_secs(30),
    )
    .await;
    println!("direct path after {:?}", t.elapsed());
    let (to_b, to_a) = (da.proxies[0].1, db.proxies[0].1);
    assert!(wga.exchange(to_b, &wgb, 40, Duration::from_secs(10)).await >= 36);
    assert!(wgb.exchange(to_a, &wga, 40, Duration::from_secs(10)).await >= 36);
    // The peer is the other daemon's data socket (the port the rendezvous observed).
    let st = status(&da.control_socket).await;
    assert_eq!(
        st.peers[0].remote.as_deref(),
        Some(db.data_addr.to_string().as_str())
    );
    // Signalling kept working through the engine's demultiplexer all along.
    assert_eq!(st.rendezvous.state, "connected");
    drop(da);
    drop(db);
    relay.control().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stun_the_observed_address_is_the_srflx_candidate_and_punching_works() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    // A rendezvous without a STUN server: the only source of the data socket's mapping is
    // the address the rendezvous observes on the shared socket.
    let mut cfg = meshpunch_rendezvous::Config::loopback(dir.path().join("rdv"));
    cfg.stun_listen = None;
    cfg.relays = vec![meshpunch_rendezvous::config::RelayConfig {
        region: "loopback".into(),
        urls: vec![format!("turn:{}?transport=udp", relay.listen_addr())],
        secret: support::SECRET.into(),
    }];
    let rdv = meshpunch_rendezvous::Server::start(cfg).await.unwrap();
    let connect = rdv.dev_connect().unwrap().to_string();

    // No host candidates either: the peers can only meet at their server-reflexive addresses.
    let (da, db, wga, wgb) = support::start_rendezvous_pair(&connect, dir.path()).await;
    for d in [&da, &db] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            let st = status(&d.control_socket).await;
            if st.public_addr.is_some() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "no server-reflexive address: {}",
                serde_json::to_string_pretty(&st).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(st.public_addr_source.as_deref(), Some("rendezvous"));
        assert_eq!(st.public_addr, Some(d.data_addr));
        assert!(st.rendezvous.shares_data_socket);
    }
    let t = Instant::now();
    let st = wait_path(&da.control_socket, &["direct"], Duration::from_secs(30)).await;
    wait_path(&db.control_socket, &["direct"], Duration::from_secs(30)).await;
    println!(
        "direct over the rendezvous-observed candidate after {:?}: {:?}",
        t.elapsed(),
        st.peers[0].remote
    );
    assert_eq!(
        st.peers[0].remote.as_deref(),
        Some(db.data_addr.to_string().as_str())
    );
    let (to_b, to_a) = (da.proxies[0].1, db.proxies[0].1);
    assert!(wga.exchange(to_b, &wgb, 40, Duration::from_secs(10)).await >= 36);
    assert!(wgb.exchange(to_a, &wga, 40, Duration::from_secs(10)).await >= 36);
    drop(da);
    drop(db);
    relay.control().stop();
}

/// UDP sockets of process `pid` (in this network namespace), as local ports.
fn udp_ports_of(pid: u32) -> Vec<u16> {
    let mut by_inode: HashMap<String, u16> = HashMap::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                .unwrap();
            by_inode.insert(f[9].to_string(), port);
        }
    }
    let mut ports = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            if let Some(port) = by_inode.get(inode) {
                ports.push(*port);
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// Kills the child when the test ends, also on a failed assertion.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshpunch_up_has_one_udp_socket_besides_its_proxy_ports() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    let rdv = start_rendezvous(&dir.path().join("rdv"), relay.listen_addr()).await;
    let connect = rdv.dev_connect().unwrap().to_string();
    let me = generate_private();
    let peer = Identity::from_private(generate_private());
    let ctl = dir.path().join("up.sock");
    let conf = dir.path().join("up.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nRendezvous = {connect}\nListenPort = 0\n\n[Peer]\nPublicKey = {}\nName = other\n",
            format_key(&me),
            format_key(&peer.public)
        ),
    )
    .unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_meshpunch"))
            .args([
                "up",
                "--json",
                "--no-host-candidates",
                "--listen-ip",
                "127.0.0.1",
            ])
            .arg("--config")
            .arg(&conf)
            .arg("--control-socket")
            .arg(&ctl)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let data: SocketAddr = ready["data_addr"].as_str().unwrap().parse().unwrap();
    let proxy: SocketAddr = ready["peers"][0]["proxy"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Registered (QUIC up) and STUN answered: every socket the daemon needs is open now.
    let st = wait_stun_and_rendezvous(&ctl).await;
    let ports = udp_ports_of(child.0.id());
    println!(
        "meshpunch up: UDP sockets on ports {ports:?} (data {data}, proxy {proxy}); rendezvous sees {:?}, STUN {:?}",
        st.rendezvous.observed_addr, st.public_addr
    );
    let mut want = vec![data.port(), proxy.port()];
    want.sort_unstable();
    assert_eq!(
        ports, want,
        "UDP sockets besides the data socket and the proxy port"
    );
    assert!(st.rendezvous.shares_data_socket);
    assert_eq!(st.rendezvous.quic_local_addr, Some(data));
    assert_eq!(st.rendezvous.observed_addr.map(canonical), Some(data));
    assert_eq!(st.public_addr, Some(data));
    drop(child);
    relay.control().stop();
}

/// Waits for the next registration (after a disconnect when `after_loss`).
async fn next_registration(ev: &mut Events, after_loss: bool) -> Registration {
    let mut lost = !after_loss;
    let deadline = Duration::from_secs(60);
    tokio::time::timeout(deadline, async {
        loop {
            match ev.recv().await.expect("event stream open") {
                Event::Disconnected { .. } => lost = true,
                Event::Registered(r) if lost => return r,
                _ => {}
            }
        }
    })
    .await
    .expect("registered in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_on_a_shared_socket_moves_between_nodes_on_that_socket() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay();
    // Two nodes with one certificate and token secret (one data directory).
    let rdv_dir = dir.path().join("rdv");
    let n1 = start_rendezvous(&rdv_dir, relay.listen_addr()).await;
    let n2 = start_rendezvous(&rdv_dir, relay.listen_addr()).await;
    let cs = n1.dev_connect().unwrap().clone();
    assert_eq!(cs.pins, n2.dev_connect().unwrap().pins);

    // A stand-in for the daemon's engine: owns the receive side of the data socket, hands
    // QUIC to the shared socket by source and keeps everything else.
    let data = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let data_addr = data.local_addr().unwrap();
    let shared = SharedSocket::new(data.clone(), false).unwrap();
    let others = Arc::new(AtomicU64::new(0));
    let pump = {
        let (data, shared, others) = (data.clone(), shared.clone(), others.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = data.recv_from(&mut buf).await else {
                    continue;
                };
                if !shared.offer(Instant::now(), canonical(from), &buf[..n]) {
                    others.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let endpoint = endpoint_on(shared.clone()).unwrap();

    // Happy eyeballs: a dead address first, then n1. Both attempts run on the one socket.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let mut cfg = ClientConfig::new(
        cs.clone(),
        x25519_dalek::StaticSecret::from(generate_private()),
    );
    cfg.addresses = vec![dead_addr, n1.quic_addr(), n2.quic_addr()];
    cfg.max_backoff = Duration::from_secs(1);
    cfg.endpoint = Some(endpoint.clone());
    let (client, mut ev) = Client::connect(cfg).await.unwrap();
    let r1 = next_registration(&mut ev, false).await;
    println!("first registration: {r1:?}");
    assert!(r1.shared_socket);
    assert_eq!(r1.local, Some(data_addr));
    assert_eq!(canonical(r1.observed), data_addr);
    assert_ne!(r1.server, dead_addr);

    // A datagram from anyone else is the engine's.
    let before = others.load(Ordering::Relaxed);
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(b"not quic", data_addr).await.unwrap();
    let t = Instant::now();
    while others.load(Ordering::Relaxed) == before && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(others.load(Ordering::Relaxed), before + 1);

    // Its node drains: the client reconnects to the other node, on the same socket.
    let (gone, other) = if r1.server == n1.quic_addr() {
        (&n1, &n2)
    } else {
        (&n2, &n1)
    };
    let t = Instant::now();
    gone.drain(Duration::from_secs(5)).await;
    let r2 = next_registration(&mut ev, true).await;
    println!("registered again after {:?}: {r2:?}", t.elapsed());
    assert_eq!(r2.server, other.quic_addr());
    assert!(r2.shared_socket);
    assert_eq!(r2.local, Some(data_addr));
    assert_eq!(canonical(r2.observed), data_addr);
    assert!(client.is_connected());
    let st = shared.stats();
    println!("shared socket: {st:?}");
    assert!(st.rx > 0 && st.tx > 0);
    assert_eq!(st.rx_dropped, 0);

    // A second client on the same endpoint after the first closed (what the daemon's
    // rendezvous task does after a failed first connect).
    client.close();
    let mut cfg = ClientConfig::new(cs, x25519_dalek::StaticSecret::from(generate_private()));
    cfg.addresses = vec![other.quic_addr()];
    cfg.endpoint = Some(endpoint);
    let (_c2, mut ev2) = Client::connect(cfg).await.unwrap();
    let r3 = next_registration(&mut ev2, false).await;
    assert!(r3.shared_socket);
    assert_eq!(canonical(r3.observed), data_addr);
    pump.abort();
    relay.control().stop();
}
