//! Batched UDP I/O for the data plane (Linux): `recvmmsg` with UDP GRO on receive, `sendmmsg`
//! with UDP GSO on send. Every buffer is allocated once per worker; nothing here allocates per
//! packet.
//!
//! GSO: consecutive packets to the same destination from the same socket with the same size
//! are coalesced into one message carrying a `UDP_SEGMENT` control message, so the kernel walks
//! the stack once for up to 64 datagrams. GRO: a socket with `UDP_GRO` may hand us several
//! datagrams of one flow in one buffer; [`RecvBatch::segments`] splits them again.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::SockAddr;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Datagrams per `recvmmsg`.
pub const RECV_BATCH: usize = 64;
/// Bytes per receive buffer (a GRO batch can be up to 64 KiB).
pub const RECV_BUF: usize = 65_536;
/// Most datagrams one GSO message may carry (kernel UDP_MAX_SEGMENTS).
const MAX_SEGMENTS: usize = 64;
/// Largest GSO message payload.
const MAX_GSO_BYTES: usize = 65_000;
/// Messages per `sendmmsg`: everything one worker queued for one socket in a wake-up (up to
/// the listener's share, `LISTENER_ROUNDS × RECV_BATCH` in `worker.rs`) leaves in one call,
/// whatever its destinations.
const SEND_BATCH: usize = 1024;
/// Bytes of queued outgoing data before a flush is forced.
pub const ARENA: usize = 4 << 20;

fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE(len as u32) as usize }
}

/// One aligned unit of control-message storage. `CMSG_FIRSTHDR`/`CMSG_NXTHDR` cast the buffer
/// to `*mut cmsghdr` and the kernel writes `cmsghdr`s into it, so the buffer must start on a
/// `cmsghdr` boundary (a plain `Vec<u8>` only promises alignment 1).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgUnit([u8; 8]);

const _: () = assert!(std::mem::align_of::<CmsgUnit>() >= std::mem::align_of::<libc::cmsghdr>());

/// Control-message buffers for a batch: `slots` slots of `slot_len` bytes each, every slot
/// aligned for `cmsghdr` (`slot_len` is a `CMSG_SPACE`, a multiple of that alignment).
struct CmsgBuf {
    units: Vec<CmsgUnit>,
    slot_len: usize,
}

impl CmsgBuf {
    fn new(slots: usize, slot_len: usize) -> CmsgBuf {
        debug_assert_eq!(slot_len % std::mem::align_of::<libc::cmsghdr>(), 0);
        let units = (slots * slot_len).div_ceil(size_of::<CmsgUnit>());
        CmsgBuf {
            units: vec![CmsgUnit([0; 8]); units],
            slot_len,
        }
    }

    /// Start of slot `i` (aligned for `cmsghdr`); `None` past the end.
    fn slot(&mut self, i: usize) -> Option<*mut libc::c_void> {
        let off = i.checked_mul(self.slot_len)?;
        if off + self.slot_len > self.units.len() * size_of::<CmsgUnit>() {
            return None;
        }
        // SAFETY: `off + slot_len` lies within the allocation (checked above), so the offset
        // pointer stays in bounds; the base is aligned to 8 and `off` is a multiple of the
        // cmsghdr alignment, so the result is aligned for cmsghdr.
        Some(unsafe { self.units.as_mut_ptr().cast::<u8>().add(off) }.cast())
    }
}

