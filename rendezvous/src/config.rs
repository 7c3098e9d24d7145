//! Configuration: a TOML file, overridden by command-line flags and `MESHPUNCH_*` environment
//! variables (see `main.rs`). Every key has a default, so an empty file is a valid config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::registry::RegistryConfig;

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default STUN listen address (RFC 8489 §18.6 default port).
pub const DEFAULT_STUN_LISTEN: &str = "0.0.0.0:3478";
/// Default admin HTTP listen address (metrics, health).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9478";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "meshpunch-data";
/// Default longest lifetime of TURN credentials (`credential_ttl`).
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// One `[[relay]]` entry: a TURN region handed to clients with REST-API credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Region name.
    pub region: String,
    /// TURN URIs, e.g. `"turn:relay.example.com:3478"`.
    pub urls: Vec<String>,
    /// Shared secret (coturn `static-auth-secret`).
    pub secret: String,
}

/// `[limits]`: abuse limits, each with a metric when hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent QUIC connections per source (an IPv4 address or an IPv6 /64), counted
    /// from the moment the source address is validated (stateless Retry) and moved to the new
    /// source when a connection migrates.
    pub max_connections_per_ip: u32,
    /// QUIC handshakes (from a validated source) in progress at once on this node; Initials
    /// beyond it are dropped without an answer (the client retransmits) and counted as
    /// `limit="handshakes_in_flight"`.
    pub max_handshakes_in_flight: usize,
    /// Sustained Watch requests per second per connection (each can cost up to 1,024
    /// registry reads and presence writes).
    pub watches_per_sec: f64,
    /// Burst of Watch requests per connection.
    pub watch_burst: u32,
    /// Sustained registrations (Hello) per second per source (IPv4 address or IPv6 /64).
    pub registrations_per_sec_per_ip: f64,
    /// Burst of registrations per source IP.
    pub registrations_burst: u32,
    /// Largest accepted frame (version + kind + body), bytes.
    pub max_frame_bytes: usize,
    /// A connection with no traffic for this long is closed (clients send keep-alives).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Time allowed from connection start to a completed registration. Over TCP it also
    /// bounds the wait for the first byte and the TLS handshake.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// A frame begun but not finished for this long closes the connection (a stalled
    /// half-sent frame would otherwise hold its buffer for ever).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub frame_timeout: Duration,
    /// Time a client has to answer a re-authentication challenge before it is closed.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub reauth_timeout: Duration,
    /// Sustained offers per second per connection.
    pub offers_per_sec: f64,
    /// Offers a connection may have outstanding (sent or received, unanswered).
    pub max_pending_offers: usize,
    /// How long an offer waits for the answer.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub offer_timeout: Duration,
    /// Sustained STUN Binding requests per second per source IP.
    pub stun_per_sec_per_ip: f64,
    /// Burst of STUN requests per source IP.
    pub stun_burst: u32,
    /// Most source IPs tracked by each rate limiter (older entries are evicted).
    pub max_tracked_ips: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_ip: 256,
            max_handshakes_in_flight: 1024,
            watches_per_sec: 1.0,
            watch_burst: 10,
            registrations_per_sec_per_ip: 10.0,
            registrations_burst: 40,
            max_frame_bytes: meshpunch_proto::wire::MAX_FRAME_LEN,
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            reauth_timeout: meshpunch_proto::session::REAUTH_TIMEOUT,
            offers_per_sec: 20.0,
            max_pending_offers: 64,
            offer_timeout: Duration::from_secs(15),
            stun_per_sec_per_ip: 50.0,
            stun_burst: 100,
            max_tracked_ips: 100_000,
        }
    }
}

/// `[acme]`: certificate from an ACME CA (see docs/tls.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// DNS name to certify; also the connect strings' host unless `public_host` is set.
    pub domain: String,
    /// Contact e-mail of the ACME account.
    pub contact: String,
    /// ACME directory URL (default: Let's Encrypt production).
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Extra CA (PEM) trusted for the ACME server's HTTPS (test CAs such as Pebble).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// http-01 challenge listener (TCP; ACME validators connect to port 80 of `domain`).
    #[serde(default = "default_acme_http_listen")]
    pub http_listen: SocketAddr,
}

fn default_acme_directory() -> String {
    meshpunch_certs::acme::LETS_ENCRYPT.to_string()
}

