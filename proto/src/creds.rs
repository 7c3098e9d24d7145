//! TURN credentials shared by the rendezvous (which mints them) and the relay (which checks
//! them).
//!
//! The TURN REST-API scheme is the one coturn implements for `use-auth-secret` /
//! `static-auth-secret` (draft-uberti-behave-turn-rest-00 §2.2): the username is
//! `"<unix-expiry>:<user-id>"` and the password is `base64(HMAC-SHA1(secret, username))`.
//! The long-term key is RFC 8489 §9.2.2: `MD5(username ":" realm ":" password)`; `stun-rs`
//! computes it, so only the REST-API half lives here.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Separator between expiry and user id in a REST-API username (coturn's default `:`).
pub const REST_USERNAME_SEPARATOR: char = ':';

/// A TURN REST-API username/password pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCredentials {
    /// `"<unix-expiry>:<user-id>"`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
    /// Unix time (seconds) after which the relay refuses the credentials.
    pub expires_unix: u64,
}

/// Mints REST-API credentials valid until `expires_unix` for `user_id`.
pub fn rest_credentials(secret: &[u8], expires_unix: u64, user_id: &str) -> RestCredentials {
    let username = format!("{expires_unix}{REST_USERNAME_SEPARATOR}{user_id}");
    let password = rest_password(secret, &username);
    RestCredentials {
        username,
        password,
        expires_unix,
    }
}

/// The password the relay expects for a REST-API `username`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for Hmac<Sha1>.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Why a REST-API username was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestUsernameError {
    /// The username has no numeric expiry before the separator.
    #[error("REST-API username has no numeric expiry")]
    Malformed,
    /// The expiry lies in the past.
    #[error("REST-API credentials expired at {0}")]
    Expired(u64),
}

/// Checks the expiry of a REST-API username against `now_unix` and returns it.
///
/// coturn accepts both `expiry:user` and a bare `expiry`; so do we.
pub fn check_rest_username(username: &str, now_unix: u64) -> Result<u64, RestUsernameError> {
    let ts = username
        .split(REST_USERNAME_SEPARATOR)
        .next()
        .ok_or(RestUsernameError::Malformed)?;
    let expiry: u64 = ts.parse().map_err(|_| RestUsernameError::Malformed)?;
    if expiry < now_unix {
        return Err(RestUsernameError::Expired(expiry));
    }
    Ok(expiry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_coturn_formula() {
        // Computed independently: printf '%s' '1700000000:alice' |
        //   openssl dgst -sha1 -hmac 'secret' -binary | base64
        let c = rest_credentials(b"secret", 1_700_000_000, "alice");
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.password, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn expired_and_malformed_usernames_are_refused() {
        assert_eq!(check_rest_username("100:bob", 50), Ok(100));
        assert_eq!(check_rest_username("100", 50), Ok(100));
        assert_eq!(
            check_rest_username("100:bob", 101),
            Err(RestUsernameError::Expired(100))
        );
        assert_eq!(
            check_rest_username("bob:100", 1),
            Err(RestUsernameError::Malformed)
        );
    }
}
