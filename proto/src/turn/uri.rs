//! TURN URIs (RFC 7065): `turn:host[:port][?transport=udp|tcp]` and `turns:host[:port]
//! [?transport=tcp]`, as the rendezvous relay map hands them out and clients read them.
//!
//! One parser for everyone: host, port (default [`DEFAULT_TURN_PORT`] for `turn:`,
//! [`DEFAULT_TURNS_PORT`] for `turns:`, RFC 8656 §18) and the transport to the server, UDP, TCP
//! or TLS. An unknown transport is an error, never quietly UDP; `turns:` with
//! `transport=udp` would be DTLS, which meshpunch does not speak, and is refused too.

use std::fmt;

/// Default port of `turn:` URIs (UDP and TCP, RFC 8656 §18).
pub const DEFAULT_TURN_PORT: u16 = 3478;
/// Default port of `turns:` URIs (TLS, RFC 8656 §18).
pub const DEFAULT_TURNS_PORT: u16 = 5349;

/// Transport between the client and the TURN server (the relayed transport is always UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TurnTransport {
    /// `turn:…` or `turn:…?transport=udp`.
    Udp,
    /// `turn:…?transport=tcp`.
    Tcp,
    /// `turns:…` (TLS over TCP).
    Tls,
}

impl TurnTransport {
    /// Label used in metrics, status and logs: `udp`, `tcp`, `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnTransport::Udp => "udp",
            TurnTransport::Tcp => "tcp",
            TurnTransport::Tls => "tls",
        }
    }
}

impl fmt::Display for TurnTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a usable TURN URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnUriError {
    /// Neither `turn:` nor `turns:`.
    #[error("{0:?}: a TURN URI starts with turn: or turns:")]
    Scheme(String),
    /// No host.
    #[error("{0:?}: no host")]
    NoHost(String),
    /// A port that is not a number in 1–65535, or a malformed `[IPv6]`.
    #[error("{0:?}: bad port or host")]
    BadAuthority(String),
    /// A transport other than udp/tcp.
    #[error("{uri:?}: unknown transport {transport:?} (udp or tcp)")]
    UnknownTransport {
        /// The URI.
        uri: String,
        /// What it asked for.
        transport: String,
    },
    /// A query other than `transport=…`.
    #[error("{0:?}: only ?transport=udp|tcp may follow the address")]
    BadQuery(String),
    /// `turns:` with `transport=udp` (DTLS, not supported).
    #[error("{0:?}: turns: over UDP (DTLS) is not supported; use turns: or transport=tcp")]
    DtlsUnsupported(String),
}

/// A parsed TURN URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TurnUri {
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (the scheme's default when the URI gives none).
    pub port: u16,
    /// Client-to-server transport.
    pub transport: TurnTransport,
}

