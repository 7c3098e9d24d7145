//! Async client of the rendezvous service (QUIC, TLS over TCP where UDP is blocked):
//! register, watch peers, exchange offers.
//!
//! ```no_run
//! # async fn demo(cs: meshpunch_proto::connect::ConnectString, sk: x25519_dalek::StaticSecret,
//! #               peer: meshpunch_proto::wire::PeerKey) -> Result<(), meshpunch::rendezvous::ClientError> {
//! use meshpunch::rendezvous::{Client, ClientConfig, Event};
//! let (client, mut events) = Client::connect(ClientConfig::new(cs, sk)).await?;
//! client.watch(vec![peer]).await?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         Event::Presence { key, online: true } if key == peer => {
//!             let punch = client.offer(peer, vec![]).await?;
//!             println!("punch {} at {:?}", punch.peer, punch.start_at);
//!         }
//!         Event::IncomingOffer(offer) => {
//!             let punch = offer.answer(vec![]).await?;
//!             println!("answered {}", punch.peer);
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`Client::connect`] returns once the first registration succeeded. A background task then
//! keeps the client connected: when the connection drops it reconnects with jittered
//! exponential backoff, trying every address the host resolves to, proves the key again,
//! re-registers and re-sends the watch set. [`Event::Registered`] marks each registration.
//! The handshake and the periodic re-authentication the server asks for on the live connection
//! are [`meshpunch_proto::session::ClientSession`]'s; this module moves its bytes.
//!
//! When the server refuses the token (expired, revoked, not for this key) retrying every few
//! seconds cannot help: the client reports [`Event::Unauthorized`] once, then retries only
//! every [`ClientConfig::auth_retry`] (5 min) or at once when given a new connect string with
//! [`Client::reload`] (the daemon does that on SIGHUP).
//!
//! Sockets: by default the QUIC connection uses a UDP socket of its own per address family
//! ([`ClientConfig::socket`] may supply one, e.g. bound to a specific interface; quinn then
//! owns it). [`ClientConfig::endpoint`] instead hands the client a ready quinn endpoint that
//! every connection attempt — each address of happy eyeballs, each reconnect — uses; the
//! daemon makes one with [`endpoint_on`] over its data socket
//! ([`crate::shared_socket::SharedSocket`]), so the address the rendezvous observes is the
//! data socket's mapping. An address family that endpoint cannot reach falls back to a socket
//! of its own; [`Registration::shared_socket`] says which one a registration used.
//!
//! **TCP fallback.** Networks that drop UDP (corporate, hotel, some mobile) cannot reach the
//! QUIC port. Each connect races: QUIC first; if no QUIC handshake has completed within
//! [`TCP_FALLBACK_DELAY`] (or every QUIC attempt failed), TLS 1.3 over TCP to the same
//! host (port [`ConnectString::tcp_port`]) starts in parallel, and the first handshake to
//! complete registers. The protocol over TCP is the same (frames, ALPN, key proof bound to
//! the TLS exporter). While on TCP the client retries QUIC in the background
//! ([`QUIC_RETRY`], doubling up to [`QUIC_RETRY_MAX`]) and moves back as soon as a QUIC
//! registration succeeds: the watch set is re-sent and [`Event::Registered`] reports the new
//! transport (offers in flight on the old connection fail with `Closed`, as on any
//! reconnect). [`Registration::transport`] says which one a registration uses; an address
//! observed over TCP is a TCP mapping, never a UDP candidate, so such a registration always
//! has `shared_socket = false`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::connect::Pin;
use meshpunch_proto::session::{ClientEvent, ClientSession};
pub use meshpunch_proto::wire::Transport;
use meshpunch_proto::wire::{
    self, Answer, Candidate, ErrorCode, ErrorReason, FrameDecoder, GoAwayReason, Message, Offer,
    PeerKey, PunchStart, Registered, RelayRegion,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

/// Client keep-alive interval (well below the server's idle timeout).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Idle timeout on the client side: how long a node that died without closing (crash, power,
/// network) keeps the client before it reconnects to another node. Three keep-alives lost.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for QUIC handshake + registration on one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between starting handshakes to successive addresses of the host.
const STAGGER: Duration = Duration::from_millis(250);
/// How long QUIC gets before TLS over TCP starts in parallel. Happy eyeballs (RFC 8305
/// §5) waits 250 ms between address families, which both use TCP; here the alternative is
/// the *fallback* transport, so QUIC gets a clear head start: 1 s is three times a slow
/// mobile RTT (a QUIC handshake is one RTT, two with the server's mandatory Retry), so a
/// working UDP path almost always wins, while a network that drops UDP registers over TCP
/// about a second later. Chrome's QUIC→TCP race uses a similar fixed head start.
pub const TCP_FALLBACK_DELAY: Duration = Duration::from_secs(1);
/// First background QUIC retry while registered over TCP (UDP may be back: another network,
/// a firewall change).
pub const QUIC_RETRY: Duration = Duration::from_secs(30);
/// Cap of the doubling QUIC retry interval while on TCP (each retry costs a few UDP packets
/// and, where UDP is blocked, one QUIC handshake timeout).
pub const QUIC_RETRY_MAX: Duration = Duration::from_secs(300);
/// Time a background QUIC retry gets (handshake and registration) before it counts as failed.
const QUIC_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Event queue length; events beyond it are dropped (with a warning).
const EVENT_QUEUE: usize = 1024;
/// Default retry interval after the server refused the token (see [`ClientConfig::auth_retry`]).
pub const AUTH_RETRY: Duration = Duration::from_secs(300);

/// Client configuration.
pub struct ClientConfig {
    /// Where to connect, the certificate pin and the network token.
    pub connect: ConnectString,
    /// The WireGuard private key whose public key is registered.
    pub secret: StaticSecret,
    /// Software name sent in Hello.
    pub software: String,
    /// UDP socket for QUIC (quinn owns it; to share a socket with other traffic use
    /// [`ClientConfig::endpoint`]). Default: an ephemeral socket per address family.
    pub socket: Option<std::net::UdpSocket>,
    /// How long [`Client::offer`] waits for the peer's answer.
    pub offer_timeout: Duration,
    /// Cap of the jittered exponential reconnect backoff.
    pub max_backoff: Duration,
    /// Node addresses to use instead of resolving the connect string's host (a static list of
    /// nodes where DNS is not set up). Empty: resolve the host on every (re)connect.
    pub addresses: Vec<SocketAddr>,
    /// A quinn endpoint to connect from instead of binding a socket (e.g. one made with
    /// [`endpoint_on`] over a socket shared with other traffic). Several connections may use
    /// it at once (happy eyeballs); it is reused across reconnects and by later clients given
    /// the same endpoint. Addresses of a family it cannot reach use a socket of their own.
    pub endpoint: Option<quinn::Endpoint>,
    /// Extra trusted CA certificates (`--ca-file`) for a connect string without `pin=`.
    pub ca_roots: Vec<CertificateDer<'static>>,
    /// After the server refused the token (expired, revoked, bad), retry this rarely until
    /// [`Client::reload`] brings a new connect string.
    pub auth_retry: Duration,
    /// First background QUIC retry while registered over TCP (doubling up to
    /// [`QUIC_RETRY_MAX`]); default [`QUIC_RETRY`].
    pub quic_retry: Duration,
}

impl ClientConfig {
    /// Defaults for everything but the connect string and key.
    pub fn new(connect: ConnectString, secret: StaticSecret) -> Self {
        ClientConfig {
            secret,
            software: format!("meshpunch/{}", env!("CARGO_PKG_VERSION")),
            socket: None,
            offer_timeout: Duration::from_secs(15),
            max_backoff: Duration::from_secs(10),
            addresses: connect.addrs.clone(),
            endpoint: None,
            ca_roots: Vec::new(),
            connect,
            auth_retry: AUTH_RETRY,
            quic_retry: QUIC_RETRY,
        }
    }
}

/// A client-only quinn endpoint over `socket` (an abstract socket such as
/// [`crate::shared_socket::SharedSocket`]), for [`ClientConfig::endpoint`]. Make one per
/// socket and reuse it: two endpoints on one socket would take each other's datagrams.
pub fn endpoint_on(socket: Arc<dyn quinn::AsyncUdpSocket>) -> Result<quinn::Endpoint, ClientError> {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| ClientError::Connect(format!("QUIC endpoint on the shared socket: {e}")))
}

