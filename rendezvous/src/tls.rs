//! TLS for the QUIC listener: certificate loading or generation, and a resolver whose
//! certificate can be swapped at run time (SIGHUP) without touching open connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Errors loading or generating certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No certificate or key found in the PEM file, or the key is unusable.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A loaded certificate chain and key.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl CertAndKey {
    /// SHA-256 of the leaf certificate, the pin of connect strings.
    pub fn pin(&self) -> [u8; 32] {
        self.chain
            .first()
            .map(|c| meshpunch_proto::connect::cert_pin(c.as_ref()))
            .unwrap_or([0u8; 32])
    }

    fn certified(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let signer = rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(|e| TlsError::Invalid(format!("unusable private key: {e}")))?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signer)))
    }
}

/// Loads a PEM certificate chain and private key.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertAndKey, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(io(cert))?;
    let key_pem = std::fs::read(key).map_err(io(key))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(io(cert))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no certificate found",
            cert.display()
        )));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(io(key))?
        .ok_or_else(|| TlsError::Invalid(format!("{}: no private key found", key.display())))?;
    Ok(CertAndKey {
        chain,
        key: Arc::new(key_der),
    })
}

/// Loads `dir/cert.pem` + `dir/key.pem`, generating a self-signed pair (rcgen) first if they
/// do not exist. `names` become the subject alternative names.
pub fn load_or_generate(dir: &Path, names: &[String]) -> Result<CertAndKey, TlsError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut sans = vec!["localhost".to_string(), "meshpunch".to_string()];
        sans.extend(names.iter().cloned());
        sans.sort();
        sans.dedup();
        let generated = rcgen::generate_simple_self_signed(sans)
            .map_err(|e| TlsError::Invalid(format!("generating certificate: {e}")))?;
        write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&cert, generated.cert.pem()).map_err(io(&cert))?;
    }
    load_pem(&cert, &key)
}

/// Writes a file readable only by the owner: created 0600 from the first byte under a fresh
/// name (`O_EXCL`, so never through a planted symlink) and renamed over `path`, so a file that
/// existed with a wider mode is replaced, not reused.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{:08x}.tmp", rand::random::<u32>()));
    let tmp = path.with_file_name(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let written = opts
        .open(&tmp)
        .and_then(|mut f| f.write_all(data))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io(path))
}

/// Server certificate resolver with a swappable certificate.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

impl ReloadableCert {
    /// A resolver serving `ck`.
    pub fn new(ck: &CertAndKey) -> Result<Self, TlsError> {
        Ok(ReloadableCert {
            current: RwLock::new((ck.certified()?, ck.pin())),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, ck: &CertAndKey) -> Result<(), TlsError> {
        let certified = ck.certified()?;
        if let Ok(mut g) = self.current.write() {
            *g = (certified, ck.pin());
        }
        Ok(())
    }

    /// Pin of the current certificate.
    pub fn pin(&self) -> [u8; 32] {
        self.current.read().map(|g| g.1).unwrap_or([0u8; 32])
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|g| g.0.clone())
    }
}

/// The QUIC server crypto config: TLS 1.3 only, ALPN `meshpunch/1`, certificate from
/// `resolver`.
pub fn server_crypto(
    resolver: Arc<ReloadableCert>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
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
    quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Invalid(e.to_string()))
}
