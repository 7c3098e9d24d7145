//! Fuzzes the probe decoder, the replay window and the data-socket demultiplexer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::probe::{classify, decode, peek_key_id, ProbeKey, ProbeReceiver};

fuzz_target!(|data: &[u8]| {
    let key = ProbeKey::derive(&[1u8; 32], &[2u8; 32]);
    let _ = classify(data);
    let _ = peek_key_id(data);
    let _ = decode(&key, data);
    let mut r = ProbeReceiver::new(key);
    let _ = r.open(0, data);
});
