//! Server certificates for meshpunch's TLS listeners (the rendezvous today, the relay when it
//! terminates TLS): one small interface, [`CertManager`], over three sources ([`Source`]):
//!
//! - **PEM files** (`--cert`/`--key`): re-read on [`CertManager::reload`] (SIGHUP) and when
//!   their modification time changes (polled every [`WATCH_INTERVAL`]), so a certificate
//!   renewed by certbot or a Kubernetes secret update applies without a restart.
//! - **Self-signed** (dev): generated once into a directory, then treated like files.
//! - **ACME** ([`acme`]): obtained from an ACME CA, stored in the data dir, renewed at 2/3 of
//!   its lifetime with the same key (so SPKI pins survive), retried with backoff on failure
//!   while the current certificate keeps being served.
//!
//! Every source feeds one [`ReloadableCert`], the rustls resolver: a new certificate applies to
//! new handshakes, open connections keep theirs.

#![forbid(unsafe_code)]

pub mod acme;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;

/// How often watched certificate files are checked for a new modification time.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Errors loading, generating or obtaining certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
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
    /// The ACME exchange failed.
    #[error("ACME: {0}")]
    Acme(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
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
    fn leaf(&self) -> &[u8] {
        self.chain.first().map(|c| c.as_ref()).unwrap_or_default()
    }

    /// Legacy pin: SHA-256 of the leaf certificate DER.
    pub fn cert_pin(&self) -> [u8; 32] {
        meshpunch_proto::connect::cert_pin(self.leaf())
    }

    /// SPKI pin: SHA-256 of the leaf's public key (survives renewal with the same key).
    pub fn spki_pin(&self) -> [u8; 32] {
        meshpunch_proto::x509::spki_pin(self.leaf()).unwrap_or([0u8; 32])
    }

    /// Validity of the leaf as Unix seconds (notBefore, notAfter).
    pub fn validity(&self) -> Option<(i64, i64)> {
        meshpunch_proto::x509::validity(self.leaf())
    }

    fn certified(&self) -> Result<Arc<CertifiedKey>, CertError> {
        let signer = rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(|e| CertError::Invalid(format!("unusable private key: {e}")))?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signer)))
    }
}

/// Parses a PEM certificate chain and private key (`what` names them in errors).
pub fn parse_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<CertAndKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid(format!("{what}: certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Invalid(format!("{what}: no certificate found")));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| CertError::Invalid(format!("{what}: no usable private key: {e}")))?;
    let ck = CertAndKey {
        chain,
        key: Arc::new(key),
    };
    ck.certified()?;
    Ok(ck)
}

/// Loads a PEM certificate chain and private key.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertAndKey, CertError> {
    let cert_pem = std::fs::read(cert).map_err(io(cert))?;
    let key_pem = std::fs::read(key).map_err(io(key))?;
    parse_pem(
        &cert_pem,
        &key_pem,
        &format!("{} / {}", cert.display(), key.display()),
    )
}

/// Loads `dir/cert.pem` + `dir/key.pem`, generating a self-signed pair (rcgen) first if they
/// do not exist. `names` become the subject alternative names.
pub fn load_or_generate(dir: &Path, names: &[String]) -> Result<CertAndKey, CertError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut sans = vec!["localhost".to_string(), "meshpunch".to_string()];
        sans.extend(names.iter().cloned());
        sans.sort();
        sans.dedup();
        let generated = rcgen::generate_simple_self_signed(sans)
            .map_err(|e| CertError::Invalid(format!("generating certificate: {e}")))?;
        write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert, generated.cert.pem()).map_err(io(&cert))?;
    }
    load_pem(&cert, &key)
}

/// Writes a file readable only by the owner: created 0600 from the first byte under a fresh
/// name (`O_EXCL`, so never through a planted symlink) and renamed over `path` (so a watcher
/// never reads half a file, and a file that existed with a wider mode is replaced, not reused).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CertError> {
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
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io(path))
}

#[derive(Debug)]
struct Current {
    certified: Arc<CertifiedKey>,
    cert_pin: [u8; 32],
    spki_pin: [u8; 32],
    validity: Option<(i64, i64)>,
}