/// Enables `UDP_GRO` on `fd`; returns whether the kernel accepted it.
pub fn enable_gro(fd: RawFd) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: valid fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Whether the kernel supports `UDP_SEGMENT` on `fd` (probe by setting it to 0).
pub fn gso_supported(fd: RawFd) -> bool {
    let zero: libc::c_int = 0;
    // SAFETY: as above.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_UDP,
            UDP_SEGMENT,
            (&zero as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// One `recvmmsg` worth of buffers.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: CmsgBuf,
    hdrs: Vec<libc::mmsghdr>,
    cmsg_len: usize,
    n: usize,
}

// SAFETY: the raw pointers inside point into the struct's own heap buffers, which move with it.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the buffers (once per worker).
    pub fn new() -> Self {
        let cmsg_len = cmsg_space(size_of::<libc::c_int>()) * 2;
        RecvBatch {
            bufs: vec![0u8; RECV_BATCH * RECV_BUF],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs valid when zeroed.
            names: vec![unsafe { zeroed() }; RECV_BATCH],
            iovs: vec![unsafe { zeroed() }; RECV_BATCH],
            cmsgs: CmsgBuf::new(RECV_BATCH, cmsg_len),
            hdrs: vec![unsafe { zeroed() }; RECV_BATCH],
            cmsg_len,
            n: 0,
        }
    }

    /// Receives up to [`RECV_BATCH`] datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..RECV_BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * RECV_BUF..].as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            match self.cmsgs.slot(i) {
                Some(c) => {
                    h.msg_control = c;
                    h.msg_controllen = self.cmsg_len as _;
                }
                None => {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by self that outlive the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = r as usize;
        Ok(self.n)
    }

    /// Datagram `i` of the last receive: source, bytes, GRO segment size (= len if none).
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        if i >= self.n {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(RECV_BUF);
        // SAFETY: the kernel filled names[i] with msg_namelen bytes of a socket address.
        let addr = unsafe { SockAddr::new(std::ptr::read(&self.names[i]), h.msg_hdr.msg_namelen) }
            .as_socket()?;
        let mut seg = len;
        // SAFETY: walking the control buffer the kernel filled, with the libc CMSG helpers.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    if v > 0 {
                        seg = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        let data = &self.bufs[i * RECV_BUF..i * RECV_BUF + len];
        Some((addr, data, seg))
    }
}

/// Splits a (possibly GRO-coalesced) buffer into its datagrams.
pub fn segments(data: &[u8], seg: usize) -> impl Iterator<Item = &[u8]> {
    data.chunks(seg.max(1))
}

#[derive(Clone, Copy)]
struct Entry {
    fd: RawFd,
    seq: u32,
    dst: SocketAddr,
    start: usize,
    len: usize,
    seg: usize,
    segs: usize,
}

/// Counters of a [`SendQueue`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SendStats {
    /// Datagrams handed to the kernel.
    pub datagrams: u64,
    /// `sendmmsg` calls.
    pub syscalls: u64,
    /// Datagrams dropped (socket buffer full, errors).
    pub dropped: u64,
}

/// Outgoing datagrams of one worker, coalesced and flushed in batches.
pub struct SendQueue {
    arena: Vec<u8>,
    used: usize,
    entries: Vec<Entry>,
    gso: bool,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: CmsgBuf,
    hdrs: Vec<libc::mmsghdr>,
    cmsg_len: usize,
    seq: u32,
    /// Counters.
    pub stats: SendStats,
}

// SAFETY: as for RecvBatch.
unsafe impl Send for SendQueue {}

impl SendQueue {
    /// A queue; `gso` enables segmentation offload.
    pub fn new(gso: bool) -> Self {
        let cmsg_len = cmsg_space(size_of::<u16>());
        SendQueue {
            arena: vec![0u8; ARENA],
            used: 0,
            entries: Vec::with_capacity(ARENA / 64),
            gso,
            // SAFETY: plain C structs, valid zeroed.
            names: vec![unsafe { zeroed() }; SEND_BATCH],
            iovs: vec![unsafe { zeroed() }; SEND_BATCH],
            cmsgs: CmsgBuf::new(SEND_BATCH, cmsg_len),
            hdrs: vec![unsafe { zeroed() }; SEND_BATCH],
            cmsg_len,
            seq: 0,
            stats: SendStats::default(),
        }
    }

    /// Whether GSO is (still) in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// True when the queue should be flushed before more is pushed.
    pub fn is_full(&self) -> bool {
        self.used + RECV_BUF + 64 > self.arena.len()
            || self.entries.len() + 1 >= self.entries.capacity()
    }