/// Whether an endpoint bound to `local` can send to an address of the given family: IPv4
/// from an IPv4 socket or a dual-stack `[::]` one (quinn writes IPv4-mapped addresses), IPv6
/// from an IPv6 socket.
fn reaches(local: SocketAddr, v6: bool) -> bool {
    match local {
        SocketAddr::V4(_) => !v6,
        SocketAddr::V6(a) => v6 || a.ip().is_unspecified() || a.ip().to_ipv4_mapped().is_some(),
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.connect.authority())
            .field("software", &self.software)
            .finish_non_exhaustive()
    }
}

/// Client errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused with a typed error.
    #[error("server error {code:?}: {message}")]
    Server {
        /// Code.
        code: ErrorCode,
        /// Detail.
        message: String,
        /// Typed reason of an `Unauthorized` (None from older servers).
        reason: Option<ErrorReason>,
    },
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The client was closed, or the connection dropped while waiting.
    #[error("connection closed")]
    Closed,
    /// Not connected right now (reconnecting).
    #[error("not connected to the rendezvous (reconnecting)")]
    NotConnected,
    /// Could not connect (resolution, QUIC handshake, certificate pin).
    #[error("connect: {0}")]
    Connect(String),
    /// The server sent something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The result of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The address the server sees our QUIC connection from.
    pub observed: SocketAddr,
    /// Network of our token.
    pub network: String,
    /// Relay map with TURN credentials.
    pub relays: Vec<RelayRegion>,
    /// STUN servers of the rendezvous.
    pub stun: Vec<SocketAddr>,
    /// The server address we are connected to.
    pub server: SocketAddr,
    /// Local address of the socket the connection runs on.
    pub local: Option<SocketAddr>,
    /// The connection runs on [`ClientConfig::endpoint`] (for the daemon: its data socket,
    /// so [`Registration::observed`] is the data socket's mapping). Always false over TCP.
    pub shared_socket: bool,
    /// The transport of this registration. Over [`Transport::Tcp`], `observed` is the
    /// connection's TCP mapping: its IP is our public IP, its port no UDP candidate.
    pub transport: Transport,
}

/// The server refused our token or ended the session for an authentication reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// Typed reason (expired, revoked, bad token, key not allowed, …); `None` from an older
    /// server that sent only a message.
    pub reason: Option<ErrorReason>,
    /// The server's message.
    pub message: String,
    /// Network named in our token.
    pub network: Option<String>,
    /// Expiry of our token (unix seconds).
    pub token_expires_unix: Option<u64>,
}

impl AuthFailure {
    /// The failure for a refusal of `token` with this reason and message.
    pub fn from_refusal(reason: Option<ErrorReason>, message: String, token: &str) -> AuthFailure {
        let parsed = meshpunch_proto::token::parse(token).ok();
        AuthFailure {
            reason,
            message,
            network: parsed.as_ref().map(|t| t.network.clone()),
            token_expires_unix: parsed.map(|t| t.expires_unix),
        }
    }

    /// Whether retrying with the same token can succeed (false for expired, revoked, bad
    /// token, key not allowed; also false for an untyped `Unauthorized` of an older server).
    pub fn is_permanent(&self) -> bool {
        self.reason.is_none_or(|r| r.is_permanent())
    }

    /// One line for logs and `status`: what happened, to which network, and when the token
    /// expired, as a readable UTC date.
    pub fn describe(&self) -> String {
        let network = self.network.as_deref().unwrap_or("?");
        let expiry = self
            .token_expires_unix
            .map(meshpunch_proto::token::format_unix_utc)
            .unwrap_or_else(|| "?".into());
        match self.reason {
            Some(ErrorReason::TokenExpired) => {
                format!("the token of network {network} expired at {expiry}")
            }
            Some(ErrorReason::TokenRevoked) => {
                format!("the token of network {network} was revoked (it would expire at {expiry})")
            }
            Some(ErrorReason::KeyNotAllowed) => format!(
                "the token of network {network} is a member token for another WireGuard key"
            ),
            Some(ErrorReason::BadToken) => format!(
                "the rendezvous does not accept the token of network {network} ({})",
                self.message
            ),
            _ => format!(
                "the rendezvous refused network {network}: {} (token expires {expiry})",
                self.message
            ),
        }
    }
}

/// Both sides have what they need to punch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Punch {
    /// The other peer.
    pub peer: PeerKey,
    /// The other peer's candidates.
    pub peer_candidates: Vec<Candidate>,
    /// Secret shared by both sides for this session.
    pub session_secret: [u8; 32],
    /// When to start (both sides start together).
    pub start_at: Instant,
    /// True on the offering side.
    pub initiator: bool,
    /// Where the rendezvous sees the other peer from (`None` from an older server).
    pub peer_observed: Option<SocketAddr>,
}

/// An offer from another peer; answer it with [`IncomingOffer::answer`].
#[derive(Debug)]
pub struct IncomingOffer {
    /// Who offers.
    pub from: PeerKey,
    /// Server-assigned id.
    pub offer_id: u64,
    /// Their candidates.
    pub candidates: Vec<Candidate>,
    client: Client,
}

impl IncomingOffer {
    /// Answers with our candidates and waits for the punch signal.
    pub async fn answer(self, candidates: Vec<Candidate>) -> Result<Punch, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.client
            .command(Command::Answer {
                offer_id: self.offer_id,
                candidates,
                reply: tx,
            })
            .await?;
        self.client.await_reply(rx).await
    }
}

