//! Network tokens: stateless HMAC over network name and expiry (and, for member tokens, one
//! WireGuard key), minted by `meshpunch-rendezvous token create`.
//!
//! Formats (both verify; the prefix is the format version):
//! - network token `mpt1.<network>.<expiry-unix>.<mac>`, `mac` =
//!   `base64url-nopad(HMAC-SHA256(secret, "mpt1|<network>|<expiry>"))`: admits any key;
//! - member token `mpt2.<network>.<expiry-unix>.<key>.<mac>`, `key` = the WireGuard public key
//!   in base64url without padding (43 characters), `mac` = `base64url-nopad(HMAC-SHA256(secret,
//!   "mpt2|<network>|<expiry>|<key>"))`: admits only that key, so one member can be revoked
//!   without re-keying the network.
//!
//! Network names are `[A-Za-z0-9_-]{1,64}`, so the dots delimit unambiguously. The server keeps
//! no per-token state: a token is valid while its MAC checks out, it has not expired, and it is
//! not on the revocation list (which holds tokens or their [`token_hash`]es).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Prefix (and format version) of network tokens.
pub const TOKEN_PREFIX: &str = "mpt1";

/// Prefix (and format version) of member tokens (bound to one WireGuard key).
pub const MEMBER_TOKEN_PREFIX: &str = "mpt2";

/// Shortest accepted token secret, in bytes: an HMAC key of 256 bits.
pub const MIN_SECRET_LEN: usize = 32;

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
    /// The only WireGuard public key a member token admits; `None` for a network token.
    pub key: Option<[u8; 32]>,
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
    /// A member token presented with another WireGuard key.
    #[error("this token admits another WireGuard key")]
    KeyNotAllowed,
}

/// Whether `name` is a valid network name.
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETWORK_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The MAC input of a token: each format signs its own prefix, so a tag of one format never
/// verifies as the other.
fn signed_text(network: &str, expires_unix: u64, key: Option<&[u8; 32]>) -> String {
    match key {
        None => format!("{TOKEN_PREFIX}|{network}|{expires_unix}"),
        Some(k) => format!("{MEMBER_TOKEN_PREFIX}|{network}|{expires_unix}|{}", b64(k)),
    }
}

fn hmac(secret: &[u8]) -> Option<Hmac<Sha256>> {
    Hmac::<Sha256>::new_from_slice(secret).ok()
}

fn mac(secret: &[u8], network: &str, expires_unix: u64, key: Option<&[u8; 32]>) -> [u8; 32] {
    let Some(mut m) = hmac(secret) else {
        return [0u8; 32];
    };
    m.update(signed_text(network, expires_unix, key).as_bytes());
    m.finalize().into_bytes().into()
}

/// Mints a network token for `network` valid until `expires_unix` (admits any key).
pub fn mint(secret: &[u8], network: &str, expires_unix: u64) -> Result<String, TokenError> {
    mint_for(secret, network, expires_unix, None)
}

/// Mints a token for `network` valid until `expires_unix`; with `key`, a member token that
/// admits only that WireGuard public key.
pub fn mint_for(
    secret: &[u8],
    network: &str,
    expires_unix: u64,
    key: Option<[u8; 32]>,
) -> Result<String, TokenError> {
    if !valid_network_name(network) {
        return Err(TokenError::BadNetwork);
    }
    let tag = mac(secret, network, expires_unix, key.as_ref());
    Ok(Token {
        network: network.to_string(),
        expires_unix,
        key,
        mac: tag,
    }
    .to_string())
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            None => write!(
                f,
                "{TOKEN_PREFIX}.{}.{}.{}",
                self.network,
                self.expires_unix,
                b64(&self.mac)
            ),
            Some(k) => write!(
                f,
                "{MEMBER_TOKEN_PREFIX}.{}.{}.{}.{}",
                self.network,
                self.expires_unix,
                b64(k),
                b64(&self.mac)
            ),
        }
    }
}

impl std::str::FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        parse(s)
    }
}

fn b64_32(s: &str) -> Result<[u8; 32], TokenError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::Malformed)?;
    let out: [u8; 32] = raw.try_into().map_err(|_| TokenError::Malformed)?;
    // One spelling per token: base64 with stray low bits in the last character decodes to
    // the same bytes, and revocation lists match the string (or its hash).
    if b64(&out) != s {
        return Err(TokenError::Malformed);
    }
    Ok(out)
}

