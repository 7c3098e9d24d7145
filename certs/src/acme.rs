//! ACME (RFC 8555) certificates with `instant-acme` (ring provider, no aws-lc; chosen over
//! `rustls-acme` because that one only answers tls-alpn-01 inside the server's own TLS
//! listener, and a QUIC listener cannot take ACME validations, which arrive over TCP).
//!
//! Challenge: **http-01** on a plain HTTP listener of our own (`--acme-http-listen`, default
//! `[::]:80`, RFC 8555 §8.3). State lives in `<data dir>/acme/<domain>/`: `account.json` (the
//! ACME account), `key.pem` (the certificate key, kept across renewals so `pin=spki:` pins
//! survive them) and `cert.pem` (the chain). Renewal starts at 2/3 of the certificate's
//! lifetime; a failure is logged with its reason, counted in
//! `meshpunch_<component>_acme_renewals_total{result="error"}` and retried with exponential
//! backoff (never later than a tenth of the remaining lifetime), while the current
//! certificate keeps being served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use crate::{load_pem, unix_now, write_private, CertAndKey, CertError, ReloadableCert};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// First retry after a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest wait between retries while there is no certificate at all.
const RETRY_FIRST_MAX: Duration = Duration::from_secs(300);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// ACME settings.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The DNS name to certify (the connect string's host).
    pub domain: String,
    /// Contact e-mail for the account.
    pub contact: String,
    /// Directory URL.
    pub directory: String,
    /// Extra CA (PEM) to trust for the ACME server's own HTTPS (a test CA such as Pebble).
    pub ca_file: Option<PathBuf>,
    /// Where account, key and certificate are stored.
    pub state_dir: PathBuf,
    /// Address of the http-01 challenge listener.
    pub http_listen: SocketAddr,
}

type Tokens = Arc<Mutex<HashMap<String, String>>>;

/// A running ACME source: the challenge listener and the stored state.
#[derive(Debug, Clone)]
pub struct Acme {
    cfg: AcmeConfig,
    component: &'static str,
    tokens: Tokens,
    http_addr: SocketAddr,
    _http: Arc<crate::AbortOnDropDebug>,
}

