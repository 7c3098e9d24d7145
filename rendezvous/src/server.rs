//! The rendezvous server: QUIC listener and TLS-over-TCP listener ([`crate::tcp`]), one task
//! per connection running the session state machine (hello → challenge → key proof →
//! registered) over either transport, and the dispatcher that routes registry deliveries to
//! local connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use meshpunch_proto::connect::{join_host_port, ConnectString};
use meshpunch_proto::session::{ServerEvent, ServerSession, ServerSessionConfig, TokenCheck};
use meshpunch_proto::token::{self, Revocations, Token, TokenError};
use meshpunch_proto::wire::{
    self, Answer, Candidate, ErrorCode, FrameDecoder, GoAwayReason, IncomingOffer, Message, Offer,
    PeerKey, PunchStart, Registered, RelayRegion, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::limits::{ConnCounter, ConnSlot, RateLimiter, TokenBucket};
use crate::metrics as m;
use crate::registry::{self, ConnId, Delivery, Inbox, PeerId, Registry, RegistryError};
use crate::tls::{self, CertManager, ReloadableCert};

/// Extra delay added to the common punch start so both PunchStart messages arrive first.
const START_MARGIN_MS: u64 = 150;

/// How often each connection checks its observed address, timers and deadlines.
const TICK: Duration = Duration::from_secs(1);

/// Bound on a write to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Queue of deliveries per connection (each slot is one pointer: deliveries are boxed).
const CONN_QUEUE: usize = 64;

/// Unacknowledged bytes the server may have in flight on one connection. Signalling
/// messages are small; a Registered with a large relay map or a burst of Presence after a
/// Watch fits, and a client that stops reading cannot make the server buffer more.
const SEND_WINDOW: u64 = 64 * 1024;

/// Transport parameters sized for a signalling connection: one bidirectional control stream,
/// no unidirectional streams, no datagrams, receive windows of one maximum frame, no MTU
/// discovery (every message fits the 1200-byte minimum MTU). Paid per connected client.
fn transport_config(limits: &crate::config::Limits) -> quinn::TransportConfig {
    let frame = u32::try_from(limits.max_frame_bytes + 64).unwrap_or(u32::MAX);
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok())
        .max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(frame.into())
        .receive_window(frame.saturating_mul(2).into())
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .mtu_discovery_config(None);
    t
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Registry backend.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// Binding a socket or writing state.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// Unix time now in seconds.
pub fn unix_now() -> u64 {
    meshpunch_proto::clock::unix_secs(SystemTime::now())
}

fn unix_now_ms() -> u64 {
    meshpunch_proto::clock::unix_ms(SystemTime::now())
}

/// Reads the token secret: `token_secret`, else `token_secret_file`, else
/// `data_dir/token-secret` (generated on first use). A secret shorter than
/// [`token::MIN_SECRET_LEN`] bytes is refused with a message saying how to make one.
pub fn load_token_secret(cfg: &Config) -> Result<Vec<u8>, StartError> {
    let secret = read_token_secret(cfg)?;
    let origin = match (&cfg.token_secret, &cfg.token_secret_file) {
        (Some(_), _) => "token_secret (or MESHPUNCH_TOKEN_SECRET)".to_string(),
        (None, Some(f)) => format!("token_secret_file {}", f.display()),
        (None, None) => format!("{}", cfg.data_dir.join("token-secret").display()),
    };
    crate::config::check_token_secret(&secret, &origin)?;
    Ok(secret)
}

fn read_token_secret(cfg: &Config) -> Result<Vec<u8>, StartError> {
    if let Some(s) = &cfg.token_secret {
        return Ok(s.trim().as_bytes().to_vec());
    }
    let path = cfg
        .token_secret_file
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("token-secret"));
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().as_bytes().to_vec()),
        Ok(_) | Err(_) if cfg.token_secret_file.is_none() => {
            std::fs::create_dir_all(&cfg.data_dir)
                .map_err(io_err(format!("creating {}", cfg.data_dir.display())))?;
            let secret = hex::encode(rand::random::<[u8; 32]>());
            tls::write_private(&path, secret.as_bytes())?;
            Ok(secret.into_bytes())
        }
        Ok(_) => Err(StartError::Io {
            what: format!("{} is empty", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        }),
        Err(e) => Err(StartError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Events for one connection task.
#[derive(Debug)]
enum ConnEvent {
    /// Boxed: the per-connection queue allocates its slots up front.
    Delivery(Box<Delivery>),
    Superseded,
}

/// The revocation list: the config's entries merged with the registry's shared list.
#[derive(Default)]
struct RevocationState {
    config: Revocations,
    shared: Vec<String>,
    /// Version of the registry list last read.
    shared_version: u64,
    merged: Revocations,
    /// Bumped on every change; connections re-check their token when it moves.
    generation: u64,
}

impl RevocationState {
    fn remerge(&mut self) {
        let mut merged = self.config.clone();
        merged.extend_hashes(self.shared.iter().cloned());
        self.merged = merged;
        self.generation += 1;
    }
}

/// State shared by all tasks of one server.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    token_secret: Vec<u8>,
    revocations: RwLock<RevocationState>,
    pub(crate) registry: Arc<dyn Registry>,
    conns: DashMap<ConnId, mpsc::Sender<ConnEvent>>,
    peers: DashMap<PeerId, ConnId>,
    conn_counter: Arc<ConnCounter>,
    reg_limiter: RateLimiter,
    drain_tx: watch::Sender<bool>,
    pub(crate) degraded: RwLock<Option<String>>,
    cert: Arc<ReloadableCert>,
    stun_addrs: Vec<SocketAddr>,
    /// Handshakes in progress on both transports (`limits.max_handshakes_in_flight`).
    pub(crate) handshakes: Arc<AtomicUsize>,
}

impl TokenCheck for Shared {
    fn check(&self, token: &str, now_unix: u64) -> Result<Token, TokenError> {
        token::verify(&self.token_secret, token, now_unix, |t| self.is_revoked(t))
    }
}

impl Shared {
    /// TURN credentials for `peer`, expiring at `credential_ttl` from now but never after the
    /// token (`token_expires_unix`): a credential must not outlive the right it came from.
    fn relay_map(&self, peer: &PeerId, token_expires_unix: u64) -> Vec<RelayRegion> {
        let expires = unix_now()
            .saturating_add(self.cfg.turn_credential_ttl.as_secs())
            .min(token_expires_unix);
        let user = format!(
            "{}.{}",
            peer.network,
            &hex::encode(peer.key.as_bytes())[..16]
        );
        self.cfg
            .relays
            .iter()
            .map(|r| {
                let c =
                    meshpunch_proto::creds::rest_credentials(r.secret.as_bytes(), expires, &user);
                RelayRegion {
                    region: r.region.clone(),
                    urls: r.urls.clone(),
                    username: c.username,
                    password: c.password,
                    expires_unix: c.expires_unix,
                }
            })
            .collect()
    }

    fn is_revoked(&self, token: &str) -> bool {
        self.revocations
            .read()
            .map(|g| g.merged.contains(token))
            .unwrap_or(false)
    }

    fn revocation_generation(&self) -> u64 {
        self.revocations.read().map(|g| g.generation).unwrap_or(0)
    }

    fn session_config(&self) -> ServerSessionConfig {
        ServerSessionConfig {
            handshake_timeout: self.cfg.limits.handshake_timeout,
            reauth_interval: self.cfg.reauth_interval,
            reauth_timeout: self.cfg.limits.reauth_timeout,
        }
    }

    pub(crate) fn draining(&self) -> bool {
        *self.drain_tx.borrow()
    }

    /// A per-source connection slot (`limits.max_connections_per_ip`), shared by both
    /// transports.
    pub(crate) fn acquire_slot(&self, ip: IpAddr) -> Option<ConnSlot> {
        self.conn_counter
            .acquire(ip, self.cfg.limits.max_connections_per_ip)
    }

    /// Takes a handshake slot if fewer than `limits.max_handshakes_in_flight` handshakes (of
    /// either transport) are in progress.
    pub(crate) fn begin_handshake(&self) -> Option<HandshakeGuard> {
        let cap = self.cfg.limits.max_handshakes_in_flight;
        self.handshakes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!(m::HANDSHAKES_IN_FLIGHT).increment(1.0);
        Some(HandshakeGuard(self.handshakes.clone()))
    }
}

/// A running rendezvous server. Dropping it stops every task and closes the sockets.
pub struct Server {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    dev_connect: Option<ConnectString>,
    certs: Arc<CertManager>,
    tasks: Vec<JoinHandle<()>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("quic_addr", &self.quic_addr)
            .field("tcp_addr", &self.tcp_addr)
            .field("stun_addrs", &self.shared.stun_addrs)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Server {
    /// Starts every part of the server configured in `cfg`.
    pub async fn start(cfg: Config) -> Result<Server, StartError> {
        cfg.validate()?;
        let _ = m::install();
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(io_err(format!("creating {}", cfg.data_dir.display())))?;
        let token_secret = load_token_secret(&cfg)?;
        let certs = Arc::new(
            CertManager::start(tls::source(&cfg), "rendezvous")
                .await?
                .watching(cfg.watch_files),
        );
        let resolver = certs.resolver();
        let (registry, inbox) = registry::build(&cfg.registry).await?;

        let mut server_config =
            quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(resolver.clone())?));
        server_config.transport_config(Arc::new(transport_config(&cfg.limits)));
        // Every new connection goes through a Retry (see `Admission`). When the handshake cap
        // drops a validated Initial, the client retransmits it with the same Retry token after
        // its probe timeout, doubling each time: quinn's default 15 s token lifetime then
        // refused clients that had queued behind a burst of reconnects (seen with 10,000
        // clients registering at once). A token stays bound to the client's address, so a
        // longer lifetime gives a spoofer nothing.
        server_config.retry_token_lifetime(RETRY_TOKEN_LIFETIME);
        let endpoint = quinn::Endpoint::server(server_config, cfg.listen)
            .map_err(io_err(format!("binding QUIC {}", cfg.listen)))?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(io_err("QUIC local address"))?;
        let tcp = match cfg.tcp {
            true => Some(crate::tcp::bind(&cfg, quic_addr).await?),
            false => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr().map_err(io_err("TCP local address"))?),
            None => None,
        };
        let tls_acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_tls(resolver.clone())?));

        let mut tasks = Vec::new();
        let stun_addrs = match cfg.stun_listen {
            Some(primary) => {
                let (addrs, handles) = crate::stun_server::start(
                    primary,
                    cfg.stun_alt,
                    cfg.software.clone(),
                    &cfg.limits,
                )
                .await
                .map_err(io_err("binding STUN sockets"))?;
                tasks.extend(handles);
                addrs
            }
            None => Vec::new(),
        };

        let (drain_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            revocations: RwLock::new({
                let mut r = RevocationState {
                    config: Revocations::parse(cfg.revoked_tokens.iter().map(String::as_str))
                        .map_err(|e| {
                            crate::config::ConfigError::Invalid(format!("revoked_tokens: {e}"))
                        })?,
                    ..RevocationState::default()
                };
                r.remerge();
                r
            }),
            reg_limiter: RateLimiter::new(
                cfg.limits.registrations_per_sec_per_ip,
                cfg.limits.registrations_burst,
                cfg.limits.max_tracked_ips,
            ),
            token_secret,
            registry,
            conns: DashMap::new(),
            peers: DashMap::new(),
            conn_counter: Arc::new(ConnCounter::default()),
            drain_tx,
            degraded: RwLock::new(None),
            cert: resolver,
            stun_addrs,
            handshakes: Arc::new(AtomicUsize::new(0)),
            cfg,
        });

        tasks.push(tokio::spawn(dispatch(shared.clone(), inbox)));
        tasks.push(tokio::spawn(poll_revocations(shared.clone())));
        tasks.push(tokio::spawn(accept_loop(shared.clone(), endpoint.clone())));
        if let Some(listener) = tcp {
            tasks.push(tokio::spawn(crate::tcp::accept_loop(
                shared.clone(),
                listener,
                tls_acceptor,
            )));
        }
        let admin_addr = match shared.cfg.admin_listen {
            Some(addr) => {
                let (bound, handle) = crate::admin::start(addr, shared.clone())
                    .await
                    .map_err(io_err(format!("binding admin {addr}")))?;
                tasks.push(handle);
                Some(bound)
            }
            None => None,
        };
        metrics::gauge!(m::READY).set(1.0);
        // Readiness follows the certificate: an expired one (ACME failing for too long,
        // files not renewed) makes /readyz say so.
        let weak = Arc::downgrade(&shared);
        tasks.push(certs.spawn(move |reason| {
            if let Some(shared) = weak.upgrade() {
                if let Ok(mut g) = shared.degraded.write() {
                    let ours = g
                        .as_deref()
                        .is_some_and(|r| r.starts_with("TLS certificate"));
                    if reason.is_some() || ours {
                        *g = reason;
                    }
                }
            }
        }));

        let mut server = Server {
            certs,
            shared,
            endpoint,
            quic_addr,
            tcp_addr,
            admin_addr,
            dev_connect: None,
            tasks,
            stopped: AtomicBool::new(false),
        };
        if server.shared.cfg.dev {
            server.dev_connect = Some(server.write_dev_connect()?);
        }
        info!(quic = %server.quic_addr, tcp = ?server.tcp_addr, stun = ?server.shared.stun_addrs, admin = ?server.admin_addr,
              node = server.shared.registry.node_id(), "rendezvous listening");
        Ok(server)
    }

    fn write_dev_connect(&self) -> Result<ConnectString, StartError> {
        let dir = &self.shared.cfg.data_dir;
        let token_path = dir.join("dev-token");
        let network = &self.shared.cfg.dev_network;
        let existing = std::fs::read_to_string(&token_path).ok().and_then(|t| {
            let t = t.trim().to_string();
            match token::verify(&self.shared.token_secret, &t, unix_now() + 86_400, |_| {
                false
            }) {
                Ok(tok) if &tok.network == network => Some(t),
                _ => None,
            }
        });
        let tok = match existing {
            Some(t) => t,
            None => {
                let t = self.mint_token(network, Duration::from_secs(365 * 86_400));
                tls::write_private(&token_path, t.as_bytes())?;
                t
            }
        };
        let cs = self.connect_string(&tok);
        // The connect string carries the dev token: a secret, so the file is 0600.
        tls::write_private(&dir.join("connect"), format!("{cs}\n").as_bytes())?;
        Ok(cs)
    }

    /// Mints a token for `network` valid for `ttl` with this server's secret.
    pub fn mint_token(&self, network: &str, ttl: Duration) -> String {
        token::mint(
            &self.shared.token_secret,
            network,
            unix_now().saturating_add(ttl.as_secs()),
        )
        .unwrap_or_default()
    }

    /// The connect string for `token` pointing at this server.
    pub fn connect_string(&self, token: &str) -> ConnectString {
        let host = public_host(&self.shared.cfg, self.quic_addr.ip());
        let stun = self.shared.stun_addrs.first().map(|s| {
            if s.ip().is_unspecified() {
                join_host_port(&host, s.port())
            } else {
                join_host_port(&s.ip().to_string(), s.port())
            }
        });
        ConnectString {
            token: token.to_string(),
            host,
            port: self.shared.cfg.public_port.unwrap_or(self.quic_addr.port()),
            pins: connect_pins(&self.shared.cfg, &self.shared.cert),
            stun,
            addrs: Vec::new(),
            tcp_port: self
                .shared
                .cfg
                .connect_tcp_port(self.quic_addr.port(), self.tcp_addr.map(|a| a.port())),
        }
    }

    /// The dev connect string (only with `dev`).
    pub fn dev_connect(&self) -> Option<&ConnectString> {
        self.dev_connect.as_ref()
    }

    /// QUIC address bound.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// TLS-over-TCP address bound (`None` with `tcp = false`).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// STUN addresses bound: primary first, then (with `stun_alt`) alt-port, alt-IP, alt-both.
    pub fn stun_addrs(&self) -> &[SocketAddr] {
        &self.shared.stun_addrs
    }

    /// Admin HTTP address bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The registry in use.
    pub fn registry(&self) -> Arc<dyn Registry> {
        self.shared.registry.clone()
    }

    /// Number of open client connections.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.len()
    }

    /// Marks the node degraded (`/readyz` answers 503 with `reason`) or healthy again.
    pub fn set_degraded(&self, reason: Option<String>) {
        if let Ok(mut g) = self.shared.degraded.write() {
            *g = reason;
        }
    }

    /// Replaces the config part of the revocation list (SIGHUP re-reads it from the config
    /// file; the registry's shared list stays). Connections registered with a token now
    /// revoked get `Error{Unauthorized, revoked}` and are closed within a second. A malformed
    /// entry refuses the whole new list (the old one stays).
    pub fn set_revoked_tokens(&self, entries: &[String]) -> Result<(), token::BadRevocation> {
        let parsed = Revocations::parse(entries.iter().map(String::as_str))?;
        if let Ok(mut g) = self.shared.revocations.write() {
            g.config = parsed;
            g.remerge();
        }
        Ok(())
    }

    /// Revokes a token (or token hash) on every node sharing this server's registry.
    pub async fn revoke(&self, token_or_hash: &str) -> Result<(), RegistryError> {
        let hash = token::revocation_hash(token_or_hash).ok_or_else(|| {
            RegistryError::Unavailable("neither a token nor a sha256: token hash".into())
        })?;
        self.shared.registry.revoke(&hash).await?;
        refresh_revocations(&self.shared).await;
        Ok(())
    }

    /// Reloads the certificate and key files (SIGHUP). New handshakes use the new
    /// certificate; open connections are not touched.
    /// Returns the SPKI pin of the certificate now served.
    pub fn reload_tls(&self) -> Result<[u8; 32], tls::TlsError> {
        // Counted by meshpunch-certs as m::TLS_RELOADS_TOTAL (file-watch reloads too).
        self.certs.reload()
    }

    /// Drains: stops accepting, tells every client `GoAway{Draining}`, waits up to `grace`
    /// for them to leave, then closes the endpoint.
    pub async fn drain(&self, grace: Duration) {
        let _ = self.shared.drain_tx.send(true);
        metrics::gauge!(m::READY).set(0.0);
        let deadline = Instant::now() + grace;
        while !self.shared.conns.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop();
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.endpoint.close(0u8.into(), b"server stopped");
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// STUN servers announced to clients: the primary and, with RFC 5780, the address on the
/// other IP (the last socket), so a client can test whether its mapping depends on the
/// destination.
fn client_stun_addrs(all: &[SocketAddr]) -> Vec<SocketAddr> {
    match all {
        [] => Vec::new(),
        [one] => vec![*one],
        [first, .., last] => vec![*first, *last],
    }
}

fn public_host(cfg: &Config, bound: IpAddr) -> String {
    if let Some(h) = &cfg.public_host {
        return h.clone();
    }
    if let Some(a) = &cfg.acme {
        return a.domain.clone();
    }
    if bound.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        bound.to_string()
    }
}

