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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshpunch_proto::nat::RelayLatency;
use meshpunch_proto::path::{
    BirthdayStatus, LocalSocket, MappingBehaviour, PairStatus, PathKind, ProbeCounters,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

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
    /// `disabled`, `connecting`, `connected` or `disconnected`.
    pub state: String,
    /// Last error.
    pub error: Option<String>,
    /// Address the rendezvous saw our QUIC connection from.
    pub observed_addr: Option<SocketAddr>,
    /// The QUIC connection to the rendezvous runs on the data socket (demultiplexed by
    /// source), so `observed_addr` is the data socket's mapping as the rendezvous sees it.
    #[serde(default)]
    pub shares_data_socket: bool,
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
    /// `lan`, `direct`, `relay` or `none`.
    pub path: PathKind,
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
    /// Every candidate pair.
    pub pairs: Vec<PairStatus>,
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
    /// Peers.
    pub peers: Vec<PeerStatus>,
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
}

/// Time a single ping waits for its pong.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the control socket at `path` (replacing a stale socket file) until the engine goes.
pub async fn serve(path: PathBuf, engine: mpsc::Sender<CtlCmd>) -> std::io::Result<()> {
    if path.exists() {
        // A live daemon on the same path would answer; a dead one left a stale file.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon serves {}", path.display()),
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let listener = UnixListener::bind(&path)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = handle_conn(stream, engine).await;
            });
        }
    });
    Ok(())
}

async fn write_json<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    v: &T,
) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

async fn handle_conn(stream: UnixStream, engine: mpsc::Sender<CtlCmd>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
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
                match rx.await {
                    Ok(s) => write_json(&mut w, &s).await?,
                    Err(_) => return Ok(()),
                }
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
        }
    }
    Ok(())
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
    write_json(&mut w, req).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        if !each(v) {
            break;
        }
    }
    Ok(())
}

/// Default control socket path: `$XDG_RUNTIME_DIR/meshpunch.sock` (or
/// `/run/meshpunch/meshpunch.sock` as root, `/tmp/meshpunch-$UID.sock` otherwise).
pub fn default_socket_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("meshpunch.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/meshpunch/meshpunch.sock")
    } else {
        PathBuf::from(format!("/tmp/meshpunch-{uid}.sock"))
    }
}
