//! Fuzz network- and member-token parsing and verification and revocation entries: never
//! panics, and a parsed token prints back to the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::token;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = token::parse(s) {
            assert_eq!(t.to_string(), s);
            let _ = t.admits(&[0u8; 32]);
        }
        if let Ok(t) = token::verify(b"fuzz secret", s, 0, |_| false) {
            let _ = t.is_expired(u64::MAX);
        }
        let _ = token::parse_ttl(s);
        let _ = token::revocation_hash(s);
        if let Ok(r) = token::Revocations::parse(s.lines()) {
            let _ = r.contains(s);
        }
    }
});
