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

/// Length of the key part of a meshpunch REST-API user id (`<network>.<16 hex of key>`).
pub const KEY_HEX_LEN: usize = 16;

/// The tenant a REST-API username belongs to, as the relay's quotas see it.
///
/// The rendezvous mints usernames `<expiry>:<network>.<first 16 hex of the node key>`; the
/// relay keys its quotas by the network (many keys of one network share one bucket) and by
/// the user id without the expiry (a refreshed credential is the same user). A username
/// without a network part (a bare `<expiry>`, `<expiry>:<id>` from another minting service,
/// or a static user) is its own tenant: a per-username bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    /// Per-username quota key: the user id (`network.keyhex`), or the whole username.
    pub user: String,
    /// Per-network quota key: `net:<network>`, or `user:<user>` when the username names no
    /// network (the two spellings cannot collide).
    pub network: String,
}

impl Tenant {
    /// Tenant of `username`; `rest` says whether it is a REST-API username (`expiry:id`)
    /// rather than a static user.
    pub fn of(username: &str, rest: bool) -> Tenant {
        let user = if rest {
            username
                .split_once(REST_USERNAME_SEPARATOR)
                .map_or(username, |(_, id)| id)
        } else {
            username
        };
        let network = match rest.then(|| rest_network(user)).flatten() {
            Some(n) => format!("net:{n}"),
            None => format!("user:{user}"),
        };
        Tenant {
            user: user.to_owned(),
            network,
        }
    }

    /// The network name, if the username carried one.
    pub fn network_name(&self) -> Option<&str> {
        self.network.strip_prefix("net:")
    }
}

/// The network part of a meshpunch REST-API user id `<network>.<16 hex>`: `None` when the id
/// does not have that shape (no dot, an empty network, or a suffix that is not 16 hex digits).
pub fn rest_network(user_id: &str) -> Option<&str> {
    let (network, key) = user_id.rsplit_once('.')?;
    (!network.is_empty() && key.len() == KEY_HEX_LEN && key.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(network)
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

    #[test]
    fn tenant_is_the_network_of_a_meshpunch_username() {
        let t = Tenant::of("1800000000:office.0123456789abcdef", true);
        assert_eq!(t.user, "office.0123456789abcdef");
        assert_eq!(t.network, "net:office");
        assert_eq!(t.network_name(), Some("office"));
        // A network name may contain dots: the key is the last part.
        let t = Tenant::of("1800000000:a.b.0123456789ABCDEF", true);
        assert_eq!(t.network_name(), Some("a.b"));
        // Same network, other key: same network bucket, other user bucket.
        let u = Tenant::of("1800000099:a.b.fedcba9876543210", true);
        assert_eq!(u.network, t.network);
        assert_ne!(u.user, t.user);
    }

    #[test]
    fn usernames_without_a_network_are_their_own_bucket() {
        for (name, rest, user) in [
            ("1800000000", true, "1800000000"),
            ("1800000000:alice", true, "alice"),
            ("1800000000:.0123456789abcdef", true, ".0123456789abcdef"),
            (
                "1800000000:net.0123456789abcdeg",
                true,
                "net.0123456789abcdeg",
            ),
            ("1800000000:net.0123", true, "net.0123"),
            ("static.0123456789abcdef", false, "static.0123456789abcdef"),
        ] {
            let t = Tenant::of(name, rest);
            assert_eq!(t.user, user, "{name}");
            assert_eq!(t.network, format!("user:{user}"), "{name}");
            assert_eq!(t.network_name(), None);
        }
        // A user id spelled like a bucket key cannot join a network's bucket.
        assert_ne!(
            Tenant::of("1:net:x", true).network,
            Tenant::of("1:x.0123456789abcdef", true).network
        );
    }
}