/// Pins for connect strings: none with ACME (clients verify the public-CA certificate and
/// the name), else the SPKI pin of the served certificate.
pub fn connect_pins(cfg: &Config, cert: &ReloadableCert) -> Vec<meshpunch_proto::connect::Pin> {
    if cfg.acme.is_some() {
        Vec::new()
    } else {
        vec![meshpunch_proto::connect::Pin::Spki(cert.spki_pin())]
    }
}

/// Sleeps until `at`, or for ever when there is no deadline.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Paths of the generated dev state inside `data_dir`.
pub fn dev_paths(data_dir: &std::path::Path) -> [PathBuf; 3] {
    [
        data_dir.join("cert.pem"),
        data_dir.join("dev-token"),
        data_dir.join("connect"),
    ]
}

async fn dispatch(shared: Arc<Shared>, mut inbox: Inbox) {
    while let Some(env) = inbox.recv().await {
        let (conn, event) = match env.delivery {
            Delivery::Superseded { conn } => (Some(conn), ConnEvent::Superseded),
            d => (
                shared.peers.get(&env.to).map(|c| *c),
                ConnEvent::Delivery(Box::new(d)),
            ),
        };
        let delivered = conn
            .and_then(|c| shared.conns.get(&c).map(|tx| tx.try_send(event).is_ok()))
            .unwrap_or(false);
        if !delivered {
            metrics::counter!(m::DELIVERIES_DROPPED_TOTAL).increment(1);
            debug!(to = %env.to, "delivery dropped: recipient not here or queue full");
        }
    }
}

