//! The daemon's control socket: a Unix stream socket speaking one JSON request per line and
//! answering with JSON lines. `meshpunch status`, `meshpunch ping` and `meshpunch debug` are
//! its clients; anything that can write JSON to a Unix socket can drive the daemon.
//!
//! Requests (one line each):
//! * `{"cmd":"status"}` → one line: the [`Status`] object.
//! * `{"cmd":"ping","peer":KEY,"count":N,"interval_ms":MS}` → one [`PingLine`] per ping, then
//!   `{"done":true,...}`.
//! * `{"cmd":"debug","peer":KEY,"knob":"block-direct"|"force-relay"|"block-relay","on":BOOL}`
//!   → `{"ok":true}` or `{"error":"..."}`.
//! * `{"cmd":"reload"}` → `{"ok":true,"summary":"+1 peer (laptop), -0, ~0","changes":{...}}`
//!   or `{"error":"..."}` (nothing changed) — `meshpunch reload`, the same as SIGHUP.
//! * `{"cmd":"down"}` → `{"ok":true,"pid":N}`; the daemon then exits cleanly (restores the
//!   `--wg-interface` endpoints, removes its control socket) — `meshpunch down`.
//!
//! Who may talk to it: the socket is mode 0600 (whatever the umask) in a directory only its
//! owner (or root) can write, and every connection's peer credentials (`SO_PEERCRED`) are
//! checked: only the daemon's uid and root are served; anyone else gets one
//! `{"error":...,"refused":true}` line and is closed. Request lines are capped at
//! [`MAX_REQUEST_LINE`] bytes and connections at [`MAX_CONNECTIONS`]; every refusal is logged
//! and counted (`control_socket` in `meshpunch status --json`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshpunch_proto::nat::RelayLatency;
use meshpunch_proto::path::{
    BirthdayStatus, LocalSocket, MappingBehaviour, PairStatus, PathKind, ProbeCounters,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Status of the daemon and every peer.
    Status,
    /// Ping a peer over its current path.
    Ping {
        /// Peer public key (base64) or name.
        peer: String,
        /// Number of pings.
        #[serde(default = "default_count")]
        count: u32,
        /// Interval between pings.
        #[serde(default = "default_interval")]
        interval_ms: u64,
    },
    /// Test knobs.
    Debug {
        /// Peer public key (base64) or name.
        peer: String,
        /// `block-direct` (alias `force-relay`) or `block-relay`.
        knob: String,
        /// On or off.
        on: bool,
    },
    /// Stop the daemon cleanly (`meshpunch down`).
    Down,
    /// Re-read the config's peers like SIGHUP does (`meshpunch reload`).
    Reload,
}

/// What a config reload changed (`meshpunch reload`, SIGHUP): peer labels (name, or the
/// first 8 characters of the key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerChanges {
    /// Peers added.
    pub added: Vec<String>,
    /// Peers removed.
    pub removed: Vec<String>,
    /// Peers whose name, candidates, `ProxyPort`, `AllowedIPs` or `PresharedKey` changed.
    pub changed: Vec<String>,
    /// What could not be applied after the checks passed (a system call failed).
    #[serde(default)]
    pub errors: Vec<String>,
}

impl PeerChanges {
    /// `+1 peer (laptop), -0, ~2 peers (a, b)`.
    pub fn summary(&self) -> String {
        let part = |sign: char, v: &[String]| match v.len() {
            0 => format!("{sign}0"),
            1 => format!("{sign}1 peer ({})", v[0]),
            n => format!("{sign}{n} peers ({})", v.join(", ")),
        };
        format!(
            "{}, {}, {}",
            part('+', &self.added),
            part('-', &self.removed),
            part('~', &self.changed)
        )
    }
}

fn default_count() -> u32 {
    5
}
fn default_interval() -> u64 {
    1000
}

