//! ChannelData framing (RFC 8656 §12.4): the 4-byte header that `stun-rs` does not provide.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Channel Number        |            Length             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! /                       Application Data                        /
//! ```
//!
//! Over UDP the padding to a multiple of four is optional (§12.5): [`parse`] accepts it (and any
//! trailing bytes after the declared length), [`encode`] writes none, [`encode_padded`] pads for
//! stream transports. Parsing borrows the payload: nothing is copied or allocated.

/// Size of the ChannelData header.
pub const HEADER_LEN: usize = 4;
/// Lowest channel number a client may bind (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number a client may bind (RFC 8656 §12); 0x5000–0x7FFF are reserved.
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// Highest channel number of RFC 5766 (TURN's first version), which allowed 0x4000–0x7FFF.
/// coturn (and its `turnutils_uclient`) still use that range.
pub const LEGACY_CHANNEL_MAX: u16 = 0x7FFF;

/// Why a ChannelData frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelDataError {
    /// Fewer than four bytes.
    #[error("ChannelData shorter than its 4-byte header")]
    Truncated,
    /// The channel number lies outside 0x4000–0x4FFF.
    #[error("channel number {0:#06x} outside 0x4000-0x4FFF")]
    BadChannel(u16),
    /// The length field promises more bytes than the datagram holds.
    #[error("ChannelData length {declared} exceeds the {available} bytes present")]
    LengthMismatch {
        /// Length field value.
        declared: usize,
        /// Payload bytes present after the header.
        available: usize,
    },
    /// The payload does not fit the 16-bit length field or the output buffer.
    #[error("ChannelData payload of {0} bytes does not fit")]
    TooLong(usize),
}

/// A parsed ChannelData frame borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// Channel number (0x4000–0x4FFF).
    pub channel: u16,
    /// Application data (without padding).
    pub data: &'a [u8],
}

/// True if `channel` is a bindable channel number.
#[inline]
pub fn is_valid_channel(channel: u16) -> bool {
    (CHANNEL_MIN..=CHANNEL_MAX).contains(&channel)
}

/// True if the datagram is ChannelData-shaped (first two bits `01`), as opposed to STUN (`00`).
///
/// RFC 8656 §12: the whole 0x4000–0x7FFF range is the ChannelData demultiplexing space; numbers
/// above 0x4FFF are reserved and [`parse`] refuses them.
#[inline]
pub fn is_channel_data(packet: &[u8]) -> bool {
    matches!(packet.first(), Some(b) if b & 0xC0 == 0x40)
}

/// Parses a ChannelData frame (RFC 8656 range 0x4000–0x4FFF) without copying.
#[inline]
pub fn parse(packet: &[u8]) -> Result<ChannelData<'_>, ChannelDataError> {
    parse_up_to(packet, CHANNEL_MAX)
}

/// Parses a ChannelData frame with a channel number up to `max` (use
/// [`LEGACY_CHANNEL_MAX`] to accept RFC 5766 clients) without copying.
#[inline]
pub fn parse_up_to(packet: &[u8], max: u16) -> Result<ChannelData<'_>, ChannelDataError> {
    if packet.len() < HEADER_LEN {
        return Err(ChannelDataError::Truncated);
    }
    let channel = u16::from_be_bytes([packet[0], packet[1]]);
    if !(CHANNEL_MIN..=max.min(LEGACY_CHANNEL_MAX)).contains(&channel) {
        return Err(ChannelDataError::BadChannel(channel));
    }
    let declared = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let body = &packet[HEADER_LEN..];
    match body.get(..declared) {
        Some(data) => Ok(ChannelData { channel, data }),
        None => Err(ChannelDataError::LengthMismatch {
            declared,
            available: body.len(),
        }),
    }
}

