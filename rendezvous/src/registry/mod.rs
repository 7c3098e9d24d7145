//! Who is connected where, and delivery of messages between peers.
//!
//! Every cross-peer interaction of the rendezvous (offers, answers, punch signals, presence
//! events, "a newer connection took your key") goes through [`Registry`], addressed by
//! [`PeerId`] = (network, key). A node never talks to another peer's connection directly: it
//! asks the registry to deliver an [`Envelope`], and the registry puts it in the [`Inbox`] of
//! the node that owns the target's connection. The node's dispatcher then hands it to the
//! right connection task. With the in-memory backend there is exactly one node; a shared
//! backend (Redis) lets many nodes serve one set of networks.
//!
//! Ownership is "newest connection wins": [`Registry::register`] makes `conn` the owner and
//! sends [`Delivery::Superseded`] for the previous connection to its node, which then sends the
//! client `GoAway{Superseded}` and closes it.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use meshpunch_proto::wire::{Candidate, ErrorCode, PeerKey};
use serde::{Deserialize, Serialize};

/// A boxed, `Send` future: keeps [`Registry`] object safe (`Arc<dyn Registry>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connection id, random and unique across nodes.
pub type ConnId = u64;

/// Receiving end of a node's inbox: deliveries for the peers connected to this node.
pub type Inbox = tokio::sync::mpsc::Receiver<Envelope>;

/// Capacity of a node inbox (deliveries queued before [`RegistryError::Overloaded`]).
pub const INBOX_CAPACITY: usize = 65_536;

/// A registered peer: network name and WireGuard public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId {
    /// Network (tenant) name from the token.
    pub network: String,
    /// WireGuard public key.
    pub key: PeerKey,
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.key)
    }
}

/// Something delivered to one peer's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// `from` offers to connect (forwarded to the target as `IncomingOffer`).
    Offer {
        /// The offering peer (same network as the target).
        from: PeerKey,
        /// Server-assigned id the target answers with.
        offer_id: u64,
        /// The offerer's own request id, echoed back in [`Delivery::Answer`].
        request_id: u64,
        /// The offerer's candidates.
        candidates: Vec<Candidate>,
        /// Smoothed RTT of the offerer's connection, for the common start time.
        initiator_rtt_ms: u32,
    },
    /// The target answered: the offerer gets its candidates and the session.
    Answer {
        /// The answering peer.
        from: PeerKey,
        /// The offerer's request id.
        request_id: u64,
        /// The answerer's candidates.
        candidates: Vec<Candidate>,
        /// Session secret shared by both sides.
        session_secret: [u8; 32],
        /// Common start time, unix milliseconds (server clocks).
        start_at_unix_ms: u64,
    },
    /// The offer could not be completed (target refused, went away, timed out).
    OfferFailed {
        /// The target of the offer.
        from: PeerKey,
        /// The offerer's request id.
        request_id: u64,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// A watched key came online or went away.
    Presence {
        /// The watched key.
        key: PeerKey,
        /// Online now?
        online: bool,
    },
    /// Connection `conn` lost its key to a newer connection: close it with GoAway.
    Superseded {
        /// The connection that lost ownership.
        conn: ConnId,
    },
}

/// A delivery with its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The recipient.
    pub to: PeerId,
    /// What it gets.
    pub delivery: Delivery,
}

/// Registry failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The addressed peer is not connected (or not in that network).
    #[error("peer not found")]
    NotFound,
    /// The target node's inbox is full.
    #[error("registry overloaded")]
    Overloaded,
    /// The backend is unreachable or failed.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

/// Readiness of the registry backend, reported by `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// False when the backend cannot serve (the node should not get new clients).
    pub ready: bool,
    /// Human-readable state (`"memory"`, `"redis ok"`, `"redis: connection refused"`).
    pub detail: String,
}