/// The rendezvous connection as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RendezvousStatus {
    /// `disabled`, `connecting`, `connected`, `disconnected` or `unauthorized` (the token was
    /// refused: expired, revoked, …; the daemon retries every 5 min or on SIGHUP).
    pub state: String,
    /// Last error.
    pub error: Option<String>,
    /// Why the token was refused (`expired`, `revoked`, `bad_token`, `key_not_allowed`,
    /// `bad_proof`, `reauth_timeout`, `unauthorized`), while state is `unauthorized`.
    #[serde(default)]
    pub auth_reason: Option<String>,
    /// Expiry of the token in use (unix seconds), when known from a refusal.
    #[serde(default)]
    pub token_expires_unix: Option<u64>,
    /// Address the rendezvous saw our QUIC connection from.
    pub observed_addr: Option<SocketAddr>,
    /// The QUIC connection to the rendezvous runs on the data socket (demultiplexed by
    /// source), so `observed_addr` is the data socket's mapping as the rendezvous sees it.
    #[serde(default)]
    pub shares_data_socket: bool,
    /// Transport of the current registration: `quic`, or `tcp` over the TLS-over-TCP fallback
    /// (then `observed_addr` is a TCP mapping and never a UDP candidate).
    #[serde(default)]
    pub transport: Option<String>,
    /// Local address of the socket the QUIC connection runs on (`data_addr` when shared).
    #[serde(default)]
    pub quic_local_addr: Option<SocketAddr>,
    /// Datagrams from the rendezvous handed from the data socket to QUIC.
    #[serde(default)]
    pub quic_rx: u64,
    /// Datagrams from the rendezvous dropped because QUIC's queue was full.
    #[serde(default)]
    pub quic_rx_dropped: u64,
}

/// The home relay as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Region.
    pub region: String,
    /// TURN server address.
    pub server: SocketAddr,
    /// Our relayed address.
    pub relayed: Option<SocketAddr>,
    /// `allocating`, `allocated` or `failed`.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// How the relay is reached: `udp`, `tcp` (TURN over TCP) or `tls` (TURN over TLS).
    #[serde(default)]
    pub transport: String,
    /// The TURN URI in use.
    #[serde(default)]
    pub url: String,
    /// Messages to a TCP/TLS relay dropped (queue full while the stream stalled, or the
    /// stream down); 0 on UDP.
    #[serde(default)]
    pub stream_dropped: u64,
}

/// The NAT keepalive as status shows it (`nat` in `meshpunch status --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NatStatus {
    /// NAT binding lifetime in seconds: the configured value, or the longest idle period a
    /// mapping was seen to survive (`null` = unknown).
    pub binding_lifetime_s: Option<u64>,
    /// The shortest idle period a mapping was seen to expire in (`null` = none expired).
    pub binding_lifetime_max_s: Option<u64>,
    /// Idle keepalive interval of every peer's paths, seconds.
    pub keepalive_interval_s: f64,
    /// Where the interval comes from: `measured`, `config`, `cached` or `default`.
    pub source: String,
    /// A measurement runs in the background.
    pub measuring: bool,
    /// Public IP the value belongs to.
    pub public_ip: Option<std::net::IpAddr>,
    /// Why the last measurement gave no result.
    pub error: Option<String>,
}

