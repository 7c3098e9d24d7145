//! How the client trusts the rendezvous certificate, and the errors it gives when it does not.
//!
//! Two modes, chosen by the connect string ([`meshpunch_proto::connect`]):
//!
//! - **WebPKI** (no `pin=`): the chain must lead to a CA in the system trust store or in a
//!   `--ca-file`/`CaFile`, be valid now and name the connect string's host. The system store is
//!   read with `rustls-native-certs` and the chain checked with rustls' own webpki verifier
//!   (ring provider). We chose that over `rustls-platform-verifier` because on Linux the latter
//!   does the same thing with more machinery, while here the private CA and the system roots
//!   sit in one `RootCertStore` and every failure comes back as a typed webpki error we can
//!   turn into a message that names the host and the reason.
//! - **Pinned** (`pin=`): the leaf must match one of the pins (SPKI SHA-256, or the legacy
//!   whole-certificate SHA-256) and be inside its validity period. The host name is not
//!   checked (pinned servers are often reached by IP with a self-signed certificate).
//!
//! Either way the handshake signature is checked with the leaf's key.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use meshpunch_proto::connect::Pin;
use meshpunch_proto::x509;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Loads the certificates of a PEM CA file (`--ca-file`, `CaFile =`).
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("CA file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "CA file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The system trust store, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading the system trust store");
        }
        found.certs
    })
}

/// The last certificate failure of a verifier, in words a user can act on. Shared between
/// the verifier (which writes it) and the connection code (which reads it when a handshake
/// fails, since the TLS error that reaches quinn is a bare alert).
#[derive(Debug, Clone, Default)]
pub struct Failures(Arc<Mutex<Option<String>>>);

impl Failures {
    fn set(&self, msg: String) -> rustls::Error {
        tracing::debug!(reason = %msg, "rendezvous certificate refused");
        if let Ok(mut g) = self.0.lock() {
            *g = Some(msg.clone());
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            VerifyError(msg),
        ))))
    }

    /// The message of the last refused certificate, if any, clearing it.
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }

    /// Describes a failed handshake: the certificate reason when the verifier refused,
    /// else the transport error.
    pub fn explain(&self, err: &dyn std::fmt::Display) -> String {
        self.take().unwrap_or_else(|| err.to_string())
    }
}

#[derive(Debug)]
struct VerifyError(String);

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerifyError {}

#[derive(Debug)]
enum Mode {
    Pinned(Vec<Pin>),
    WebPki(Arc<WebPkiServerVerifier>),
}

/// The rendezvous certificate verifier (see the module doc).
#[derive(Debug)]
struct Verifier {
    /// Whose certificate: the messages name it and say where to fix it.
    relay: bool,
    mode: Mode,
    provider: Arc<rustls::crypto::CryptoProvider>,
    failures: Failures,
}

fn got_spki(cert: &[u8]) -> String {
    match x509::spki_pin(cert) {
        Some(p) => Pin::Spki(p).to_string(),
        None => "unreadable".into(),
    }
}