impl TurnUri {
    /// Parses `uri` (scheme and `transport` value case-insensitive).
    pub fn parse(uri: &str) -> Result<TurnUri, TurnUriError> {
        let err = || uri.to_owned();
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| TurnUriError::Scheme(err()))?;
        let secure = if scheme.eq_ignore_ascii_case("turn") {
            false
        } else if scheme.eq_ignore_ascii_case("turns") {
            true
        } else {
            return Err(TurnUriError::Scheme(err()));
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let transport = match query {
            None => None,
            Some(q) => {
                let (key, value) = q
                    .split_once('=')
                    .ok_or_else(|| TurnUriError::BadQuery(err()))?;
                if !key.eq_ignore_ascii_case("transport") || value.contains(['&', ';', '=']) {
                    return Err(TurnUriError::BadQuery(err()));
                }
                if value.eq_ignore_ascii_case("udp") {
                    Some(TurnTransport::Udp)
                } else if value.eq_ignore_ascii_case("tcp") {
                    Some(TurnTransport::Tcp)
                } else {
                    return Err(TurnUriError::UnknownTransport {
                        uri: err(),
                        transport: value.to_owned(),
                    });
                }
            }
        };
        let transport = match (secure, transport) {
            (false, t) => t.unwrap_or(TurnTransport::Udp),
            (true, None | Some(TurnTransport::Tcp)) => TurnTransport::Tls,
            (true, Some(_)) => return Err(TurnUriError::DtlsUnsupported(err())),
        };
        let default_port = if secure {
            DEFAULT_TURNS_PORT
        } else {
            DEFAULT_TURN_PORT
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| TurnUriError::BadAuthority(err()))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(TurnUriError::BadAuthority(err()));
            }
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| TurnUriError::BadAuthority(err()))?,
                ),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(TurnUriError::NoHost(err()));
        }
        if host.contains(['/', '@', ' ', '[', ']']) {
            return Err(TurnUriError::BadAuthority(err()));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(TurnUriError::BadAuthority(err())),
            },
        };
        Ok(TurnUri {
            host: host.to_owned(),
            port,
            transport,
        })
    }

    /// `host:port`, with brackets around an IPv6 host (what socket address lookups take).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for TurnUri {
    type Err = TurnUriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TurnUri::parse(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> Result<(String, u16, TurnTransport), TurnUriError> {
        TurnUri::parse(s).map(|u| (u.authority(), u.port, u.transport))
    }

    #[test]
    fn the_three_forms_of_rfc_7065() {
        use TurnTransport::*;
        assert_eq!(
            p("turn:relay.example.com:3478").unwrap(),
            ("relay.example.com:3478".into(), 3478, Udp)
        );
        assert_eq!(
            p("turn:relay.example.com").unwrap().0,
            "relay.example.com:3478"
        );
        assert_eq!(p("turn:192.0.2.1:3478?transport=udp").unwrap().2, Udp);
        assert_eq!(
            p("turn:192.0.2.1:443?transport=tcp").unwrap(),
            ("192.0.2.1:443".into(), 443, Tcp)
        );
        assert_eq!(
            p("turns:relay.example.com").unwrap(),
            ("relay.example.com:5349".into(), 5349, Tls)
        );
        assert_eq!(
            p("turns:relay.example.com:443?transport=tcp").unwrap().2,
            Tls
        );
        assert_eq!(
            p("TURNS:[2001:db8::1]:443").unwrap(),
            ("[2001:db8::1]:443".into(), 443, Tls)
        );
        assert_eq!(p("turn:[2001:db8::1]").unwrap().0, "[2001:db8::1]:3478");
        assert_eq!(p("turn:h:1?TRANSPORT=TCP").unwrap().2, Tcp);
    }

    #[test]
    fn bad_uris_are_typed_errors_never_udp() {
        assert!(matches!(
            p("turn:h:3478?transport=sctp"),
            Err(TurnUriError::UnknownTransport { .. })
        ));
        assert!(matches!(
            p("turn:h:3478?transport="),
            Err(TurnUriError::UnknownTransport { .. })
        ));
        assert!(matches!(
            p("turns:h?transport=udp"),
            Err(TurnUriError::DtlsUnsupported(_))
        ));
        assert!(matches!(p("stun:h:3478"), Err(TurnUriError::Scheme(_))));
        assert!(matches!(p("h:3478"), Err(TurnUriError::Scheme(_))));
        assert!(matches!(
            p("relay.example.com"),
            Err(TurnUriError::Scheme(_))
        ));
        assert!(matches!(p("turn:"), Err(TurnUriError::NoHost(_))));
        assert!(matches!(p("turn::3478"), Err(TurnUriError::NoHost(_))));
        for bad in [
            "turn:h:0",
            "turn:h:70000",
            "turn:h:x",
            "turn:h:",
            "turn:[::1",
            "turn:[nope]:1",
            "turn:2001:db8::1",
            "turn:u@h:1",
            "turn:h/x:1",
        ] {
            assert!(
                matches!(p(bad), Err(TurnUriError::BadAuthority(_))),
                "{bad}: {:?}",
                p(bad)
            );
        }
        assert!(matches!(
            p("turn:h:1?foo=bar"),
            Err(TurnUriError::BadQuery(_))
        ));
        assert!(matches!(
            p("turn:h:1?transport=udp&x=y"),
            Err(TurnUriError::BadQuery(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            let _ = TurnUri::parse(&s);
        }
    }
}
