//! Fuzz the TURN stream framer (TCP/TLS): any bytes in any read sizes never panic, the buffer
//! stays bounded, every frame is a whole STUN message or a ChannelData that parses; the
//! TURN URI parser never panics on the same input read as text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::channeldata::{parse_up_to, LEGACY_CHANNEL_MAX};
use meshpunch_proto::turn::stream::{FrameKind, StreamFramer, MAX_STREAM_FRAME, READ_CHUNK};
use meshpunch_proto::turn::uri::TurnUri;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = TurnUri::parse(s) {
            assert!(u.port > 0 && !u.host.is_empty());
        }
    }
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let max = 20 + usize::from(cut) * 64;
    let mut f = StreamFramer::new(max);
    let mut off = 0;
    while off < rest.len() {
        let end = (off + step).min(rest.len());
        let n = f.push(&rest[off..end]);
        if n == 0 {
            break;
        }
        off += n;
        assert!(f.capacity() <= max.min(MAX_STREAM_FRAME) + READ_CHUNK);
        loop {
            match f.next_frame() {
                Ok(Some(fr)) => match fr.kind {
                    FrameKind::Stun => {
                        assert!(fr.bytes.len() >= 20);
                        let len = usize::from(u16::from_be_bytes([fr.bytes[2], fr.bytes[3]]));
                        assert_eq!(fr.bytes.len(), 20 + len);
                    }
                    FrameKind::ChannelData => {
                        let cd = parse_up_to(fr.bytes, LEGACY_CHANNEL_MAX).unwrap();
                        assert_eq!(cd.data.len() + 4, fr.bytes.len());
                    }
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
