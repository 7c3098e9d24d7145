//! How many routers lie between this host and a STUN server, from the TTL of the server's
//! answer (`IP_RECVTTL`). With `BirthdayTtl = auto` the birthday pool pings get one less as
//! their TTL ([`pool_ttl`], at least 2): they pass every NAT on the way out (our own NATs are
//! on the path to the server, which saw the mapped address) and die two routers before the
//! server, so they do not reach a peer's NAT that is about as far as the server — where a
//! router that accepts unsolicited UDP would otherwise keep a conntrack entry for them that
//! breaks the peer's spray (see `docs/design/birthday.md`).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Tries (one STUN Binding request each) before giving up.
const TRIES: u32 = 3;
/// Wait for each answer.
const WAIT: Duration = Duration::from_millis(700);

/// Routers between us and `server` (IPv4), measured from the received TTL of a STUN answer:
/// the initial TTL is taken as the next of 64, 128, 255 at or above it. `None` if the server
/// did not answer or answered with a TTL that says nothing (no router at all). Blocking:
/// run it off the engine (`spawn_blocking`).
pub(crate) fn routers_to(server: SocketAddrV4, mark: Option<u32>) -> Option<u8> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    if let Some(m) = mark {
        crate::daemon::set_mark(&sock, m).ok()?;
    }
    set_recv_ttl(&sock).ok()?;
    sock.set_read_timeout(Some(WAIT)).ok()?;
    for _ in 0..TRIES {
        let tx: [u8; 12] = rand::random();
        let req = meshpunch_proto::stun::binding_request(tx, false, false);
        if sock.send_to(&req, SocketAddr::V4(server)).is_err() {
            continue;
        }
        while let Ok((bytes, ttl, from)) = recv_with_ttl(&sock) {
            if from != SocketAddr::V4(server)
                || meshpunch_proto::stun::peek_transaction_id(&bytes) != Some(tx)
            {
                continue;
            }
            return routers_from_ttl(ttl?);
        }
    }
    None
}

/// The TTL of unanswered pool pings for `routers` routers to the STUN server: one less (the
/// server is rarely nearer than a peer), but at least 2 (pass a home router).
pub(crate) fn pool_ttl(routers: u8) -> u8 {
    routers.saturating_sub(1).max(2)
}

/// Routers on the way, from a received TTL (initial TTL: the next of 64, 128, 255).
pub(crate) fn routers_from_ttl(ttl: u8) -> Option<u8> {
    let initial = match ttl {
        0..=64 => 64u8,
        65..=128 => 128,
        _ => 255,
    };
    Some(initial - ttl).filter(|h| *h > 0)
}

pub(crate) fn set_recv_ttl(sock: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVTTL,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram with the TTL it arrived with (`None` if the kernel gave none).
pub(crate) fn recv_with_ttl(sock: &UdpSocket) -> io::Result<(Vec<u8>, Option<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 1500];
    let mut cbuf = [0u64; 8];
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: every pointer in msg refers to a live local buffer of the stated size; the
    // cmsg walk stays within msg_controllen as the CMSG_* macros guarantee.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        let mut ttl = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        let from = SocketAddr::V4(SocketAddrV4::new(
            std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ));
        Ok((buf, ttl, from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_ttl_is_the_next_common_one() {
        assert_eq!(routers_from_ttl(62), Some(2));
        assert_eq!(routers_from_ttl(64), None);
        assert_eq!(routers_from_ttl(120), Some(8));
        assert_eq!(routers_from_ttl(250), Some(5));
        assert_eq!(routers_from_ttl(1), Some(63));
        // natlab with a shaped server link: a router, the internet router twice (through
        // the shaper's TUN device) -> 3; pool pings with TTL 2 die at the internet router.
        assert_eq!(pool_ttl(3), 2);
        assert_eq!(pool_ttl(1), 2);
        assert_eq!(pool_ttl(12), 11);
    }

    /// A real STUN server on loopback that sends with TTL 61: loopback does not decrement,
    /// so the answer looks as if three routers had forwarded it.
    #[test]
    fn stun_answer_ttl_gives_the_routers() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_ttl(61).unwrap();
        let addr = match server.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let srv = std::thread::spawn(move || {
            let stun = meshpunch_proto::stun::BindingServer::new(
                "test",
                [Some(SocketAddr::V4(addr)), None, None, None],
            );
            let mut buf = [0u8; 1500];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            let reply = stun.handle(0, from, &buf[..n]).unwrap();
            server.send_to(&reply.bytes, from).unwrap();
        });
        assert_eq!(routers_to(addr, None), Some(3));
        srv.join().unwrap();
    }
}
