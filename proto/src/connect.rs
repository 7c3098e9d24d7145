//! The connect string a rendezvous prints in `--dev` and a client accepts as-is: address,
//! how to trust the server's certificate and the network token in one line.
//!
//! ```text
//! meshpunch://<token>@<host>[:<port>][?pin=<pin>[,<pin>...]][&stun=<host:port>][&addr=<ip:port>[,...]][&tcp=<port>]
//! ```
//!
//! - `host` is a DNS name, an IPv4 address or a bracketed IPv6 address (`[2001:db8::1]`);
//!   the port defaults to [`DEFAULT_PORT`] (443, UDP for QUIC).
//! - Without `pin=` the client verifies the certificate against the system's trust store (and
//!   any `--ca-file`) and the host name: the form for a server with a public-CA (ACME)
//!   certificate, `meshpunch://TOKEN@rendezvous.example.com`.
//! - `pin=spki:<64 hex>` pins the SHA-256 of the certificate's SubjectPublicKeyInfo (RFC 7469
//!   §2.4): it survives renewal with the same key. Several pins (comma-separated, or `pin=`
//!   repeated; at most [`MAX_PINS`]) let an operator stage a key change: the certificate must
//!   match one. `pin=<64 hex>` (no prefix) is the legacy pin of the whole certificate DER,
//!   which any renewal breaks; it keeps working for strings already handed out.
//! - `addr=` lists node addresses to connect to instead of resolving `host` (the certificate
//!   is still verified for `host`): for names not in DNS yet, and for tests.
//! - `tcp=` is the TCP port of the rendezvous' TLS-over-TCP listener (the fallback when UDP is
//!   blocked) when it differs from `port`; without it the client uses `port` for TCP too (the
//!   server's default: one port number, 443, for both).
//!
//! Unknown query parameters are ignored so newer servers can add some.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// URI scheme of connect strings.
pub const SCHEME: &str = "meshpunch://";

/// Longest connect string accepted.
pub const MAX_CONNECT_LEN: usize = 2048;

/// Port of the rendezvous when the connect string names none (QUIC over UDP 443, where
/// firewalls let HTTP/3 through).
pub const DEFAULT_PORT: u16 = 443;

/// Most pins in one connect string (current and next key, with room for a few more).
pub const MAX_PINS: usize = 8;

/// Most `addr=` entries in one connect string.
pub const MAX_ADDRS: usize = 8;

/// A certificate pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pin {
    /// SHA-256 of the SubjectPublicKeyInfo DER (survives renewal with the same key).
    Spki([u8; 32]),
    /// Legacy: SHA-256 of the whole certificate DER (any renewal breaks it).
    Cert([u8; 32]),
}

impl Pin {
    /// Whether the certificate `cert_der` matches this pin.
    pub fn matches(&self, cert_der: &[u8]) -> bool {
        match self {
            Pin::Spki(p) => crate::x509::spki_pin(cert_der).is_some_and(|h| h == *p),
            Pin::Cert(p) => cert_pin(cert_der) == *p,
        }
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::Spki(p) => write!(f, "spki:{}", hex::encode(p)),
            Pin::Cert(p) => write!(f, "{}", hex::encode(p)),
        }
    }
}

impl FromStr for Pin {
    type Err = ConnectError;
    fn from_str(s: &str) -> Result<Pin, ConnectError> {
        let hash = |v: &str| -> Result<[u8; 32], ConnectError> {
            let raw = hex::decode(v).map_err(|_| ConnectError::BadPin)?;
            <[u8; 32]>::try_from(raw).map_err(|_| ConnectError::BadPin)
        };
        match s.split_once(':') {
            Some(("spki", v)) => Ok(Pin::Spki(hash(v)?)),
            Some(("cert", v)) => Ok(Pin::Cert(hash(v)?)),
            Some(_) => Err(ConnectError::BadPin),
            None => Ok(Pin::Cert(hash(s)?)),
        }
    }
}

/// A parsed connect string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectString {
    /// Network token (see [`crate::token`]).
    pub token: String,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// QUIC port of the rendezvous.
    pub port: u16,
    /// Certificate pins; empty: verify with the trust store and the host name.
    pub pins: Vec<Pin>,
    /// STUN server (`host:port`, IPv6 bracketed), if the server advertised one.
    pub stun: Option<String>,
    /// Addresses to connect to instead of resolving `host`.
    pub addrs: Vec<SocketAddr>,
    /// TCP port of the TLS-over-TCP fallback when it differs from `port` (`tcp=`).
    pub tcp_port: Option<u16>,
}

