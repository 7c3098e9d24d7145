//! Fuzz connect-string parsing: never panics, and whatever parses round-trips through Display.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::connect::{split_host_port, ConnectString};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = s.parse::<ConnectString>() {
            let again: ConnectString = c.to_string().parse().expect("display output parses");
            assert_eq!(again, c);
        }
        let _ = split_host_port(s);
    }
});