fn name_of(server_name: &ServerName<'_>) -> String {
    match server_name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

impl Verifier {
    fn what(&self) -> &'static str {
        if self.relay {
            "relay"
        } else {
            "rendezvous"
        }
    }

    fn check_dates(&self, host: &str, cert: &[u8], now: UnixTime) -> Result<(), rustls::Error> {
        let what = self.what();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match x509::validity(cert) {
            None => Err(self.failures.set(format!(
                "the {what} certificate for {host} cannot be read (no validity dates)"
            ))),
            Some((nb, _)) if now < nb => Err(self.failures.set(format!(
                "the {what} certificate for {host} is not valid before {} (is this machine's clock right?)",
                x509::format_unix(nb)
            ))),
            Some((_, na)) if now > na => Err(self.failures.set(format!(
                "the {what} certificate for {host} expired on {}; the server operator must renew it",
                x509::format_unix(na)
            ))),
            Some(_) => Ok(()),
        }
    }

    fn webpki_failure(&self, host: &str, cert: &[u8], e: &rustls::Error) -> String {
        let what = self.what();
        let dates = x509::validity(cert);
        let reason = match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    let when = dates
                        .map(|(_, na)| x509::format_unix(na))
                        .unwrap_or_else(|| "an earlier date".into());
                    return format!(
                        "the {what} certificate for {host} expired on {when}; the server operator must renew it"
                    );
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    let when = dates
                        .map(|(nb, _)| x509::format_unix(nb))
                        .unwrap_or_else(|| "a later date".into());
                    return format!(
                        "the {what} certificate for {host} is not valid before {when} (is this machine's clock right?)"
                    );
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    return format!(
                        "the {what} certificate is not valid for the host name {host} ({ce}); use the name the certificate was issued for in {}",
                        if self.relay { "the relay's turns: URI" } else { "the connect string" }
                    );
                }
                CertificateError::UnknownIssuer if self.relay => {
                    "it is issued by a CA this machine does not trust (add the CA with --ca-file / CaFile)".to_string()
                }
                CertificateError::UnknownIssuer => format!(
                    "it is issued by a CA this machine does not trust (add the CA with --ca-file / CaFile, or pin the server with pin={})",
                    got_spki(cert)
                ),
                CertificateError::BadSignature => "its signature chain is broken".to_string(),
                CertificateError::Revoked => "it is revoked".to_string(),
                other => other.to_string(),
            },
            other => other.to_string(),
        };
        format!("the {what} certificate for {host} is not trusted: {reason}")
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let host = name_of(server_name);
        match &self.mode {
            Mode::Pinned(pins) => {
                if !pins.iter().any(|p| p.matches(end_entity.as_ref())) {
                    return Err(self.failures.set(format!(
                        "the rendezvous certificate does not match the pin in your connect string (got SPKI {})",
                        got_spki(end_entity.as_ref())
                    )));
                }
                self.check_dates(&host, end_entity.as_ref(), now)?;
                Ok(ServerCertVerified::assertion())
            }
            Mode::WebPki(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    let msg = self.webpki_failure(&host, end_entity.as_ref(), &e);
                    self.failures.set(msg)
                }),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client config for the rendezvous: TLS 1.3 only, ALPN `meshpunch/1`, the