/// How long a Retry token stays valid (quinn's default is 15 s).
const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// How often a warning is logged while the handshake cap refuses Initials (the counter
/// counts every one).
const HANDSHAKE_CAP_WARN_EVERY: Duration = Duration::from_secs(10);

/// One handshake (QUIC or TLS over TCP) in progress; decrements the in-flight count when
/// dropped.
pub(crate) struct HandshakeGuard(Arc<AtomicUsize>);

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::HANDSHAKES_IN_FLIGHT).decrement(1.0);
    }
}

/// Admission of new QUIC connections, in this order:
///
/// 1. **Address validation, always.** An Initial without a valid address-validation token
///    gets a stateless Retry (RFC 9000 §8.1.2): no connection state, no per-IP slot, no TLS
///    work, and a reply no larger than the Initial (no amplification). Only a client that
///    receives the Retry at the address it claims can come back, so spoofed Initials cost the
///    server one stateless packet each and cannot hold a victim's slots. quinn's NEW_TOKEN
///    tokens let a reconnecting client skip the extra round trip. Always rather than above a
///    load threshold: clients connect once and keep the connection for hours, so one more
///    round trip at connect time is cheap, and per-IP accounting is then truthful at every load
///    (below a threshold, spoofed Initials would again take slots).
/// 2. **Global cap on handshakes in flight** (`limits.max_handshakes_in_flight`): beyond it an
///    Initial is dropped without an answer; the client retransmits it after its probe timeout.
/// 3. **Per-source slot** (`limits.max_connections_per_ip`, IPv4 address or IPv6 /64), taken
///    only now that the address is validated.
struct Admission {
    last_cap_warn: Option<Instant>,
}

