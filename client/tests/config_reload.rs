//! `meshpunch up --config FILE` re-reads its peers on SIGHUP and on `meshpunch reload`: an
//! added peer starts punching and carries WireGuard packets, a removed one is dropped and its
//! proxy port closed, a renamed one keeps its path and traffic, and an invalid config changes
//! nothing (one error, the daemon keeps serving). Real binary, real sockets on loopback.

#![allow(clippy::unwrap_used)]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshpunch::config::PeerConfig;
use meshpunch::daemon::{self, Options};
use meshpunch::keys::{format_key, generate_private, Identity};
use meshpunch_proto::path::PathConfig;
use support::{free_udp_port, status, FakeWg};

/// Kills the daemon if the test fails half-way.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn meshpunch(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
        .arg("--control-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn wait_for(sock: &Path, what: &str, f: impl Fn(&meshpunch::control::Status) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if sock.exists() {
            let st = status(sock).await;
            if f(&st) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                serde_json::to_string_pretty(&st).unwrap()
            );
        } else {
            assert!(Instant::now() < deadline, "{what}: no control socket");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_reload_add_remove_and_rename_peers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a_priv = generate_private();
    let a = Identity::from_private(a_priv);
    let b = Identity::from_private(generate_private());
    let c = Identity::from_private(generate_private());
    let (pa, pb, pc_unused) = (free_udp_port(), free_udp_port(), free_udp_port());
    let (c_proxy, laptop_proxy) = (free_udp_port(), free_udp_port());
    let wga = FakeWg::new().await;
    let wgb = FakeWg::new().await;

    // B: an in-process daemon that knows A statically.
    let db = daemon::start(Options {
        identity: b.clone(),
        rendezvous: None,
        listen: format!("127.0.0.1:{pb}").parse().unwrap(),
        control_socket: dir.path().join("b.sock"),
        wireguard_endpoint: Some(wgb.addr()),
        host_candidates: false,
        peers: vec![PeerConfig {
            public_key: a.public,
            name: Some("a".into()),
            proxy_port: 0,
            candidates: vec![format!("127.0.0.1:{pa}").parse().unwrap()],
        }],
        path: PathConfig::default(),
        exclude_interfaces: Vec::new(),
        ca_roots: Vec::new(),
    })
    .await
    .unwrap();

    // A: the binary, first with peer c only (nobody answers at c's candidate).
    let conf = dir.path().join("a.conf");
    let sock = dir.path().join("a.sock");
    let iface = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {pa}\nWireGuardEndpoint = {}\nHostCandidates = off\nPortMapping = off\n\n",
        format_key(&a_priv),
        wga.addr()
    );
    let peer_c = format!(
        "[Peer]\nPublicKey = {}\nName = c\nProxyPort = {c_proxy}\nCandidate = 127.0.0.1:{pc_unused}\n\n",
        format_key(&c.public)
    );
    let peer_b = |name: &str| {
        format!(
            "[Peer]\nPublicKey = {}\nName = {name}\nProxyPort = {laptop_proxy}\nCandidate = 127.0.0.1:{pb}\n\n",
            format_key(&b.public)
        )
    };
    std::fs::write(&conf, format!("{iface}{peer_c}")).unwrap();
    let log = dir.path().join("a.log");
    let child = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
        .arg("--control-socket")
        .arg(&sock)
        .args(["up", "--listen-ip", "127.0.0.1", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut da = Daemon(child);
    wait_for(&sock, "c carried", |s| {
        s.peers.len() == 1 && s.peers[0].name.as_deref() == Some("c")
    })
    .await;

    // SIGHUP after adding the laptop (B): it punches and carries WireGuard packets.
    std::fs::write(&conf, format!("{iface}{peer_c}{}", peer_b("laptop"))).unwrap();
    // SAFETY: plain kill(2) to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for(&sock, "laptop direct", |s| {
        s.peers
            .iter()
            .any(|p| p.name.as_deref() == Some("laptop") && p.path.as_str() == "direct")
    })
    .await;
    let st = status(&sock).await;
    let laptop = st
        .peers
        .iter()
        .find(|p| p.name.as_deref() == Some("laptop"))
        .unwrap();
    assert_eq!(laptop.proxy.port(), laptop_proxy, "ProxyPort honoured");
    let to_b = laptop.proxy;
    let to_a = db.proxies[0].1;
    let got = wga.exchange(to_b, &wgb, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "a->laptop {got}/50");
    let got = wgb.exchange(to_a, &wga, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "laptop->a {got}/50");

    // An invalid config (the same key twice): one error naming it, nothing changes.
    std::fs::write(
        &conf,
        format!("{iface}{peer_c}{}{}", peer_b("laptop"), peer_b("again")),
    )
    .unwrap();
    let (ok, out, err) = meshpunch(&sock, &["reload"]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("duplicate [Peer] PublicKey"), "{err}");
    assert!(err.contains("a.conf"), "names the file: {err}");
    let st = status(&sock).await;
    assert_eq!(st.peers.len(), 2, "nothing changed");
    assert!(st.peers.iter().any(|p| p.path.as_str() == "direct"));

    // `meshpunch reload`: c removed (its proxy port closed), the laptop renamed (its path and
    // traffic go on).
    std::fs::write(&conf, format!("{iface}{}", peer_b("lap"))).unwrap();
    let (ok, out, err) = meshpunch(&sock, &["reload"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.trim(),
        "meshpunch reload: +0, -1 peer (c), ~1 peer (lap)",
        "{err}"
    );
    let st = status(&sock).await;
    assert_eq!(st.peers.len(), 1, "{st:?}");
    assert_eq!(st.peers[0].name.as_deref(), Some("lap"));
    assert_eq!(
        st.peers[0].path.as_str(),
        "direct",
        "renaming kept the path"
    );
    std::net::UdpSocket::bind(("127.0.0.1", c_proxy)).expect("c's proxy port is closed");
    let got = wga.exchange(to_b, &wgb, 50, Duration::from_secs(10)).await;
    assert!(got >= 45, "a->lap after reload {got}/50");
    let (ok, out, _) = meshpunch(&sock, &["ping", "lap", "-c", "1"]);
    assert!(ok, "{out}");
    let (ok, _, _) = meshpunch(&sock, &["ping", "c", "-c", "1"]);
    assert!(!ok, "c is gone");

    // Removing every peer is refused (that is `meshpunch down`).
    std::fs::write(&conf, &iface).unwrap();
    let (ok, _, err) = meshpunch(&sock, &["reload"]);
    assert!(!ok);
    assert!(err.contains("no [Peer] left"), "{err}");
    let st = status(&sock).await;
    assert_eq!(st.peers.len(), 1);
    assert_eq!(
        (st.config_reloads.ok, st.config_reloads.failed),
        (2, 2),
        "SIGHUP and reload ok, duplicate key and no peers refused"
    );

    let (ok, out, err) = meshpunch(&sock, &["down"]);
    assert!(ok, "{out}{err}");
    let _ = da.0.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.matches("peer added (config reload)").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("peer removed (config reload)").count(), 1);
    assert_eq!(log.matches("peer changed (config reload)").count(), 1);
    assert_eq!(
        log.matches("config not reloaded, nothing changed").count(),
        2,
        "{log}"
    );
    assert!(log.contains("\"SIGHUP\""), "{log}");
}
