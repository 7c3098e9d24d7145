//! Framing of TURN over stream transports (TCP, TLS; RFC 8656 §3.1, §12.5): a byte stream
//! carries STUN messages and ChannelData messages back to back, and this module cuts it into
//! messages again. Sans-IO: the driver reads into [`StreamFramer::read_space`], reports how many
//! bytes arrived with [`StreamFramer::commit`], then takes whole messages from
//! [`StreamFramer::next_frame`] until it returns `Ok(None)`.
//!
//! * The first two bits of a message tell the kind (RFC 8656 §12): `00` STUN, `01`
//!   ChannelData; `10`/`11` can start neither, and the stream is out of sync for good
//!   ([`FrameError::BadFirstByte`]).
//! * A STUN message is its 20-byte header plus the length in the header, a multiple of 4
//!   (RFC 8489 §5); the magic cookie is checked as soon as the header is in.
//! * Over a stream a ChannelData message is padded to a multiple of 4 (RFC 8656 §12.5): the
//!   frame handed out is header + data without the padding, the padding is skipped.
//! * A message may arrive split over many reads, or many in one read. The buffer grows only to
//!   the message being assembled and never beyond `max_frame` (+ the read chunk): a declared
//!   length beyond it is [`FrameError::TooLong`]. An idle connection holds no buffer.
//!
//! [`encode_channel_data`] writes the padded form a stream needs.

use super::codec::{MAGIC_COOKIE, STUN_HEADER_LEN};
use crate::channeldata::{self, HEADER_LEN as CD_HEADER_LEN};

/// Largest message a stream can carry: a ChannelData header, 65,535 bytes of data and 1 byte of
/// padding, or a STUN header with a 65,532-byte body (lengths are 16-bit).
pub const MAX_STREAM_FRAME: usize = CD_HEADER_LEN + u16::MAX as usize + 1;

/// Bytes asked for per read when no longer message is being assembled.
pub const READ_CHUNK: usize = 2048;

/// Buffers larger than this are given back once they are empty (one large message must not
/// pin 64 KiB on an idle connection).
const SHRINK_ABOVE: usize = 16 * 1024;

/// Why a stream cannot be framed any further. Every error ends the connection: there is no way
/// to find the start of the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first two bits are `10` or `11`: neither STUN nor ChannelData.
    #[error("byte {0:#04x} starts neither a STUN nor a ChannelData message")]
    BadFirstByte(u8),
    /// A STUN header without the magic cookie 0x2112A442.
    #[error("STUN header without the magic cookie")]
    BadMagicCookie,
    /// A STUN length that is not a multiple of 4.
    #[error("STUN message length {0} is not a multiple of 4")]
    BadStunLength(usize),
    /// A message longer than this framer accepts.
    #[error("message of {declared} bytes exceeds the limit of {max}")]
    TooLong {
        /// Length the header declares (whole message, padding included).
        declared: usize,
        /// The framer's limit.
        max: usize,
    },
}

/// Kind of a framed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A STUN message (request, indication, response).
    Stun,
    /// A ChannelData message.
    ChannelData,
}

/// One framed message, borrowed from the framer's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// STUN or ChannelData.
    pub kind: FrameKind,
    /// The whole message as a datagram would carry it (ChannelData: header + data, without
    /// the stream padding).
    pub bytes: &'a [u8],
}

/// Incremental, bounded splitter of a TURN byte stream. See the module docs.
#[derive(Debug, Clone)]
pub struct StreamFramer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
    failed: Option<FrameError>,
}

impl Default for StreamFramer {
    fn default() -> Self {
        Self::new(MAX_STREAM_FRAME)
    }
}

/// `(message length with padding, length handed out)` from a complete header, or an error.
fn lengths(head: &[u8], max: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let Some(&first) = head.first() else {
        return Ok(None);
    };
    match first & 0xC0 {
        0x00 => {
            if head.len() < 8 {
                return Ok(None);
            }
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            if len % 4 != 0 {
                return Err(FrameError::BadStunLength(len));
            }
            if u32::from_be_bytes([head[4], head[5], head[6], head[7]]) != MAGIC_COOKIE {
                return Err(FrameError::BadMagicCookie);
            }
            let total = STUN_HEADER_LEN + len;
            if total > max {
                return Err(FrameError::TooLong {
                    declared: total,
                    max,
                });
            }
            Ok(Some((total, total)))
        }
        0x40 => {
            if head.len() < CD_HEADER_LEN {
                return Ok(None);
            }
            let data = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let unpadded = CD_HEADER_LEN + data;
            let padded = unpadded.next_multiple_of(4);
            if padded > max {
                return Err(FrameError::TooLong {
                    declared: padded,
                    max,
                });
            }
            Ok(Some((padded, unpadded)))
        }
        _ => Err(FrameError::BadFirstByte(first)),
    }
}

