//! Network tokens: stateless HMAC over network name and expiry, minted by
//! `meshpunch-rendezvous token create`.
//!
//! Format: `mpt1.<network>.<expiry-unix>.<mac>` where `mac` is
//! `base64url-nopad(HMAC-SHA256(server secret, "mpt1|<network>|<expiry>"))`. Network names are
//! `[A-Za-z0-9_-]{1,64}`, so the dots delimit unambiguously. The server keeps no per-token
//! state: a token is valid while its MAC checks out, it has not expired, and it is not on the
//! configured revocation list (which holds tokens or their [`token_hash`]es).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Prefix (and format version) of every token.
pub const TOKEN_PREFIX: &str = "mpt1";

/// Longest accepted network name.
pub const MAX_NETWORK_LEN: usize = 64;

/// Longest accepted token string.
pub const MAX_TOKEN_LEN: usize = 256;

/// A structurally valid token (MAC not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Network the token admits to.
    pub network: String,
    /// Unix time (seconds) after which the token is refused.
    pub expires_unix: u64,
    /// The HMAC tag.
    pub mac: [u8; 32],
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not of the form `mpt1.<network>.<expiry>.<mac>`.
    #[error("malformed token")]
    Malformed,
    /// The network name is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("invalid network name (allowed: [A-Za-z0-9_-], 1 to 64 characters)")]
    BadNetwork,
    /// The MAC does not match: minted with another secret or tampered with.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token expired at the given unix time.
    #[error("token expired at unix time {0}")]
    Expired(u64),
    /// The token is on the revocation list.
    #[error("token revoked")]
    Revoked,
}

/// Whether `name` is a valid network name.
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETWORK_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn mac(secret: &[u8], network: &str, expires_unix: u64) -> [u8; 32] {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0u8; 32];
    };
    m.update(format!("{TOKEN_PREFIX}|{network}|{expires_unix}").as_bytes());
    m.finalize().into_bytes().into()
}

/// Mints a token for `network` valid until `expires_unix`.
pub fn mint(secret: &[u8], network: &str, expires_unix: u64) -> Result<String, TokenError> {
    if !valid_network_name(network) {
        return Err(TokenError::BadNetwork);
    }
    let tag = mac(secret, network, expires_unix);
    Ok(Token {
        network: network.to_string(),
        expires_unix,
        mac: tag,
    }
    .to_string())
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.network,
            self.expires_unix,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.mac)
        )
    }
}

impl std::str::FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        parse(s)
    }
}

/// Parses the structure of a token without checking its MAC.
pub fn parse(s: &str) -> Result<Token, TokenError> {
    if s.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = s.split('.');
    let (Some(prefix), Some(network), Some(expiry), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if prefix != TOKEN_PREFIX {
        return Err(TokenError::Malformed);
    }
    if !valid_network_name(network) {
        return Err(TokenError::BadNetwork);
    }
    // One spelling per token: a leading zero would give the same MAC under a different
    // string, and revocation lists match the string (or its hash).
    if expiry.is_empty()
        || !expiry.bytes().all(|b| b.is_ascii_digit())
        || (expiry.len() > 1 && expiry.starts_with('0'))
    {
        return Err(TokenError::Malformed);
    }
    let expires_unix: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    let mac: [u8; 32] = raw.try_into().map_err(|_| TokenError::Malformed)?;
    Ok(Token {
        network: network.to_string(),
        expires_unix,
        mac,
    })
}

/// Hex SHA-256 of the token string, the form a revocation list may hold instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Checks a token: structure, MAC (constant time), expiry against `now_unix`, and
/// revocation (`is_revoked` gets the token string; see [`Revocations`]).
pub fn verify(
    secret: &[u8],
    token: &str,
    now_unix: u64,
    is_revoked: impl Fn(&str) -> bool,
) -> Result<Token, TokenError> {
    let t = parse(token)?;
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return Err(TokenError::BadSignature);
    };
    m.update(format!("{TOKEN_PREFIX}|{}|{}", t.network, t.expires_unix).as_bytes());
    m.verify_slice(&t.mac)
        .map_err(|_| TokenError::BadSignature)?;
    if t.expires_unix < now_unix {
        return Err(TokenError::Expired(t.expires_unix));
    }
    if is_revoked(token) {
        return Err(TokenError::Revoked);
    }
    Ok(t)
}

/// A revocation list: entries are whole tokens or `sha256:<hex>` / bare 64-hex hashes of them.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    hashes: std::collections::HashSet<String>,
}

