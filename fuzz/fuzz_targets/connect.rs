//! Fuzz connect-string parsing and the X.509 fields a pinning client reads: never panics, and
//! whatever parses round-trips through Display.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::connect::{split_host_port, ConnectString, Pin};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = s.parse::<ConnectString>() {
            let again: ConnectString = c.to_string().parse().expect("display output parses");
            assert_eq!(again, c);
        }
        if let Ok(p) = s.parse::<Pin>() {
            assert_eq!(p.to_string().parse::<Pin>(), Ok(p));
        }
        let _ = split_host_port(s);
    }
    // Certificates from the server are peer input too.
    let _ = meshpunch_proto::x509::spki_pin(data);
    let _ = meshpunch_proto::x509::validity(data);
});