impl Admission {
    fn admit(
        &mut self,
        shared: &Shared,
        incoming: quinn::Incoming,
    ) -> Option<(quinn::Incoming, ConnSlot, HandshakeGuard)> {
        if shared.draining() {
            incoming.refuse();
            return None;
        }
        if !incoming.remote_address_validated() {
            // quinn guarantees `may_retry()` for every unvalidated Incoming.
            metrics::counter!(m::RETRIES_TOTAL).increment(1);
            if let Err(e) = incoming.retry() {
                metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "unvalidated_retry_token")
                    .increment(1);
                e.into_incoming().ignore();
            }
            return None;
        }
        let cap = shared.cfg.limits.max_handshakes_in_flight;
        let Some(guard) = shared.begin_handshake() else {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "handshakes_in_flight").increment(1);
            let now = Instant::now();
            let due = match self.last_cap_warn {
                None => true,
                Some(t) => now.saturating_duration_since(t) >= HANDSHAKE_CAP_WARN_EVERY,
            };
            if due {
                self.last_cap_warn = Some(now);
                warn!(
                    cap,
                    remote = %incoming.remote_address(),
                    "handshake cap reached: dropping new Initials until handshakes finish \
                     (limits.max_handshakes_in_flight)"
                );
            }
            incoming.ignore();
            return None;
        };
        let ip = incoming.remote_address().ip();
        let Some(slot) = shared.acquire_slot(ip) else {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "connections_per_ip").increment(1);
            warn!(%ip, "connection refused: too many connections from this source");
            incoming.refuse();
            return None;
        };
        Some((incoming, slot, guard))
    }
}

/// Reads the registry's shared revocation list when its version moves.
async fn refresh_revocations(shared: &Shared) {
    let known = shared
        .revocations
        .read()
        .map(|g| g.shared_version)
        .unwrap_or(0);
    match shared.registry.revocations(known).await {
        Ok(Some((version, hashes))) => {
            if let Ok(mut g) = shared.revocations.write() {
                info!(
                    entries = hashes.len(),
                    version, "shared revocation list updated"
                );
                g.shared = hashes;
                g.shared_version = version;
                g.remerge();
            }
        }
        Ok(None) => {}
        Err(e) => debug!(error = %e, "reading the shared revocation list failed"),
    }
}

/// Polls the shared revocation list every [`registry::REVOCATION_POLL`].
async fn poll_revocations(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(registry::REVOCATION_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        refresh_revocations(&shared).await;
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let mut conns = tokio::task::JoinSet::new();
    let mut admission = Admission {
        last_cap_warn: None,
    };
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if let Some((incoming, slot, guard)) = admission.admit(&shared, incoming) {
                    metrics::counter!(m::CONNECTIONS_TOTAL, "transport" => "quic").increment(1);
                    conns.spawn(handle_incoming(shared.clone(), incoming, slot, guard));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Keeps a connection's per-source slot on the source it is using now. quinn follows a
/// client to a new address (NAT rebinding: the client's data socket also carries QUIC, and
/// its mapping can change under it) after validating the new path; the slot then moves to the
/// new source, and when that source is already full the connection is closed with
/// `RateLimited` (the client reconnects and is refused like any other connection over the
/// limit). Migration stays on so a rebinding client keeps its registration.
async fn follow_migrations(shared: Arc<Shared>, conn: quinn::Connection, mut slot: ConnSlot) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ip = conn.remote_address().ip();
        if crate::limits::source_key(ip) == slot.key() {
            continue;
        }
        match shared.acquire_slot(ip) {
            Some(new_slot) => slot = new_slot,
            None => {
                metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "migrated_connections_per_ip")
                    .increment(1);
                warn!(%ip, "migrated connection closed: too many connections from its new source");
                conn.close(
                    quinn::VarInt::from(u16::from(ErrorCode::RateLimited)),
                    b"too many connections from this source",
                );
                return;
            }
        }
    }
}

