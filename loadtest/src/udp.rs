//! Batched UDP socket I/O: `sendmmsg(2)` / `recvmmsg(2)` over preallocated buffers.
//!
//! Both the load generator and the bare forwarder move packets through these two types so
//! that one system call carries up to [`BATCH`] datagrams and nothing is allocated per packet.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;

/// Largest datagram the batches carry (a 1500-byte MTU leaves less; loopback allows more).
pub const MAX_DATAGRAM: usize = 2048;

/// Socket buffer size asked for on every load socket (4 MiB; as root `SO_*BUFFORCE` lifts the
/// `net.core.[rw]mem_max` cap).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket on `addr` with large send/receive buffers.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    grow_buffers(&sock);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn grow_buffers(sock: &socket2::Socket) {
    let fd = sock.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a valid socket owned by `sock`; the option value is a c_int that
        // lives for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                force,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // Not root: fall back to the capped variant; a smaller buffer is not an error.
            let _ = if plain == libc::SO_RCVBUF {
                sock.set_recv_buffer_size(SOCKET_BUFFER)
            } else {
                sock.set_send_buffer_size(SOCKET_BUFFER)
            };
        }
    }
}

/// Sets how long a blocking receive waits before giving up with `WouldBlock`/`TimedOut`.
pub fn set_read_timeout(sock: &UdpSocket, t: Duration) -> io::Result<()> {
    sock.set_read_timeout(Some(t))
}

fn sockaddr_from(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let sa: socket2::SockAddr = addr.into();
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = sa.len() as usize;
    // SAFETY: `sa` holds `len` initialised bytes of a sockaddr that fits in sockaddr_storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        );
    }
    (storage, sa.len())
}

fn sockaddr_to(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel filled `len` bytes of `storage` with a socket address.
    let sa = unsafe { socket2::SockAddr::new(*storage, len) };
    sa.as_socket()
}

/// A reusable batch of outgoing datagrams for `sendmmsg(2)`.
///
/// Fill slots with [`SendBatch::slot`] and [`SendBatch::set`], then [`SendBatch::send`].
pub struct SendBatch {
    bufs: Box<[[u8; MAX_DATAGRAM]]>,
    lens: [usize; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH],
    has_addr: [bool; BATCH],
    count: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    /// An empty batch (allocates its buffers once).
    pub fn new() -> Self {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: vec![zero_addr; BATCH].into_boxed_slice(),
            addr_lens: [0; BATCH],
            has_addr: [false; BATCH],
            count: 0,
        }
    }

    /// Number of datagrams queued.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// True when no more datagrams fit.
    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// Drops every queued datagram.
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// The buffer of slot `i` (`i < BATCH`), to write a datagram into before [`Self::set`].
    pub fn slot(&mut self, i: usize) -> &mut [u8; MAX_DATAGRAM] {
        &mut self.bufs[i]
    }

    /// The bytes of queued datagram `i` (`i < len()`).
    pub fn queued(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Queues the first `len` bytes of the next free slot, to `to` (or to the connected peer
    /// when `None`). Returns the index used. The caller checks [`Self::is_full`] first.
    pub fn push_slot(&mut self, len: usize, to: Option<SocketAddr>) -> usize {
        let i = self.count;
        self.lens[i] = len.min(MAX_DATAGRAM);
        match to {
            Some(a) => {
                let (s, l) = sockaddr_from(a);
                self.addrs[i] = s;
                self.addr_lens[i] = l;
                self.has_addr[i] = true;
            }
            None => self.has_addr[i] = false,
        }
        self.count += 1;
        i
    }

    /// Copies `data` into the next free slot and queues it. Returns false when full.
    pub fn push(&mut self, data: &[u8], to: Option<SocketAddr>) -> bool {
        if self.is_full() || data.len() > MAX_DATAGRAM {
            return false;
        }
        let i = self.count;
        self.bufs[i][..data.len()].copy_from_slice(data);
        self.push_slot(data.len(), to);
        true
    }

    /// Sends every queued datagram with as few `sendmmsg` calls as needed, then empties the
    /// batch. Returns how many were handed to the kernel; datagrams refused with an error
    /// (for example `ECONNREFUSED` from an earlier ICMP) are counted as not sent.
    pub fn send(&mut self, sock: &UdpSocket) -> usize {
        let n = self.count;
        if n == 0 {
            return 0;
        }
        // SAFETY: iovec and mmsghdr are plain old data; all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iov[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = self.lens[i];
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            if self.has_addr[i] {
                h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = self.addr_lens[i];
            }
        }
        let fd = sock.as_raw_fd();
        let mut done = 0usize;
        let mut failures = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point into buffers owned by self/iov that outlive the
            // call; the count passed matches the slice length.
            let rc = unsafe {
                libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as libc::c_uint, 0)
            };
            if rc > 0 {
                done += rc as usize;
            } else {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Skip the datagram the kernel refused and go on with the rest.
                done += 1;
                failures += 1;
            }
        }
        self.count = 0;
        n - failures
    }
}

/// Asks the kernel to attach the socket's receive-queue drop counter (`SO_RXQ_OVFL`) to every
/// received datagram; [`RecvBatch::rxq_ovfl`] reads it. Returns whether the kernel accepted.
pub fn enable_rxq_ovfl(sock: &UdpSocket) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: valid socket and a c_int option value that outlives the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Bytes of control-message room per received datagram (one `SO_RXQ_OVFL` u32, with slack).
const CMSG_ROOM: usize = 64;