/// The seam between the rendezvous and its state backend. Object safe: used as
/// `Arc<dyn Registry>`. Every method may be called concurrently from many connection tasks.
pub trait Registry: Send + Sync + 'static {
    /// Id of this node (appears in logs and, for shared backends, in ownership records).
    fn node_id(&self) -> &str;

    /// Makes `conn` (on this node) the owner of `peer`. A previous owner gets
    /// [`Delivery::Superseded`] through its node's inbox. If `peer` was offline, every watcher
    /// of `peer` gets `Presence{online: true}`.
    fn register<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Releases `peer` if `conn` still owns it (a superseded connection releases nothing),
    /// drops `peer`'s watch set, and sends `Presence{online: false}` to its watchers.
    fn unregister<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Called by the owning connection every [`REFRESH_INTERVAL`] so TTL-based backends keep
    /// the record alive while the node runs (and expire it when the node dies).
    fn refresh<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Whether `peer` is connected anywhere.
    fn is_online<'a>(&'a self, peer: &'a PeerId) -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// Delivers to `to`'s inbox; [`RegistryError::NotFound`] if `to` is not connected.
    fn deliver<'a>(
        &'a self,
        to: &'a PeerId,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Replaces the set of keys `watcher` watches (same network as the watcher) and returns
    /// the current online state of each. Later changes arrive as [`Delivery::Presence`].
    fn watch<'a>(
        &'a self,
        watcher: &'a PeerId,
        keys: &'a [PeerKey],
    ) -> BoxFuture<'a, Result<Vec<(PeerKey, bool)>, RegistryError>>;

    /// Backend readiness for `/readyz`.
    fn health(&self) -> BoxFuture<'_, Health>;

    /// Adds a token hash ([`meshpunch_proto::token::revocation_hash`] form: 64 lowercase hex)
    /// to the revocation list shared by every node of the registry.
    fn revoke<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// The shared revocation list when its version differs from `known` (`None`: unchanged).
    /// Every node polls this every [`REVOCATION_POLL`], so a revocation reaches all of them
    /// within about a second. Entries that are not 64-hex hashes are dropped (and counted).
    fn revocations(
        &self,
        known: u64,
    ) -> BoxFuture<'_, Result<Option<RevocationList>, RegistryError>>;
}

/// A version of the shared revocation list and its entries (64-hex token hashes).
pub type RevocationList = (u64, Vec<String>);

/// How often each node reads the shared revocation list's version.
pub const REVOCATION_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Counter of malformed entries found in the shared revocation list (someone wrote to the
/// registry by hand): they are ignored.
pub const REVOCATIONS_MALFORMED_TOTAL: &str =
    "meshpunch_rendezvous_registry_revocations_malformed_total";

/// Whether `h` is a revocation hash as stored in the registry.
pub fn is_revocation_hash(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How often a connection calls [`Registry::refresh`].
pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The `[registry]` section of the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `"memory"` (default, single node) or `"redis"`.
    #[serde(default)]
    pub backend: Option<String>,
    /// Redis URL (`redis://host:6379/0`) for the `redis` backend.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Id of this node (default: random).
    #[serde(default)]
    pub node_id: Option<String>,
    /// `redis` backend: how long a dead node's peers may still look present (`"30s"`).
    #[serde(default)]
    pub presence_ttl: Option<String>,
    /// `redis` backend: prefix of every key and channel (default `"meshpunch"`).
    #[serde(default)]
    pub key_prefix: Option<String>,
}

/// The backend `cfg` selects: `backend`, else `redis` when a URL is set, else `memory`.
pub fn backend_name(cfg: &RegistryConfig) -> &str {
    cfg.backend
        .as_deref()
        .unwrap_or(if cfg.redis_url.is_some() {
            "redis"
        } else {
            "memory"
        })
}

/// Builds the configured registry and this node's inbox. The one place backends are chosen.
pub async fn build(cfg: &RegistryConfig) -> Result<(Arc<dyn Registry>, Inbox), RegistryError> {
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()));
    match backend_name(cfg) {
        "memory" => {
            let (reg, inbox) = memory::MemoryRegistry::new(node_id);
            Ok((Arc::new(reg), inbox))
        }
        "redis" => {
            let (reg, inbox) = redis::RedisRegistry::start(redis::config_from(cfg, node_id)?);
            Ok((Arc::new(reg), inbox))
        }
        other => Err(RegistryError::Unavailable(format!(
            "registry backend {other:?} is not available in this build"
        ))),
    }
}

/// Tells each of `watchers` (keys in `peer`'s network) that is connected to this node, per
/// `owners`, that `peer` went online or offline. Shared by the memory and Redis registries.
fn tell_local_watchers(
    owners: &dashmap::DashMap<PeerId, ConnId>,
    watchers: Vec<PeerKey>,
    peer: &PeerId,
    online: bool,
    push: impl Fn(PeerId, Delivery) -> Result<(), RegistryError>,
) {
    for w in watchers {
        let to = PeerId {
            network: peer.network.clone(),
            key: w,
        };
        if owners.contains_key(&to) {
            // A full inbox drops the event; the watcher sees the state on its next watch.
            let _ = push(
                to,
                Delivery::Presence {
                    key: peer.key,
                    online,
                },
            );
        }
    }
}
