//! ACME end to end against Debian's `pebble` (the ACME test CA) on loopback: the rendezvous
//! obtains a certificate for a test name, clients with no pin and Pebble's root as CA file
//! register and punch; Pebble issues 24-second certificates, the rendezvous renews during the
//! test while a connected client stays connected, and a client arriving after the first
//! certificate expired verifies the renewed one. Then Pebble goes away: the renewal fails, the
//! server keeps serving its certificate, says why in a metric, and `/readyz` stays ready while
//! the certificate is valid and turns not-ready once it expired.
//!
//! Pebble runs with `PEBBLE_VA_ALWAYS_VALID=1`: its validation authority would connect to the
//! test name's port 80, which does not resolve here (the rendezvous still binds its
//! `--acme-http-listen` port and answers http-01 there). `PEBBLE_CHAIN_LENGTH=2`: leaf,
//! intermediate, root, as with Let's Encrypt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::{Client, ClientConfig, Event, Events};
use common::*;
use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::wire::{Candidate, CandidateKind};
use meshpunch_rendezvous::config::AcmeSettings;
use meshpunch_rendezvous::{Config, Server};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "rdv.meshpunch.test";
/// Lifetime of Pebble's certificates here (renewal at 2/3: 16 s).
const LIFETIME_S: u64 = 24;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pebble {
    child: std::process::Child,
    directory: String,
    management: u16,
    ca_file: std::path::PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    fn start(dir: &Path) -> Pebble {
        // Pebble's own HTTPS certificate, from a throw-away CA the rendezvous is told to trust
        // (--acme-ca-file).
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "pebble test listener CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::from_params(&p, &ca_key))
            .unwrap();
        let ca_file = dir.join("pebble-listener-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();
        let (api, management) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{api}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": free_port(),
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": LIFETIME_S,
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let child = std::process::Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .env("PEBBLE_VA_ALWAYS_VALID", "1")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_CHAIN_LENGTH", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + SOON;
        while std::net::TcpStream::connect(("127.0.0.1", api)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", management)).is_err()
        {
            assert!(Instant::now() < deadline, "pebble did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Pebble {
            child,
            directory: format!("https://127.0.0.1:{api}/dir"),
            management,
            ca_file,
        }
    }

    /// The root Pebble issues under, from its management interface.
    fn root(&self) -> CertificateDer<'static> {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.ca_file)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        CertificateDer::from_pem_slice(&out.stdout).unwrap()
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(SOON, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

async fn connect_with(cs: &ConnectString, root: &CertificateDer<'static>) -> (Client, Events) {
    let (sk, _) = key();
    let mut cfg = ClientConfig::new(cs.clone(), sk);
    cfg.ca_roots = vec![root.clone()];
    tokio::time::timeout(SOON, Client::connect(cfg))
        .await
        .expect("connect in time")
        .expect("certificate verified with Pebble's root")
}

async fn punch(a: &Client, b: Client, mut b_ev: Events) -> (Client, Events) {
    let b_key = b.public_key();
    let answering = tokio::spawn(async move {
        let offer = wait_for(&mut b_ev, |e| match e {
            Event::IncomingOffer(o) => Some(o),
            _ => None,
        })
        .await;
        let cand = vec![Candidate {
            addr: SocketAddr::from(([192, 0, 2, 2], 2)),
            kind: CandidateKind::Host,
            priority: 100,
        }];
        offer.answer(cand).await.unwrap();
        b_ev
    });
    let cand = vec![Candidate {
        addr: SocketAddr::from(([192, 0, 2, 1], 1)),
        kind: CandidateKind::Host,
        priority: 100,
    }];
    a.offer(b_key, cand).await.unwrap();
    (b, answering.await.unwrap())
}

fn stored_cert(data: &Path) -> Vec<u8> {
    std::fs::read(data.join("acme").join(NAME).join("cert.pem")).unwrap_or_default()
}

fn not_after(pem: &[u8]) -> i64 {
    let der = CertificateDer::from_pem_slice(pem).unwrap();
    meshpunch_proto::x509::validity(&der).unwrap().1
}

#[tokio::test]
async fn acme_certificate_from_pebble_renews_under_connected_clients() {
    if !natlab::testenv::require_commands("acme_pebble", &["pebble", "curl"]) {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pebble = Pebble::start(dir.path());
    let data = dir.path().join("data");
    let mut cfg = Config::loopback(&data);
    cfg.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.acme = Some(AcmeSettings {
        domain: NAME.into(),
        contact: "ops@meshpunch.test".into(),
        directory: pebble.directory.clone(),
        ca_file: Some(pebble.ca_file.clone()),
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    });
    let server = Server::start(cfg).await.unwrap();
    let admin = server.admin_addr().unwrap();
    let first = stored_cert(&data);
    assert!(!first.is_empty(), "certificate stored in the data dir");
    assert!(data.join("acme").join(NAME).join("account.json").exists());
    let first_expiry = not_after(&first);

    // The connect string a user gets: the test name, no pin. The name does not resolve
    // here, so addr= dials loopback while the certificate is verified for NAME.
    let mut cs = server.dev_connect().unwrap().clone();
    assert_eq!(cs.host, NAME);
    assert!(cs.pins.is_empty(), "{cs}");
    cs.addrs = vec![server.quic_addr()];
    let root = pebble.root();

    let (a, mut a_ev) = connect_with(&cs, &root).await;
    let (b, b_ev) = connect_with(&cs, &root).await;
    let (_b, _b_ev) = punch(&a, b, b_ev).await;

    // Renewal at 2/3 of the lifetime: a new certificate lands in the data dir.
    let deadline = Instant::now() + Duration::from_secs(LIFETIME_S + 20);
    while stored_cert(&data) == first {
        assert!(Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Wait until the first certificate expired: a new client can only succeed with the new one.
    while meshpunch_certs::unix_now() <= first_expiry + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (c, c_ev) = connect_with(&cs, &root).await;
    // The client connected before the renewal is still there and can punch with the new one.
    assert!(a.is_connected());
    let (_c, _c_ev) = punch(&a, c, c_ev).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                if let Some(Event::Disconnected { .. }) = a_ev.recv().await {
                    return;
                }
            }
        })
        .await
        .is_err(),
        "renewal must not drop connections"
    );
    let (code, _) = http_get(admin, "/readyz").await;
    assert_eq!(code, 200);
    let (_, metrics) = http_get(admin, "/metrics").await;
    for name in [
        meshpunch_rendezvous::metrics::CERT_EXPIRY_TIMESTAMP_SECONDS,
        meshpunch_rendezvous::metrics::ACME_RENEWALS_TOTAL,
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    // ACME unreachable: renewals fail (metric with the reason's result), the current
    // certificate keeps being served and /readyz stays ready until it expires.
    drop(pebble);
    let current_expiry = not_after(&stored_cert(&data));
    let deadline = Instant::now() + Duration::from_secs(LIFETIME_S + 10);
    loop {
        let (_, metrics) = http_get(admin, "/metrics").await;
        if metrics
            .lines()
            .any(|l| l.starts_with("meshpunch_rendezvous_acme_renewals_total{result=\"error\"}"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed renewal counted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if meshpunch_certs::unix_now() < current_expiry - 1 {
        let (code, body) = http_get(admin, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        let (d, _d_ev) = connect_with(&cs, &root).await;
        d.close();
    }
    let deadline = Instant::now() + Duration::from_secs(LIFETIME_S + 10);
    loop {
        let (code, body) = http_get(admin, "/readyz").await;
        if code == 503 {
            assert!(body.contains("TLS certificate"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed ready with an expired certificate"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