/// Things that happen on the client's connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Registered (first time and after each reconnect).
    Registered(Registration),
    /// The connection dropped; the client is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The server sees us from a new address.
    ObservedAddr(SocketAddr),
    /// Fresh relay map / TURN credentials.
    RelayUpdate(Vec<RelayRegion>),
    /// A watched key came online or went away.
    Presence {
        /// The key.
        key: PeerKey,
        /// Online?
        online: bool,
    },
    /// A peer offers to connect.
    IncomingOffer(IncomingOffer),
    /// Another connection registered our key; this client stopped.
    Superseded,
    /// The server refused our token or ended the session for an authentication reason. The
    /// client now retries only every [`ClientConfig::auth_retry`], or when
    /// [`Client::reload`] brings a new connect string. Sent once per distinct failure.
    Unauthorized(AuthFailure),
}

/// Receiver of [`Event`]s.
#[derive(Debug)]
pub struct Events(mpsc::Receiver<Event>);

impl Events {
    /// Next event; `None` when the client has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

enum Command {
    Watch(Vec<PeerKey>, oneshot::Sender<Result<(), ClientError>>),
    Offer {
        peer: PeerKey,
        candidates: Vec<Candidate>,
        reply: oneshot::Sender<Result<Punch, ClientError>>,
    },
    Answer {
        offer_id: u64,
        candidates: Vec<Candidate>,
        reply: oneshot::Sender<Result<Punch, ClientError>>,
    },
    /// Use this connect string (new token) from now on.
    Reload(Box<ConnectString>),
}

#[derive(Default)]
struct State {
    registration: Option<Registration>,
    connected: bool,
    auth_failure: Option<AuthFailure>,
}

struct Inner {
    key: PeerKey,
    cmd: mpsc::Sender<Command>,
    state: Mutex<State>,
    close: watch::Sender<bool>,
    offer_timeout: Duration,
}

/// Handle to a rendezvous client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.inner.key)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and registers; see the module docs.
    pub async fn connect(cfg: ClientConfig) -> Result<(Client, Events), ClientError> {
        let key = PeerKey::from(PublicKey::from(&cfg.secret));
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (close_tx, close_rx) = watch::channel(false);
        let client = Client {
            inner: Arc::new(Inner {
                key,
                cmd: cmd_tx,
                state: Mutex::new(State::default()),
                close: close_tx,
                offer_timeout: cfg.offer_timeout,
            }),
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let driver = Driver::new(cfg, client.clone(), ev_tx)?;
        tokio::spawn(driver.run(cmd_rx, close_rx, ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => Ok((client, Events(ev_rx))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PeerKey {
        self.inner.key
    }

    /// The latest registration.
    pub fn registration(&self) -> Option<Registration> {
        self.inner
            .state
            .lock()
            .ok()
            .and_then(|s| s.registration.clone())
    }

    /// The latest observed address.
    pub fn observed_addr(&self) -> Option<SocketAddr> {
        self.registration().map(|r| r.observed)
    }

    /// Whether the client is connected and registered right now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .state
            .lock()
            .map(|s| s.connected)
            .unwrap_or(false)
    }

    /// Replaces the set of watched keys (kept across reconnects). The current state of each
    /// key arrives as [`Event::Presence`].
    pub async fn watch(&self, keys: Vec<PeerKey>) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Watch(keys, tx)).await?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Offers to connect to `peer` with our candidates; resolves when both sides got the
    /// punch signal. Errors: `Server{NotFound}` (unknown peer or other network),
    /// `Server{SelfOffer}`, `Server{Timeout}` / `Timeout` (no answer), `NotConnected`.
    pub async fn offer(
        &self,
        peer: PeerKey,
        candidates: Vec<Candidate>,
    ) -> Result<Punch, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Offer {
            peer,
            candidates,
            reply: tx,
        })
        .await?;
        self.await_reply(rx).await
    }

    /// The last authentication failure, until the next successful registration.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        self.inner
            .state
            .lock()
            .ok()
            .and_then(|s| s.auth_failure.clone())
    }

    /// Uses `connect` (typically: a rotated token) from now on. If it differs from the current
    /// one, or the token was refused, the client reconnects at once with it; the watch set is
    /// kept.
    pub async fn reload(&self, connect: ConnectString) -> Result<(), ClientError> {
        self.command(Command::Reload(Box::new(connect))).await
    }

    /// Stops the client and closes the connection.
    pub fn close(&self) {
        let _ = self.inner.close.send(true);
    }

    async fn command(&self, c: Command) -> Result<(), ClientError> {
        self.inner
            .cmd
            .send(c)
            .await
            .map_err(|_| ClientError::Closed)
    }

    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Result<Punch, ClientError>>,
    ) -> Result<Punch, ClientError> {
        match tokio::time::timeout(self.inner.offer_timeout + Duration::from_secs(5), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    fn set_state(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut s) = self.inner.state.lock() {
            f(&mut s);
        }
    }
}