/// Why a connect string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Does not start with `meshpunch://`.
    #[error("connect string must start with meshpunch://")]
    Scheme,
    /// No `token@` part.
    #[error("connect string has no token (meshpunch://TOKEN@host[:port])")]
    NoToken,
    /// The host or port is missing or invalid.
    #[error("connect string has no valid host[:port]")]
    BadHost,
    /// A `pin=` entry is not `spki:<64 hex>` or `<64 hex>`, or there are too many.
    #[error("connect string has an invalid pin (expected spki:<64 hex digits of the public key SHA-256>, at most 8)")]
    BadPin,
    /// `tcp=` is not a port number (1-65535).
    #[error("connect string has an invalid tcp= port (expected 1-65535)")]
    BadTcpPort,
    /// `stun=` is not a valid `host:port`.
    #[error("connect string has an invalid stun address")]
    BadStun,
    /// An `addr=` entry is not `IP:PORT`, or there are too many.
    #[error("connect string has an invalid addr (expected IP:PORT, at most 8)")]
    BadAddr,
    /// Longer than [`MAX_CONNECT_LEN`] or contains whitespace/control characters.
    #[error("connect string too long or contains invalid characters")]
    Invalid,
}

/// The legacy pin of a certificate: SHA-256 of its DER encoding.
pub fn cert_pin(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

fn valid_host(h: &str) -> bool {
    if h.is_empty() || h.len() > 253 {
        return false;
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    h.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Splits `host:port` / `[v6]:port` into host (unbracketed) and port.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, after.strip_prefix(':')?)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if !valid_host(host) {
        return None;
    }
    Some((host.to_string(), port))
}

/// Splits an authority whose port may be omitted (then [`DEFAULT_PORT`]).
fn split_authority(s: &str) -> Option<(String, u16)> {
    if let Some(hp) = split_host_port(s) {
        return Some(hp);
    }
    let host = match s.strip_prefix('[') {
        Some(rest) => {
            let h = rest.strip_suffix(']')?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            h
        }
        None if !s.contains(':') => s,
        None => return None,
    };
    valid_host(host).then(|| (host.to_string(), DEFAULT_PORT))
}

/// Joins host and port, bracketing IPv6 addresses.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl ConnectString {
    /// `host:port` of the rendezvous, suitable for DNS resolution.
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// TCP port of the TLS-over-TCP fallback: `tcp=`, else the QUIC port.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port.unwrap_or(self.port)
    }
}

impl fmt::Display for ConnectString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@", self.token)?;
        if self.port == DEFAULT_PORT {
            if self.host.contains(':') {
                write!(f, "[{}]", self.host)?;
            } else {
                write!(f, "{}", self.host)?;
            }
        } else {
            write!(f, "{}", self.authority())?;
        }
        let mut sep = '?';
        let mut param = |f: &mut fmt::Formatter<'_>, k: &str, v: String| {
            let r = write!(f, "{sep}{k}={v}");
            sep = '&';
            r
        };
        if !self.pins.is_empty() {
            let pins: Vec<String> = self.pins.iter().map(Pin::to_string).collect();
            param(f, "pin", pins.join(","))?;
        }
        if let Some(stun) = &self.stun {
            param(f, "stun", stun.clone())?;
        }
        if !self.addrs.is_empty() {
            let addrs: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
            param(f, "addr", addrs.join(","))?;
        }
        if let Some(p) = self.tcp_port.filter(|p| *p != self.port) {
            param(f, "tcp", p.to_string())?;
        }
        Ok(())
    }
}

