//! Fuzz ChannelData framing: parsing never panics, and what parses re-encodes to the same
//! channel and payload (padded and unpadded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::channeldata::{
    encode, encode_padded, is_channel_data, parse, parse_up_to, LEGACY_CHANNEL_MAX,
};

fuzz_target!(|data: &[u8]| {
    let _ = is_channel_data(data);
    let _ = parse(data);
    if let Ok(cd) = parse_up_to(data, LEGACY_CHANNEL_MAX) {
        let mut out = vec![0u8; cd.data.len() + 8];
        for padded in [false, true] {
            let n = if padded {
                encode_padded(cd.channel, cd.data, &mut out).unwrap()
            } else {
                encode(cd.channel, cd.data, &mut out).unwrap()
            };
            let again = parse_up_to(&out[..n], LEGACY_CHANNEL_MAX).unwrap();
            assert_eq!(again.channel, cd.channel);
            assert_eq!(again.data, cd.data);
        }
    }
});