impl Revocations {
    /// Builds the list from config entries.
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let hashes = entries
            .into_iter()
            .map(|e| {
                let e = e.trim();
                let h = e.strip_prefix("sha256:").unwrap_or(e);
                if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    h.to_ascii_lowercase()
                } else {
                    token_hash(e)
                }
            })
            .collect();
        Revocations { hashes }
    }

    /// Whether `token` is revoked.
    pub fn contains(&self, token: &str) -> bool {
        !self.hashes.is_empty() && self.hashes.contains(&token_hash(token))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Parses a duration like `30d`, `12h`, `90m`, `45s`, `2w` or a bare number of seconds.
pub fn parse_ttl(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 's') => (&s[..i], 1),
        (i, 'm') => (&s[..i], 60),
        (i, 'h') => (&s[..i], 3600),
        (i, 'd') => (&s[..i], 86_400),
        (i, 'w') => (&s[..i], 7 * 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_revoked_token_cannot_come_back_with_a_leading_zero_expiry() {
        // Found by the `token` fuzz target: "000" parsed as 0 and printed as "0", so the same
        // MAC verified under a second spelling that a revocation list did not name.
        let t = mint(b"secret", "net", 2000).unwrap();
        let respelled = t.replace(".2000.", ".02000.");
        assert_eq!(parse(&respelled), Err(TokenError::Malformed));
        let revoked = Revocations::new([t.as_str()]);
        assert_eq!(
            verify(b"secret", &respelled, 1000, |s| revoked.contains(s)),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(b"secret", &t, 1000, |s| revoked.contains(s)),
            Err(TokenError::Revoked)
        );
        assert!(
            parse(&mint(b"secret", "net", 0).unwrap()).is_ok(),
            "a lone 0 is canonical"
        );
    }

    #[test]
    fn minted_token_verifies_and_tampering_fails() {
        let t = mint(b"secret", "home-net_1", 2000).unwrap();
        assert!(t.starts_with("mpt1.home-net_1.2000."));
        let ok = verify(b"secret", &t, 1000, |_| false).unwrap();
        assert_eq!(ok.network, "home-net_1");
        assert_eq!(
            verify(b"other", &t, 1000, |_| false),
            Err(TokenError::BadSignature)
        );
        let forged = t.replace("home-net_1", "office");
        assert_eq!(
            verify(b"secret", &forged, 1000, |_| false),
            Err(TokenError::BadSignature)
        );
        let later = t.replace(".2000.", ".9000.");
        assert_eq!(
            verify(b"secret", &later, 1000, |_| false),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"secret", &t, 2001, |_| false),
            Err(TokenError::Expired(2000))
        );
    }

    #[test]
    fn revocation_by_token_or_hash() {
        let a = mint(b"s", "a", 10).unwrap();
        let b = mint(b"s", "b", 10).unwrap();
        let c = mint(b"s", "c", 10).unwrap();
        let hb = format!("sha256:{}", token_hash(&b));
        let r = Revocations::new([a.as_str(), hb.as_str()]);
        assert!(r.contains(&a));
        assert!(r.contains(&b));
        assert!(!r.contains(&c));
        assert_eq!(
            verify(b"s", &b, 0, |t| r.contains(t)),
            Err(TokenError::Revoked)
        );
    }

    #[test]
    fn network_names_are_restricted() {
        assert_eq!(mint(b"s", "a.b", 1), Err(TokenError::BadNetwork));
        assert_eq!(mint(b"s", "", 1), Err(TokenError::BadNetwork));
        assert_eq!(mint(b"s", &"x".repeat(65), 1), Err(TokenError::BadNetwork));
        assert!(mint(b"s", &"x".repeat(64), 1).is_ok());
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("30d"), Some(30 * 86_400));
        assert_eq!(parse_ttl("12h"), Some(43_200));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("x"), None);
        assert_eq!(parse_ttl(""), None);
    }

    proptest! {
        #[test]
        fn round_trip(net in "[A-Za-z0-9_-]{1,64}", exp in any::<u64>(), secret in any::<[u8; 16]>()) {
            let t = mint(&secret, &net, exp).unwrap();
            let parsed: Token = t.parse().unwrap();
            prop_assert_eq!(parsed.to_string(), t.clone());
            prop_assert_eq!(verify(&secret, &t, 0, |_| false).map(|t| t.network), Ok(net));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = parse(&s);
            let _ = verify(b"k", &s, 0, |_| false);
            let _ = parse_ttl(&s);
        }
    }
}