    /// Queues `head ++ body` for `dst` on socket `fd` (copies into the arena).
    #[inline]
    pub fn push(&mut self, fd: RawFd, dst: SocketAddr, head: &[u8], body: &[u8]) {
        let len = head.len() + body.len();
        if len == 0
            || self.used + len > self.arena.len()
            || self.entries.len() >= self.entries.capacity()
        {
            self.stats.dropped += 1;
            return;
        }
        let start = self.used;
        self.arena[start..start + head.len()].copy_from_slice(head);
        self.arena[start + head.len()..start + len].copy_from_slice(body);
        self.used += len;
        if self.gso {
            if let Some(last) = self.entries.last_mut() {
                // Coalesce: same socket and destination, contiguous, equal-sized segments
                // (the last one may be shorter, after which nothing more may join).
                if last.fd == fd
                    && last.dst == dst
                    && last.start + last.len == start
                    && last.len == last.seg * last.segs
                    && len <= last.seg
                    && last.segs < MAX_SEGMENTS
                    && last.len + len <= MAX_GSO_BYTES
                {
                    last.len += len;
                    last.segs += 1;
                    return;
                }
            }
        }
        self.seq = self.seq.wrapping_add(1);
        self.entries.push(Entry {
            fd,
            seq: self.seq,
            dst,
            start,
            len,
            seg: len,
            segs: 1,
        });
    }

    /// Sends everything queued.
    pub fn flush(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        // Group by socket, keeping order within one socket (in place: no allocation).
        self.entries.sort_unstable_by_key(|e| (e.fd, e.seq));
        let mut i = 0;
        while i < self.entries.len() {
            let fd = self.entries[i].fd;
            let mut j = i;
            while j < self.entries.len() && self.entries[j].fd == fd && j - i < SEND_BATCH {
                j += 1;
            }
            self.send_run(i, j);
            i = j;
        }
        self.entries.clear();
        self.used = 0;
    }

    fn send_run(&mut self, from: usize, to: usize) {
        let fd = self.entries[from].fd;
        let n = to - from;
        for k in 0..n {
            let e = self.entries[from + k];
            let sa = SockAddr::from(e.dst);
            // SAFETY: copying the socket address bytes into our storage slot.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sa.as_ptr().cast::<u8>(),
                    (&mut self.names[k] as *mut libc::sockaddr_storage).cast::<u8>(),
                    sa.len() as usize,
                );
            }
            self.iovs[k] = libc::iovec {
                iov_base: self.arena[e.start..].as_mut_ptr().cast(),
                iov_len: e.len,
            };
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = sa.len();
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            let slot = if e.segs > 1 { self.cmsgs.slot(k) } else { None };
            if let Some(c) = slot {
                h.msg_control = c;
                h.msg_controllen = self.cmsg_len as _;
                // SAFETY: the control buffer (aligned for cmsghdr, see CmsgBuf) has room for
                // one cmsg carrying a u16, so CMSG_FIRSTHDR is non-null and in bounds.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(h);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), e.seg as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        let mut done = 0;
        while done < n {
            // SAFETY: headers point at buffers owned by self, alive for the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            self.stats.syscalls += 1;
            if r > 0 {
                for k in done..done + r as usize {
                    self.stats.datagrams += self.entries[from + k].segs as u64;
                }
                done += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            let e = self.entries[from + done];
            if e.segs > 1 && matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) {
                // The device cannot segment: fall back to plain datagrams for good.
                self.gso = false;
                self.send_segments(fd, e);
            } else {
                // Buffer full or the destination unreachable: UDP drops.
                self.stats.dropped += e.segs as u64;
            }
            done += 1;
        }
    }

