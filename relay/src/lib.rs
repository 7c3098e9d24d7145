//! `meshpunch-relay`: a TURN server (RFC 8656 over UDP, TCP and TLS; relayed transport UDP)
//! built for throughput and safe by default.
//!
//! The protocol lives in [`meshpunch_proto::turn`] (sans-IO); this crate is the driver:
//! [`config`] resolves TOML + flags + `--dev`, [`worker`] runs one data-plane thread per CPU
//! (`SO_REUSEPORT`, epoll, `recvmmsg`/`sendmmsg` with GRO/GSO from [`udp`]), [`admin`] serves
//! `/metrics` and `/healthz`, [`stream`] serves TURN over TCP/TLS with the same core,
//! [`relayed`] binds relayed sockets out of the one port pool for every transport, and
//! [`Relay`] ties them together with graceful drain.
//!
//! Capacity: every allocation holds one relayed UDP port, so one relay IP carries at most as
//! many allocations as its port range has ports (16 384 for the default 49152–65535). Add
//! relay IPs (`relay_ips`) to go beyond.

pub mod admin;
pub mod client;
pub mod config;
pub mod metrics;
pub mod relayed;
pub mod stream;
pub mod udp;
pub mod worker;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;
use meshpunch_proto::turn::{PortPool, SharedLimits};

pub use config::RelayConfig;
use worker::Shared;

/// A running relay: its worker threads and shared state.
#[derive(Debug)]
pub struct Relay {
    listen: SocketAddr,
    listens: Vec<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    capacity: usize,
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    certs: Option<Arc<meshpunch_certs::CertManager>>,
}

impl Relay {
    /// Binds the listening sockets and starts the workers.
    pub fn start(cfg: RelayConfig) -> anyhow::Result<Relay> {
        let workers = cfg.workers.max(1);
        // Per listening address: the first socket resolves port 0, the others join it with
        // SO_REUSEPORT. Worker w gets socket w of every address.
        let mut per_worker: Vec<Vec<UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
        let mut listens = Vec::new();
        for addr in std::iter::once(cfg.listen).chain(cfg.also_listen.iter().copied()) {
            let first = worker::udp_socket(addr, true, cfg.socket_buffer)
                .with_context(|| format!("binding {addr}"))?;
            let bound = first.local_addr()?;
            listens.push(bound);
            per_worker[0].push(first);
            for sockets in per_worker.iter_mut().skip(1) {
                sockets.push(
                    worker::udp_socket(bound, true, cfg.socket_buffer)
                        .with_context(|| format!("binding worker socket on {bound}"))?,
                );
            }
        }
        let listen = listens[0];
        let pool = PortPool::new(
            cfg.relay_ips.clone(),
            cfg.ports.0,
            cfg.ports.1,
            cfg.user_quota,
        )
        .with_network_limits(cfg.network_quota, cfg.network_bandwidth)
        .with_token_seed(rand::random());
        let capacity = pool.capacity();
        ::metrics::gauge!(metrics::PORTS_CAPACITY).set(capacity as f64);
        let shared = Arc::new(Shared {
            pool: Mutex::new(pool),
            limits: SharedLimits::new(&cfg.server),
            draining: Default::default(),
            stop: Default::default(),
            socket_buffer: cfg.socket_buffer,
            gro: cfg.gso,
            wakers: Mutex::new(Vec::new()),
            reserved: Mutex::new(Default::default()),
        });
        let mut threads = Vec::new();
        let (mut tcp, mut tls, mut certs) = (None, None, None);
        if cfg.stream.enabled() {
            let s = stream::start(
                cfg.stream.clone(),
                cfg.server.clone(),
                shared.clone(),
                cfg.drain,
            )?;
            (tcp, tls, certs) = (s.tcp, s.tls, s.certs);
            threads.push(s.thread);
        }
        for (id, sock) in per_worker.into_iter().enumerate() {
            let shared = shared.clone();
            let server_cfg = cfg.server.clone();
            let gso = cfg.gso;
            let drain = cfg.drain;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("relay-worker-{id}"))
                    .spawn(move || {
                        if let Err(e) =
                            worker::run(id, sock, server_cfg, shared.clone(), gso, drain)
                        {
                            tracing::error!(worker = id, error = %e, "worker failed");
                        }
                    })?,
            );
        }
        tracing::info!(
            listen = ?listens,
            tcp = ?tcp,
            tls = ?tls,
            workers,
            relay_ips = ?cfg.relay_ips,
            ports = ?cfg.ports,
            capacity,
            "relay started"
        );
        Ok(Relay {
            listen,
            listens,
            shared,
            threads,
            capacity,
            tcp,
            tls,
            certs,
        })
    }

    /// The bound TURN-over-TCP address, if configured.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The bound TURN-over-TLS address, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// The bound listening address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Every bound listening address (`listen` first, then `also_listen`).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listens
    }

    /// Most allocations the relay can hold (relay IPs × port range).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Relayed ports in use.
    pub fn ports_in_use(&self) -> usize {
        self.shared.pool.lock().map_or(0, |p| p.in_use())
    }

    /// A cheap handle for health checks and signal handlers.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
            certs: self.certs.clone(),
        }
    }

    /// Waits for every worker to finish (after [`Control::drain`] or [`Control::stop`]).
    pub fn join(mut self) {
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Drain/stop switch and health of a running relay.
#[derive(Debug, Clone)]
pub struct Control {
    shared: Arc<Shared>,
    certs: Option<Arc<meshpunch_certs::CertManager>>,
}

impl Control {
    /// Refuse new allocations; workers exit once their allocations are gone or the drain
    /// period ends.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.wake_all();
        ::metrics::gauge!(metrics::DRAINING).set(1.0);
    }

    /// Stop now.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake_all();
    }

    /// True while draining (health checks report 503 so load balancers move on).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Relayed ports in use.
    pub fn ports_in_use(&self) -> usize {
        self.shared.pool.lock().map_or(0, |p| p.in_use())
    }

    /// Re-reads the TLS certificate files now (SIGHUP); a no-op without TLS. On error the
    /// current certificate stays.
    pub fn reload_tls(&self) {
        if let Some(m) = &self.certs {
            match m.reload() {
                Ok(_) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the current one")
                }
            }
        }
    }
}