impl Acme {
    /// Binds the http-01 listener.
    pub(crate) async fn start(cfg: AcmeConfig, component: &'static str) -> Result<Acme, CertError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(crate::io(&cfg.state_dir))?;
        // The ACME HTTP client (hyper-rustls) uses the process default provider: make it ring
        // even when another crate compiled aws-lc-rs into rustls too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tokens: Tokens = Arc::default();
        let listener = tokio::net::TcpListener::bind(cfg.http_listen)
            .await
            .map_err(|e| {
                CertError::Acme(format!(
                    "binding the http-01 listener {}: {e}",
                    cfg.http_listen
                ))
            })?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| CertError::Acme(e.to_string()))?;
        let t = tokens.clone();
        let app = axum::Router::new().route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(
                move |axum::extract::Path(token): axum::extract::Path<String>| {
                    let answer = t.lock().ok().and_then(|g| g.get(&token).cloned());
                    async move {
                        match answer {
                            Some(a) => (axum::http::StatusCode::OK, a),
                            None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                        }
                    }
                },
            ),
        );
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        tracing::info!(addr = %http_addr, domain = %cfg.domain, "ACME http-01 listener");
        Ok(Acme {
            cfg,
            component,
            tokens,
            http_addr,
            _http: Arc::new(crate::AbortOnDropDebug(handle)),
        })
    }

    /// Address the http-01 listener is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    fn cert_path(&self) -> PathBuf {
        self.cfg.state_dir.join("cert.pem")
    }

    fn key_path(&self) -> PathBuf {
        self.cfg.state_dir.join("key.pem")
    }

    /// The stored certificate.
    pub(crate) fn stored(&self) -> Result<CertAndKey, CertError> {
        load_pem(&self.cert_path(), &self.key_path())
    }

    /// The stored certificate if it is still valid, else a new one (retried with backoff
    /// until the CA issues one).
    pub(crate) async fn initial(&self) -> Result<CertAndKey, CertError> {
        if let Ok(ck) = self.stored() {
            if let Some((_, na)) = ck.validity() {
                if na > unix_now() {
                    tracing::info!(domain = %self.cfg.domain, expires = %meshpunch_proto::x509::format_unix(na), "using the stored ACME certificate");
                    return Ok(ck);
                }
            }
        }
        // Nothing to serve yet: retry until the CA answers (a restart loop under systemd would
        // hit the CA's rate limits faster).
        let mut backoff = RETRY_MIN;
        loop {
            match self.issue_counted().await {
                Ok(ck) => return Ok(ck),
                Err(err) => {
                    tracing::error!(error = %err, domain = %self.cfg.domain,
                        directory = %self.cfg.directory, retry_in = ?backoff,
                        "ACME: no certificate yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_FIRST_MAX);
                }
            }
        }
    }

    async fn issue_counted(&self) -> Result<CertAndKey, CertError> {
        let r = self.issue().await;
        let label = if r.is_ok() { "ok" } else { "error" };
        metrics::counter!(format!("meshpunch_{}_acme_renewals_total", self.component), "result" => label)
            .increment(1);
        r
    }

    async fn account(&self) -> Result<Account, CertError> {
        let e = |e: instant_acme::Error| CertError::Acme(e.to_string());
        let builder = match &self.cfg.ca_file {
            Some(p) => Account::builder_with_root(p).map_err(e)?,
            None => Account::builder().map_err(e)?,
        };
        let path = self.cfg.state_dir.join("account.json");
        if let Ok(raw) = std::fs::read(&path) {
            if let Ok(creds) = serde_json::from_slice(&raw) {
                return builder.from_credentials(creds).await.map_err(e);
            }
            tracing::warn!(path = %path.display(), "ACME account file unreadable; creating a new account");
        }
        let contact = format!("mailto:{}", self.cfg.contact);
        let (account, creds) = builder
            .create(
                &NewAccount {
                    contact: &[&contact],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.cfg.directory.clone(),
                None,
            )
            .await
            .map_err(e)?;
        let json = serde_json::to_vec(&creds).map_err(|e| CertError::Acme(e.to_string()))?;
        write_private(&path, &json)?;
        Ok(account)
    }

    /// The certificate key: the stored one (so the SPKI pin stays), or a new one.
    fn key(&self) -> Result<rcgen::KeyPair, CertError> {
        if let Ok(pem) = std::fs::read_to_string(self.key_path()) {
            if let Ok(k) = rcgen::KeyPair::from_pem(&pem) {
                return Ok(k);
            }
        }
        let k = rcgen::KeyPair::generate()
            .map_err(|e| CertError::Invalid(format!("generating a key: {e}")))?;
        write_private(&self.key_path(), k.serialize_pem().as_bytes())?;
        Ok(k)
    }

    /// One complete order: account, http-01 authorization, CSR with our key, download.
    async fn issue(&self) -> Result<CertAndKey, CertError> {
        let e = |e: instant_acme::Error| CertError::Acme(e.to_string());
        let account = self.account().await?;
        let ids = [Identifier::Dns(self.cfg.domain.clone())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(e)?;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(e)?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(CertError::Acme(format!(
                        "authorization for {} is {other:?}",
                        self.cfg.domain
                    )))
                }
            }
            let mut ch = a.challenge(ChallengeType::Http01).ok_or_else(|| {
                CertError::Acme("the ACME server offers no http-01 challenge".into())
            })?;
            let ka = ch.key_authorization().as_str().to_string();
            if let Ok(mut g) = self.tokens.lock() {
                g.insert(ch.token.clone(), ka);
            }
            ch.set_ready().await.map_err(e)?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retry).await.map_err(e)?;
        if let Ok(mut g) = self.tokens.lock() {
            g.clear();
        }
        if status != OrderStatus::Ready {
            return Err(CertError::Acme(format!(
                "order for {} ended {status:?} (challenge failed: is http-01 on port 80 reachable from the internet?)",
                self.cfg.domain
            )));
        }
        let key = self.key()?;
        let params = rcgen::CertificateParams::new(vec![self.cfg.domain.clone()])
            .map_err(|e| CertError::Invalid(format!("CSR: {e}")))?;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| CertError::Invalid(format!("CSR: {e}")))?;
        order.finalize_csr(csr.der()).await.map_err(e)?;
        let chain = order.poll_certificate(&retry).await.map_err(e)?;
        let ck = crate::parse_pem(chain.as_bytes(), key.serialize_pem().as_bytes(), "ACME")?;
        std::fs::write(self.cert_path(), chain.as_bytes()).map_err(crate::io(&self.cert_path()))?;
        if let Some((_, na)) = ck.validity() {
            tracing::info!(domain = %self.cfg.domain, expires = %meshpunch_proto::x509::format_unix(na), "ACME certificate obtained");
        }
        Ok(ck)
    }

    /// Renews at 2/3 of the served certificate's lifetime, forever; retries with backoff.
    pub(crate) async fn renew_loop(
        &self,
        resolver: Arc<ReloadableCert>,
        on_new: impl Fn(&CertAndKey),
    ) {
        let mut backoff = RETRY_MIN;
        loop {
            let wait = match resolver.validity() {
                Some((nb, na)) => {
                    let at = nb + (na - nb) * 2 / 3;
                    Duration::from_secs(at.saturating_sub(unix_now()).max(0) as u64)
                }
                None => Duration::ZERO,
            };
            tokio::time::sleep(wait).await;
            match self.issue_counted().await {
                Ok(ck) => match resolver.set(&ck) {
                    Ok(()) => {
                        on_new(&ck);
                        backoff = RETRY_MIN;
                    }
                    Err(err) => tracing::error!(error = %err, "renewed certificate unusable"),
                },
                Err(err) => {
                    let left = resolver
                        .validity()
                        .map(|(_, na)| na.saturating_sub(unix_now()).max(0) as u64)
                        .unwrap_or(0);
                    // Retry sooner as the certificate nears its end, but never hammer the CA:
                    // at least RETRY_MIN apart, and plain backoff once it has expired.
                    let sleep = if left > 0 {
                        backoff.min(Duration::from_secs(left / 10).max(RETRY_MIN))
                    } else {
                        backoff
                    };
                    tracing::error!(error = %err, domain = %self.cfg.domain,
                        directory = %self.cfg.directory, retry_in = ?sleep,
                        "ACME renewal failed; still serving the current certificate");
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}
