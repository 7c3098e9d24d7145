//! Authentication: the long-term credential mechanism (RFC 8489 §9.2) with stateless nonces
//! (an HMAC over issue time and client IP) and either static users or TURN REST-API secrets.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use stun_rs::attributes::stun::{
    MessageIntegrity, MessageIntegritySha256, Nonce, PasswordAlgorithm, Realm, UserName,
};
use stun_rs::{Algorithm, AlgorithmId, HMACKey, StunAttribute, StunMessage};

use super::codec::RawAttrs;
use super::ports::RelayAllocator;
use super::server::{ClientAction, Refuse, TurnServer};
use crate::creds::{self, Tenant};

/// How the server authenticates requests.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// TURN REST-API shared secrets (coturn `static-auth-secret`); several allow rotation.
    pub secrets: Vec<Vec<u8>>,
    /// Static long-term users (username → password).
    pub users: HashMap<String, String>,
}

/// Which integrity attribute protected a request (and therefore its response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Integrity {
    Sha1,
    Sha256,
}

/// Outcome of authenticating a request.
pub(super) enum AuthOutcome {
    Ok {
        user: Tenant,
        key: HMACKey,
        integrity: Integrity,
    },
    /// Error response already written.
    Replied(usize),
    /// Drop silently.
    Drop,
}

impl<A: RelayAllocator> TurnServer<A> {
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        msg: &StunMessage,
        out: &mut [u8],
    ) -> AuthOutcome {
        let txid = *msg.transaction_id().as_bytes();
        let has_sha256 = msg.get::<MessageIntegritySha256>().is_some();
        let has_sha1 = msg.get::<MessageIntegrity>().is_some();
        if !has_sha1 && !has_sha256 {
            self.stats.challenges += 1;
            return self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out);
        }
        let username = msg
            .get::<UserName>()
            .and_then(|a| a.as_user_name().ok())
            .map(|u| u.as_str().to_owned());
        let realm = msg
            .get::<Realm>()
            .and_then(|a| a.as_realm().ok())
            .map(|r| r.as_str().to_owned());
        let nonce = msg
            .get::<Nonce>()
            .and_then(|a| a.as_nonce().ok())
            .map(|n| n.as_str().to_owned());
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            self.stats.errors += 1;
            return match self.unauth_error(
                now,
                from,
                msg.method(),
                &txid,
                Refuse(400, "Bad Request"),
                out,
            ) {
                ClientAction::Reply(n) => AuthOutcome::Replied(n),
                _ => AuthOutcome::Drop,
            };
        };
        if !self.nonce_valid(&nonce, from.ip(), now) {
            self.stats.stale_nonces += 1;
            return self.challenge(now, from, msg.method(), &txid, 438, "Stale Nonce", out);
        }
        if realm != self.cfg.realm {
            self.stats.auth_failures += 1;
            return self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out);
        }
        let algorithm = match msg.get::<PasswordAlgorithm>() {
            Some(StunAttribute::PasswordAlgorithm(pa)) if pa.algorithm() == AlgorithmId::SHA256 => {
                AlgorithmId::SHA256
            }
            _ => AlgorithmId::MD5,
        };
        let (integrity, input) = if has_sha256 {
            (
                Integrity::Sha256,
                stun_rs::get_input_text::<MessageIntegritySha256>(packet),
            )
        } else {
            (
                Integrity::Sha1,
                stun_rs::get_input_text::<MessageIntegrity>(packet),
            )
        };
        let received: Option<Vec<u8>> = packet_integrity(packet, integrity);
        let (Some(input), Some(received)) = (input, received) else {
            self.stats.malformed += 1;
            return AuthOutcome::Drop;
        };
        let unix_now = self.unix_now(now);
        for password in self.passwords(&username, unix_now) {
            let Ok(key) =
                HMACKey::new_long_term(&username, &realm, &password, Algorithm::from(algorithm))
            else {
                continue;
            };
            if verify_hmac(integrity, key.as_bytes(), &input, &received) {
                let user = Tenant::of(&username, !self.cfg.auth.users.contains_key(&username));
                return AuthOutcome::Ok {
                    user,
                    key,
                    integrity,
                };
            }
        }
        self.stats.auth_failures += 1;
        self.challenge(now, from, msg.method(), &txid, 401, "Unauthorized", out)
    }

    /// Candidate passwords for `username`: the static one, or one per REST-API secret if the
    /// username has not expired.
    pub(super) fn passwords(&self, username: &str, unix_now: u64) -> Vec<String> {
        if let Some(p) = self.cfg.auth.users.get(username) {
            return vec![p.clone()];
        }
        if creds::check_rest_username(username, unix_now).is_err() {
            return Vec::new();
        }
        self.cfg
            .auth
            .secrets
            .iter()
            .map(|s| creds::rest_password(s, username))
            .collect()
    }

    pub(super) fn make_nonce(&self, ip: IpAddr, now: Instant) -> String {
        // 8 hex digits of issue time (u32 seconds: good until 2106) + 16 of MAC.
        let issued = (now.saturating_duration_since(self.epoch).as_secs() + self.epoch_unix) as u32;
        format!(
            "{issued:08x}{}",
            nonce_mac(&self.cfg.nonce_key, u64::from(issued), ip)
        )
    }

    pub(super) fn nonce_valid(&self, nonce: &str, ip: IpAddr, now: Instant) -> bool {
        if nonce.len() != 24 || !nonce.is_ascii() {
            return false;
        }
        let Ok(issued) = u64::from_str_radix(&nonce[..8], 16) else {
            return false;
        };
        let expected = nonce_mac(&self.cfg.nonce_key, issued, ip);
        if !constant_time_eq(expected.as_bytes(), &nonce.as_bytes()[8..]) {
            return false;
        }
        let unix_now = self.unix_now(now);
        unix_now >= issued && unix_now - issued < self.cfg.nonce_lifetime.as_secs()
    }
}

pub(super) fn nonce_mac(key: &[u8; 32], issued: u64, ip: IpAddr) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(&issued.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => mac.update(&v4.octets()),
        IpAddr::V6(v6) => mac.update(&v6.octets()),
    }
    hex::encode(&mac.finalize().into_bytes()[..8])
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The integrity value carried in `packet` (raw bytes of the attribute).
pub(super) fn packet_integrity(packet: &[u8], integrity: Integrity) -> Option<Vec<u8>> {
    let want = match integrity {
        Integrity::Sha1 => 0x0008,
        Integrity::Sha256 => 0x001C,
    };
    RawAttrs::new(packet)
        .find(|(t, _)| *t == want)
        .and_then(|(_, r)| packet.get(r).map(<[u8]>::to_vec))
}

/// Verifies an HMAC in constant time. MESSAGE-INTEGRITY-SHA256 may be truncated to 16+ bytes.
pub(crate) fn verify_hmac(integrity: Integrity, key: &[u8], input: &[u8], received: &[u8]) -> bool {
    match integrity {
        Integrity::Sha1 => {
            let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
                return false;
            };
            mac.update(input);
            received.len() == 20 && mac.verify_slice(received).is_ok()
        }
        Integrity::Sha256 => {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                return false;
            };
            mac.update(input);
            (16..=32).contains(&received.len()) && mac.verify_truncated_left(received).is_ok()
        }
    }
}
