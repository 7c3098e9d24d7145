//! Fuzz network-token parsing and verification: never panics, and a parsed token prints back
//! to the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::token;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = token::parse(s) {
            assert_eq!(t.to_string(), s);
        }
        let _ = token::verify(b"fuzz secret", s, 0, |_| false);
        let _ = token::parse_ttl(s);
        let _ = token::Revocations::new([s]).contains(s);
    }
});