/// certificate checked against `pins` or (none given) the system trust store plus
/// `ca_roots`. Returns the [`Failures`] slot its verifier reports refusals to.
pub fn client_crypto(
    pins: &[Pin],
    ca_roots: &[CertificateDer<'static>],
) -> Result<(rustls::ClientConfig, Failures), String> {
    let (mut tls, failures) = crypto_with(false, pins, ca_roots, &[&rustls::version::TLS13])?;
    tls.alpn_protocols = vec![meshpunch_proto::wire::ALPN.to_vec()];
    Ok((tls, failures))
}

/// The rustls client config for TURN over TLS: the same verifier as the rendezvous' (system
/// trust store plus `ca_roots`, no pins), TLS 1.3 and 1.2 (coturn 4.6 offers no 1.3), no ALPN.
pub fn relay_client_crypto(
    ca_roots: &[CertificateDer<'static>],
) -> Result<(rustls::ClientConfig, Failures), String> {
    crypto_with(
        true,
        &[],
        ca_roots,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

fn crypto_with(
    relay: bool,
    pins: &[Pin],
    ca_roots: &[CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(rustls::ClientConfig, Failures), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mode = if pins.is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        for c in ca_roots {
            roots
                .add(c.clone())
                .map_err(|e| format!("CA file certificate unusable: {e}"))?;
        }
        // Broken entries in the system store are skipped (as curl and Go do).
        let _ = roots.add_parsable_certificates(system_roots().iter().cloned());
        if roots.is_empty() {
            return Err("no trusted CA certificates: install the system CA bundle (ca-certificates), pass --ca-file, or put pin=spki:... in the connect string".into());
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("certificate verifier: {e}"))?;
        Mode::WebPki(v)
    } else {
        Mode::Pinned(pins.to_vec())
    };
    let failures = Failures::default();
    let verifier = Verifier {
        relay,
        mode,
        provider: provider.clone(),
        failures: failures.clone(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((tls, failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str], key: &rcgen::KeyPair, days: (i64, i64)) -> CertificateDer<'static> {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = std::time::SystemTime::now();
        let at = |d: i64| {
            if d >= 0 {
                now + std::time::Duration::from_secs(d as u64 * 86_400)
            } else {
                now - std::time::Duration::from_secs((-d) as u64 * 86_400)
            }
        };
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, names[0].to_string());
        p.not_before = at(days.0).into();
        p.not_after = at(days.1).into();
        p.self_signed(key).unwrap().der().clone()
    }

    fn verify(
        pins: &[Pin],
        roots: &[CertificateDer<'static>],
        c: &CertificateDer<'static>,
        host: &str,
    ) -> Result<(), String> {
        let (_, failures) = client_crypto(pins, roots).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mode = if pins.is_empty() {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(roots.iter().cloned());
            Mode::WebPki(
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .unwrap(),
            )
        } else {
            Mode::Pinned(pins.to_vec())
        };
        let v = Verifier {
            relay: false,
            mode,
            provider,
            failures,
        };
        v.verify_server_cert(
            c,
            &[],
            &ServerName::try_from(host.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|_| v.failures.take().unwrap())
    }

    #[test]
    fn spki_pin_survives_reissue_and_legacy_pin_still_works() {
        let key = rcgen::KeyPair::generate().unwrap();
        let old = cert(&["rdv.test"], &key, (-10, 300));
        let new = cert(&["rdv.test"], &key, (-1, 400));
        let spki = Pin::Spki(x509::spki_pin(&old).unwrap());
        verify(&[spki], &[], &old, "rdv.test").unwrap();
        verify(&[spki], &[], &new, "rdv.test").unwrap();
        let legacy = Pin::Cert(meshpunch_proto::connect::cert_pin(&old));
        verify(&[legacy], &[], &old, "127.0.0.1").unwrap();
        let err = verify(&[legacy], &[], &new, "rdv.test").unwrap_err();
        assert!(err.contains("does not match the pin in your connect string (got SPKI spki:"));
        // A second pin admits a new key.
        let key2 = rcgen::KeyPair::generate().unwrap();
        let other = cert(&["rdv.test"], &key2, (-1, 400));
        let err = verify(&[spki], &[], &other, "rdv.test").unwrap_err();
        assert!(err.contains(&Pin::Spki(x509::spki_pin(&other).unwrap()).to_string()));
        let next = Pin::Spki(x509::spki_pin(&other).unwrap());
        verify(&[spki, next], &[], &other, "rdv.test").unwrap();
    }

    #[test]
    fn pinned_mode_checks_dates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let expired = cert(&["rdv.test"], &key, (-30, -2));
        let pin = Pin::Spki(x509::spki_pin(&expired).unwrap());
        let err = verify(&[pin], &[], &expired, "rdv.test").unwrap_err();
        assert!(err.contains("rdv.test expired on"), "{err}");
        let future = cert(&["rdv.test"], &key, (2, 30));
        let err = verify(&[pin], &[], &future, "rdv.test").unwrap_err();
        assert!(err.contains("is not valid before"), "{err}");
    }

    #[test]
    fn webpki_errors_name_host_and_reason() {
        let key = rcgen::KeyPair::generate().unwrap();
        let good = cert(&["rdv.test"], &key, (-1, 30));
        // Self-signed leaf as its own trust anchor.
        verify(&[], std::slice::from_ref(&good), &good, "rdv.test").unwrap();
        let err = verify(&[], std::slice::from_ref(&good), &good, "other.test").unwrap_err();
        assert!(
            err.contains("not valid for the host name other.test"),
            "{err}"
        );
        let expired = cert(&["rdv.test"], &key, (-30, -2));
        let err = verify(&[], std::slice::from_ref(&expired), &expired, "rdv.test").unwrap_err();
        assert!(err.contains("rdv.test expired on"), "{err}");
        let stranger = cert(&["ca.test"], &rcgen::KeyPair::generate().unwrap(), (-1, 30));
        let err = verify(&[], &[stranger], &good, "rdv.test").unwrap_err();
        assert!(
            err.contains("certificate for rdv.test is not trusted: it is issued by a CA this machine does not trust"),
            "{err}"
        );
    }

    #[test]
    fn ca_file_errors_say_which_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not pem").unwrap();
        assert!(load_ca_file(&p).unwrap_err().contains("no PEM certificate"));
        assert!(load_ca_file(&dir.path().join("missing.pem"))
            .unwrap_err()
            .contains("missing.pem"));
    }
}