/// One peer in `meshpunch status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Name from the config.
    pub name: Option<String>,
    /// The 127.0.0.1 port WireGuard sends this peer's packets to.
    pub proxy: SocketAddr,
    /// Of `tx_bytes`, bytes sent through the relay.
    #[serde(default)]
    pub relay_tx_bytes: u64,
    /// Of `rx_bytes`, bytes received through the relay.
    #[serde(default)]
    pub relay_rx_bytes: u64,
    /// Path changes since start (the first path counts as one).
    #[serde(default)]
    pub path_changes: u64,
    /// Failovers: a `direct`/`lan` path given up for `relay` or `none`.
    #[serde(default)]
    pub failovers: u64,
    /// The peer's tunnel prefixes (`AllowedIPs`) in `--tun` mode; empty in proxy mode.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// `lan`, `direct`, `relay` or `none`.
    pub path: PathKind,
    /// With `path` `relay`: how our relay is reached (`udp`, `tcp` or `tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_transport: Option<String>,
    /// Remote endpoint of the path (`relay:IP:PORT` for the relay).
    pub remote: Option<String>,
    /// Smoothed RTT of the path in milliseconds.
    pub rtt_ms: Option<f64>,
    /// WireGuard bytes sent to the peer.
    pub tx_bytes: u64,
    /// WireGuard bytes received from the peer.
    pub rx_bytes: u64,
    /// WireGuard packets sent.
    pub tx_packets: u64,
    /// WireGuard packets received.
    pub rx_packets: u64,
    /// Packets from WireGuard dropped because no path existed.
    pub dropped_no_path: u64,
    /// Packets on the proxy port refused because they came from another local address than
    /// WireGuard's (the configured `WireGuardEndpoint`, or the first address that used it).
    #[serde(default)]
    pub proxy_refused: u64,
    /// Why this path (or why none).
    pub reason: String,
    /// A punching session exists.
    pub session: bool,
    /// `debug block-direct` is on.
    pub direct_blocked: bool,
    /// Local socket carrying the path: 0 = the data socket, `N` = birthday pool socket `N`.
    #[serde(default)]
    pub local_socket: LocalSocket,
    /// UDP port of that local socket.
    #[serde(default)]
    pub local_port: Option<u16>,
    /// Birthday probing towards this peer (role, spray pings sent / answered, pairs found).
    #[serde(default)]
    pub birthday: BirthdayStatus,
    /// Every candidate pair (each with the `mtu` its last path MTU search found).
    pub pairs: Vec<PairStatus>,
    /// The smallest tunnel MTU any working path to this peer allows (path MTU probing;
    /// `null` until a search finished, or when the peer does not answer sized probes).
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// Birthday probing in `meshpunch status --json` (all peers together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirthdayTotals {
    /// Our data socket's mapping behaviour from two STUN servers (`endpoint-dependent` makes
    /// us the hard side).
    pub mapping: MappingBehaviour,
    /// Pool sockets open now.
    pub pool_open: usize,
    /// Pool sockets opened since start.
    pub pool_opened_total: u64,
    /// Spray pings sent (easy side).
    pub spray_sent: u64,
    /// Spray pings answered by an authenticated pong.
    pub spray_hits: u64,
    /// Pairs found by birthday probing that became valid.
    pub found: u64,
    /// Pool pings sent with the low TTL (`BirthdayTtl`, hard side).
    #[serde(default)]
    pub low_ttl_pings: u64,
}

/// `meshpunch status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Our public key.
    pub public_key: String,
    /// Local address of the data socket.
    pub data_addr: SocketAddr,
    /// NAT binding lifetime and keepalive interval.
    #[serde(default)]
    pub nat: NatStatus,
    /// Our address as STUN servers see the data socket.
    pub public_addr: Option<SocketAddr>,
    /// Where `public_addr` comes from: `stun` (a STUN Binding from the data socket) or
    /// `rendezvous` (the address the rendezvous observed on the shared data socket, used
    /// until STUN answers).
    #[serde(default)]
    pub public_addr_source: Option<String>,
    /// Rendezvous connection.
    pub rendezvous: RendezvousStatus,
    /// Home relay.
    pub home_relay: Option<RelayStatus>,
    /// Latency to every relay region.
    pub relays: Vec<RelayLatency>,
    /// Probe counters (all peers).
    pub probes: ProbeCounters,
    /// Birthday probing (all peers).
    #[serde(default)]
    pub birthday: BirthdayTotals,
    /// Port mapping (`null` when `PortMapping = off` or not started: no default gateway, a
    /// data socket on loopback).
    #[serde(default)]
    pub portmap: Option<crate::portmap::PortmapStatus>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// The `--wg-interface` meshpunch keeps pointed at its proxy ports.
    #[serde(default)]
    pub wg_interface: Option<WgInterfaceStatus>,
    /// The built-in WireGuard device (`up --tun`), when the daemon runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun: Option<TunStatus>,
    /// Config reloads (SIGHUP, `meshpunch reload`) since start.
    #[serde(default)]
    pub config_reloads: ConfigReloads,
    /// Path MTU probing (docs/mtu.md).
    #[serde(default)]
    pub mtu: MtuStatus,
}

