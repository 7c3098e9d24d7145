//! WireGuard-compatible keys: `meshpunch keygen` / `meshpunch pubkey` produce exactly what
//! `wg genkey` / `wg pubkey` do (base64, standard alphabet, of a clamped X25519 scalar and its
//! public point).

use base64::Engine as _;
use x25519_dalek::{PublicKey, StaticSecret};

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not base64 of exactly 32 bytes (44 characters ending in `=`).
    #[error("expected a WireGuard key: base64 of 32 bytes (44 characters ending in '=')")]
    Invalid,
}

/// Parses a WireGuard base64 key.
pub fn parse_key(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    if s.len() != 44 {
        return Err(KeyError::Invalid);
    }
    let v = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| KeyError::Invalid)?;
    v.try_into().map_err(|_| KeyError::Invalid)
}

/// Formats a key as WireGuard base64.
pub fn format_key(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Clamps an X25519 scalar (RFC 7748 §5), as `wg genkey` does.
pub fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// A new random private key (clamped).
pub fn generate_private() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    clamp(k)
}

/// The public key of a private key.
pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// `wg`'s warning for a file holding a private key that others can read: `Warning: `FILE' is
/// world accessible` (or `group accessible`), with the command that fixes it. `None` when the
/// file is private (no group/other bits) or cannot be examined.
pub fn key_file_warning(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    let who = if mode & 0o007 != 0 {
        "world"
    } else if mode & 0o070 != 0 {
        "group"
    } else {
        return None;
    };
    Some(format!(
        "Warning: `{}' is {who} accessible (mode {mode:04o}) and holds a private key; \
         fix it with: chmod 600 {}",
        path.display(),
        path.display()
    ))
}

/// A WireGuard identity: private key and its public key.
#[derive(Clone)]
pub struct Identity {
    /// Private X25519 key.
    pub private: [u8; 32],
    /// Public X25519 key.
    pub public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &format_key(&self.public))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity of a private key.
    pub fn from_private(private: [u8; 32]) -> Self {
        Identity {
            private,
            public: public_of(&private),
        }
    }
    /// Static-static X25519 shared secret with `peer` (both sides compute the same value).
    pub fn shared_secret(&self, peer: &[u8; 32]) -> [u8; 32] {
        StaticSecret::from(self.private)
            .diffie_hellman(&PublicKey::from(*peer))
            .to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_and_are_clamped() {
        let k = generate_private();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 0xC0, 0x40);
        let s = format_key(&k);
        assert_eq!(s.len(), 44);
        assert_eq!(parse_key(&s), Ok(k));
    }

    #[test]
    fn rfc7748_public_key_vector() {
        // RFC 7748 §6.1 Alice.
        let sk: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex::encode(public_of(&sk)),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(parse_key("abc").is_err());
        assert!(parse_key("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=").is_err());
    }

    #[test]
    fn key_file_readable_by_others_gets_wgs_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("wg0.conf");
        std::fs::write(&f, "[Interface]\n").unwrap();
        let set = |m| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
        set(0o644);
        let w = key_file_warning(&f).unwrap();
        assert!(
            w.starts_with(&format!("Warning: `{}' is world accessible", f.display())),
            "{w}"
        );
        set(0o640);
        assert!(key_file_warning(&f)
            .unwrap()
            .contains("is group accessible"));
        set(0o600);
        assert_eq!(key_file_warning(&f), None);
        set(0o400);
        assert_eq!(key_file_warning(&f), None);
    }

    #[test]
    fn shared_secret_is_symmetric() {
        let a = Identity::from_private(generate_private());
        let b = Identity::from_private(generate_private());
        assert_eq!(a.shared_secret(&b.public), b.shared_secret(&a.public));
    }
}