/// Server certificate resolver with a swappable certificate.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Current>,
}

impl ReloadableCert {
    /// A resolver serving `ck`.
    pub fn new(ck: &CertAndKey) -> Result<Self, CertError> {
        Ok(ReloadableCert {
            current: RwLock::new(Self::current(ck)?),
        })
    }

    fn current(ck: &CertAndKey) -> Result<Current, CertError> {
        Ok(Current {
            certified: ck.certified()?,
            cert_pin: ck.cert_pin(),
            spki_pin: ck.spki_pin(),
            validity: ck.validity(),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, ck: &CertAndKey) -> Result<(), CertError> {
        let c = Self::current(ck)?;
        if let Ok(mut g) = self.current.write() {
            *g = c;
        }
        Ok(())
    }

    /// Legacy pin (certificate SHA-256) of the current certificate.
    pub fn cert_pin(&self) -> [u8; 32] {
        self.current.read().map(|g| g.cert_pin).unwrap_or([0u8; 32])
    }

    /// SPKI pin of the current certificate.
    pub fn spki_pin(&self) -> [u8; 32] {
        self.current.read().map(|g| g.spki_pin).unwrap_or([0u8; 32])
    }

    /// Validity of the current certificate (Unix seconds).
    pub fn validity(&self) -> Option<(i64, i64)> {
        self.current.read().ok().and_then(|g| g.validity)
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|g| g.certified.clone())
    }
}

/// Where a server's certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files, watched and reloaded.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// A self-signed certificate generated once into `dir` (dev), then watched like files.
    SelfSigned {
        /// Directory of `cert.pem` / `key.pem`.
        dir: PathBuf,
        /// Subject alternative names.
        names: Vec<String>,
    },
    /// Obtained and renewed from an ACME CA.
    Acme(acme::AcmeConfig),
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn mtimes(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Keeps a [`ReloadableCert`] current from its [`Source`].
#[derive(Debug)]
pub struct CertManager {
    source: Source,
    resolver: Arc<ReloadableCert>,
    component: &'static str,
    acme: Option<acme::Acme>,
    seen: Mutex<Vec<Option<SystemTime>>>,
    watch: bool,
}

impl CertManager {
    /// Loads (files, self-signed) or obtains (ACME, unless a stored certificate is still
    /// good) the first certificate. `component` names the metrics
    /// (`meshpunch_<component>_cert_*`).
    pub async fn start(source: Source, component: &'static str) -> Result<Self, CertError> {
        let (ck, acme) = match &source {
            Source::Files { cert, key } => (load_pem(cert, key)?, None),
            Source::SelfSigned { dir, names } => (load_or_generate(dir, names)?, None),
            Source::Acme(cfg) => {
                let a = acme::Acme::start(cfg.clone(), component).await?;
                (a.initial().await?, Some(a))
            }
        };
        let resolver = Arc::new(ReloadableCert::new(&ck)?);
        let mgr = CertManager {
            resolver,
            component,
            acme,
            seen: Mutex::new(Vec::new()),
            watch: true,
            source,
        };
        mgr.note(&ck);
        let seen = mtimes(&mgr.watched());
        if let Ok(mut g) = mgr.seen.lock() {
            *g = seen;
        }
        Ok(mgr)
    }

    /// Whether [`CertManager::spawn`] polls the certificate files (default: yes). Without,
    /// only [`CertManager::reload`] (SIGHUP) re-reads them.
    pub fn watching(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// The rustls resolver serving the current certificate.
    pub fn resolver(&self) -> Arc<ReloadableCert> {
        self.resolver.clone()
    }

    fn watched(&self) -> Vec<PathBuf> {
        match &self.source {
            Source::Files { cert, key } => vec![cert.clone(), key.clone()],
            Source::SelfSigned { dir, .. } => vec![dir.join("cert.pem"), dir.join("key.pem")],
            Source::Acme(_) => Vec::new(),
        }
    }

    fn note(&self, ck: &CertAndKey) {
        if let Some((_, na)) = ck.validity() {
            metrics::gauge!(format!(
                "meshpunch_{}_cert_expiry_timestamp_seconds",
                self.component
            ))
            .set(na as f64);
        }
    }

    /// Re-reads the certificate now (SIGHUP): the files, or the ACME certificate stored in the
    /// data dir. On error the current certificate stays. Returns the new SPKI pin.
    pub fn reload(&self) -> Result<[u8; 32], CertError> {
        let result = match &self.source {
            Source::Files { cert, key } => load_pem(cert, key),
            Source::SelfSigned { dir, names } => load_or_generate(dir, names),
            Source::Acme(_) => match &self.acme {
                Some(a) => a.stored(),
                None => Err(CertError::Invalid("ACME not started".into())),
            },
        }
        .and_then(|ck| {
            self.resolver.set(&ck)?;
            self.note(&ck);
            Ok(ck.spki_pin())
        });
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(format!("meshpunch_{}_tls_reloads_total", self.component), "result" => label)
            .increment(1);
        result
    }

    /// Runs the source in the background: polls watched files and reloads when they change;
    /// renews ACME certificates (serving http-01 challenges). `on_validity` is called with
    /// `Some(reason)` when the served certificate expires (readiness should drop) and with
    /// `None` when a valid one is served again.
    pub fn spawn(
        self: &Arc<Self>,
        on_validity: impl Fn(Option<String>) + Send + Sync + 'static,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let on_validity = Arc::new(on_validity);
            let renew = me.acme.as_ref().map(|a| {
                let a = a.clone();
                let resolver = me.resolver.clone();
                let me2 = me.clone();
                tokio::spawn(async move {
                    a.renew_loop(resolver, move |ck| me2.note(ck)).await;
                })
            });
            let _abort = AbortOnDrop(renew);
            let mut expired = false;
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.poll_files();
                let now_expired = me
                    .resolver
                    .validity()
                    .map(|(nb, na)| unix_now() > na || unix_now() < nb)
                    .unwrap_or(false);
                if now_expired != expired {
                    expired = now_expired;
                    if expired {
                        let na = me.resolver.validity().map(|v| v.1).unwrap_or(0);
                        let reason = format!(
                            "TLS certificate not valid now (expires {})",
                            meshpunch_proto::x509::format_unix(na)
                        );
                        tracing::error!(%reason, "serving an invalid certificate");
                        on_validity(Some(reason));
                    } else {
                        on_validity(None);
                    }
                }
            }
        })
    }