/// Config reloads by outcome (`config_reloads` in `meshpunch status --json`,
/// `meshpunch_client_config_reloads_total{result}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReloads {
    /// Applied.
    pub ok: u64,
    /// Refused (the file did not parse or check); nothing changed.
    pub failed: u64,
}

/// Path MTU in `meshpunch status --json` (docs/mtu.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtuStatus {
    /// The smallest tunnel MTU any measured path to any peer allows (`null`: none measured).
    pub path: Option<u16>,
    /// The WireGuard interface MTU this daemon recommends: `path`, or the static
    /// recommendation of the mode (1412) while nothing is measured. In `--tun` mode the
    /// interface follows it (never above `MTU`); otherwise set it on your WireGuard interface.
    pub recommended: u16,
    /// Times the `--tun` interface MTU was changed to follow the paths.
    pub changes: u64,
    /// The last error setting the interface MTU.
    pub error: Option<String>,
    /// Datagrams the kernel refused as larger than the outgoing link (EMSGSIZE): MTU probes
    /// above the local link's MTU, or WireGuard packets too big for it.
    pub send_too_big: u64,
}

/// The watched `--wg-interface` (`wg_interface` in `meshpunch status --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WgInterfaceStatus {
    /// Interface name.
    pub name: String,
    /// `up` (seen at the last poll) or `gone` (`wg show` failed: deleted, or being
    /// re-created; meshpunch keeps polling and re-points the peers when it is back).
    pub state: String,
    /// Since when it is gone (unix seconds).
    pub gone_since_unix: Option<u64>,
    /// Last error (`wg show` or `wg set`).
    pub error: Option<String>,
    /// Endpoints meshpunch re-pointed after someone else changed them (re-created
    /// interface, `wg syncconf`).
    pub reapplied_total: u64,
    /// The interface's firewall mark as `wg show` says.
    pub fwmark: Option<u32>,
    /// Peers on the interface that meshpunch could not carry (no proxy port could be bound).
    #[serde(default)]
    pub unmanaged_peers: Vec<String>,
}

/// The built-in WireGuard device's counters (totals since the daemon started).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunStatus {
    /// Interface name.
    pub name: String,
    /// Packets read from the device and sent to a peer.
    pub tx_packets: u64,
    /// Their bytes (inner).
    pub tx_bytes: u64,
    /// Packets decrypted and written to the device.
    pub rx_packets: u64,
    /// Their bytes (inner).
    pub rx_bytes: u64,
    /// Outgoing packets whose destination is in no peer's `AllowedIPs`.
    pub no_peer: u64,
    /// Received datagrams that failed to decrypt or authenticate, or were replays.
    pub decrypt_failed: u64,
    /// Decrypted packets from a source outside the sending peer's `AllowedIPs` (dropped).
    pub bad_source: u64,
    /// Packets the device refused.
    pub write_failed: u64,
    /// The interface MTU now (follows the smallest working path, never above `configured_mtu`).
    #[serde(default)]
    pub mtu: u32,
    /// `MTU` as configured.
    #[serde(default)]
    pub configured_mtu: u32,
}

/// One line of `ping` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingLine {
    /// 1-based sequence number.
    pub seq: u32,
    /// Path kind the ping took.
    pub path: Option<PathKind>,
    /// Remote it went to.
    pub remote: Option<String>,
    /// RTT in ms (None = no answer).
    pub rtt_ms: Option<f64>,
    /// Error (no path, timeout).
    pub error: Option<String>,
}