async fn handle_incoming(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    slot: ConnSlot,
    handshake: HandshakeGuard,
) {
    let remote = incoming.remote_address();
    let timeout = shared.cfg.limits.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "handshake_timeout").increment(1);
            return;
        }
    };
    drop(handshake);
    let streams = tokio::time::timeout(timeout, conn.accept_bi()).await;
    let (send, recv) = match streams {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return,
        Err(_) => {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "handshake_timeout").increment(1);
            conn.close(0u8.into(), b"no control stream");
            return;
        }
    };
    // All zeros if the exporter is unavailable: then no key proof verifies.
    let mut exporter = [0u8; wire::EXPORTER_LEN];
    let _ = conn.export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"");
    let migrations = follow_migrations(shared.clone(), conn.clone(), slot);
    let link = Link::Quic { conn, send };
    run_session(shared, link, Recv::Quic(recv), exporter, migrations).await;
}

/// Runs one session over `link` until it ends (or `until` completes: the QUIC migration
/// watcher closing the connection), then unregisters it. The caller holds the connection's
/// per-source slot for as long as this runs.
pub(crate) async fn run_session(
    shared: Arc<Shared>,
    link: Link,
    recv: Recv,
    exporter: [u8; wire::EXPORTER_LEN],
    until: impl std::future::Future<Output = ()>,
) {
    let conn_id: ConnId = rand::random();
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    shared.conns.insert(conn_id, tx);
    let transport = link.transport().as_str();
    metrics::gauge!(m::CONNECTIONS_OPEN, "transport" => transport).increment(1.0);
    /// Unregisters the session however its task ends (also when aborted: the guard's drop
    /// removes it from the local maps; the registry entry expires with its refresh).
    struct Open(Arc<Shared>, ConnId, &'static str);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.conns.remove(&self.1);
            metrics::gauge!(m::CONNECTIONS_OPEN, "transport" => self.2).decrement(1.0);
        }
    }
    let _open = Open(shared.clone(), conn_id, transport);
    let mut session = Session::new(shared, link, conn_id, exporter);
    tokio::select! {
        () = Box::pin(session.run(recv, rx)) => {}
        () = until => {}
    }
    Box::pin(session.cleanup()).await;
}

/// The connection under a session: one QUIC bidirectional stream, or TLS over TCP.
pub(crate) enum Link {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
    },
    Tcp(crate::tcp::TcpLink),
}

impl Link {
    fn transport(&self) -> Transport {
        match self {
            Link::Quic { .. } => Transport::Quic,
            Link::Tcp(_) => Transport::Tcp,
        }
    }

    fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Quic { conn, .. } => conn.remote_address(),
            Link::Tcp(t) => t.remote,
        }
    }

    fn local_ip(&self) -> Option<IpAddr> {
        match self {
            Link::Quic { conn, .. } => conn.local_ip(),
            Link::Tcp(t) => Some(t.local.ip()),
        }
    }

    fn rtt(&self) -> Duration {
        match self {
            Link::Quic { conn, .. } => conn.rtt(),
            Link::Tcp(t) => t.rtt,
        }
    }

    async fn write_all(&mut self, frame: &[u8]) -> Result<(), ()> {
        match self {
            Link::Quic { send, .. } => send.write_all(frame).await.map_err(|_| ()),
            Link::Tcp(t) => t.write_all(frame).await.map_err(|_| ()),
        }
    }

    /// Ends the connection after what was written is delivered (bounded wait).
    async fn finish(&mut self) {
        match self {
            Link::Quic { conn, send } => {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                conn.close(0u8.into(), b"");
            }
            Link::Tcp(t) => t.shutdown().await,
        }
    }

    fn idle_timed_out(&self) -> bool {
        match self {
            Link::Quic { conn, .. } => {
                matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut))
            }
            Link::Tcp(t) => t.timed_out(),
        }
    }
}

/// The reading side of a [`Link`].
pub(crate) enum Recv {
    Quic(quinn::RecvStream),
    Tcp(crate::tcp::TcpRecv),
}

impl Recv {
    /// The next bytes received; `None` when the peer closed or the connection failed.
    async fn read(&mut self) -> Option<bytes::Bytes> {
        match self {
            // No read buffer per connection: take quinn's received chunk as it is.
            Recv::Quic(r) => match r.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => Some(chunk.bytes),
                Ok(None) | Err(_) => None,
            },
            Recv::Tcp(r) => r.read().await,
        }
    }
}

struct PendingIncoming {
    from: PeerKey,
    request_id: u64,
    initiator_rtt_ms: u32,
    candidates: Vec<Candidate>,
    /// Where this server's node saw the offerer's connection from.
    observed: Option<SocketAddr>,
    deadline: Instant,
}

/// What the session loop does after handling something.
enum Flow {
    Continue,
    Close,
}