    fn send_segments(&mut self, fd: RawFd, e: Entry) {
        let sa = SockAddr::from(e.dst);
        let mut off = 0;
        while off < e.len {
            let l = e.seg.min(e.len - off);
            let buf = &self.arena[e.start + off..e.start + off + l];
            // SAFETY: valid fd, buffer and address.
            let r = unsafe {
                libc::sendto(
                    fd,
                    buf.as_ptr().cast(),
                    l,
                    libc::MSG_DONTWAIT,
                    sa.as_ptr().cast(),
                    sa.len(),
                )
            };
            self.stats.syscalls += 1;
            if r < 0 {
                self.stats.dropped += 1;
            } else {
                self.stats.datagrams += 1;
            }
            off += l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn batched_send_and_receive_round_trip_with_and_without_gso() {
        for gso in [false, true] {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let b = UdpSocket::bind("127.0.0.1:0").unwrap();
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let gso = gso && gso_supported(a.as_raw_fd());
            let mut q = SendQueue::new(gso);
            let dst = b.local_addr().unwrap();
            for i in 0..10u8 {
                q.push(a.as_raw_fd(), dst, &[i], &[7u8; 99]);
            }
            q.push(a.as_raw_fd(), dst, &[], b"short");
            q.flush();
            assert_eq!(q.stats.datagrams, 11);
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while got.len() < 11 {
                let (n, from) = b.recv_from(&mut buf).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                got.push(buf[..n].to_vec());
            }
            for (i, g) in got.iter().take(10).enumerate() {
                assert_eq!(g.len(), 100);
                assert_eq!(g[0], i as u8);
            }
            assert_eq!(got[10], b"short");
            if gso {
                assert!(q.stats.syscalls <= 2, "coalesced: {:?}", q.stats);
            }
        }
    }

    /// Realistic relay traffic: datagrams for many destinations, interleaved over two sockets
    /// (two allocations), different sizes: no GSO run forms, yet one `sendmmsg` per socket
    /// carries all of that socket's datagrams, in order per socket.
    #[test]
    fn interleaved_destinations_leave_in_one_sendmmsg_per_socket() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peers: Vec<UdpSocket> = (0..8)
            .map(|_| {
                let p = UdpSocket::bind("127.0.0.1:0").unwrap();
                p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                p
            })
            .collect();
        let mut q = SendQueue::new(gso_supported(a.as_raw_fd()));
        let n = 400usize;
        for i in 0..n {
            let from = if i % 2 == 0 { &a } else { &b };
            let to = peers[i % peers.len()].local_addr().unwrap();
            let len = 32 + (i * 37) % 1400;
            let mut body = vec![0u8; len];
            body[..4].copy_from_slice(&(i as u32).to_be_bytes());
            q.push(from.as_raw_fd(), to, &[], &body);
        }
        q.flush();
        assert_eq!(q.stats.datagrams, n as u64, "{:?}", q.stats);
        assert_eq!(q.stats.dropped, 0, "{:?}", q.stats);
        assert_eq!(
            q.stats.syscalls, 2,
            "one sendmmsg per socket: {:?}",
            q.stats
        );
        let mut buf = [0u8; 2048];
        for (k, p) in peers.iter().enumerate() {
            let mut last: Option<u32> = None;
            for _ in 0..n / peers.len() {
                let (len, _) = p.recv_from(&mut buf).unwrap();
                let i = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                assert_eq!(i as usize % peers.len(), k);
                assert_eq!(len, 32 + (i as usize * 37) % 1400);
                // Each peer hears from one socket (i and k share parity): order kept.
                assert!(last.is_none_or(|l| l < i), "{last:?} then {i}");
                last = Some(i);
            }
        }
    }

    #[test]
    fn recv_batch_reads_several_datagrams() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(b.as_raw_fd());
        for i in 0..5u8 {
            a.send_to(&[i; 10], b.local_addr().unwrap()).unwrap();
        }
        let mut rb = RecvBatch::new();
        let mut seen = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen < 5 && std::time::Instant::now() < deadline {
            let n = match rb.recv(b.as_raw_fd()) {
                Ok(n) => n,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            for i in 0..n {
                let (from, data, seg) = rb.get(i).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                for s in segments(data, seg) {
                    assert_eq!(s.len(), 10);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 5);
    }
}