/// What `meshpunch ping` prints at the end: sent, received, loss and RTT min/avg/max, like
/// ping(8).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PingSummary {
    /// Pings that got an answer or an error line.
    pub sent: u32,
    /// Pongs.
    pub received: u32,
    /// Smallest, sum and largest RTT in ms.
    rtt: Option<(f64, f64, f64)>,
    /// A pong came over a direct or LAN path.
    pub direct: bool,
}

impl PingSummary {
    /// A ping without an answer.
    pub fn lost(&mut self) {
        self.sent += 1;
    }

    /// A pong after `rtt_ms` over `path`.
    pub fn pong(&mut self, rtt_ms: f64, path: Option<PathKind>) {
        self.sent += 1;
        self.received += 1;
        self.direct |= matches!(path, Some(PathKind::Direct | PathKind::Lan));
        let (lo, sum, hi) = self.rtt.unwrap_or((f64::MAX, 0.0, 0.0));
        self.rtt = Some((lo.min(rtt_ms), sum + rtt_ms, hi.max(rtt_ms)));
    }

    /// `--- PEER ping statistics: 5 sent, 4 received, 20% loss, rtt min/avg/max 0.41/0.52/0.70 ms`.
    pub fn line(&self, peer: &str) -> String {
        let loss = (100 * self.sent.saturating_sub(self.received))
            .checked_div(self.sent)
            .unwrap_or(0);
        let mut s = format!(
            "--- {peer} ping statistics: {} sent, {} received, {loss}% loss",
            self.sent, self.received
        );
        if let Some((lo, sum, hi)) = self.rtt {
            let avg = sum / f64::from(self.received.max(1));
            s.push_str(&format!(", rtt min/avg/max {lo:.2}/{avg:.2}/{hi:.2} ms"));
        }
        s
    }
}

/// Result of one ping inside the engine.
#[derive(Debug, Clone)]
pub struct PingResult {
    /// Path kind.
    pub path: PathKind,
    /// Remote.
    pub remote: String,
    /// RTT.
    pub rtt: Duration,
}

/// Commands from the control server to the engine.
#[derive(Debug)]
pub enum CtlCmd {
    /// Status snapshot.
    Status(oneshot::Sender<Status>),
    /// One ping; the engine answers when the pong arrives (or with an error at once).
    PingOnce {
        /// Peer key or name.
        peer: String,
        /// Answer.
        reply: oneshot::Sender<Result<PingResult, String>>,
    },
    /// A debug knob.
    Debug {
        /// Peer key or name.
        peer: String,
        /// Knob.
        knob: String,
        /// On/off.
        on: bool,
        /// Answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Stop the daemon (`meshpunch down`); answered before the engine stops.
    Shutdown(oneshot::Sender<()>),
    /// `meshpunch reload`: re-read the config's peers; the answer says what changed.
    Reload(oneshot::Sender<Result<PeerChanges, String>>),
}

/// Time a single ping waits for its pong.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request line the daemon reads, newline excluded (a request is a few hundred bytes).
/// A longer line closes that connection; the daemon keeps serving the others.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Control connections served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Refusals on the control socket since the daemon started (`control_socket` in
/// `meshpunch status --json`).
#[derive(Debug, Default)]
pub struct ControlCounters {
    /// Connections from a uid that is neither the daemon's nor root.
    pub refused_uid: AtomicU64,
    /// Connections closed for a request line longer than [`MAX_REQUEST_LINE`].
    pub oversized_lines: AtomicU64,
    /// Connections refused because [`MAX_CONNECTIONS`] were open.
    pub over_capacity: AtomicU64,
}

impl ControlCounters {
    /// The counters as JSON (`refused_uid_total`, `oversized_line_total`,
    /// `over_capacity_total`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "refused_uid_total": self.refused_uid.load(Ordering::Relaxed),
            "oversized_line_total": self.oversized_lines.load(Ordering::Relaxed),
            "over_capacity_total": self.over_capacity.load(Ordering::Relaxed),
        })
    }
}

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    counters: Arc<ControlCounters>,
    uid: u32,
}

