//! Fuzzes the probe decoder (plain and sized pings/pongs), the replay window and the
//! data-socket demultiplexer; sized pings built from the input must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::probe::{
    classify, decode, encode, peek_key_id, ProbeBody, ProbeKey, ProbeReceiver, MAX_SIZED_PING,
    MIN_SIZED_PING,
};

fuzz_target!(|data: &[u8]| {
    let key = ProbeKey::derive(&[1u8; 32], &[2u8; 32]);
    let _ = classify(data);
    let _ = peek_key_id(data);
    let _ = decode(&key, data);
    let mut r = ProbeReceiver::new(key.clone());
    let _ = r.open(0, data);
    if let [a, b, ..] = data {
        let size = u16::from_be_bytes([*a, *b]);
        let mut out = Vec::new();
        let body = ProbeBody::SizedPing { tx: [3; 12], size };
        let n = encode(&key, 1, 2, &body, &mut out);
        let want = usize::from(size).clamp(MIN_SIZED_PING, MAX_SIZED_PING);
        assert_eq!(n, want);
        assert_eq!(
            decode(&key, &out).map(|p| p.body),
            Ok(ProbeBody::SizedPing { tx: [3; 12], size: want as u16 })
        );
    }
});