/// Writes only the header for a payload of `data_len` bytes into `out[..4]`, for callers that
/// received the payload straight into `out[4..]` (no copy on the relay's hot path).
#[inline]
pub fn write_header(channel: u16, data_len: usize, out: &mut [u8]) -> Result<(), ChannelDataError> {
    if !(CHANNEL_MIN..=LEGACY_CHANNEL_MAX).contains(&channel) {
        return Err(ChannelDataError::BadChannel(channel));
    }
    let len = u16::try_from(data_len).map_err(|_| ChannelDataError::TooLong(data_len))?;
    let hdr = out
        .get_mut(..HEADER_LEN)
        .ok_or(ChannelDataError::TooLong(data_len))?;
    hdr[..2].copy_from_slice(&channel.to_be_bytes());
    hdr[2..].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Encodes a frame without padding (the UDP form); returns the bytes written.
pub fn encode(channel: u16, data: &[u8], out: &mut [u8]) -> Result<usize, ChannelDataError> {
    let total = HEADER_LEN + data.len();
    if out.len() < total {
        return Err(ChannelDataError::TooLong(data.len()));
    }
    write_header(channel, data.len(), out)?;
    out[HEADER_LEN..total].copy_from_slice(data);
    Ok(total)
}

/// Length of a frame with `data_len` payload bytes padded to a multiple of four.
#[inline]
pub fn padded_len(data_len: usize) -> usize {
    HEADER_LEN + data_len.div_ceil(4) * 4
}

/// Encodes a frame padded with zeros to a multiple of four (required over TCP/TLS); returns the
/// bytes written.
pub fn encode_padded(channel: u16, data: &[u8], out: &mut [u8]) -> Result<usize, ChannelDataError> {
    let total = padded_len(data.len());
    if out.len() < total {
        return Err(ChannelDataError::TooLong(data.len()));
    }
    let n = encode(channel, data, out)?;
    out[n..total].fill(0);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_unpadded_and_padded() {
        let mut out = [0u8; 64];
        let n = encode(0x4001, b"hello", &mut out).unwrap();
        assert_eq!(n, 9);
        assert_eq!(&out[..4], &[0x40, 0x01, 0x00, 0x05]);
        let cd = parse(&out[..n]).unwrap();
        assert_eq!(cd.channel, 0x4001);
        assert_eq!(cd.data, b"hello");

        let n = encode_padded(0x4FFF, b"hello", &mut out).unwrap();
        assert_eq!(n, 12);
        assert_eq!(&out[9..12], &[0, 0, 0]);
        let cd = parse(&out[..n]).unwrap();
        assert_eq!(cd.channel, 0x4FFF);
        assert_eq!(cd.data, b"hello", "padding is not payload");
        assert_eq!(padded_len(0), 4);
        assert_eq!(padded_len(4), 8);
        assert_eq!(padded_len(5), 12);
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(parse(&[0x40, 0x00, 0x00]), Err(ChannelDataError::Truncated));
        assert_eq!(
            parse(&[0x50, 0x00, 0x00, 0x00]),
            Err(ChannelDataError::BadChannel(0x5000))
        );
        assert_eq!(
            parse(&[0x3F, 0xFF, 0x00, 0x00]),
            Err(ChannelDataError::BadChannel(0x3FFF))
        );
        assert_eq!(
            parse(&[0x40, 0x00, 0x00, 0x05, 1, 2]),
            Err(ChannelDataError::LengthMismatch {
                declared: 5,
                available: 2
            })
        );
        assert_eq!(
            parse_up_to(&[0x71, 0xee, 0x00, 0x00], LEGACY_CHANNEL_MAX)
                .unwrap()
                .channel,
            0x71ee
        );
        assert!(parse_up_to(&[0x80, 0x00, 0x00, 0x00], LEGACY_CHANNEL_MAX).is_err());
        let mut out = [0u8; 8];
        assert_eq!(
            encode(0x4000, &[0; 5], &mut out),
            Err(ChannelDataError::TooLong(5))
        );
        assert_eq!(
            encode(0x3000, &[0; 1], &mut out),
            Err(ChannelDataError::BadChannel(0x3000))
        );
        let big = vec![0u8; 70_000];
        let mut out = vec![0u8; 70_010];
        assert_eq!(
            encode(0x4000, &big, &mut out),
            Err(ChannelDataError::TooLong(70_000))
        );
    }

    #[test]
    fn demultiplexes_against_stun() {
        assert!(is_channel_data(&[0x40, 0, 0, 0]));
        assert!(is_channel_data(&[0x7F, 0, 0, 0]));
        assert!(!is_channel_data(&[0x00, 1, 0, 0]));
        assert!(!is_channel_data(&[0x80]));
        assert!(!is_channel_data(&[]));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn encode_parse_round_trip(ch in CHANNEL_MIN..=CHANNEL_MAX, data in proptest::collection::vec(any::<u8>(), 0..300), pad in any::<bool>()) {
            let mut out = vec![0u8; 400];
            let n = if pad { encode_padded(ch, &data, &mut out).unwrap() } else { encode(ch, &data, &mut out).unwrap() };
            let cd = parse(&out[..n]).unwrap();
            prop_assert_eq!(cd.channel, ch);
            prop_assert_eq!(cd.data, &data[..]);
        }
    }
}