/// Serves the control socket at `path` (replacing a stale socket file) until the engine goes.
pub async fn serve(path: PathBuf, engine: mpsc::Sender<CtlCmd>) -> std::io::Result<()> {
    bind(&path).await?.spawn(engine);
    Ok(())
}

/// Binds the control socket at `path`, mode 0600 from the first moment it is reachable
/// whatever the umask: the socket is bound inside a fresh 0700 directory next to `path`,
/// chmod-ed, then renamed into place. The directory holding `path` is created 0700 if missing;
/// an existing one must belong to this user or root and must not be writable by others
/// (unless sticky, like `/tmp`). A stale socket (no daemon answers) is replaced; any other
/// file at `path` is left alone and is an error.
pub async fn bind(path: &Path) -> std::io::Result<ControlServer> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};

    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "cannot create the control socket directory {}: {e}",
                        dir.display()
                    ),
                )
            })?;
    }
    let meta = std::fs::metadata(&dir)?;
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "control socket directory {} belongs to uid {}, not to this user ({uid}) or root: \
                 choose a directory only you can write (--control-socket or ControlSocket)",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "control socket directory {} is world-writable: choose a directory only you can \
                 write (--control-socket or ControlSocket)",
                dir.display()
            ),
        ));
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        // A live daemon on the same path would answer; a dead one left a stale file.
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::new(
                ErrorKind::AddrInUse,
                format!("another daemon serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bind in a private directory so the socket is never reachable with the umask's mode.
    let private = loop {
        let d = dir.join(format!(".mp{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => break d,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let tmp = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok::<_, Error>(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let listener = bound.map_err(|e| {
        Error::new(
            e.kind(),
            format!("cannot bind the control socket {}: {e}", path.display()),
        )
    })?;
    Ok(ControlServer {
        listener,
        counters: Arc::new(ControlCounters::default()),
        uid,
    })
}

impl ControlServer {
    /// The refusal counters of this socket.
    pub fn counters(&self) -> Arc<ControlCounters> {
        self.counters.clone()
    }

    /// Accepts connections on a task until the runtime ends. A connection from another uid
    /// than the daemon's (or root) gets one error line and is closed, as is one beyond
    /// [`MAX_CONNECTIONS`].
    pub fn spawn(self, engine: mpsc::Sender<CtlCmd>) {
        let ControlServer {
            listener,
            counters,
            uid,
        } = self;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: do not spin.
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let peer_uid = stream.peer_cred().map(|c| c.uid());
                match peer_uid {
                    Ok(p) if p == uid || p == 0 => {}
                    other => {
                        counters.refused_uid.fetch_add(1, Ordering::Relaxed);
                        let who = match other {
                            Ok(p) => format!("uid {p}"),
                            Err(e) => format!("a peer without credentials ({e})"),
                        };
                        tracing::warn!(peer = %who, daemon_uid = uid, "control connection refused");
                        refuse(
                            &stream,
                            &format!(
                                "permission denied: this daemon (uid {uid}) takes control \
                                 requests only from uid {uid} or root, not from {who}; run the \
                                 command as that user or with sudo"
                            ),
                        );
                        continue;
                    }
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    counters.over_capacity.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        "control connection refused: too many open"
                    );
                    refuse(
                        &stream,
                        &format!(
                            "too many control connections (at most {MAX_CONNECTIONS}); try again"
                        ),
                    );
                    continue;
                };
                let engine = engine.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    let _ = handle_conn(stream, engine, &counters).await;
                    drop(slot);
                });
            }
        });
    }
}

/// Writes one refusal line without waiting (a fresh socket's buffer takes it) and lets the
/// caller drop the stream.
fn refuse(stream: &UnixStream, msg: &str) {
    let mut line = serde_json::json!({"error": msg, "refused": true}).to_string();
    line.push('\n');
    let _ = stream.try_write(line.as_bytes());
}