/// The QUIC client config of the rendezvous connection: TLS 1.3, ALPN `meshpunch/1`, the
/// server certificate checked as [`crate::tls`] describes (pins, or the trust store plus
/// `ca_roots`), keep-alives. Public for tools (loadtest) that speak the protocol themselves.
pub fn quic_client_config(
    pins: &[Pin],
    ca_roots: &[CertificateDer<'static>],
) -> Result<quinn::ClientConfig, ClientError> {
    quic_client_config_with(pins, ca_roots).map(|(c, _)| c)
}

fn quic_client_config_with(
    pins: &[Pin],
    ca_roots: &[CertificateDer<'static>],
) -> Result<(quinn::ClientConfig, crate::tls::Failures), ClientError> {
    client_configs(pins, ca_roots).map(|(q, _, f)| (q, f))
}

/// The QUIC client config and the TLS-over-TCP one, sharing one certificate verifier (and
/// so one [`crate::tls::Failures`] slot).
fn client_configs(
    pins: &[Pin],
    ca_roots: &[CertificateDer<'static>],
) -> Result<
    (
        quinn::ClientConfig,
        tokio_rustls::TlsConnector,
        crate::tls::Failures,
    ),
    ClientError,
> {
    let (tls, failures) =
        crate::tls::client_crypto(pins, ca_roots).map_err(ClientError::Connect)?;
    let tcp = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()));
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .max_concurrent_uni_streams(0u8.into());
    cfg.transport_config(Arc::new(transport));
    Ok((cfg, tcp, failures))
}

/// The writing side of a connection: a QUIC stream or TLS over TCP.
enum SendHalf {
    Quic(quinn::SendStream),
    Tcp(WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The reading side of a connection.
enum RecvHalf {
    Quic(quinn::RecvStream),
    Tcp(ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl SendHalf {
    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self {
            SendHalf::Quic(s) => s.write_all(bytes).await.map_err(|e| e.to_string()),
            SendHalf::Tcp(s) => {
                s.write_all(bytes).await.map_err(|e| e.to_string())?;
                s.flush().await.map_err(|e| e.to_string())
            }
        }
    }
}

impl RecvHalf {
    /// Bytes read into `buf`; `Ok(None)` at end of stream.
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        match self {
            RecvHalf::Quic(r) => r.read(buf).await.map_err(|e| e.to_string()),
            RecvHalf::Tcp(r) => match r.read(buf).await {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// A completed handshake, not yet registered.
struct Handshake {
    send: SendHalf,
    recv: RecvHalf,
    /// The QUIC connection (to close it); `None` over TCP.
    quic: Option<quinn::Connection>,
    exporter: [u8; wire::EXPORTER_LEN],
    server: SocketAddr,
    local: Option<SocketAddr>,
    shared: bool,
    transport: Transport,
}

/// TCP keep-alive and user timeout on the client's TCP connection: a dead server or path is
/// noticed after about [`IDLE_TIMEOUT`], as over QUIC.
fn set_tcp_options(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEP_ALIVE)
        .with_interval(Duration::from_secs(3))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(IDLE_TIMEOUT));
}

/// TCP connect and TLS handshake to `addr` (certificate checked for `name`, ALPN
/// `meshpunch/1`).
async fn tcp_handshake(
    tls: tokio_rustls::TlsConnector,
    failures: crate::tls::Failures,
    addr: SocketAddr,
    name: String,
) -> Result<Handshake, ClientError> {
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| ClientError::Connect(format!("{name}: {e}")))?;
    // `FwMark`: in a full tunnel the fallback must not be routed into the tunnel.
    let stream = crate::fwmark::tcp_connect(addr)
        .await
        .map_err(|e| ClientError::Connect(format!("tcp {addr}: {e}")))?;
    set_tcp_options(&stream);
    let local = stream.local_addr().ok();
    let stream = tls
        .connect(server_name, stream)
        .await
        .map_err(|e| ClientError::Connect(format!("tcp {addr}: {}", failures.explain(&e))))?;
    let (_, conn) = stream.get_ref();
    if conn.alpn_protocol() != Some(wire::ALPN) {
        return Err(ClientError::Connect(format!(
            "tcp {addr}: the server did not agree to ALPN meshpunch/1"
        )));
    }
    // The same exporter input as quinn's (label, empty context).
    let exporter = conn
        .export_keying_material([0u8; wire::EXPORTER_LEN], wire::EXPORTER_LABEL, Some(b""))
        .map_err(|_| ClientError::Protocol("TLS exporter unavailable".into()))?;
    let (read, write) = tokio::io::split(stream);
    Ok(Handshake {
        send: SendHalf::Tcp(write),
        recv: RecvHalf::Tcp(read),
        quic: None,
        exporter,
        server: addr,
        local,
        shared: false,
        transport: Transport::Tcp,
    })
}

/// QUIC handshake to `addr` on `ep` and the control stream.
async fn quic_handshake(
    ep: quinn::Endpoint,
    quic: quinn::ClientConfig,
    failures: crate::tls::Failures,
    addr: SocketAddr,
    name: String,
    shared: bool,
) -> Result<Handshake, ClientError> {
    let conn = ep
        .connect_with(quic, addr, &name)
        .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?
        .await
        .map_err(|e| ClientError::Connect(format!("{addr}: {}", failures.explain(&e))))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
    let mut exporter = [0u8; wire::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
        .map_err(|_| ClientError::Protocol("TLS exporter unavailable".into()))?;
    Ok(Handshake {
        send: SendHalf::Quic(send),
        recv: RecvHalf::Quic(recv),
        server: conn.remote_address(),
        quic: Some(conn),
        exporter,
        local: ep.local_addr().ok(),
        shared,
        transport: Transport::Quic,
    })
}

/// What registering needs from the config (owned, so a background QUIC retry can register
/// while the current session keeps running).
#[derive(Clone)]
struct Credentials {
    token: String,
    secret: StaticSecret,
    software: String,
}

/// Proves the key and registers over a completed handshake.
async fn register(h: Handshake, creds: Credentials) -> Result<Conn, ClientError> {
    let Handshake {
        mut send,
        mut recv,
        quic,
        exporter,
        server,
        local,
        shared,
        transport,
    } = h;
    let mut decoder = FrameDecoder::new(wire::MAX_FRAME_LEN);
    let mut core = ClientSession::new(creds.token, creds.secret, creds.software, exporter);
    let registered = loop {
        while let Some(m) = core.poll_transmit() {
            write(&mut send, &m).await?;
        }
        match core.poll_event() {
            Some(ClientEvent::Registered(r)) => break r,
            Some(ClientEvent::Refused(e)) => return Err(server_error(e)),
            Some(ClientEvent::Protocol(p)) => return Err(ClientError::Protocol(p)),
            Some(_) => continue,
            None => {}
        }
        let msg = read(&mut recv, &mut decoder).await?;
        if let Some(other) = core.handle_message(msg) {
            debug!(kind = other.name(), "ignoring message before registration");
        }
    };
    Ok(Conn {
        quic,
        server,
        send,
        recv,
        decoder,
        core,
        registered,
        local,
        shared,
        transport,
        quic_addr: server,
    })
}

/// A background QUIC retry: handshake and registration.
type Probe = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Conn, ClientError>> + Send>>;

/// Awaits the future in `slot`, or never when there is none.
async fn poll_slot<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// One live, registered connection.
struct Conn {
    /// The QUIC connection; `None` over TCP (dropping the halves closes the socket).
    quic: Option<quinn::Connection>,
    server: SocketAddr,
    send: SendHalf,
    recv: RecvHalf,
    decoder: FrameDecoder,
    /// The session protocol (answers re-authentication challenges).
    core: ClientSession,
    registered: Registered,
    /// Local address of the endpoint and whether it is [`ClientConfig::endpoint`].
    local: Option<SocketAddr>,
    shared: bool,
    transport: Transport,
    /// The QUIC address of the node this connection reached (over TCP: where the background
    /// QUIC retry goes).
    quic_addr: SocketAddr,
}

impl Conn {
    /// Closes the connection (QUIC: CONNECTION_CLOSE with `reason`; TCP: the socket closes
    /// when the halves drop, after a best-effort TLS close_notify).
    async fn close(&mut self, reason: &[u8]) {
        match &self.quic {
            Some(q) => {
                if let SendHalf::Quic(s) = &mut self.send {
                    let _ = s.finish();
                }
                q.close(0u8.into(), reason);
            }
            None => {
                if let SendHalf::Tcp(w) = &mut self.send {
                    let _ = tokio::time::timeout(Duration::from_millis(500), w.shutdown()).await;
                }
            }
        }
    }
}

/// How a session ended.
enum End {
    Lost(String),
    Draining,
    Superseded,
    Closed,
    /// The server ended the session with this error (token expired or revoked, failed
    /// re-authentication).
    Refused(wire::ErrorMsg),
    /// A new connect string was given: reconnect with it now.
    Reload,
    /// A background QUIC retry registered while on TCP: continue on this connection.
    Switch(Box<Conn>),
}

struct Driver {
    cfg: ClientConfig,
    client: Client,
    events: mpsc::Sender<Event>,
    quic: quinn::ClientConfig,
    tcp_tls: tokio_rustls::TlsConnector,
    tls_failures: crate::tls::Failures,
    endpoint_v4: Option<quinn::Endpoint>,
    endpoint_v6: Option<quinn::Endpoint>,
    watch_set: Vec<PeerKey>,
    next_id: u64,
    offers: HashMap<u64, oneshot::Sender<Result<Punch, ClientError>>>,
    answers: HashMap<u64, oneshot::Sender<Result<Punch, ClientError>>>,
}

impl Driver {
    fn new(
        mut cfg: ClientConfig,
        client: Client,
        events: mpsc::Sender<Event>,
    ) -> Result<Driver, ClientError> {
        let (quic, tcp_tls, tls_failures) = client_configs(&cfg.connect.pins, &cfg.ca_roots)?;
        let mut d = Driver {
            quic,
            tcp_tls,
            tls_failures,
            client,
            events,
            endpoint_v4: None,
            endpoint_v6: None,
            watch_set: Vec::new(),
            next_id: rand::random::<u32>() as u64 + 1,
            offers: HashMap::new(),
            answers: HashMap::new(),
            cfg: ClientConfig {
                socket: None,
                ..ClientConfig::new(cfg.connect.clone(), cfg.secret.clone())
            },
        };
        d.cfg.software = std::mem::take(&mut cfg.software);
        d.cfg.offer_timeout = cfg.offer_timeout;
        d.cfg.max_backoff = cfg.max_backoff;
        d.cfg.quic_retry = cfg.quic_retry;
        d.cfg.auth_retry = cfg.auth_retry;
        d.cfg.addresses = std::mem::take(&mut cfg.addresses);
        d.cfg.endpoint = cfg.endpoint.take();
        d.cfg.ca_roots = std::mem::take(&mut cfg.ca_roots);
        if let Some(sock) = cfg.socket.take() {
            let v6 = sock.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
            let runtime = quinn::default_runtime()
                .ok_or_else(|| ClientError::Connect("no async runtime".into()))?;
            let ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock, runtime)
                .map_err(|e| ClientError::Connect(format!("using the given socket: {e}")))?;
            if v6 {
                d.endpoint_v6 = Some(ep);
            } else {
                d.endpoint_v4 = Some(ep);
            }
        }
        Ok(d)
    }

    fn emit(&self, ev: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
            warn!("rendezvous client event queue full; event dropped");
        }
    }

    /// The endpoint for an address of this family, and whether it is the given (shared) one.
    fn endpoint(&mut self, v6: bool) -> Result<(quinn::Endpoint, bool), ClientError> {
        if let Some(ep) = &self.cfg.endpoint {
            if ep.local_addr().is_ok_and(|l| reaches(l, v6)) {
                return Ok((ep.clone(), true));
            }
        }
        self.own_endpoint(v6).map(|ep| (ep, false))
    }

    fn own_endpoint(&mut self, v6: bool) -> Result<quinn::Endpoint, ClientError> {
        let slot = if v6 {
            &mut self.endpoint_v6
        } else {
            &mut self.endpoint_v4
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if v6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let ep = quinn::Endpoint::client(bind)
            .map_err(|e| ClientError::Connect(format!("binding {bind}: {e}")))?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut close: watch::Receiver<bool>,
        ready: oneshot::Sender<Result<(), ClientError>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = INITIAL_BACKOFF;
        let mut last_refusal: Option<String> = None;
        // A connection a background QUIC retry registered while the last session was on TCP.
        let mut switch_to: Option<Conn> = None;
        loop {
            let attempt = match switch_to.take() {
                Some(c) => Ok(c),
                None => tokio::select! {
                    r = self.connect_any() => r,
                    _ = close.changed() => break,
                },
            };
            // Set when the server refused the token: wait long, or for a reload.
            let mut auth_wait = false;
            match attempt {
                Ok(conn) => {
                    backoff = INITIAL_BACKOFF;
                    last_refusal = None;
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                    let end = self.session(conn, &mut cmds, &mut close).await;
                    self.client.set_state(|s| s.connected = false);
                    for (_, tx) in self.offers.drain().chain(self.answers.drain()) {
                        let _ = tx.send(Err(ClientError::Closed));
                    }
                    match end {
                        End::Closed => break,
                        End::Superseded => {
                            self.emit(Event::Superseded);
                            break;
                        }
                        End::Draining => {
                            self.emit(Event::Disconnected {
                                reason: "server draining".into(),
                            });
                            backoff = INITIAL_BACKOFF;
                        }
                        End::Reload => {
                            self.emit(Event::Disconnected {
                                reason: "reconnecting with the new connect string".into(),
                            });
                            continue;
                        }
                        End::Switch(c) => {
                            switch_to = Some(*c);
                            continue;
                        }
                        End::Refused(e) => {
                            self.emit(Event::Disconnected {
                                reason: format!("rendezvous ended the session: {}", e.message),
                            });
                            if e.code == ErrorCode::Unauthorized {
                                auth_wait =
                                    self.auth_failed(e.reason, e.message, &mut last_refusal);
                            }
                        }
                        End::Lost(reason) => {
                            info!(%reason, "rendezvous connection lost; reconnecting");
                            self.emit(Event::Disconnected { reason });
                        }
                    }
                }
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e));
                        return;
                    }
                    debug!(error = %e, "reconnect failed");
                    if let ClientError::Server {
                        code: ErrorCode::Unauthorized,
                        message,
                        reason,
                    } = &e
                    {
                        auth_wait = self.auth_failed(*reason, message.clone(), &mut last_refusal);
                    } else if let ClientError::Server { .. } = &e {
                        // A refusal by the server (rate limit, …) is worth surfacing; report
                        // each distinct one once.
                        let reason = e.to_string();
                        if last_refusal.as_deref() != Some(reason.as_str()) {
                            warn!(%reason, "rendezvous refused the registration; retrying");
                            self.emit(Event::Disconnected {
                                reason: reason.clone(),
                            });
                            last_refusal = Some(reason);
                        }
                    }
                }
            }
            // Jittered exponential backoff (after a token refusal: the slow auth retry);
            // commands arriving meanwhile fail fast, a reload ends the wait.
            let sleep = if auth_wait {
                self.cfg.auth_retry
            } else {
                let s = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                backoff = (backoff * 2).min(self.cfg.max_backoff);
                s
            };
            let deadline = Instant::now() + sleep;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = close.changed() => return,
                    c = cmds.recv() => match c {
                        Some(Command::Reload(cs)) => {
                            if self.reload(*cs) || auth_wait {
                                backoff = INITIAL_BACKOFF;
                                break;
                            }
                        }
                        Some(c) => self.command_offline(c),
                        None => return,
                    },
                }
            }
        }
    }

    /// Records a token refusal; reports it once per distinct failure. Returns whether to wait
    /// for a reload (slow retry).
    fn auth_failed(
        &mut self,
        reason: Option<ErrorReason>,
        message: String,
        last_refusal: &mut Option<String>,
    ) -> bool {
        let failure = AuthFailure::from_refusal(reason, message, &self.cfg.connect.token);
        let permanent = failure.is_permanent();
        let key = format!("{:?} {}", failure.reason, self.cfg.connect.token);
        self.client
            .set_state(|s| s.auth_failure = Some(failure.clone()));
        if last_refusal.as_deref() != Some(key.as_str()) {
            *last_refusal = Some(key);
            self.emit(Event::Unauthorized(failure));
        }
        permanent
    }

    /// Switches to `cs`; returns whether it differs from the current connect string.
    fn reload(&mut self, cs: ConnectString) -> bool {
        if cs == self.cfg.connect {
            return false;
        }
        match client_configs(&cs.pins, &self.cfg.ca_roots) {
            Ok((q, t, failures)) => {
                self.quic = q;
                self.tcp_tls = t;
                self.tls_failures = failures;
            }
            Err(e) => {
                warn!(error = %e, "new connect string not usable; keeping the old one");
                return false;
            }
        }
        info!(server = %cs.authority(), "rendezvous connect string reloaded");
        // Addresses that came from the old string's addr= follow the new string.
        if self.cfg.addresses == self.cfg.connect.addrs {
            self.cfg.addresses = cs.addrs.clone();
        }
        self.cfg.connect = cs;
        self.client.set_state(|s| s.auth_failure = None);
        true
    }

    fn command_offline(&mut self, c: Command) {
        match c {
            Command::Watch(keys, reply) => {
                self.watch_set = keys;
                let _ = reply.send(Ok(()));
            }
            Command::Offer { reply, .. } | Command::Answer { reply, .. } => {
                let _ = reply.send(Err(ClientError::NotConnected));
            }
            Command::Reload(cs) => {
                self.reload(*cs);
            }
        }
    }

    fn credentials(&self) -> Credentials {
        Credentials {
            token: self.cfg.connect.token.clone(),
            secret: self.cfg.secret.clone(),
            software: self.cfg.software.clone(),
        }
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, ClientError> {
        let authority = self.cfg.connect.authority();
        let addrs: Vec<SocketAddr> = if self.cfg.addresses.is_empty() {
            tokio::net::lookup_host(authority.as_str())
                .await
                .map_err(|e| ClientError::Connect(format!("resolving {authority}: {e}")))?
                .collect()
        } else {
            self.cfg.addresses.clone()
        };
        if addrs.is_empty() {
            return Err(ClientError::Connect(format!(
                "{authority} resolves to nothing"
            )));
        }
        Ok(addrs)
    }

    async fn connect_any(&mut self) -> Result<Conn, ClientError> {
        let authority = self.cfg.connect.authority();
        let addrs = self.resolve().await?;
        tracing::debug!(?addrs, "connecting");
        // Happy-eyeballs style (RFC 8305 §5): start a QUIC handshake to each address in turn,
        // STAGGER apart, and keep the first that completes. TLS over TCP joins the race after
        // TCP_FALLBACK_DELAY, or at once when every QUIC attempt failed. Only the winner
        // registers, so two registrations can never race each other.
        // The certificate is verified for the connect string's host (a DNS name or an IP
        // address SAN; pinned mode ignores the name).
        let server_name = self.cfg.connect.host.clone();
        let tcp_port = self.cfg.connect.tcp_port();
        let mut quic = futures::stream::FuturesUnordered::new();
        for (i, addr) in addrs.iter().copied().enumerate() {
            let (ep, shared) = self.endpoint(addr.is_ipv6())?;
            let attempt = quic_handshake(
                ep,
                self.quic.clone(),
                self.tls_failures.clone(),
                addr,
                server_name.clone(),
                shared,
            );
            let delay = STAGGER * i.min(16) as u32;
            quic.push(async move {
                tokio::time::sleep(delay).await;
                match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                    Ok(r) => r.map(|h| (h, addr)),
                    Err(_) => Err(ClientError::Connect(format!("{addr}: timed out"))),
                }
            });
        }
        let mut tcp = futures::stream::FuturesUnordered::new();
        let mut tcp_started = false;
        let fallback = tokio::time::sleep(TCP_FALLBACK_DELAY);
        tokio::pin!(fallback);
        let mut last = ClientError::Connect(format!("no address of {authority} answered"));
        let mut informative = false;
        // The error reported when every attempt failed: the first that says why (a refused
        // certificate, a refused connection) rather than a bare timeout of the other transport.
        let mut note = |e: ClientError, last: &mut ClientError| {
            let timeout = matches!(&e, ClientError::Connect(m) if m.ends_with("timed out"));
            if !informative || !timeout {
                informative |= !timeout;
                *last = e;
            }
        };
        let (handshake, quic_addr) = loop {
            let start_tcp = tokio::select! {
                Some(r) = futures::StreamExt::next(&mut quic), if !quic.is_empty() => match r {
                    Ok(h) => break h,
                    Err(e) => {
                        tracing::debug!(error = %e, "QUIC handshake failed");
                        note(e, &mut last);
                        quic.is_empty()
                    }
                },
                Some(r) = futures::StreamExt::next(&mut tcp), if !tcp.is_empty() => match r {
                    Ok(h) => break h,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS-over-TCP handshake failed");
                        note(e, &mut last);
                        false
                    }
                },
                _ = &mut fallback, if !tcp_started => true,
                else => return Err(last),
            };
            if start_tcp && !tcp_started {
                tcp_started = true;
                debug!(
                    delay_ms = TCP_FALLBACK_DELAY.as_millis() as u64,
                    "no QUIC handshake yet: trying TLS over TCP too"
                );
                for (i, addr) in addrs.iter().copied().enumerate() {
                    let tcp_addr = SocketAddr::new(addr.ip(), tcp_port);
                    let attempt = tcp_handshake(
                        self.tcp_tls.clone(),
                        self.tls_failures.clone(),
                        tcp_addr,
                        server_name.clone(),
                    );
                    let delay = STAGGER * i.min(16) as u32;
                    tcp.push(async move {
                        tokio::time::sleep(delay).await;
                        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                            Ok(r) => r.map(|h| (h, addr)),
                            Err(_) => {
                                Err(ClientError::Connect(format!("tcp {tcp_addr}: timed out")))
                            }
                        }
                    });
                }
            }
            if tcp_started && quic.is_empty() && tcp.is_empty() {
                return Err(last);
            }
        };
        drop(quic);
        drop(tcp);
        let creds = self.credentials();
        match tokio::time::timeout(CONNECT_TIMEOUT, register(handshake, creds)).await {
            Ok(r) => r.map(|mut c| {
                c.quic_addr = quic_addr;
                c
            }),
            Err(_) => Err(ClientError::Connect(format!(
                "{authority}: registration timed out"
            ))),
        }
    }

    /// A background QUIC handshake and registration to `addr` (while on TCP).
    fn quic_probe(&mut self, addr: SocketAddr) -> Result<Probe, ClientError> {
        let (ep, shared) = self.endpoint(addr.is_ipv6())?;
        let attempt = quic_handshake(
            ep,
            self.quic.clone(),
            self.tls_failures.clone(),
            addr,
            self.cfg.connect.host.clone(),
            shared,
        );
        let creds = self.credentials();
        Ok(Box::pin(async move {
            let r = tokio::time::timeout(QUIC_PROBE_TIMEOUT, async move {
                register(attempt.await?, creds).await
            })
            .await;
            match r {
                Ok(Ok(mut c)) => {
                    c.quic_addr = addr;
                    Ok(c)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ClientError::Timeout),
            }
        }))
    }

    async fn session(
        &mut self,
        mut c: Conn,
        cmds: &mut mpsc::Receiver<Command>,
        close: &mut watch::Receiver<bool>,
    ) -> End {
        // On a dual-stack socket quinn reports IPv4 servers IPv4-mapped.
        let server = match c.server {
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), a.port()),
                None => SocketAddr::V6(a),
            },
            a => a,
        };
        let reg = Registration {
            observed: c.registered.observed,
            network: c.registered.network.clone(),
            relays: c.registered.relays.clone(),
            // A wildcard STUN address means "the server's IP".
            stun: c
                .registered
                .stun
                .iter()
                .map(|a| {
                    if a.ip().is_unspecified() {
                        SocketAddr::new(server.ip(), a.port())
                    } else {
                        *a
                    }
                })
                .collect(),
            server,
            local: c.local,
            // Over TCP the observed address is no UDP mapping of any socket.
            shared_socket: c.shared && c.transport.observed_is_udp_mapping(),
            transport: c.transport,
        };
        info!(server = %reg.server, observed = %reg.observed, network = %reg.network,
              shared_socket = reg.shared_socket, transport = reg.transport.as_str(),
              "registered with rendezvous");
        self.client.set_state(|s| {
            s.registration = Some(reg.clone());
            s.connected = true;
            s.auth_failure = None;
        });
        self.emit(Event::Registered(reg));
        if !self.watch_set.is_empty()
            && write(&mut c.send, &Message::Watch(self.watch_set.clone()))
                .await
                .is_err()
        {
            return End::Lost("write failed".into());
        }
        let mut buf = vec![0u8; 16 * 1024];
        // While on TCP: the background QUIC retry (see the module docs).
        let mut retry_every = self.cfg.quic_retry;
        let mut next_probe = (c.transport == Transport::Tcp).then(|| Instant::now() + retry_every);
        let mut probe: Option<Probe> = None;
        loop {
            // Drain decoded messages first.
            loop {
                match c.decoder.next_message() {
                    Ok(Some(msg)) => {
                        if let Some(end) = self.on_message(&mut c, msg).await {
                            // Our own QUIC retry registering supersedes this connection:
                            // continue on the new one.
                            if let (End::Superseded, Some(p)) = (&end, probe.take()) {
                                if let Ok(new) = p.await {
                                    info!("rendezvous: moved back to QUIC");
                                    return End::Switch(Box::new(new));
                                }
                            }
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.recoverable() => {
                        debug!(error = %e, "skipping undecodable frame from server");
                    }
                    Err(e) => {
                        c.close(b"bad frame").await;
                        return End::Lost(e.to_string());
                    }
                }
            }
            tokio::select! {
                _ = sleep_until_opt(next_probe), if probe.is_none() => {
                    next_probe = None;
                    match self.quic_probe(c.quic_addr) {
                        Ok(p) => probe = Some(p),
                        Err(e) => {
                            debug!(error = %e, "QUIC retry not started");
                            retry_every = (retry_every * 2).min(QUIC_RETRY_MAX);
                            next_probe = Some(Instant::now() + retry_every);
                        }
                    }
                }
                r = poll_slot(&mut probe) => {
                    probe = None;
                    match r {
                        Ok(new) => {
                            info!("rendezvous: QUIC works again; moving from TCP back to QUIC");
                            c.close(b"moved to QUIC").await;
                            return End::Switch(Box::new(new));
                        }
                        Err(e) => {
                            retry_every = (retry_every * 2).min(QUIC_RETRY_MAX);
                            debug!(error = %e, next_s = retry_every.as_secs(), "QUIC retry failed; staying on TCP");
                            next_probe = Some(Instant::now() + retry_every);
                        }
                    }
                }
                r = c.recv.read(&mut buf) => match r {
                    Ok(Some(n)) => c.decoder.push(&buf[..n]),
                    Ok(None) => return End::Lost("server closed the stream".into()),
                    Err(e) => return End::Lost(e.to_string()),
                },
                cmd = cmds.recv() => match cmd {
                    Some(Command::Reload(cs)) => {
                        if self.reload(*cs) {
                            c.close(b"reload").await;
                            return End::Reload;
                        }
                    }
                    Some(cmd) => {
                        if let Err(e) = self.on_command(&mut c, cmd).await {
                            return End::Lost(e.to_string());
                        }
                    }
                    None => {
                        c.close(b"client dropped").await;
                        return End::Closed;
                    }
                },
                _ = close.changed() => {
                    c.close(b"client closed").await;
                    return End::Closed;
                }
            }
        }
    }

    async fn on_command(&mut self, c: &mut Conn, cmd: Command) -> Result<(), ClientError> {
        match cmd {
            Command::Reload(cs) => {
                self.reload(*cs);
                Ok(())
            }
            Command::Watch(keys, reply) => {
                self.watch_set = keys.clone();
                let r = write(&mut c.send, &Message::Watch(keys)).await;
                let _ = reply.send(r.clone());
                r
            }
            Command::Offer {
                peer,
                candidates,
                reply,
            } => {
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1).max(1);
                self.offers.insert(id, reply);
                write(
                    &mut c.send,
                    &Message::Offer(Offer {
                        id,
                        peer,
                        candidates,
                    }),
                )
                .await
            }
            Command::Answer {
                offer_id,
                candidates,
                reply,
            } => {
                self.answers.insert(offer_id, reply);
                write(
                    &mut c.send,
                    &Message::Answer(Answer {
                        offer_id,
                        candidates,
                    }),
                )
                .await
            }
        }
    }

    async fn on_message(&mut self, c: &mut Conn, msg: Message) -> Option<End> {
        // Session messages (re-authentication, a session-ending Unauthorized) go to the core.
        let rest = c.core.handle_message(msg);
        while let Some(m) = c.core.poll_transmit() {
            if let Err(e) = write(&mut c.send, &m).await {
                return Some(End::Lost(e.to_string()));
            }
        }
        while let Some(ev) = c.core.poll_event() {
            match ev {
                ClientEvent::ReauthAnswered => debug!("answered a re-authentication challenge"),
                ClientEvent::Refused(e) => {
                    c.close(b"refused").await;
                    return Some(End::Refused(e));
                }
                ClientEvent::Protocol(p) => return Some(End::Lost(p)),
                _ => {}
            }
        }
        let msg = rest?;
        match msg {
            Message::ObservedAddr(addr) => {
                self.client.set_state(|s| {
                    if let Some(r) = s.registration.as_mut() {
                        r.observed = addr;
                    }
                });
                self.emit(Event::ObservedAddr(addr));
            }
            Message::RelayUpdate(relays) => {
                self.client.set_state(|s| {
                    if let Some(r) = s.registration.as_mut() {
                        r.relays = relays.clone();
                    }
                });
                self.emit(Event::RelayUpdate(relays));
            }
            Message::Presence { key, online } => self.emit(Event::Presence { key, online }),
            Message::IncomingOffer(o) => self.emit(Event::IncomingOffer(IncomingOffer {
                from: o.from,
                offer_id: o.offer_id,
                candidates: o.candidates,
                client: self.client.clone(),
            })),
            Message::PunchStart(p) => {
                let PunchStart {
                    id,
                    peer,
                    peer_candidates,
                    session_secret,
                    start_in_ms,
                    initiator,
                    peer_observed,
                } = p;
                let punch = Punch {
                    peer,
                    peer_candidates,
                    session_secret,
                    start_at: Instant::now() + Duration::from_millis(u64::from(start_in_ms)),
                    initiator,
                    peer_observed,
                };
                let waiter = if initiator {
                    self.offers.remove(&id)
                } else {
                    self.answers.remove(&id)
                };
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok(punch));
                }
            }
            Message::Error(e) => {
                let waiter = self
                    .offers
                    .remove(&e.id)
                    .or_else(|| self.answers.remove(&e.id));
                match waiter {
                    Some(tx) if e.id != 0 => {
                        let _ = tx.send(Err(server_error(e)));
                    }
                    _ => warn!(code = ?e.code, message = %e.message, "rendezvous error"),
                }
            }
            Message::GoAway { reason, message } => {
                info!(?reason, %message, "rendezvous sent GoAway");
                c.close(b"goaway").await;
                return Some(match reason {
                    GoAwayReason::Superseded => End::Superseded,
                    _ => End::Draining,
                });
            }
            other => debug!(kind = other.name(), "ignoring unexpected message"),
        }
        None
    }
}

