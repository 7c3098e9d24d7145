//! Fuzz the rendezvous frame decoder: arbitrary bytes, split at an arbitrary point, must
//! never panic; every decoded message must re-encode to a frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::wire::{FrameDecoder, Message};

fn drain(d: &mut FrameDecoder) {
    for _ in 0..1024 {
        match d.next_message() {
            Ok(Some(m)) => {
                let frame = m.encode();
                assert_eq!(Message::decode_payload(&frame[4..]).ok(), Some(m));
            }
            Ok(None) => return,
            Err(e) if e.recoverable() => {}
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode_payload(data);
    let split = data
        .first()
        .map(|b| *b as usize % (data.len() + 1))
        .unwrap_or(0);
    let mut d = FrameDecoder::new(4096);
    d.push(&data[..split]);
    drain(&mut d);
    d.push(&data[split..]);
    drain(&mut d);
});