/// One request line read by [`read_request_line`].
#[derive(Debug, PartialEq)]
enum RequestLine {
    /// A line, newline removed.
    Line(Vec<u8>),
    /// The peer closed the connection.
    Eof,
    /// More than [`MAX_REQUEST_LINE`] bytes without a newline.
    TooLong,
}

/// Reads one line of at most `cap` bytes (newline excluded), never buffering more than
/// `cap + 1` bytes of it.
async fn read_request_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    cap: usize,
) -> std::io::Result<RequestLine> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(cap as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(RequestLine::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > cap {
        return Ok(RequestLine::TooLong);
    }
    Ok(RequestLine::Line(buf))
}

async fn write_json<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

async fn handle_conn(
    stream: UnixStream,
    engine: mpsc::Sender<CtlCmd>,
    counters: &ControlCounters,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match read_request_line(&mut reader, MAX_REQUEST_LINE).await? {
            RequestLine::Line(l) => l,
            RequestLine::Eof => return Ok(()),
            RequestLine::TooLong => {
                counters.oversized_lines.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    max = MAX_REQUEST_LINE,
                    "control request line too long; closing"
                );
                let msg = format!("request line longer than {MAX_REQUEST_LINE} bytes; closing");
                write_json(&mut w, &serde_json::json!({"error": msg})).await?;
                return Ok(());
            }
        };
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                write_json(
                    &mut w,
                    &serde_json::json!({"error": format!("bad request: {e}")}),
                )
                .await?;
                continue;
            }
        };
        match req {
            Request::Status => {
                let (tx, rx) = oneshot::channel();
                if engine.send(CtlCmd::Status(tx)).await.is_err() {
                    return Ok(());
                }
                let Ok(s) = rx.await else {
                    return Ok(());
                };
                let mut v = serde_json::to_value(&s).map_err(std::io::Error::other)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("control_socket".into(), counters.to_json());
                }
                write_json(&mut w, &v).await?;
            }
            Request::Ping {
                peer,
                count,
                interval_ms,
            } => {
                let (mut ok, mut lost) = (0u32, 0u32);
                for seq in 1..=count.max(1) {
                    let (tx, rx) = oneshot::channel();
                    if engine
                        .send(CtlCmd::PingOnce {
                            peer: peer.clone(),
                            reply: tx,
                        })
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                    let line = match tokio::time::timeout(PING_TIMEOUT, rx).await {
                        Ok(Ok(Ok(r))) => {
                            ok += 1;
                            PingLine {
                                seq,
                                path: Some(r.path),
                                remote: Some(r.remote),
                                rtt_ms: Some(r.rtt.as_secs_f64() * 1000.0),
                                error: None,
                            }
                        }
                        Ok(Ok(Err(e))) => {
                            lost += 1;
                            PingLine {
                                seq,
                                path: None,
                                remote: None,
                                rtt_ms: None,
                                error: Some(e),
                            }
                        }
                        _ => {
                            lost += 1;
                            PingLine {
                                seq,
                                path: None,
                                remote: None,
                                rtt_ms: None,
                                error: Some("timeout".into()),
                            }
                        }
                    };
                    write_json(&mut w, &line).await?;
                    if seq < count {
                        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
                    }
                }
                write_json(
                    &mut w,
                    &serde_json::json!({"done": true, "received": ok, "lost": lost}),
                )
                .await?;
            }
            Request::Debug { peer, knob, on } => {
                let (tx, rx) = oneshot::channel();
                if engine
                    .send(CtlCmd::Debug {
                        peer,
                        knob,
                        on,
                        reply: tx,
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                match rx.await {
                    Ok(Ok(())) => write_json(&mut w, &serde_json::json!({"ok": true})).await?,
                    Ok(Err(e)) => write_json(&mut w, &serde_json::json!({"error": e})).await?,
                    Err(_) => return Ok(()),
                }
            }
            Request::Reload => {
                let (tx, rx) = oneshot::channel();
                if engine.send(CtlCmd::Reload(tx)).await.is_err() {
                    return Ok(());
                }
                match rx.await {
                    Ok(Ok(c)) => {
                        write_json(
                            &mut w,
                            &serde_json::json!({"ok": true, "summary": c.summary(), "changes": c}),
                        )
                        .await?
                    }
                    Ok(Err(e)) => write_json(&mut w, &serde_json::json!({"error": e})).await?,
                    Err(_) => return Ok(()),
                }
            }
            Request::Down => {
                let (tx, rx) = oneshot::channel();
                if engine.send(CtlCmd::Shutdown(tx)).await.is_err() || rx.await.is_err() {
                    return Ok(());
                }
                tracing::info!("stop requested on the control socket (meshpunch down)");
                write_json(
                    &mut w,
                    &serde_json::json!({"ok": true, "pid": std::process::id()}),
                )
                .await?;
                return Ok(());
            }
        }
    }
}

