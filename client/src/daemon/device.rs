//! The built-in WireGuard device (`--tun`, [`crate::tun::Device`]) as a WireGuard side: its
//! encrypted datagrams leave exactly as a proxy port's packets do — on the fast path straight
//! from the data (or pool) socket when the peer's selected path is direct, else to the engine
//! as [`FromWg::Packet`] — and the engine hands it received datagrams through
//! [`super::wg::WgSide::deliver`]. No loopback hop, no copy on the fast path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::proxy::{FastPath, FastRoute, FAST_NOTIFY};
use super::wg::FromWg;
use crate::tun::{Buffers, Device, TICK};

/// Where the device's outgoing datagrams go (shared by its reader, its timer task and the
/// engine's deliveries, which may answer with handshake responses).
pub(super) struct DeviceOut {
    /// Per peer: its fast path, and when the engine was last told that the fast path is
    /// sending (ms since `start`, +1 so that 0 means never). Written only when a peer is
    /// added at run time.
    fast: RwLock<Vec<(Arc<FastPath>, AtomicU64)>>,
    data: Arc<UdpSocket>,
    tx: mpsc::Sender<FromWg>,
    start: Instant,
}

impl DeviceOut {
    pub(super) fn new(
        fast: Vec<Arc<FastPath>>,
        data: Arc<UdpSocket>,
        tx: mpsc::Sender<FromWg>,
    ) -> DeviceOut {
        DeviceOut {
            fast: RwLock::new(fast.into_iter().map(|f| (f, AtomicU64::new(0))).collect()),
            data,
            tx,
            start: Instant::now(),
        }
    }

    /// Gives peer slot `i` (a peer added at run time; `i` = the count appends) its fast path.
    pub(super) fn set_fast(&self, i: usize, fast: Arc<FastPath>) {
        let Ok(mut v) = self.fast.write() else {
            return;
        };
        if i < v.len() {
            v[i] = (fast, AtomicU64::new(0));
        } else {
            while v.len() < i {
                v.push((Arc::new(FastPath::default()), AtomicU64::new(0)));
            }
            v.push((fast, AtomicU64::new(0)));
        }
    }

    /// Sends peer `i`'s datagram: itself on a published direct route, else through the
    /// engine (relay, no path yet, probing).
    pub(super) fn send(&self, i: usize, dg: &[u8]) {
        let Ok(v) = self.fast.read() else {
            return;
        };
        let Some((fast, notified)) = v.get(i) else {
            return;
        };
        match fast.current() {
            Some(FastRoute {
                dest, pool_sock, ..
            }) => {
                if let Err(e) = pool_sock
                    .as_ref()
                    .unwrap_or(&self.data)
                    .try_send_to(dg, dest)
                {
                    super::net::note_send_error(&e, dest);
                }
                fast.tx_bytes.fetch_add(dg.len() as u64, Ordering::Relaxed);
                fast.tx_packets.fetch_add(1, Ordering::Relaxed);
                // Tell the engine now and then that data flows (active probing).
                let now = self.start.elapsed().as_millis() as u64 + 1;
                let last = notified.load(Ordering::Relaxed);
                if last == 0 || now.saturating_sub(last) >= FAST_NOTIFY.as_millis() as u64 {
                    notified.store(now, Ordering::Relaxed);
                    let _ = self.tx.try_send(FromWg::Active(i));
                }
            }
            None => {
                // Full channel: dropped like a full socket buffer would (WireGuard and TCP
                // above it recover).
                let _ = self.tx.try_send(FromWg::Packet(i, dg.to_vec(), None));
            }
        }
    }
}

/// Peer `peer` of the device, as the engine's WireGuard side for that peer.
pub(super) struct DeviceSide {
    pub(super) dev: Arc<Device>,
    pub(super) peer: usize,
    pub(super) out: Arc<DeviceOut>,
    /// The engine's buffers for decryption (shared by all peers: one engine task).
    pub(super) bufs: Arc<Mutex<Buffers>>,
}

impl DeviceSide {
    /// Decrypts a received datagram into the TUN device; WireGuard's answers leave through
    /// [`DeviceOut::send`].
    pub(super) fn deliver(&self, pkt: &[u8]) -> bool {
        let Ok(mut b) = self.bufs.lock() else {
            return false;
        };
        self.dev
            .deliver(self.peer, pkt, &mut b, |i, dg| self.out.send(i, dg));
        true
    }
}

impl DeviceSide {
    /// The peer's path came up: start a handshake now if there is no session.
    pub(super) fn path_up(&self) {
        if let Ok(mut b) = self.bufs.lock() {
            self.dev
                .path_up(self.peer, &mut b, |i, dg| self.out.send(i, dg));
        }
    }
}

/// Starts the device's reader (TUN → encrypt → out) and its WireGuard timer task. Both end
/// when the daemon's runtime ends; the interface goes with the device's last reference.
pub(super) fn spawn(dev: Arc<Device>, out: Arc<DeviceOut>) {
    let (d, o) = (dev.clone(), out.clone());
    tokio::spawn(async move {
        if let Err(e) = d.run(|i, dg| o.send(i, dg)).await {
            tracing::error!(name = d.name(), error = %e, "reading the TUN device failed; the tunnel stops");
        }
    });
    tokio::spawn(async move {
        let mut b = Buffers::default();
        let mut t = tokio::time::interval(TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            dev.tick(&mut b, |i, dg| out.send(i, dg));
        }
    });
}