struct Session {
    shared: Arc<Shared>,
    link: Link,
    decoder: FrameDecoder,
    /// Since when the decoder holds part of a frame (`limits.frame_timeout`).
    partial_since: Option<Instant>,
    conn_id: ConnId,
    /// The session protocol (handshake, re-authentication, token expiry and revocation).
    core: ServerSession,
    peer: Option<PeerId>,
    observed: SocketAddr,
    /// request id → deadline of offers this client sent.
    outgoing: HashMap<u64, Instant>,
    /// offer id → offers this client received and has not answered.
    incoming: HashMap<u64, PendingIncoming>,
    offer_tokens: f64,
    offer_last: Instant,
    next_refresh: Instant,
    next_relay_update: Instant,
    /// Expiry of the token this connection registered with (caps TURN credentials).
    token_expires_unix: u64,
    /// The revocation generation last checked.
    revocation_gen: u64,
    /// Watch requests (`limits.watches_per_sec`, `limits.watch_burst`).
    watch_bucket: TokenBucket,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        link: Link,
        conn_id: ConnId,
        exporter: [u8; wire::EXPORTER_LEN],
    ) -> Session {
        let now = Instant::now();
        Session {
            decoder: FrameDecoder::new(shared.cfg.limits.max_frame_bytes),
            partial_since: None,
            core: ServerSession::new(now, unix_now(), exporter, shared.session_config()),
            observed: link.remote_address(),
            link,
            conn_id,
            peer: None,
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            offer_tokens: 4.0,
            offer_last: now,
            next_refresh: now + registry::REFRESH_INTERVAL,
            next_relay_update: now + shared.cfg.turn_credential_ttl / 2,
            token_expires_unix: 0,
            revocation_gen: shared.revocation_generation(),
            watch_bucket: TokenBucket::full(shared.cfg.limits.watch_burst, now),
            shared,
        }
    }

    async fn run(&mut self, mut recv: Recv, mut rx: mpsc::Receiver<ConnEvent>) {
        let mut drain = self.shared.drain_tx.subscribe();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if *drain.borrow() {
            Box::pin(self.go_away(GoAwayReason::Draining, "server draining")).await;
            return;
        }
        // The handlers' futures are boxed: they exist only while a message is handled, and
        // inline they would make every idle connection's task as large as the largest one.
        loop {
            let flow = tokio::select! {
                r = recv.read() => match r {
                    Some(bytes) => {
                        self.decoder.push(&bytes);
                        let flow = Box::pin(self.drain_decoder()).await;
                        self.partial_since = match self.decoder.buffered() {
                            0 => None,
                            _ => self.partial_since.or(Some(Instant::now())),
                        };
                        flow
                    }
                    None => Flow::Close,
                },
                ev = rx.recv() => match ev {
                    Some(ev) => Box::pin(self.on_event(ev)).await,
                    None => Flow::Close,
                },
                _ = tick.tick() => Box::pin(self.on_tick()).await,
                _ = sleep_until_opt(self.core.poll_timeout()) => {
                    self.core.handle_timeout(Instant::now(), &*self.shared, &mut rand::rngs::OsRng);
                    Box::pin(self.flush_core()).await
                }
                _ = drain.changed() => {
                    Box::pin(self.go_away(GoAwayReason::Draining, "server draining")).await;
                    Flow::Close
                }
            };
            if let Flow::Close = flow {
                break;
            }
        }
        if self.link.idle_timed_out() {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "idle_timeout").increment(1);
        }
    }

    async fn drain_decoder(&mut self) -> Flow {
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => {
                    if let Flow::Close = self.on_message(msg).await {
                        return Flow::Close;
                    }
                }
                Ok(None) => return Flow::Continue,
                Err(e) if e.recoverable() => {
                    debug!(peer = ?self.peer, error = %e, "undecodable frame");
                    if let Flow::Close = self.error(e.code(), 0, e.to_string()).await {
                        return Flow::Close;
                    }
                }
                Err(e) => {
                    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "frame_size").increment(1);
                    warn!(remote = %self.link.remote_address(), error = %e, "closing connection");
                    let _ = self.error(e.code(), 0, e.to_string()).await;
                    self.finish().await;
                    return Flow::Close;
                }
            }
        }
    }

    async fn write(&mut self, msg: &Message) -> Flow {
        let frame = msg.encode();
        match tokio::time::timeout(WRITE_TIMEOUT, self.link.write_all(&frame)).await {
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::Close,
        }
    }

    async fn error(&mut self, code: ErrorCode, id: u64, message: impl Into<String>) -> Flow {
        metrics::counter!(m::ERRORS_SENT_TOTAL, "code" => code.as_str()).increment(1);
        self.write(&Message::error(code, id, message)).await
    }

    async fn finish(&mut self) {
        self.link.finish().await;
    }

    async fn go_away(&mut self, reason: GoAwayReason, message: &str) {
        let label = match reason {
            GoAwayReason::Draining => "draining",
            GoAwayReason::Superseded => "superseded",
            _ => "other",
        };
        metrics::counter!(m::GOAWAY_TOTAL, "reason" => label).increment(1);
        let _ = self
            .write(&Message::GoAway {
                reason,
                message: message.to_string(),
            })
            .await;
        self.finish().await;
    }

    async fn on_message(&mut self, msg: Message) -> Flow {
        if matches!(msg, Message::Hello(_)) && !self.core.is_registered() {
            let ip = self.link.remote_address().ip();
            if !self.shared.reg_limiter.allow(ip, Instant::now()) {
                metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "registrations_per_ip")
                    .increment(1);
                let _ = self
                    .error(ErrorCode::RateLimited, 0, "too many registrations")
                    .await;
                self.finish().await;
                return Flow::Close;
            }
        }
        let rest =
            self.core
                .handle_message(Instant::now(), msg, &*self.shared, &mut rand::rngs::OsRng);
        if let Flow::Close = self.flush_core().await {
            return Flow::Close;
        }
        match rest {
            Some(msg) => self.on_registered_message(msg).await,
            None => Flow::Continue,
        }
    }

    /// Sends what the session core queued and acts on its events.
    async fn flush_core(&mut self) -> Flow {
        while let Some(msg) = self.core.poll_transmit() {
            if let Message::Error(e) = &msg {
                metrics::counter!(m::ERRORS_SENT_TOTAL, "code" => e.code.as_str()).increment(1);
            }
            if let Flow::Close = self.write(&msg).await {
                return Flow::Close;
            }
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                ServerEvent::Registered {
                    network,
                    key,
                    token: _,
                    expires_unix,
                } => {
                    if let Flow::Close = self.on_registered(network, key, expires_unix).await {
                        return Flow::Close;
                    }
                }
                ServerEvent::Reauthenticated => {
                    metrics::counter!(m::REAUTH_TOTAL, "result" => "ok").increment(1);
                    debug!(peer = ?self.peer, "re-authenticated");
                }
                ServerEvent::Closed { code, reason } => {
                    match reason {
                        Some(r) => {
                            metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => r.as_str())
                                .increment(1);
                            if r == wire::ErrorReason::ReauthTimeout
                                || (r == wire::ErrorReason::BadProof && self.peer.is_some())
                            {
                                metrics::counter!(m::REAUTH_TOTAL, "result" => r.as_str())
                                    .increment(1);
                            }
                            info!(peer = ?self.peer, remote = %self.link.remote_address(),
                                  reason = r.as_str(), "session refused or ended");
                        }
                        None if code == ErrorCode::Timeout => {
                            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "handshake_timeout")
                                .increment(1);
                        }
                        None => {}
                    }
                    self.finish().await;
                    return Flow::Close;
                }
                _ => {}
            }
        }
        Flow::Continue
    }

    async fn on_registered(&mut self, network: String, key: PeerKey, expires_unix: u64) -> Flow {
        let peer = PeerId {
            network: network.clone(),
            key,
        };
        self.shared.peers.insert(peer.clone(), self.conn_id);
        if let Err(e) = self.shared.registry.register(&peer, self.conn_id).await {
            self.shared
                .peers
                .remove_if(&peer, |_, c| *c == self.conn_id);
            warn!(%peer, error = %e, "registry refused registration");
            let _ = self
                .error(ErrorCode::Internal, 0, format!("registry: {e}"))
                .await;
            self.finish().await;
            return Flow::Close;
        }
        let transport = self.link.transport();
        metrics::counter!(m::REGISTRATIONS_TOTAL, "transport" => transport.as_str()).increment(1);
        metrics::gauge!(m::PEERS_REGISTERED).increment(1.0);
        info!(%peer, remote = %self.observed, transport = transport.as_str(),
              token_expires_unix = expires_unix, "registered");
        let relays = self.shared.relay_map(&peer, expires_unix);
        self.peer = Some(peer);
        self.token_expires_unix = expires_unix;
        self.write(&Message::Registered(Registered {
            observed: self.observed,
            network,
            relays,
            stun: client_stun_addrs(&self.shared.stun_addrs)
                .into_iter()
                .map(|a| match self.link.local_ip() {
                    // A wildcard-bound STUN socket answers on the IP the client reached us on.
                    Some(ip) if a.ip().is_unspecified() => SocketAddr::new(ip, a.port()),
                    _ => a,
                })
                .collect(),
            server_time_unix_ms: unix_now_ms(),
        }))
        .await
    }

    fn take_offer_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = self.shared.cfg.limits.offers_per_sec;
        let burst = rate.max(4.0);
        self.offer_tokens = (self.offer_tokens
            + now.saturating_duration_since(self.offer_last).as_secs_f64() * rate)
            .min(burst);
        self.offer_last = now;
        if self.offer_tokens >= 1.0 {
            self.offer_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn rtt_ms(&self) -> u32 {
        self.link.rtt().as_millis().min(u128::from(u32::MAX / 2)) as u32
    }

    async fn on_registered_message(&mut self, msg: Message) -> Flow {
        let Some(me) = self.peer.clone() else {
            return Flow::Close;
        };
        match msg {
            Message::Watch(keys) => {
                if keys.len() > wire::MAX_WATCH_KEYS {
                    return self
                        .error(ErrorCode::BadRequest, 0, "too many keys in watch")
                        .await;
                }
                let limits = &self.shared.cfg.limits;
                let (rate, burst) = (limits.watches_per_sec, limits.watch_burst);
                if !self.watch_bucket.take(rate, burst, Instant::now()) {
                    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "watch_rate").increment(1);
                    return self
                        .error(ErrorCode::RateLimited, 0, "too many watch requests")
                        .await;
                }
                match self.shared.registry.watch(&me, &keys).await {
                    Ok(states) => {
                        for (key, online) in states {
                            metrics::counter!(m::PRESENCE_EVENTS_TOTAL).increment(1);
                            if let Flow::Close =
                                self.write(&Message::Presence { key, online }).await
                            {
                                return Flow::Close;
                            }
                        }
                        Flow::Continue
                    }
                    Err(e) => self.error(ErrorCode::Internal, 0, e.to_string()).await,
                }
            }
            Message::Offer(offer) => self.on_offer(me, offer).await,
            Message::Answer(answer) => self.on_answer(me, answer).await,
            Message::Error(e) => {
                debug!(peer = %me, code = ?e.code, message = %e.message, "client reported error");
                Flow::Continue
            }
            other => {
                let name = other.name();
                self.error(
                    ErrorCode::BadRequest,
                    0,
                    format!("unexpected {name} after registration"),
                )
                .await
            }
        }
    }

    async fn on_offer(&mut self, me: PeerId, offer: Offer) -> Flow {
        let Offer {
            id,
            peer,
            candidates,
        } = offer;
        if peer == me.key {
            metrics::counter!(m::OFFERS_TOTAL, "result" => "self_offer").increment(1);
            return self
                .error(ErrorCode::SelfOffer, id, "offer to own key")
                .await;
        }
        if candidates.len() > wire::MAX_CANDIDATES {
            return self
                .error(ErrorCode::BadRequest, id, "too many candidates")
                .await;
        }
        if !self.take_offer_token() {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "offers_rate").increment(1);
            return self
                .error(ErrorCode::RateLimited, id, "too many offers")
                .await;
        }
        if self.outgoing.len() >= self.shared.cfg.limits.max_pending_offers
            || self.outgoing.contains_key(&id)
        {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "pending_offers").increment(1);
            return self
                .error(
                    ErrorCode::RateLimited,
                    id,
                    "too many pending offers (or duplicate id)",
                )
                .await;
        }
        let to = PeerId {
            network: me.network.clone(),
            key: peer,
        };
        let delivery = Delivery::Offer {
            from: me.key,
            offer_id: rand::random(),
            request_id: id,
            candidates,
            initiator_rtt_ms: self.rtt_ms(),
            observed: Some(self.observed),
        };
        match self.shared.registry.deliver(&to, delivery).await {
            Ok(()) => {
                metrics::counter!(m::OFFERS_TOTAL, "result" => "forwarded").increment(1);
                self.outgoing
                    .insert(id, Instant::now() + self.shared.cfg.limits.offer_timeout);
                Flow::Continue
            }
            Err(RegistryError::NotFound) => {
                metrics::counter!(m::OFFERS_TOTAL, "result" => "not_found").increment(1);
                self.error(ErrorCode::NotFound, id, "peer not found").await
            }
            Err(e) => {
                metrics::counter!(m::OFFERS_TOTAL, "result" => "failed").increment(1);
                self.error(ErrorCode::Internal, id, e.to_string()).await
            }
        }
    }

    async fn on_answer(&mut self, me: PeerId, answer: Answer) -> Flow {
        let Answer {
            offer_id,
            candidates,
        } = answer;
        if candidates.len() > wire::MAX_CANDIDATES {
            return self
                .error(ErrorCode::BadRequest, offer_id, "too many candidates")
                .await;
        }
        let Some(pending) = self.incoming.remove(&offer_id) else {
            return self
                .error(ErrorCode::NotFound, offer_id, "no such offer")
                .await;
        };
        let my_rtt = self.rtt_ms();
        let session_secret: [u8; 32] = rand::random();
        let now = unix_now_ms();
        let start_at = now + u64::from(my_rtt.max(pending.initiator_rtt_ms)) / 2 + START_MARGIN_MS;
        let to = PeerId {
            network: me.network.clone(),
            key: pending.from,
        };
        let delivery = Delivery::Answer {
            from: me.key,
            request_id: pending.request_id,
            candidates: candidates.clone(),
            session_secret,
            start_at_unix_ms: start_at,
            observed: Some(self.observed),
        };
        match self.shared.registry.deliver(&to, delivery).await {
            Ok(()) => {}
            Err(RegistryError::NotFound) => {
                return self
                    .error(ErrorCode::NotFound, offer_id, "offering peer went away")
                    .await
            }
            Err(e) => {
                return self
                    .error(ErrorCode::Internal, offer_id, e.to_string())
                    .await
            }
        }
        // Our copy leaves now and arrives after half our RTT.
        let start_in = start_at.saturating_sub(unix_now_ms() + u64::from(my_rtt / 2));
        metrics::counter!(m::PUNCH_STARTS_TOTAL).increment(1);
        self.write(&Message::PunchStart(PunchStart {
            id: offer_id,
            peer: pending.from,
            peer_candidates: pending.candidates,
            session_secret,
            start_in_ms: start_in.min(u64::from(u32::MAX)) as u32,
            initiator: false,
            peer_observed: pending.observed,
        }))
        .await
    }

    async fn on_event(&mut self, ev: ConnEvent) -> Flow {
        match ev {
            ConnEvent::Superseded => {
                info!(peer = ?self.peer, "superseded by a newer connection");
                self.go_away(
                    GoAwayReason::Superseded,
                    "a newer connection registered this key",
                )
                .await;
                Flow::Close
            }
            ConnEvent::Delivery(d) => self.on_delivery(*d).await,
        }
    }

    async fn on_delivery(&mut self, d: Delivery) -> Flow {
        let Some(me) = self.peer.clone() else {
            return Flow::Continue;
        };
        match d {
            Delivery::Offer {
                from,
                offer_id,
                request_id,
                candidates,
                initiator_rtt_ms,
                observed,
            } => {
                let now = Instant::now();
                self.incoming.retain(|_, p| p.deadline > now);
                if self.incoming.len() >= self.shared.cfg.limits.max_pending_offers {
                    metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "pending_offers")
                        .increment(1);
                    let to = PeerId {
                        network: me.network.clone(),
                        key: from,
                    };
                    let failed = Delivery::OfferFailed {
                        from: me.key,
                        request_id,
                        code: ErrorCode::RateLimited,
                        message: "peer has too many pending offers".into(),
                    };
                    let _ = self.shared.registry.deliver(&to, failed).await;
                    return Flow::Continue;
                }
                self.incoming.insert(
                    offer_id,
                    PendingIncoming {
                        from,
                        request_id,
                        initiator_rtt_ms,
                        candidates: candidates.clone(),
                        observed,
                        deadline: now + self.shared.cfg.limits.offer_timeout,
                    },
                );
                self.write(&Message::IncomingOffer(IncomingOffer {
                    offer_id,
                    from,
                    candidates,
                }))
                .await
            }
            Delivery::Answer {
                from,
                request_id,
                candidates,
                session_secret,
                start_at_unix_ms,
                observed,
            } => {
                if self.outgoing.remove(&request_id).is_none() {
                    // Timed out meanwhile: the client already got Timeout.
                    return Flow::Continue;
                }
                let start_in =
                    start_at_unix_ms.saturating_sub(unix_now_ms() + u64::from(self.rtt_ms() / 2));
                metrics::counter!(m::PUNCH_STARTS_TOTAL).increment(1);
                self.write(&Message::PunchStart(PunchStart {
                    id: request_id,
                    peer: from,
                    peer_candidates: candidates,
                    session_secret,
                    start_in_ms: start_in.min(u64::from(u32::MAX)) as u32,
                    initiator: true,
                    peer_observed: observed,
                }))
                .await
            }
            Delivery::OfferFailed {
                request_id,
                code,
                message,
                ..
            } => {
                if self.outgoing.remove(&request_id).is_none() {
                    return Flow::Continue;
                }
                metrics::counter!(m::OFFERS_TOTAL, "result" => "failed").increment(1);
                self.error(code, request_id, message).await
            }
            Delivery::Presence { key, online } => {
                metrics::counter!(m::PRESENCE_EVENTS_TOTAL).increment(1);
                self.write(&Message::Presence { key, online }).await
            }
            Delivery::Superseded { .. } => Flow::Continue,
        }
    }

    async fn on_tick(&mut self) -> Flow {
        let now = Instant::now();
        if self.partial_since.is_some_and(|t| {
            now.saturating_duration_since(t) >= self.shared.cfg.limits.frame_timeout
        }) {
            metrics::counter!(m::LIMIT_HITS_TOTAL, "limit" => "stalled_frame").increment(1);
            warn!(remote = %self.link.remote_address(), transport = self.link.transport().as_str(),
                  buffered = self.decoder.buffered(), "closing connection: frame not finished in time");
            let _ = self
                .error(ErrorCode::BadRequest, 0, "frame not finished in time")
                .await;
            self.finish().await;
            return Flow::Close;
        }
        if self.peer.is_none() {
            return Flow::Continue;
        }
        let generation = self.shared.revocation_generation();
        if generation != self.revocation_gen {
            self.revocation_gen = generation;
            self.core.recheck(now, &*self.shared);
            if let Flow::Close = self.flush_core().await {
                return Flow::Close;
            }
        }
        let addr = self.link.remote_address();
        if addr != self.observed {
            self.observed = addr;
            metrics::counter!(m::OBSERVED_ADDR_CHANGES_TOTAL).increment(1);
            info!(peer = ?self.peer, %addr, "observed address changed");
            if let Flow::Close = self.write(&Message::ObservedAddr(addr)).await {
                return Flow::Close;
            }
        }
        let expired: Vec<u64> = self
            .outgoing
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.outgoing.remove(&id);
            metrics::counter!(m::OFFERS_TOTAL, "result" => "timeout").increment(1);
            if let Flow::Close = self
                .error(ErrorCode::Timeout, id, "peer did not answer in time")
                .await
            {
                return Flow::Close;
            }
        }
        self.incoming.retain(|_, p| p.deadline > now);
        if now >= self.next_refresh {
            self.next_refresh = now + registry::REFRESH_INTERVAL;
            if let Some(peer) = &self.peer {
                if let Err(e) = self.shared.registry.refresh(peer, self.conn_id).await {
                    warn!(%peer, error = %e, "registry refresh failed");
                }
            }
        }
        if now >= self.next_relay_update {
            self.next_relay_update = now + self.shared.cfg.turn_credential_ttl / 2;
            if let Some(peer) = self.peer.clone() {
                if !self.shared.cfg.relays.is_empty() {
                    // No credential for a token that expired or was revoked meanwhile.
                    self.core.recheck(now, &*self.shared);
                    if let Flow::Close = self.flush_core().await {
                        return Flow::Close;
                    }
                    let relays = self.shared.relay_map(&peer, self.token_expires_unix);
                    return self.write(&Message::RelayUpdate(relays)).await;
                }
            }
        }
        Flow::Continue
    }

    async fn cleanup(&mut self) {
        if let Some(peer) = self.peer.take() {
            self.shared
                .peers
                .remove_if(&peer, |_, c| *c == self.conn_id);
            if let Err(e) = self.shared.registry.unregister(&peer, self.conn_id).await {
                warn!(%peer, error = %e, "registry unregister failed");
            }
            metrics::gauge!(m::PEERS_REGISTERED).decrement(1.0);
            info!(%peer, "disconnected");
        }
    }
}