impl FromStr for ConnectString {
    type Err = ConnectError;
    fn from_str(s: &str) -> Result<Self, ConnectError> {
        let s = s.trim();
        if s.len() > MAX_CONNECT_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConnectError::Invalid);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(ConnectError::Scheme)?;
        let (token, rest) = rest.split_once('@').ok_or(ConnectError::NoToken)?;
        if token.is_empty() || token.contains(['/', '?', '&', '#']) {
            return Err(ConnectError::NoToken);
        }
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, q),
            None => (rest, ""),
        };
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let (host, port) = split_authority(authority).ok_or(ConnectError::BadHost)?;
        let mut pins = Vec::new();
        let mut addrs = Vec::new();
        let mut stun = None;
        let mut tcp_port = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "pin" => {
                    for p in v.split(',') {
                        let pin: Pin = p.parse()?;
                        if !pins.contains(&pin) {
                            pins.push(pin);
                        }
                    }
                    if pins.len() > MAX_PINS {
                        return Err(ConnectError::BadPin);
                    }
                }
                "stun" => {
                    let (h, p) = split_host_port(v).ok_or(ConnectError::BadStun)?;
                    stun = Some(join_host_port(&h, p));
                }
                "addr" => {
                    for a in v.split(',') {
                        let a: SocketAddr = a.parse().map_err(|_| ConnectError::BadAddr)?;
                        if !addrs.contains(&a) {
                            addrs.push(a);
                        }
                    }
                    if addrs.len() > MAX_ADDRS {
                        return Err(ConnectError::BadAddr);
                    }
                }
                "tcp" => match v.parse::<u16>() {
                    Ok(p) if p != 0 => tcp_port = Some(p),
                    _ => return Err(ConnectError::BadTcpPort),
                },
                _ => {}
            }
        }
        Ok(ConnectString {
            token: token.to_string(),
            host,
            port,
            pins,
            stun,
            addrs,
            tcp_port: tcp_port.filter(|p| *p != port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_v4_v6_and_names() {
        let pin = "ab".repeat(32);
        let c: ConnectString =
            format!("meshpunch://mpt1.dev.1.x@127.0.0.1:4433?pin={pin}&stun=127.0.0.1:3478")
                .parse()
                .unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 4433);
        assert_eq!(c.stun.as_deref(), Some("127.0.0.1:3478"));
        assert_eq!(c.pins, vec![Pin::Cert([0xab; 32])]);
        let c6: ConnectString =
            format!("meshpunch://t@[2001:db8::1]:443?pin={pin}&stun=[::1]:3478")
                .parse()
                .unwrap();
        assert_eq!(c6.host, "2001:db8::1");
        assert_eq!(c6.authority(), "[2001:db8::1]:443");
        assert_eq!(c6.to_string().parse::<ConnectString>(), Ok(c6.clone()));
        let dns: ConnectString = format!("meshpunch://t@rdv.example.com:443?pin={pin}&future=1")
            .parse()
            .unwrap();
        assert_eq!(dns.host, "rdv.example.com");
        assert_eq!(dns.stun, None);
    }

    #[test]
    fn shortest_form_defaults_to_port_443_and_webpki() {
        let c: ConnectString = "meshpunch://TOKEN@rendezvous.example.com".parse().unwrap();
        assert_eq!(c.host, "rendezvous.example.com");
        assert_eq!(c.port, DEFAULT_PORT);
        assert!(c.pins.is_empty());
        assert_eq!(c.to_string(), "meshpunch://TOKEN@rendezvous.example.com");
        let v6: ConnectString = "meshpunch://t@[2001:db8::1]/".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 443));
        assert_eq!(v6.to_string(), "meshpunch://t@[2001:db8::1]");
    }

    #[test]
    fn several_pins_comma_or_repeated() {
        let a = "aa".repeat(32);
        let b = "bb".repeat(32);
        let one: ConnectString = format!("meshpunch://t@h?pin=spki:{a},spki:{b}")
            .parse()
            .unwrap();
        let two: ConnectString = format!("meshpunch://t@h?pin=spki:{a}&pin=spki:{b}")
            .parse()
            .unwrap();
        assert_eq!(one, two);
        assert_eq!(one.pins, vec![Pin::Spki([0xaa; 32]), Pin::Spki([0xbb; 32])]);
        let mixed: ConnectString = format!("meshpunch://t@h:1?pin=cert:{a},{b}")
            .parse()
            .unwrap();
        assert_eq!(
            mixed.pins,
            vec![Pin::Cert([0xaa; 32]), Pin::Cert([0xbb; 32])]
        );
        let nine = vec![format!("spki:{a}"); 1]
            .into_iter()
            .chain((0..8).map(|i| format!("spki:{}", format!("{i:02}").repeat(32))))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            format!("meshpunch://t@h?pin={nine}").parse::<ConnectString>(),
            Err(ConnectError::BadPin)
        );
    }

    #[test]
    fn addr_overrides_resolution() {
        let c: ConnectString = "meshpunch://t@rdv.test:8443?addr=127.0.0.1:8443,[::1]:8443"
            .parse()
            .unwrap();
        assert_eq!(c.host, "rdv.test");
        assert_eq!(c.addrs.len(), 2);
        assert_eq!(c.to_string().parse::<ConnectString>(), Ok(c.clone()));
        assert_eq!(
            "meshpunch://t@h?addr=rdv.test:1".parse::<ConnectString>(),
            Err(ConnectError::BadAddr)
        );
    }

    #[test]
    fn refuses_bad_strings() {
        let pin = "ab".repeat(32);
        assert_eq!(
            "http://t@h:1?pin=00".parse::<ConnectString>(),
            Err(ConnectError::Scheme)
        );
        assert_eq!(
            format!("meshpunch://h:1?pin={pin}").parse::<ConnectString>(),
            Err(ConnectError::NoToken)
        );
        assert_eq!(
            "meshpunch://t@h:1?pin=abc".parse::<ConnectString>(),
            Err(ConnectError::BadPin)
        );
        assert_eq!(
            format!("meshpunch://t@h:1?pin=sha1:{pin}").parse::<ConnectString>(),
            Err(ConnectError::BadPin)
        );
        assert_eq!(
            "meshpunch://t@h:1?pin=".parse::<ConnectString>(),
            Err(ConnectError::BadPin)
        );
        assert_eq!(
            format!("meshpunch://t@::1:1?pin={pin}").parse::<ConnectString>(),
            Err(ConnectError::BadHost)
        );
        assert_eq!(
            format!("meshpunch://t@h:99999?pin={pin}").parse::<ConnectString>(),
            Err(ConnectError::BadHost)
        );
        assert_eq!(
            "meshpunch://t@h:".parse::<ConnectString>(),
            Err(ConnectError::BadHost)
        );
    }

    #[test]
    fn tcp_port_defaults_to_the_quic_port() {
        let c: ConnectString = "meshpunch://t@h:4433".parse().unwrap();
        assert_eq!((c.tcp_port, c.tcp_port()), (None, 4433));
        let c: ConnectString = "meshpunch://t@h:4433?tcp=8443".parse().unwrap();
        assert_eq!(c.tcp_port(), 8443);
        assert_eq!(c.to_string(), "meshpunch://t@h:4433?tcp=8443");
        // The same port is the default: not written out.
        let c: ConnectString = "meshpunch://t@h:4433?tcp=4433".parse().unwrap();
        assert_eq!(
            (c.tcp_port, c.to_string().as_str()),
            (None, "meshpunch://t@h:4433")
        );
        for bad in ["tcp=0", "tcp=x", "tcp=65536", "tcp="] {
            assert_eq!(
                format!("meshpunch://t@h?{bad}").parse::<ConnectString>(),
                Err(ConnectError::BadTcpPort),
                "{bad}"
            );
        }
    }

    fn pin_strategy() -> impl Strategy<Value = Pin> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(Pin::Spki),
            any::<[u8; 32]>().prop_map(Pin::Cert),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(token in "[A-Za-z0-9._-]{1,80}", host in prop_oneof![
                "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,5}){0,2}",
                any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
                any::<[u8; 16]>().prop_map(|b| std::net::Ipv6Addr::from(b).to_string()),
            ], port in prop_oneof![Just(DEFAULT_PORT), any::<u16>()],
            pins in proptest::collection::hash_set(pin_strategy(), 0..=MAX_PINS),
            addrs in proptest::collection::hash_set(any::<SocketAddr>(), 0..=MAX_ADDRS),
            stun in proptest::option::of(any::<u16>()),
            tcp_port in proptest::option::of(1u16..)) {
            let c = ConnectString {
                tcp_port: tcp_port.filter(|p| *p != port),
                token,
                stun: stun.map(|p| join_host_port(&host, p)),
                host,
                port,
                pins: pins.into_iter().collect(),
                addrs: addrs.into_iter().map(|a| match a {
                    // Display of a scoped/flow-labelled v6 address does not round-trip.
                    SocketAddr::V6(v6) => SocketAddr::new((*v6.ip()).into(), v6.port()),
                    v4 => v4,
                }).collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
            };
            prop_assert_eq!(c.to_string().parse::<ConnectString>(), Ok(c));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = s.parse::<ConnectString>();
            let _ = format!("meshpunch://{s}").parse::<ConnectString>();
            let _ = format!("meshpunch://t@h?pin={s}").parse::<ConnectString>();
            let _ = split_host_port(&s);
        }
    }
}