/// Parses the structure of a token (either format) without checking its MAC.
pub fn parse(s: &str) -> Result<Token, TokenError> {
    if s.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let parts: Vec<&str> = s.splitn(6, '.').collect();
    let (network, expiry, key, tag) = match parts.as_slice() {
        [TOKEN_PREFIX, network, expiry, tag] => (*network, *expiry, None, *tag),
        [MEMBER_TOKEN_PREFIX, network, expiry, key, tag] => (*network, *expiry, Some(*key), *tag),
        _ => return Err(TokenError::Malformed),
    };
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
    let key = key.map(b64_32).transpose()?;
    let mac = b64_32(tag)?;
    Ok(Token {
        network: network.to_string(),
        expires_unix,
        key,
        mac,
    })
}

/// Hex SHA-256 of the token string, the form a revocation list may hold instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Checks a token: structure, MAC (constant time), expiry against `now_unix`, and
/// revocation (`is_revoked` gets the token string; see [`Revocations`]). A member token's key
/// is checked by the caller against the key being registered ([`Token::admits`]).
pub fn verify(
    secret: &[u8],
    token: &str,
    now_unix: u64,
    is_revoked: impl Fn(&str) -> bool,
) -> Result<Token, TokenError> {
    let t = parse(token)?;
    let Some(mut m) = hmac(secret) else {
        return Err(TokenError::BadSignature);
    };
    m.update(signed_text(&t.network, t.expires_unix, t.key.as_ref()).as_bytes());
    m.verify_slice(&t.mac)
        .map_err(|_| TokenError::BadSignature)?;
    if t.is_expired(now_unix) {
        return Err(TokenError::Expired(t.expires_unix));
    }
    if is_revoked(token) {
        return Err(TokenError::Revoked);
    }
    Ok(t)
}

impl Token {
    /// Whether the token has expired at `now_unix` (it is valid through its expiry second).
    pub fn is_expired(&self, now_unix: u64) -> bool {
        self.expires_unix < now_unix
    }

    /// Whether the token admits the WireGuard public key `key` (any key for a network token).
    pub fn admits(&self, key: &[u8; 32]) -> bool {
        self.key.as_ref().is_none_or(|k| k == key)
    }
}

/// A revocation list: entries are whole tokens (either format) or `sha256:<hex>` / bare
/// 64-hex hashes of them ([`token_hash`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    hashes: std::collections::HashSet<String>,
}

/// A revocation entry that is neither a token nor a token hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revocation entry {index} ({shown:?}) is neither a token (mpt1./mpt2.…) nor a token hash (sha256:<64 hex>)")]
pub struct BadRevocation {
    /// 1-based position of the entry in its list.
    pub index: usize,
    /// The start of the entry (never the whole of a possibly valid token).
    pub shown: String,
}

/// The hash form of one revocation entry, if it is a token or a token hash.
pub fn revocation_hash(entry: &str) -> Option<String> {
    let e = entry.trim();
    let h = e.strip_prefix("sha256:").unwrap_or(e);
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(h.to_ascii_lowercase())
    } else if parse(e).is_ok() {
        Some(token_hash(e))
    } else {
        None
    }
}

