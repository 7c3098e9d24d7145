//! The daemon's WireGuard side: where a peer's outgoing WireGuard packets come from and where
//! the packets received for it go. Everything else in the daemon sees only this interface:
//!
//! * inbound: every side hands the engine [`FromWg`] messages on one channel (a packet for peer
//!   `i` that the fast path did not send, or "the fast path is sending for peer `i`");
//! * outbound: [`WgSide::deliver`] gives one received (encrypted) datagram to WireGuard;
//! * the fast path: a side may send peer `i`'s packets itself on the direct route the engine
//!   publishes in the peer's [`FastPath`] (the proxy reader does; an in-process device can).
//!
//! Two kinds of side: [`WgSide::Proxy`], one 127.0.0.1 UDP port per peer that the kernel's (or
//! any) WireGuard sends that peer's packets to ([`super::proxy`]); and [`WgSide::Device`], the
//! built-in WireGuard on a TUN device (`--tun`, [`crate::tun`], [`super::device`]), whose
//! reader sends [`FromWg::Packet`] with `src: None` (or sends itself on the fast path) and whose
//! `deliver` arm decrypts into the device.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use super::device::DeviceSide;

/// What a WireGuard side hands the engine.
pub(super) enum FromWg {
    /// An outgoing packet for peer `.0` that the fast path could not send; `.2` is the local
    /// address it came from when the side is a proxy port (the engine learns WireGuard's
    /// address from the first one).
    Packet(usize, Vec<u8>, Option<SocketAddr>),
    /// The fast path sent packets for peer `.0` (data is flowing).
    Active(usize),
}

/// One peer's WireGuard side (see the module docs).
pub(super) enum WgSide {
    /// A loopback proxy port (`ProxyPort` in the config).
    Proxy(ProxyPort),
    /// The built-in WireGuard on a TUN device (`--tun`, [`super::device`]).
    Device(DeviceSide),
    /// A peer removed from the config at run time (SIGHUP, `meshpunch reload`): its proxy
    /// port is closed / its tunnel is gone; the slot stays so that indices never move.
    Removed,
}

/// A peer's loopback proxy port as the engine uses it (its reader task is
/// [`super::proxy::spawn_reader`]).
pub(super) struct ProxyPort {
    /// The proxy socket (the engine writes received packets from it).
    pub(super) sock: Arc<UdpSocket>,
    /// Its local address.
    pub(super) addr: SocketAddr,
    /// WireGuard's address (configured, or learned from the first packet).
    pub(super) wg: Option<SocketAddr>,
    /// The reader task, stopped when the port is dropped (which closes the port: the task
    /// holds the socket's other reference).
    pub(super) reader: tokio::task::AbortHandle,
}

impl Drop for ProxyPort {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl WgSide {
    /// Gives WireGuard one datagram received from the peer. Returns false when it could not
    /// be handed over (WireGuard's address not known yet, or the socket refused it).
    pub(super) fn deliver(&self, pkt: &[u8]) -> bool {
        match self {
            WgSide::Proxy(p) => match p.wg {
                Some(wg) => p.sock.try_send_to(pkt, wg).is_ok(),
                None => false,
            },
            WgSide::Device(d) => d.deliver(pkt),
            WgSide::Removed => false,
        }
    }

    /// An outgoing packet came from `src`: a proxy port learns WireGuard's address from the
    /// first one (its reader already refuses every other address afterwards).
    pub(super) fn learn_source(&mut self, src: Option<SocketAddr>) {
        match self {
            WgSide::Proxy(p) => {
                if p.wg.is_none() {
                    p.wg = src;
                }
            }
            WgSide::Device(_) | WgSide::Removed => {}
        }
    }

    /// The peer's path came up (from none): the built-in device starts its handshake at once.
    pub(super) fn path_up(&self) {
        if let WgSide::Device(d) = self {
            d.path_up();
        }
    }

    /// The built-in device, for a [`WgSide::Device`].
    pub(super) fn device(&self) -> Option<&crate::tun::Device> {
        match self {
            WgSide::Proxy(_) | WgSide::Removed => None,
            WgSide::Device(d) => Some(&d.dev),
        }
    }

    /// The local address shown in `meshpunch status` (the proxy port; `0.0.0.0:0` for the
    /// built-in device, which has none).
    pub(super) fn status_addr(&self) -> SocketAddr {
        match self {
            WgSide::Proxy(p) => p.addr,
            WgSide::Device(_) | WgSide::Removed => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}