/// Time each transport gets in [`probe_transports`].
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `f` for at most [`PROBE_TIMEOUT`]; its result and how long it took, in ms.
async fn timed<F>(f: F) -> Result<((), u32), ClientError>
where
    F: std::future::Future<Output = Result<(), ClientError>>,
{
    let t = std::time::Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(((), t.elapsed().as_millis().min(u128::from(u32::MAX)) as u32)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ClientError::Timeout),
    }
}

/// Tries a QUIC handshake and a TLS-over-TCP handshake with the rendezvous of `connect`
/// (first resolved address, no registration), at the same time: what `netcheck` reports as
/// `tcp_fallback`.
pub async fn probe_transports(
    connect: &ConnectString,
    ca_roots: &[CertificateDer<'static>],
) -> meshpunch_proto::nat::TcpFallback {
    use meshpunch_proto::nat::TcpFallback;
    let mut out = TcpFallback::default();
    let addr = match connect.addrs.first() {
        Some(a) => Ok(*a),
        None => tokio::net::lookup_host(connect.authority())
            .await
            .map_err(|e| e.to_string())
            .and_then(|mut it| it.next().ok_or_else(|| "resolves to nothing".to_string())),
    };
    let addr = match addr {
        Ok(a) => a,
        Err(e) => {
            out.quic_error = Some(e.clone());
            out.tcp_error = Some(e);
            return out;
        }
    };
    let (quic, tcp, failures) = match client_configs(&connect.pins, ca_roots) {
        Ok(c) => c,
        Err(e) => {
            out.quic_error = Some(e.to_string());
            out.tcp_error = Some(e.to_string());
            return out;
        }
    };
    let tcp_addr = SocketAddr::new(addr.ip(), connect.tcp_port());
    out.quic_addr = Some(addr);
    out.tcp_addr = Some(tcp_addr);
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let quic_attempt = async {
        let ep = quinn::Endpoint::client(bind)
            .map_err(|e| ClientError::Connect(format!("binding {bind}: {e}")))?;
        let h = quic_handshake(
            ep.clone(),
            quic,
            failures.clone(),
            addr,
            connect.host.clone(),
            false,
        )
        .await?;
        if let Some(c) = &h.quic {
            c.close(0u8.into(), b"netcheck");
        }
        Ok::<_, ClientError>(())
    };
    let tcp_attempt = async {
        tcp_handshake(tcp, failures.clone(), tcp_addr, connect.host.clone())
            .await
            .map(|_| ())
    };
    let (q, t) = tokio::join!(timed(quic_attempt), timed(tcp_attempt));
    match q {
        Ok(((), ms)) => (out.quic_ok, out.quic_ms) = (true, Some(ms)),
        Err(e) => out.quic_error = Some(e.to_string()),
    }
    match t {
        Ok(((), ms)) => (out.tcp_ok, out.tcp_ms) = (true, Some(ms)),
        Err(e) => out.tcp_error = Some(e.to_string()),
    }
    out
}

fn server_error(e: wire::ErrorMsg) -> ClientError {
    ClientError::Server {
        code: e.code,
        message: e.message,
        reason: e.reason,
    }
}

async fn write(send: &mut SendHalf, msg: &Message) -> Result<(), ClientError> {
    send.write_all(&msg.encode())
        .await
        .map_err(ClientError::Connect)
}

/// Sleeps until `at`, or for ever without a deadline.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn read(recv: &mut RecvHalf, decoder: &mut FrameDecoder) -> Result<Message, ClientError> {
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_message() {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) if e.recoverable() => continue,
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(buf.get(..n).unwrap_or_default()),
            Ok(None) => return Err(ClientError::Connect("server closed the stream".into())),
            Err(e) => return Err(ClientError::Connect(e)),
        }
    }
}