/// One datagram's control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Cmsg([u8; CMSG_ROOM]);

/// A reusable batch of incoming datagrams for `recvmmsg(2)`.
pub struct RecvBatch {
    bufs: Box<[[u8; MAX_DATAGRAM]]>,
    lens: [usize; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH],
    cmsgs: Box<[Cmsg]>,
    cmsg_lens: [usize; BATCH],
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// An empty batch (allocates its buffers once).
    pub fn new() -> Self {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: vec![zero_addr; BATCH].into_boxed_slice(),
            addr_lens: [0; BATCH],
            cmsgs: vec![Cmsg([0; CMSG_ROOM]); BATCH].into_boxed_slice(),
            cmsg_lens: [0; BATCH],
            count: 0,
        }
    }

    /// Receives up to [`BATCH`] datagrams: blocks (up to the socket's read timeout) for the
    /// first one and takes whatever else is already queued. Returns the count; 0 on timeout.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain old data; all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iov[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = MAX_DATAGRAM;
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
            h.msg_controllen = CMSG_ROOM as _;
        }
        self.count = 0;
        loop {
            // SAFETY: msgs point into buffers owned by self/iov that outlive the call;
            // BATCH matches the array length; a null timeout means "use SO_RCVTIMEO".
            let rc = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                let n = rc as usize;
                for (i, m) in msgs.iter().enumerate().take(n) {
                    self.lens[i] = m.msg_len as usize;
                    self.addr_lens[i] = m.msg_hdr.msg_namelen;
                    #[allow(clippy::unnecessary_cast)] // socklen_t on some libcs
                    let controllen = m.msg_hdr.msg_controllen as usize;
                    self.cmsg_lens[i] = controllen.min(CMSG_ROOM);
                }
                self.count = n;
                return Ok(n);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(0),
                // An ICMP port unreachable from an earlier send surfaces here; not fatal.
                io::ErrorKind::ConnectionRefused => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Number of datagrams from the last [`Self::recv`].
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the last receive got nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` of the last receive.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i].min(MAX_DATAGRAM)]
    }

    /// Datagram `i` of the last receive, writable (to rewrite in place before forwarding).
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let len = self.lens[i].min(MAX_DATAGRAM);
        &mut self.bufs[i][..len]
    }

    /// The socket's cumulative receive-queue drop counter as attached to datagram `i`
    /// (`SO_RXQ_OVFL`, see [`enable_rxq_ovfl`]); `None` when the kernel attached none.
    pub fn rxq_ovfl(&self, i: usize) -> Option<u32> {
        if i >= self.count {
            return None;
        }
        // SAFETY: a msghdr that only describes our control buffer of `cmsg_lens[i]` bytes, as
        // the kernel filled it; the CMSG helpers never read past msg_controllen.
        unsafe {
            let mut h: libc::msghdr = std::mem::zeroed();
            h.msg_control = self.cmsgs[i].0.as_ptr() as *mut libc::c_void;
            h.msg_controllen = self.cmsg_lens[i] as _;
            let mut c = libc::CMSG_FIRSTHDR(&h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                }
                c = libc::CMSG_NXTHDR(&h, c);
            }
        }
        None
    }

    /// Source address of datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to(&self.addrs[i], self.addr_lens[i])
    }
}

/// Receives one datagram with a timeout into `buf` (setup traffic, not the hot path).
pub fn recv_timeout(
    sock: &UdpSocket,
    buf: &mut [u8],
    t: Duration,
) -> io::Result<Option<(usize, SocketAddr)>> {
    sock.set_read_timeout(Some(t))?;
    match sock.recv_from(buf) {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One datagram to forward straight out of a [`RecvBatch`] buffer: slot, byte range, target.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// Index of the received datagram.
    pub slot: usize,
    /// First byte to send.
    pub offset: usize,
    /// Bytes to send.
    pub len: usize,
    /// Destination.
    pub to: SocketAddr,
}

impl RecvBatch {
    /// Sends byte ranges of received datagrams with `sendmmsg`, without copying them.
    /// Returns how many the kernel accepted.
    pub fn forward(&mut self, sock: &UdpSocket, items: &[Forward]) -> usize {
        let n = items.len().min(BATCH);
        if n == 0 {
            return 0;
        }
        // SAFETY: iovec, mmsghdr and sockaddr_storage are plain old data; all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        for (i, f) in items.iter().take(n).enumerate() {
            let slot = f.slot.min(BATCH - 1);
            let end = (f.offset + f.len).min(self.lens[slot]).min(MAX_DATAGRAM);
            let start = f.offset.min(end);
            iov[i].iov_base = self.bufs[slot][start..].as_mut_ptr().cast();
            iov[i].iov_len = end - start;
            let (s, l) = sockaddr_from(f.to);
            names[i] = s;
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = l;
        }
        let fd = sock.as_raw_fd();
        let mut done = 0usize;
        let mut failures = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point into self.bufs, iov and names, all alive for the call.
            let rc = unsafe {
                libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as libc::c_uint, 0)
            };
            if rc > 0 {
                done += rc as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                done += 1;
                failures += 1;
            }
        }
        n - failures
    }
}