/// Default http-01 listener: every address, port 80.
pub fn default_acme_http_listen() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 80))
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// TLS-over-TCP listen address (the fallback for clients whose network blocks UDP).
    /// Default: the QUIC address and port (443 in production: one firewall rule, two
    /// protocols).
    pub tcp_listen: Option<SocketAddr>,
    /// Serve the TLS-over-TCP fallback (`--no-tcp` turns it off).
    pub tcp: bool,
    /// STUN listen address; `None` disables the STUN server.
    pub stun_listen: Option<SocketAddr>,
    /// Second STUN address (other IP, and other port unless equal) for RFC 5780.
    pub stun_alt: Option<SocketAddr>,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Host name or IP clients use to reach this server (connect strings). Default: the
    /// listen IP, or 127.0.0.1 when listening on the unspecified address.
    pub public_host: Option<String>,
    /// UDP port clients use to reach this server (connect strings), when it differs from the
    /// listen port (a load balancer or port forward in front). Default: the listen port.
    pub public_port: Option<u16>,
    /// Directory for generated state (dev certificate, token secret, dev token, connect file).
    pub data_dir: PathBuf,
    /// Certificate chain (PEM). Without cert+key a self-signed certificate is generated in
    /// `data_dir` and kept there.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) matching `cert`.
    pub key: Option<PathBuf>,
    /// Re-read `cert`/`key` and this file's revocation list when they change (polled every
    /// 2 s), besides on SIGHUP. `false`: only on SIGHUP (`--no-watch`).
    pub watch_files: bool,
    /// Obtain and renew the certificate with ACME (instead of `cert`/`key`).
    pub acme: Option<AcmeSettings>,
    /// Token HMAC secret (hex or any string). Default: read/generate `data_dir/token-secret`.
    pub token_secret: Option<String>,
    /// File holding the token secret (takes precedence over `data_dir/token-secret`).
    pub token_secret_file: Option<PathBuf>,
    /// Revoked tokens: whole tokens or `sha256:<hex>` of them. Merged with the revocations
    /// shared through the registry (`meshpunch-rendezvous token revoke`).
    pub revoked_tokens: Vec<String>,
    /// Longest lifetime of the TURN credentials handed out (re-sent at half-life); never past
    /// the token's expiry. Also spelled `credential_ttl`.
    #[serde(
        alias = "credential_ttl",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub turn_credential_ttl: Duration,
    /// Interval between re-authentication challenges on a live connection (the client proves
    /// its key again, bound to the TLS session and a fresh nonce; the token is re-checked).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub reauth_interval: Duration,
    /// SOFTWARE attribute of STUN answers.
    pub software: String,
    /// Development mode: print and write a connect string with a long-lived `dev` token.
    pub dev: bool,
    /// Network of the dev token.
    pub dev_network: String,
    /// Limits.
    pub limits: Limits,
    /// Relay map.
    #[serde(rename = "relay")]
    pub relays: Vec<RelayConfig>,
    /// Registry backend.
    pub registry: RegistryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 4433))),
            stun_listen: Some(
                DEFAULT_STUN_LISTEN
                    .parse()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 3478))),
            ),
            tcp_listen: None,
            tcp: true,
            stun_alt: None,
            admin_listen: Some(
                DEFAULT_ADMIN_LISTEN
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9478))),
            ),
            public_host: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            cert: None,
            key: None,
            acme: None,
            watch_files: true,
            public_port: None,
            token_secret: None,
            token_secret_file: None,
            revoked_tokens: Vec::new(),
            turn_credential_ttl: DEFAULT_CREDENTIAL_TTL,
            reauth_interval: meshpunch_proto::session::DEFAULT_REAUTH_INTERVAL,
            software: format!("meshpunch-rendezvous/{}", env!("CARGO_PKG_VERSION")),
            dev: false,
            dev_network: "dev".to_string(),
            limits: Limits::default(),
            relays: Vec::new(),
            registry: RegistryConfig::default(),
        }
    }
}

