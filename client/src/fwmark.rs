//! The process's firewall mark (`FwMark` / `--fwmark`) for the sockets `meshpunch up` opens
//! outside the engine: the TLS-over-TCP fallback connection to the rendezvous, TURN over
//! TCP/TLS, the port mapper's sockets (PCP / NAT-PMP / UPnP) and the background
//! binding-lifetime probes. (The data socket and the birthday pool sockets get the
//! mark from [`crate::daemon::Extras`].) Set once by `meshpunch up`; 0 = no mark.

use std::sync::atomic::{AtomicU32, Ordering};

static MARK: AtomicU32 = AtomicU32::new(0);

/// Sets the mark every later socket of [`apply`] gets (`None` = none).
pub fn set_process_mark(mark: Option<u32>) {
    MARK.store(mark.unwrap_or(0), Ordering::Relaxed);
}

/// The process's mark, if any.
pub fn process_mark() -> Option<u32> {
    match MARK.load(Ordering::Relaxed) {
        0 => None,
        m => Some(m),
    }
}

/// Opens a TCP connection to `addr` from a socket carrying the process's mark (if one is set):
/// in a full tunnel meshpunch's own TCP (the rendezvous fallback, TURN over TCP/TLS) must not
/// be routed into the tunnel.
pub async fn tcp_connect(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    if process_mark().is_none() {
        return tokio::net::TcpStream::connect(addr).await;
    }
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    apply(&s)?;
    s.connect(addr).await
}

/// Marks `sock` with the process's mark, if one is set.
pub fn apply<S: std::os::fd::AsFd>(sock: &S) -> std::io::Result<()> {
    match process_mark() {
        Some(m) => socket2::SockRef::from(sock).set_mark(m),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process mark reaches a socket (as root; without CAP_NET_ADMIN the kernel refuses
    /// SO_MARK, which `meshpunch up` reports as an error).
    #[test]
    fn process_mark_is_applied() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        set_process_mark(None);
        assert!(apply(&s).is_ok());
        assert_eq!(socket2::SockRef::from(&s).mark().ok(), Some(0));
        set_process_mark(Some(51820));
        let r = apply(&s);
        set_process_mark(None);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(r.is_ok(), "{r:?}");
            assert_eq!(socket2::SockRef::from(&s).mark().ok(), Some(51820));
        } else {
            assert!(r.is_err());
        }
    }
}
