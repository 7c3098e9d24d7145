//! Fuzz the STUN Binding server and the Binding response parser: arbitrary datagrams on any
//! of the four RFC 5780 sockets never panic, and answers are well-formed STUN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::stun::{looks_like_stun, parse_binding_response, BindingServer};

fuzz_target!(|data: &[u8]| {
    let server = BindingServer::new(
        "fuzz",
        [
            Some("127.0.0.1:3478".parse().unwrap()),
            Some("127.0.0.1:3479".parse().unwrap()),
            Some("127.0.0.2:3478".parse().unwrap()),
            Some("127.0.0.2:3479".parse().unwrap()),
        ],
    );
    let local = data.first().map(|b| *b as usize % 4).unwrap_or(0);
    if let Some(reply) = server.handle(local, "192.0.2.1:4000".parse().unwrap(), data) {
        assert!(looks_like_stun(&reply.bytes));
        assert!(parse_binding_response(&reply.bytes).is_ok());
    }
    let _ = parse_binding_response(data);
});
