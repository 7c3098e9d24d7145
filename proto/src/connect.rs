//! The connect string a rendezvous prints in `--dev` and a client accepts as-is: address,
//! certificate SHA-256 pin and network token in one line.
//!
//! ```text
//! meshpunch://<token>@<host>:<port>?pin=<64 hex: SHA-256 of the certificate DER>[&stun=<host:port>]
//! ```
//!
//! `host` is a DNS name, an IPv4 address or a bracketed IPv6 address (`[2001:db8::1]`).
//! Unknown query parameters are ignored so newer servers can add some.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// URI scheme of connect strings.
pub const SCHEME: &str = "meshpunch://";

/// Longest connect string accepted.
pub const MAX_CONNECT_LEN: usize = 2048;

/// A parsed connect string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectString {
    /// Network token (see [`crate::token`]).
    pub token: String,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// QUIC port of the rendezvous.
    pub port: u16,
    /// SHA-256 of the server certificate (DER).
    pub pin: [u8; 32],
    /// STUN server (`host:port`, IPv6 bracketed), if the server advertised one.
    pub stun: Option<String>,
}

/// Why a connect string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Does not start with `meshpunch://`.
    #[error("connect string must start with meshpunch://")]
    Scheme,
    /// No `token@` part.
    #[error("connect string has no token (meshpunch://TOKEN@host:port?pin=...)")]
    NoToken,
    /// The host or port is missing or invalid.
    #[error("connect string has no valid host:port")]
    BadHost,
    /// `pin=` is missing or not 64 hex digits.
    #[error("connect string has no valid pin (64 hex digits of the certificate SHA-256)")]
    BadPin,
    /// `stun=` is not a valid `host:port`.
    #[error("connect string has an invalid stun address")]
    BadStun,
    /// Longer than [`MAX_CONNECT_LEN`] or contains whitespace/control characters.
    #[error("connect string too long or contains invalid characters")]
    Invalid,
}

/// The pin of a certificate: SHA-256 of its DER encoding.
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
}

impl fmt::Display for ConnectString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}@{}?pin={}",
            self.token,
            self.authority(),
            hex::encode(self.pin)
        )?;
        if let Some(stun) = &self.stun {
            write!(f, "&stun={stun}")?;
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
        let (host, port) = split_host_port(authority).ok_or(ConnectError::BadHost)?;
        let mut pin = None;
        let mut stun = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "pin" => {
                    let raw = hex::decode(v).map_err(|_| ConnectError::BadPin)?;
                    pin = Some(<[u8; 32]>::try_from(raw).map_err(|_| ConnectError::BadPin)?);
                }
                "stun" => {
                    let (h, p) = split_host_port(v).ok_or(ConnectError::BadStun)?;
                    stun = Some(join_host_port(&h, p));
                }
                _ => {}
            }
        }
        Ok(ConnectString {
            token: token.to_string(),
            host,
            port,
            pin: pin.ok_or(ConnectError::BadPin)?,
            stun,
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
        assert_eq!(c.pin, [0xab; 32]);
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
            "meshpunch://t@h:1".parse::<ConnectString>(),
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
    }

    proptest! {
        #[test]
        fn round_trip(token in "[A-Za-z0-9._-]{1,80}", host in prop_oneof![
                "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,5}){0,2}",
                any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
                any::<[u8; 16]>().prop_map(|b| std::net::Ipv6Addr::from(b).to_string()),
            ], port in any::<u16>(), pin in any::<[u8; 32]>(),
            stun in proptest::option::of(any::<u16>())) {
            let c = ConnectString {
                token,
                stun: stun.map(|p| join_host_port(&host, p)),
                host,
                port,
                pin,
            };
            prop_assert_eq!(c.to_string().parse::<ConnectString>(), Ok(c));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = s.parse::<ConnectString>();
            let _ = format!("meshpunch://{s}").parse::<ConnectString>();
            let _ = split_host_port(&s);
        }
    }
}
