//! TLS for the QUIC and TLS-over-TCP listeners: which certificate source the config asks for (the sources
//! themselves live in the `meshpunch-certs` crate, shared with the relay) and the rustls
//! server config.

use std::sync::Arc;

pub use meshpunch_certs::{
    load_or_generate, load_pem, write_private, CertAndKey, CertError as TlsError, CertManager,
    ReloadableCert, Source,
};

use crate::config::Config;

/// The certificate source `cfg` asks for: ACME, PEM files, or a self-signed certificate in
/// the data dir.
pub fn source(cfg: &Config) -> Source {
    if let Some(a) = &cfg.acme {
        return Source::Acme(meshpunch_certs::acme::AcmeConfig {
            domain: a.domain.clone(),
            contact: a.contact.clone(),
            directory: a.directory.clone(),
            ca_file: a.ca_file.clone(),
            state_dir: cfg.data_dir.join("acme").join(&a.domain),
            http_listen: a.http_listen,
        });
    }
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => Source::SelfSigned {
            dir: cfg.data_dir.clone(),
            names: cert_names(cfg),
        },
    }
}

fn cert_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["127.0.0.1".to_string()];
    if let Some(h) = &cfg.public_host {
        names.push(h.clone());
    }
    if !cfg.listen.ip().is_unspecified() {
        names.push(cfg.listen.ip().to_string());
    }
    names
}

/// The stored certificate of `cfg`'s source without starting anything (for `token create
/// --connect`), or `None` for ACME (clients verify with WebPKI, no pin).
pub fn stored_cert(cfg: &Config) -> Result<Option<CertAndKey>, TlsError> {
    match source(cfg) {
        Source::Acme(_) => Ok(None),
        Source::Files { cert, key } => load_pem(&cert, &key).map(Some),
        Source::SelfSigned { dir, .. } => {
            load_pem(&dir.join("cert.pem"), &dir.join("key.pem")).map(Some)
        }
    }
}

/// The QUIC server crypto config: [`server_tls`] for quinn.
pub fn server_crypto(
    resolver: Arc<ReloadableCert>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(resolver)?)
        .map_err(|e| TlsError::Invalid(e.to_string()))
}

/// The rustls server config of both listeners: TLS 1.3 only, ALPN `meshpunch/1`, no early
/// data, no resumption, certificate from `resolver` (so a reload reaches both at once).
pub fn server_tls(resolver: Arc<ReloadableCert>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![meshpunch_proto::wire::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    // No resumption: clients hold one long-lived connection, and tickets or a session
    // cache cost handshake bytes and memory for every connection.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}