/// Errors loading the config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A config for tests and `--dev` on loopback: every port chosen by the OS, STUN on, no
    /// admin port, state in `data_dir`.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            stun_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            admin_listen: None,
            data_dir: data_dir.into(),
            dev: true,
            ..Config::default()
        }
    }

    /// The `tcp=` port of connect strings: the TCP listener's port (`bound_tcp` once bound,
    /// else `tcp_listen`) when it differs from the QUIC port clients use
    /// (`public_port`, else `bound_quic`); `None` when equal or TCP is off.
    pub fn connect_tcp_port(&self, bound_quic: u16, bound_tcp: Option<u16>) -> Option<u16> {
        if !self.tcp {
            return None;
        }
        let quic = self.public_port.unwrap_or(bound_quic);
        let tcp = match (bound_tcp, self.tcp_listen) {
            (Some(p), _) => p,
            (None, Some(a)) => a.port(),
            // Same address as QUIC: behind a port forward, forwarded like the UDP port.
            (None, None) => return None,
        };
        match self.public_port {
            Some(_) if self.tcp_listen.is_none() => None,
            _ => (tcp != quic).then_some(tcp),
        }
    }

    /// Checks consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError::Invalid(
                "cert and key must be given together".into(),
            ));
        }
        if let Some(a) = &self.acme {
            if self.cert.is_some() {
                return Err(ConfigError::Invalid(
                    "acme and cert/key exclude each other: pick one certificate source".into(),
                ));
            }
            if a.domain.parse::<std::net::IpAddr>().is_ok()
                || meshpunch_proto::connect::split_host_port(&format!("{}:1", a.domain)).is_none()
                || !a.domain.contains('.') && a.domain != "localhost"
            {
                return Err(ConfigError::Invalid(format!(
                    "acme domain {:?} is not a DNS name",
                    a.domain
                )));
            }
            if !a.contact.contains('@') {
                return Err(ConfigError::Invalid(format!(
                    "acme contact {:?} is not an e-mail address",
                    a.contact
                )));
            }
        }
        if !meshpunch_proto::token::valid_network_name(&self.dev_network) {
            return Err(ConfigError::Invalid(
                "dev_network must match [A-Za-z0-9_-]{1,64}".into(),
            ));
        }
        if self.limits.max_frame_bytes < 256 {
            return Err(ConfigError::Invalid(
                "limits.max_frame_bytes must be at least 256".into(),
            ));
        }
        if self.limits.max_handshakes_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_handshakes_in_flight must be at least 1".into(),
            ));
        }
        if self.turn_credential_ttl < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "turn_credential_ttl must be at least 60s".into(),
            ));
        }
        if self.reauth_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "reauth_interval must be at least 1s".into(),
            ));
        }
        if let Err(e) = meshpunch_proto::token::Revocations::parse(
            self.revoked_tokens.iter().map(String::as_str),
        ) {
            return Err(ConfigError::Invalid(format!("revoked_tokens: {e}")));
        }
        if let Some(s) = &self.token_secret {
            check_token_secret(s.trim().as_bytes(), "token_secret")?;
        }
        for r in &self.relays {
            if r.urls.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "relay {:?} has no urls",
                    r.region
                )));
            }
            // turn:h:p, turn:h:p?transport=tcp, turns:h:p (RFC 7065); anything else, an
            // unknown transport included, is refused at start instead of reaching clients.
            for u in &r.urls {
                if let Err(e) = meshpunch_proto::turn::uri::TurnUri::parse(u) {
                    return Err(ConfigError::Invalid(format!("relay {:?}: {e}", r.region)));
                }
            }
        }
        if let (Some(alt), Some(primary)) = (self.stun_alt, self.stun_listen) {
            if primary.ip().is_unspecified() || alt.ip().is_unspecified() {
                return Err(ConfigError::Invalid(
                    "stun_listen and stun_alt must be specific IPs with RFC 5780 (answers name them)"
                        .into(),
                ));
            }
            if alt.ip() == primary.ip() {
                return Err(ConfigError::Invalid(
                    "stun_alt must use a different IP than stun_listen (RFC 5780)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses a token secret shorter than [`meshpunch_proto::token::MIN_SECRET_LEN`] bytes.
pub fn check_token_secret(secret: &[u8], origin: &str) -> Result<(), ConfigError> {
    let min = meshpunch_proto::token::MIN_SECRET_LEN;
    if secret.len() < min {
        return Err(ConfigError::Invalid(format!(
            "{origin} is {} bytes; the token secret must be at least {min} bytes \
             (generate one with: openssl rand -hex 32)",
            secret.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let cfg = Config::from_toml(
            r#"
            listen = "0.0.0.0:4433"
            stun_listen = "192.0.2.1:3478"
            stun_alt = "192.0.2.2:3479"
            admin_listen = "127.0.0.1:9478"
            public_host = "rdv.example.com"
            data_dir = "/var/lib/meshpunch"
            revoked_tokens = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
            turn_credential_ttl = "6h"
            reauth_interval = "5m"
            [limits]
            idle_timeout = "45s"
            max_connections_per_ip = 8
            max_handshakes_in_flight = 64
            watches_per_sec = 0.5
            watch_burst = 4
            [[relay]]
            region = "eu"
            urls = ["turn:relay.example.com:3478"]
            secret = "s3cret"
            [registry]
            backend = "memory"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(45));
        assert_eq!(cfg.limits.max_connections_per_ip, 8);
        assert_eq!(cfg.limits.max_handshakes_in_flight, 64);
        assert_eq!(cfg.limits.watch_burst, 4);
        assert!(Config::from_toml("[limits]\nmax_handshakes_in_flight = 0").is_err());
        assert_eq!(cfg.relays.len(), 1);
        assert_eq!(cfg.turn_credential_ttl, Duration::from_secs(6 * 3600));
        assert_eq!(cfg.reauth_interval, Duration::from_secs(300));
        assert_eq!(
            Config::from_toml("credential_ttl = \"2h\"")
                .unwrap()
                .turn_credential_ttl,
            Duration::from_secs(7200)
        );
        assert_eq!(
            Config::default().turn_credential_ttl,
            DEFAULT_CREDENTIAL_TTL
        );
        assert!(Config::from_toml("").is_ok());
        assert!(Config::from_toml("bogus = 1").is_err());
        assert!(Config::from_toml("stun_alt = \"192.0.2.2:3479\"").is_err());
    }

    #[test]
    fn relay_urls_may_be_udp_tcp_or_tls_and_unknown_transports_are_refused() {
        let region =
            |url: &str| format!("[[relay]]\nregion = \"eu\"\nurls = [\"{url}\"]\nsecret = \"s\"\n");
        let ok = "[[relay]]\nregion = \"eu\"\nurls = [\"turn:relay.example.com:3478\", \"turn:relay.example.com:443?transport=tcp\", \"turns:relay.example.com:443\"]\nsecret = \"s\"\n";
        assert_eq!(Config::from_toml(ok).unwrap().relays[0].urls.len(), 3);
        for bad in [
            "turn:relay.example.com?transport=sctp",
            "turns:relay.example.com?transport=udp",
            "relay.example.com:3478",
            "turn:relay.example.com:99999",
        ] {
            let e = Config::from_toml(&region(bad)).unwrap_err().to_string();
            assert!(e.contains("relay.example.com"), "{bad}: {e}");
        }
    }

    #[test]
    fn tcp_fallback_keys_and_connect_string_port() {
        let c = Config::from_toml("listen = \"0.0.0.0:443\"").unwrap();
        assert!(c.tcp && c.tcp_listen.is_none());
        // Same port as QUIC: no tcp= in connect strings.
        assert_eq!(c.connect_tcp_port(443, Some(443)), None);
        assert_eq!(c.connect_tcp_port(443, None), None);
        let c =
            Config::from_toml("listen = \"0.0.0.0:443\"\ntcp_listen = \"0.0.0.0:8443\"").unwrap();
        assert_eq!(c.connect_tcp_port(443, None), Some(8443));
        assert_eq!(c.connect_tcp_port(443, Some(8443)), Some(8443));
        // Behind a port forward (public_port) without its own tcp_listen: forwarded alike.
        let c = Config::from_toml("listen = \"0.0.0.0:4433\"\npublic_port = 443").unwrap();
        assert_eq!(c.connect_tcp_port(4433, Some(4433)), None);
        let c = Config::from_toml("tcp = false").unwrap();
        assert_eq!(c.connect_tcp_port(443, Some(8443)), None);
        assert!(Config::from_toml("[limits]\nframe_timeout = \"3s\"").is_ok());
    }

    #[test]
    fn malformed_revocation_entry_and_short_secret_are_config_errors() {
        let e = Config::from_toml("revoked_tokens = [\"sha256:00\"]").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("revoked_tokens") && msg.contains("entry 1"),
            "{msg}"
        );
        let e = Config::from_toml("token_secret = \"short\"").unwrap_err();
        assert!(e.to_string().contains("at least 32 bytes"), "{e}");
        assert!(Config::from_toml(&format!("token_secret = \"{}\"", "x".repeat(32))).is_ok());
    }
}