impl StreamFramer {
    /// A framer accepting messages up to `max_frame` bytes (at least a STUN header; at most
    /// [`MAX_STREAM_FRAME`] is ever needed).
    pub fn new(max_frame: usize) -> Self {
        StreamFramer {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame: max_frame.clamp(STUN_HEADER_LEN, MAX_STREAM_FRAME),
            failed: None,
        }
    }

    /// Bytes received but not yet handed out as a message (a message in progress).
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Bytes of buffer currently held.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Room to read into: at least what the message being assembled still needs (up to the
    /// limit), else [`READ_CHUNK`]. Call [`StreamFramer::commit`] with the bytes read. Empty
    /// while a whole message is waiting: drain [`StreamFramer::next_frame`] before reading, so
    /// the buffer never holds more than one message plus one read.
    pub fn read_space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = match lengths(&self.buf[..self.end], self.max_frame) {
            // A whole message (or an error) is waiting: take it with `next_frame` first.
            Ok(Some((total, _))) if self.end >= total => return &mut [],
            Err(_) => return &mut [],
            Ok(Some((total, _))) => total,
            Ok(None) => self.end + READ_CHUNK,
        };
        let want = need
            .max(self.end + READ_CHUNK)
            .min(self.max_frame + READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`StreamFramer::read_space`].
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies as much of `bytes` as fits the room [`StreamFramer::read_space`] offers and
    /// returns how many were taken (for callers that already hold the bytes: tests, fuzzing).
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let space = self.read_space();
        let n = space.len().min(bytes.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.commit(n);
        n
    }

    /// The next whole message, `Ok(None)` when more bytes are needed, or the error that ends
    /// the stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let avail = &self.buf[self.start..self.end];
        let (total, handed) = match lengths(avail, self.max_frame) {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.release_if_empty();
                return Ok(None);
            }
            Err(e) => {
                self.failed = Some(e);
                return Err(e);
            }
        };
        if avail.len() < total {
            return Ok(None);
        }
        let kind = if avail[0] & 0xC0 == 0 {
            FrameKind::Stun
        } else {
            FrameKind::ChannelData
        };
        let at = self.start;
        self.start += total;
        if self.start == self.end {
            // Everything consumed: the next read starts at the front (the frame below still
            // borrows the bytes, which stay where they are until the next `read_space`).
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(Frame {
            kind,
            bytes: &self.buf[at..at + handed],
        }))
    }

    fn release_if_empty(&mut self) {
        if self.start == self.end && self.buf.len() > SHRINK_ABOVE {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Bytes of a ChannelData message with `data_len` bytes of data on a stream (padded to 4).
pub fn channel_data_len(data_len: usize) -> usize {
    (CD_HEADER_LEN + data_len).next_multiple_of(4)
}

/// Encodes ChannelData in its stream form (padded to a multiple of 4 with zeros, RFC 8656
/// §12.5) into `out`; returns the bytes written.
pub fn encode_channel_data(
    channel: u16,
    data: &[u8],
    out: &mut [u8],
) -> Result<usize, channeldata::ChannelDataError> {
    let total = channel_data_len(data.len());
    let dst = out
        .get_mut(..total)
        .ok_or(channeldata::ChannelDataError::TooLong(data.len()))?;
    channeldata::write_header(channel, data.len(), dst)?;
    dst[CD_HEADER_LEN..CD_HEADER_LEN + data.len()].copy_from_slice(data);
    dst[CD_HEADER_LEN + data.len()..].fill(0);
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn stun(body_words: usize, tag: u8) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&((body_words * 4) as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[tag; 12]);
        m.extend(std::iter::repeat_n(tag, body_words * 4));
        m
    }

    fn cd(channel: u16, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; channel_data_len(data.len())];
        let n = encode_channel_data(channel, data, &mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    fn drain(f: &mut StreamFramer) -> Result<Vec<(FrameKind, Vec<u8>)>, FrameError> {
        let mut v = Vec::new();
        while let Some(fr) = f.next_frame()? {
            v.push((fr.kind, fr.bytes.to_vec()));
        }
        Ok(v)
    }

    #[test]
    fn many_messages_in_one_read_and_padding_is_skipped() {
        let mut bytes = stun(2, 1);
        bytes.extend(cd(0x4001, b"abcde"));
        bytes.extend(stun(0, 2));
        let mut f = StreamFramer::default();
        assert_eq!(f.push(&bytes), bytes.len());
        let got = drain(&mut f).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (FrameKind::Stun, stun(2, 1)));
        // Handed out without the 3 padding bytes.
        assert_eq!(got[1].1, [&[0x40, 0x01, 0, 5][..], b"abcde"].concat());
        assert_eq!(got[2], (FrameKind::Stun, stun(0, 2)));
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn a_message_split_across_reads_comes_out_whole() {
        let m = stun(5, 9);
        let mut f = StreamFramer::default();
        for b in &m[..m.len() - 1] {
            f.push(std::slice::from_ref(b));
            assert_eq!(f.next_frame().unwrap(), None);
        }
        f.push(&m[m.len() - 1..]);
        assert_eq!(f.next_frame().unwrap().unwrap().bytes, &m[..]);
    }

    #[test]
    fn bad_input_gives_typed_errors_that_stick() {
        let mut f = StreamFramer::default();
        f.push(&[0x80, 0, 0, 0]);
        assert_eq!(f.next_frame(), Err(FrameError::BadFirstByte(0x80)));
        assert_eq!(f.next_frame(), Err(FrameError::BadFirstByte(0x80)));
        let mut f = StreamFramer::default();
        f.push(&[0x00, 0x01, 0x00, 0x05, 0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(f.next_frame(), Err(FrameError::BadStunLength(5)));
        let mut f = StreamFramer::default();
        f.push(&[0x00, 0x01, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(f.next_frame(), Err(FrameError::BadMagicCookie));
        // A ChannelData length past the limit.
        let mut f = StreamFramer::new(1024);
        f.push(&[0x40, 0x00, 0x10, 0x00]);
        assert_eq!(
            f.next_frame(),
            Err(FrameError::TooLong {
                declared: 4100,
                max: 1024
            })
        );
    }

    #[test]
    fn buffer_stays_bounded_and_is_released_when_idle() {
        let mut f = StreamFramer::default();
        assert_eq!(f.capacity(), 0);
        let big = cd(0x4000, &vec![7u8; 60_000]);
        let mut off = 0;
        while off < big.len() {
            off += f.push(&big[off..]);
            assert!(f.capacity() <= MAX_STREAM_FRAME + READ_CHUNK);
        }
        assert_eq!(drain(&mut f).unwrap().len(), 1);
        assert_eq!(f.next_frame().unwrap(), None);
        assert_eq!(f.capacity(), 0);
    }

    proptest! {
        #[test]
        fn any_split_of_a_valid_stream_gives_the_same_messages(
            msgs in proptest::collection::vec((any::<bool>(), 0usize..300, any::<u8>()), 0..12),
            cuts in proptest::collection::vec(1usize..200, 1..50),
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for (is_cd, len, tag) in msgs {
                if is_cd {
                    let data = vec![tag; len];
                    stream.extend(cd(0x4000 + u16::from(tag), &data));
                    let mut m = vec![0u8; 4 + len];
                    channeldata::encode(0x4000 + u16::from(tag), &data, &mut m).unwrap();
                    want.push((FrameKind::ChannelData, m));
                } else {
                    let m = stun(len / 4, tag);
                    stream.extend(m.clone());
                    want.push((FrameKind::Stun, m));
                }
            }
            let mut f = StreamFramer::default();
            let mut got = Vec::new();
            let mut off = 0;
            let mut k = 0;
            while off < stream.len() {
                let n = cuts[k % cuts.len()].min(stream.len() - off);
                k += 1;
                let taken = f.push(&stream[off..off + n]);
                off += taken;
                got.extend(drain(&mut f).unwrap());
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(f.pending(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..20),
            max in 20usize..4096,
        ) {
            let mut f = StreamFramer::new(max);
            for c in chunks {
                let mut off = 0;
                while off < c.len() {
                    let n = f.push(&c[off..]);
                    if n == 0 { break; }
                    off += n;
                    if drain(&mut f).is_err() { return Ok(()); }
                    prop_assert!(f.capacity() <= max.max(20) + READ_CHUNK + 4);
                }
            }
        }
    }
}