impl Revocations {
    /// Builds the list from entries; an entry that is neither a token nor a token hash is an
    /// error naming its position (a typo must not silently revoke nothing).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, BadRevocation> {
        let mut hashes = std::collections::HashSet::new();
        for (i, e) in entries.into_iter().enumerate() {
            match revocation_hash(e) {
                Some(h) => {
                    hashes.insert(h);
                }
                None => {
                    return Err(BadRevocation {
                        index: i + 1,
                        shown: e.trim().chars().take(24).collect(),
                    })
                }
            }
        }
        Ok(Revocations { hashes })
    }

    /// Adds hashes (already in [`revocation_hash`] form, e.g. read from the registry).
    pub fn extend_hashes(&mut self, hashes: impl IntoIterator<Item = String>) {
        self.hashes.extend(hashes);
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

/// Formats unix seconds as a readable UTC date, `2026-12-02 05:31:07 UTC` (for logs and
/// status: when a token expired).
pub fn format_unix_utc(unix: u64) -> String {
    crate::clock::format_utc(i64::try_from(unix).unwrap_or(i64::MAX))
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
        let revoked = Revocations::parse([t.as_str()]).unwrap();
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
        let r = Revocations::parse([a.as_str(), hb.as_str()]).unwrap();
        assert!(r.contains(&a));
        assert!(r.contains(&b));
        assert!(!r.contains(&c));
        assert_eq!(
            verify(b"s", &b, 0, |t| r.contains(t)),
            Err(TokenError::Revoked)
        );
    }

    #[test]
    fn member_token_admits_only_its_key_and_network_tokens_still_verify() {
        let key = [7u8; 32];
        let t = mint_for(b"secret", "net", 2000, Some(key)).unwrap();
        assert!(t.starts_with("mpt2.net.2000."));
        let ok = verify(b"secret", &t, 1000, |_| false).unwrap();
        assert_eq!(ok.key, Some(key));
        assert!(ok.admits(&key));
        assert!(!ok.admits(&[8u8; 32]));
        // The key is signed: swapping it breaks the MAC.
        let other = t.replace(&b64(&key), &b64(&[8u8; 32]));
        assert_eq!(
            verify(b"secret", &other, 1000, |_| false),
            Err(TokenError::BadSignature)
        );
        // Dropping the key (and claiming the v1 format) does not verify either.
        let parts: Vec<&str> = t.split('.').collect();
        let stripped = format!("mpt1.{}.{}.{}", parts[1], parts[2], parts[4]);
        assert_eq!(
            verify(b"secret", &stripped, 1000, |_| false),
            Err(TokenError::BadSignature)
        );
        // Old network tokens keep verifying and admit every key.
        let v1 = mint(b"secret", "net", 2000).unwrap();
        assert!(v1.starts_with("mpt1.net.2000."));
        let ok = verify(b"secret", &v1, 1000, |_| false).unwrap();
        assert!(ok.key.is_none() && ok.admits(&[1u8; 32]));
    }

    #[test]
    fn malformed_revocation_entry_is_an_error_naming_it() {
        let good = mint(b"s", "a", 10).unwrap();
        let hash = format!("sha256:{}", token_hash(&good));
        assert!(Revocations::parse([good.as_str(), hash.as_str()]).is_ok());
        let err = Revocations::parse([hash.as_str(), "sha256:00"]).unwrap_err();
        assert_eq!(err.index, 2);
        assert!(err.to_string().contains("sha256:00"), "{err}");
        assert!(Revocations::parse(["mpt1.broken"]).is_err());
    }

    #[test]
    fn network_names_are_restricted() {
        assert_eq!(mint(b"s", "a.b", 1), Err(TokenError::BadNetwork));
        assert_eq!(mint(b"s", "", 1), Err(TokenError::BadNetwork));
        assert_eq!(mint(b"s", &"x".repeat(65), 1), Err(TokenError::BadNetwork));
        assert!(mint(b"s", &"x".repeat(64), 1).is_ok());
    }

    #[test]
    fn unix_times_read_as_utc_dates() {
        assert_eq!(format_unix_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_utc(1_796_189_467), "2026-12-02 05:31:07 UTC");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        let _ = format_unix_utc(u64::MAX);
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
        fn member_round_trip(net in "[A-Za-z0-9_-]{1,64}", exp in any::<u64>(), key in any::<[u8; 32]>(), other in any::<[u8; 32]>(), secret in any::<[u8; 32]>()) {
            let t = mint_for(&secret, &net, exp, Some(key)).unwrap();
            prop_assert!(t.len() <= MAX_TOKEN_LEN);
            let parsed: Token = t.parse().unwrap();
            prop_assert_eq!(parsed.to_string(), t.clone());
            let ok = verify(&secret, &t, 0, |_| false).unwrap();
            prop_assert!(ok.admits(&key));
            prop_assert_eq!(ok.admits(&other), key == other);
            let r = Revocations::parse([t.as_str()]).unwrap();
            prop_assert_eq!(verify(&secret, &t, 0, |s| r.contains(s)), Err(TokenError::Revoked));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = parse(&s);
            let _ = verify(b"k", &s, 0, |_| false);
            let _ = parse_ttl(&s);
            let _ = revocation_hash(&s);
        }
    }
}
