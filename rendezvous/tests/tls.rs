//! Certificates as a user meets them: WebPKI with a private CA (`--ca-file`), SPKI pins across
//! renewal and key change, the legacy whole-certificate pin, one actionable message per bad
//! certificate, `token create --connect` with the public name, and `systemctl reload` (the
//! unit's own `ExecReload=` line) applying a new revocation list and a new certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::client::{Client, ClientConfig, ClientError, Event, Events};
use common::*;
use meshpunch_proto::connect::{ConnectString, Pin};
use meshpunch_proto::wire::{Candidate, CandidateKind};
use meshpunch_rendezvous::{Config, Server};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncBufReadExt;

const NAME: &str = "rdv.meshpunch.test";

fn days(d: i64) -> SystemTime {
    let now = SystemTime::now();
    if d >= 0 {
        now + Duration::from_secs(d as u64 * 86_400)
    } else {
        now - Duration::from_secs((-d) as u64 * 86_400)
    }
}

struct Ca {
    cert: rcgen::Certificate,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert,
            params: p,
            key,
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A leaf for `names` with `key`, valid from `from` to `to` days from now.
    fn leaf(&self, names: &[&str], key: &rcgen::KeyPair, from: i64, to: i64) -> String {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.not_before = days(from).into();
        p.not_after = days(to).into();
        p.signed_by(key, &rcgen::Issuer::from_params(&self.params, &self.key))
            .unwrap()
            .pem()
    }
}

fn self_signed(key: &rcgen::KeyPair, serial: u64) -> (String, Vec<u8>) {
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.serial_number = Some(serial.into());
    let c = p.self_signed(key).unwrap();
    (c.pem(), c.der().to_vec())
}

fn write_pair(dir: &Path, cert_pem: &str, key: &rcgen::KeyPair) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&c, cert_pem).unwrap();
    (c, k)
}

async fn server_with(dir: &Path, cert: PathBuf, key: PathBuf) -> Server {
    init_tracing();
    let mut cfg = Config::loopback(dir.join("data"));
    cfg.cert = Some(cert);
    cfg.key = Some(key);
    cfg.watch_files = false;
    Server::start(cfg).await.unwrap()
}