/// Client side: sends `req` and returns the first response line.
pub async fn request(path: &Path, req: &Request) -> std::io::Result<serde_json::Value> {
    let mut out = Vec::new();
    request_lines(path, req, |v| {
        out.push(v);
        false
    })
    .await?;
    out.into_iter()
        .next()
        .ok_or_else(|| std::io::Error::other("daemon closed the control connection"))
}

/// Client side: sends `req` and calls `each` for every response line until it returns false
/// or the stream ends.
pub async fn request_lines(
    path: &Path,
    req: &Request,
    mut each: impl FnMut(serde_json::Value) -> bool,
) -> std::io::Result<()> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the daemon at {}: {e} (is `meshpunch up` running?)",
                path.display()
            ),
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    if let Err(e) = write_json(&mut w, req).await {
        // A daemon that refused us may close before reading; its reason is already queued.
        if let Ok(Some(line)) = lines.next_line().await {
            refused(path, &line)?;
        }
        return Err(e);
    }
    while let Some(line) = lines.next_line().await? {
        refused(path, &line)?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        if !each(v) {
            break;
        }
    }
    Ok(())
}

/// An error when `line` is the daemon refusing the connection itself (another uid, too many
/// connections).
fn refused(path: &Path, line: &str) -> std::io::Result<()> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Ok(());
    };
    if v.get("refused").and_then(|r| r.as_bool()) != Some(true) {
        return Ok(());
    }
    let msg = v.get("error").and_then(|e| e.as_str()).unwrap_or("refused");
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("{}: {msg}", path.display()),
    ))
}

/// Default control socket path: `$XDG_RUNTIME_DIR/meshpunch.sock`; as root
/// `/run/meshpunch/meshpunch.sock`; otherwise `$HOME/.local/state/meshpunch/meshpunch.sock`
/// (the directory is created 0700), or `/run/user/UID/meshpunch.sock` without `$HOME`. Never a
/// predictable name in a world-writable directory such as `/tmp`.
pub fn default_socket_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        return PathBuf::from(d).join("meshpunch.sock");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/meshpunch/meshpunch.sock");
    }
    match std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute()) {
        Some(h) => PathBuf::from(h).join(".local/state/meshpunch/meshpunch.sock"),
        None => PathBuf::from(format!("/run/user/{uid}/meshpunch.sock")),
    }
}

#[cfg(test)]
mod ping_summary_tests {
    use super::*;

    #[test]
    fn ping_summary_counts_loss_and_rtt_and_knows_a_direct_pong() {
        let mut s = PingSummary::default();
        assert_eq!(
            s.line("bob"),
            "--- bob ping statistics: 0 sent, 0 received, 0% loss"
        );
        s.pong(2.0, Some(PathKind::Relay));
        s.lost();
        assert!(!s.direct);
        s.pong(1.0, Some(PathKind::Lan));
        s.pong(3.0, Some(PathKind::Direct));
        s.lost();
        assert!(s.direct);
        assert_eq!(
            s.line("bob"),
            "--- bob ping statistics: 5 sent, 3 received, 40% loss, rtt min/avg/max 1.00/2.00/3.00 ms"
        );
    }
}