    fn poll_files(&self) {
        let paths = self.watched();
        if paths.is_empty() || !self.watch {
            return;
        }
        let now = mtimes(&paths);
        let changed = match self.seen.lock() {
            Ok(mut g) if *g != now => {
                *g = now;
                true
            }
            _ => false,
        };
        if changed {
            match self.reload() {
                Ok(pin) => tracing::info!(
                    spki = %meshpunch_proto::connect::Pin::Spki(pin),
                    "certificate files changed; reloaded"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "certificate files changed but do not load; keeping the current certificate")
                }
            }
        }
    }
}

#[derive(Debug)]
struct AbortOnDropDebug(JoinHandle<()>);

impl Drop for AbortOnDropDebug {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watched_files_reload_and_bad_files_keep_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ck = load_or_generate(dir.path(), &["a.test".into()]).unwrap();
        let src = Source::Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        let mgr = Arc::new(CertManager::start(src, "test").await.unwrap());
        assert_eq!(mgr.resolver().spki_pin(), ck.spki_pin());
        let _task = AbortOnDrop(Some(mgr.spawn(|_| {})));
        // A broken file: the old certificate stays.
        std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
        tokio::time::sleep(WATCH_INTERVAL * 2).await;
        assert_eq!(mgr.resolver().spki_pin(), ck.spki_pin());
        // A new pair: picked up without a signal.
        let g = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        write_private(
            &dir.path().join("key.pem"),
            g.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        std::fs::write(dir.path().join("cert.pem"), g.cert.pem()).unwrap();
        let want = meshpunch_proto::x509::spki_pin(g.cert.der()).unwrap();
        let deadline = tokio::time::Instant::now() + WATCH_INTERVAL * 5;
        while mgr.resolver().spki_pin() != want {
            assert!(tokio::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