async fn try_connect(
    cs: &ConnectString,
    roots: &[CertificateDer<'static>],
) -> Result<(Client, Events), ClientError> {
    let (sk, _) = key();
    let mut cfg = ClientConfig::new(cs.clone(), sk);
    cfg.ca_roots = roots.to_vec();
    cfg.max_backoff = Duration::from_millis(500);
    tokio::time::timeout(SOON, Client::connect(cfg))
        .await
        .expect("connect answers in time")
}

async fn refused(cs: &ConnectString, roots: &[CertificateDer<'static>]) -> String {
    match try_connect(cs, roots).await {
        Ok(_) => panic!("{cs} must be refused"),
        Err(ClientError::Connect(m)) => m,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// `meshpunch://TOKEN@host:PORT?addr=127.0.0.1:PORT[&pin=...]`: verify `host`, dial loopback.
fn cs_for(server: &Server, host: &str, pins: Vec<Pin>) -> ConnectString {
    ConnectString {
        token: server.mint_token("dev", Duration::from_secs(3600)),
        host: host.to_string(),
        port: server.quic_addr().port(),
        pins,
        stun: None,
        addrs: vec![server.quic_addr()],
        tcp_port: server.tcp_addr().map(|a| a.port()),
    }
}

fn cand(port: u16) -> Vec<Candidate> {
    vec![Candidate {
        addr: std::net::SocketAddr::from(([192, 0, 2, 1], port)),
        kind: CandidateKind::Host,
        priority: 100,
    }]
}

/// Two clients with this connect string and trust register and exchange an offer.
async fn punch(cs: &ConnectString, roots: &[CertificateDer<'static>]) {
    let (a, _a_ev) = try_connect(cs, roots).await.unwrap();
    let (b, mut b_ev) = try_connect(cs, roots).await.unwrap();
    let b_key = b.public_key();
    let answering = tokio::spawn(async move {
        let offer = wait_for(&mut b_ev, |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        offer.answer(cand(2)).await.unwrap()
    });
    let p = a.offer(b_key, cand(1)).await.unwrap();
    let q = answering.await.unwrap();
    assert_eq!(p.session_secret, q.session_secret);
    a.close();
    b.close();
}

#[tokio::test]
async fn private_ca_via_ca_file_registers_and_punches_and_bad_certificates_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("meshpunch test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let (c, k) = write_pair(dir.path(), &ca.leaf(&[NAME], &key, -1, 30), &key);
    let server = server_with(dir.path(), c, k).await;
    let roots = [ca.der()];

    // No pin, the CA from --ca-file, the certificate's name: works end to end.
    let cs = cs_for(&server, NAME, vec![]);
    assert!(!cs.to_string().contains("pin="));
    punch(&cs, &roots).await;

    // Unknown CA: names the host and the reason.
    let m = refused(&cs, &[Ca::new("some other CA").der()]).await;
    assert!(
        m.contains(&format!(
            "the rendezvous certificate for {NAME} is not trusted"
        )) && m.contains("CA this machine does not trust"),
        "{m}"
    );
    // Wrong host name.
    let m = refused(&cs_for(&server, "wrong.meshpunch.test", vec![]), &roots).await;
    assert!(
        m.contains("not valid for the host name wrong.meshpunch.test"),
        "{m}"
    );
    // Pin mismatch shows the SPKI actually served.
    let served = Pin::Spki(server_spki(&server));
    let m = refused(&cs_for(&server, NAME, vec![Pin::Spki([7; 32])]), &roots).await;
    assert!(
        m.contains(&format!(
            "the rendezvous certificate does not match the pin in your connect string (got SPKI {served})"
        )),
        "{m}"
    );
    // Expired certificate (the operator forgot to renew): the date is in the message.
    std::fs::write(
        dir.path().join("tls-cert.pem"),
        ca.leaf(&[NAME], &key, -30, -1),
    )
    .unwrap();
    server.reload_tls().unwrap();
    let m = refused(&cs, &roots).await;
    assert!(m.contains(&format!("{NAME} expired on")), "{m}");
    // The same in pinned mode: dates are checked there too.
    let m = refused(&cs_for(&server, NAME, vec![served]), &roots).await;
    assert!(m.contains(&format!("{NAME} expired on")), "{m}");
}

fn server_spki(server: &Server) -> [u8; 32] {
    server
        .dev_connect()
        .unwrap()
        .pins
        .iter()
        .find_map(|p| match p {
            Pin::Spki(h) => Some(*h),
            Pin::Cert(_) => None,
        })
        .expect("dev connect string has an SPKI pin")
}

#[tokio::test]
async fn spki_pin_survives_reissue_second_pin_admits_new_key_legacy_pin_still_connects() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = rcgen::KeyPair::generate().unwrap();
    let (pem1, der1) = self_signed(&k1, 1);
    let (c, k) = write_pair(dir.path(), &pem1, &k1);
    let server = server_with(dir.path(), c, k).await;
    let spki1 = Pin::Spki(meshpunch_proto::x509::spki_pin(&der1).unwrap());
    assert_eq!(server.dev_connect().unwrap().pins, vec![spki1]);
    let host = "127.0.0.1";
    let pinned = cs_for(&server, host, vec![spki1]);
    let legacy = cs_for(
        &server,
        host,
        vec![Pin::Cert(meshpunch_proto::connect::cert_pin(&der1))],
    );
    // A connect string handed out before SPKI pins: bare 64-hex pin.
    assert!(legacy.to_string().contains("?pin=") && !legacy.to_string().contains("spki:"));
    let (kept, mut kept_ev) = try_connect(&pinned, &[]).await.unwrap();
    try_connect(&legacy, &[]).await.unwrap();

    // Renewal with the same key: the SPKI pin still connects, the legacy pin does not.
    let (pem2, _) = self_signed(&k1, 2);
    write_pair(dir.path(), &pem2, &k1);
    assert_eq!(
        server.reload_tls().unwrap(),
        match spki1 {
            Pin::Spki(h) => h,
            Pin::Cert(_) => unreachable!(),
        }
    );
    try_connect(&pinned, &[]).await.unwrap();
    let m = refused(&legacy, &[]).await;
    assert!(m.contains("does not match the pin"), "{m}");

    // Key change staged with a second pin.
    let k2 = rcgen::KeyPair::generate().unwrap();
    let (pem3, der3) = self_signed(&k2, 3);
    let spki2 = Pin::Spki(meshpunch_proto::x509::spki_pin(&der3).unwrap());
    let both: ConnectString = format!(
        "meshpunch://{}@{host}:{}?pin={spki1},{spki2}&addr={}",
        pinned.token,
        pinned.port,
        server.quic_addr()
    )
    .parse()
    .unwrap();
    try_connect(&both, &[]).await.unwrap();
    write_pair(dir.path(), &pem3, &k2);
    server.reload_tls().unwrap();
    try_connect(&both, &[]).await.unwrap();
    let m = refused(&pinned, &[]).await;
    assert!(m.contains(&format!("(got SPKI {spki2})")), "{m}");
    // The connection made before all of this is still up.
    assert!(kept.is_connected());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if let Some(Event::Disconnected { .. }) = kept_ev.recv().await {
                    return;
                }
            }
        })
        .await
        .is_err(),
        "the old connection must not be dropped by certificate swaps"
    );
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshpunch-rendezvous"))
}

#[test]
fn token_create_connect_uses_public_name_and_port_and_spki_pin() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (pem, der) = self_signed(&key, 9);
    let (c, k) = write_pair(dir.path(), &pem, &key);
    let run = |extra: &[&str]| -> ConnectString {
        let out = std::process::Command::new(binary())
            .args(["--data-dir"])
            .arg(dir.path())
            .args(["--listen", "0.0.0.0:4433", "--cert"])
            .arg(&c)
            .arg("--key")
            .arg(&k)
            .args(extra)
            .args(["token", "create", "--network", "home", "--connect"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let cs = run(&[
        "--public-host",
        "rendezvous.example.com",
        "--public-port",
        "443",
    ]);
    assert_eq!((cs.host.as_str(), cs.port), ("rendezvous.example.com", 443));
    assert_eq!(
        cs.pins,
        vec![Pin::Spki(meshpunch_proto::x509::spki_pin(&der).unwrap())]
    );
    assert!(cs.to_string().starts_with(&format!(
        "meshpunch://{}@rendezvous.example.com?pin=spki:",
        cs.token
    )));
    let local = run(&[]);
    assert_eq!((local.host.as_str(), local.port), ("127.0.0.1", 4433));
}

/// The `ExecReload=` command of the unit file, with `$MAINPID` given.
fn exec_reload(unit: &str, pid: u32) -> String {
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("unit has ExecReload=");
    line.replace("$MAINPID", &pid.to_string())
        .replace("${MAINPID}", &pid.to_string())
}

#[tokio::test]
async fn systemctl_reload_applies_a_new_revocation_list_and_a_new_certificate() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let k1 = rcgen::KeyPair::generate().unwrap();
    let (pem1, _) = self_signed(&k1, 1);
    let (cert, keyf) = write_pair(dir.path(), &pem1, &k1);
    let data = dir.path().join("data");
    let config = dir.path().join("rendezvous.toml");
    let write_config = |revoked: &[String]| {
        let list: Vec<String> = revoked.iter().map(|r| format!("{r:?}")).collect();
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstun_listen = \"127.0.0.1:0\"\ndata_dir = {:?}\ncert = {:?}\nkey = {:?}\nrevoked_tokens = [{}]\n",
                data.display().to_string(),
                cert.display().to_string(),
                keyf.display().to_string(),
                list.join(", ")
            ),
        )
        .unwrap();
    };
    write_config(&[]);
    // --no-watch: only the reload command can make the changes below apply.
    let mut child = tokio::process::Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["--dev", "--no-watch", "--no-admin"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(SOON, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let cs: ConnectString = line.strip_prefix("connect: ").unwrap().parse().unwrap();
    let (old_client, mut old_ev) = try_connect(&cs, &[]).await.unwrap();

    // New revocation list (the dev token) and a new certificate with a new key.
    let secret = std::fs::read_to_string(data.join("token-secret")).unwrap();
    let fresh = meshpunch_proto::token::mint(
        secret.trim().as_bytes(),
        "dev",
        meshpunch_rendezvous::server::unix_now() + 3600,
    )
    .unwrap();
    write_config(&[format!(
        "sha256:{}",
        meshpunch_proto::token::token_hash(&cs.token)
    )]);
    let k2 = rcgen::KeyPair::generate().unwrap();
    let (pem2, der2) = self_signed(&k2, 2);
    write_pair(dir.path(), &pem2, &k2);
    let new_pin = Pin::Spki(meshpunch_proto::x509::spki_pin(&der2).unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing applied without the reload (the files are not watched here).
    try_connect(&cs, &[]).await.unwrap().0.close();

    let cmd = exec_reload(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/systemd/meshpunch-rendezvous.service"
        ),
        child.id().unwrap(),
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .status()
        .unwrap();
    assert!(status.success(), "{cmd}");

    // The revoked token's connection is closed...
    wait_for(&mut old_ev, |e| match e {
        Event::Disconnected { reason } => Some(reason),
        _ => None,
    })
    .await;
    old_client.close();
    // ...new handshakes get the new certificate: the old pin is refused, the new one works
    // (with a token that is not revoked).
    let mut with_new = cs.clone();
    with_new.token = fresh.clone();
    let m = refused(&with_new, &[]).await;
    assert!(m.contains(&format!("(got SPKI {new_pin})")), "{m}");
    with_new.pins = vec![new_pin];
    try_connect(&with_new, &[]).await.unwrap();
    let _ = child.kill().await;
}

/// The daemon's rendezvous task (what `meshpunch up --ca-file` / `CaFile` feeds): with the CA
/// it registers over WebPKI, without it the failure it reports names the host and the reason.
#[tokio::test]
async fn daemon_rendezvous_task_uses_the_ca_file() {
    use meshpunch::signal::{spawn_with, SignalEvent};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("meshpunch daemon test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let (c, k) = write_pair(dir.path(), &ca.leaf(&[NAME], &key, -1, 30), &key);
    let server = server_with(dir.path(), c, k).await;
    let cs = cs_for(&server, NAME, vec![]);
    for (roots, ok) in [(vec![ca.der()], true), (vec![], false)] {
        let (_local_tx, local_rx) = tokio::sync::watch::channel((0u64, Vec::new()));
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel(16);
        let sk = meshpunch::keys::generate_private();
        let _cmds = spawn_with(cs.clone(), sk, vec![], local_rx, ev_tx, None, roots);
        let ev = tokio::time::timeout(SOON, async {
            loop {
                if let e @ (SignalEvent::Registered { .. } | SignalEvent::ConnectFailed { .. }) =
                    ev_rx.recv().await.expect("events")
                {
                    return e;
                }
            }
        })
        .await
        .unwrap();
        match (ev, ok) {
            (SignalEvent::Registered { .. }, true) => {}
            (SignalEvent::ConnectFailed { reason }, false) => assert!(
                reason.contains(&format!(
                    "the rendezvous certificate for {NAME} is not trusted"
                )),
                "{reason}"
            ),
            (e, _) => panic!("unexpected {e:?} (ca file given: {ok})"),
        }
    }
}

/// The TLS-over-TCP listener serves the same certificate as QUIC, and a reload (SIGHUP,
/// renewal) reaches it at once: a client whose QUIC gets no answer sees the new key.
#[tokio::test]
async fn certificate_reload_reaches_the_tcp_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = rcgen::KeyPair::generate().unwrap();
    let (pem1, der1) = self_signed(&k1, 1);
    let (c, k) = write_pair(dir.path(), &pem1, &k1);
    let server = server_with(dir.path(), c, k).await;
    let spki1 = Pin::Spki(meshpunch_proto::x509::spki_pin(&der1).unwrap());
    // QUIC to a socket that never answers: only TCP can register.
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp_only = |pins: Vec<Pin>| {
        let mut cs = cs_for(&server, "127.0.0.1", pins);
        cs.port = hole.local_addr().unwrap().port();
        cs.addrs = vec![hole.local_addr().unwrap()];
        cs.tcp_port = Some(server.tcp_addr().unwrap().port());
        cs
    };
    let (c1, _e1) = try_connect(&tcp_only(vec![spki1]), &[]).await.unwrap();
    assert_eq!(
        c1.registration().unwrap().transport,
        meshpunch::rendezvous::Transport::Tcp
    );

    let k2 = rcgen::KeyPair::generate().unwrap();
    let (pem2, der2) = self_signed(&k2, 2);
    let spki2 = Pin::Spki(meshpunch_proto::x509::spki_pin(&der2).unwrap());
    write_pair(dir.path(), &pem2, &k2);
    server.reload_tls().unwrap();
    let m = refused(&tcp_only(vec![spki1]), &[]).await;
    assert!(m.contains(&format!("(got SPKI {spki2})")), "{m}");
    let (c2, _e2) = try_connect(&tcp_only(vec![spki2]), &[]).await.unwrap();
    assert_eq!(
        c2.registration().unwrap().transport,
        meshpunch::rendezvous::Transport::Tcp
    );
    assert!(c1.is_connected(), "open TCP sessions keep running");
}
