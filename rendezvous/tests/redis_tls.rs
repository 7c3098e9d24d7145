//! `rediss://`: the registry talks TLS to a real `redis-server --tls-port` and verifies its
//! certificate against the trusted roots (`SSL_CERT_FILE` here, the system store in production).
//! Its own test binary because it sets `SSL_CERT_FILE` for the process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::time::Duration;

use meshpunch_proto::wire::PeerKey;
use meshpunch_rendezvous::registry::redis::{RedisRegistry, RedisRegistryConfig};
use meshpunch_rendezvous::registry::{PeerId, Registry};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use redis_support::{eventually, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls_url_verifies_the_server_certificate() {
    if !redis_support::available("redis_tls_url_verifies_the_server_certificate") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A private CA and a server certificate for 127.0.0.1 signed by it.
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .expect("cert");
    let (ca_path, cert_path, key_path) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    std::fs::write(&cert_path, cert.pem() + &ca.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    // rustls-native-certs reads the roots from SSL_CERT_FILE when it is set.
    std::env::set_var("SSL_CERT_FILE", &ca_path);

    let redis = RedisServer::start_tls(&cert_path, &key_path);
    assert!(redis.url().starts_with("rediss://"));
    let mut cfg = RedisRegistryConfig::new(redis.url().parse().expect("url"), "tls-node");
    cfg.presence_ttl = Duration::from_secs(3);
    let (n1, _in1) = RedisRegistry::start(cfg.clone());
    let (n2, _in2) = RedisRegistry::start(RedisRegistryConfig {
        node_id: "tls-node-2".into(),
        ..cfg
    });
    let wait = Duration::from_secs(30);
    eventually(wait, "TLS registry ready", || async {
        n1.health().await.ready && n2.health().await.ready
    })
    .await;
    let peer = PeerId {
        network: "net".into(),
        key: PeerKey([1; 32]),
    };
    n1.register(&peer, 1).await.expect("register");
    eventually(wait, "presence over TLS", || async {
        n2.is_online(&peer).await.unwrap_or(false)
    })
    .await;
}
