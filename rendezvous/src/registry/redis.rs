//! Redis-backed [`Registry`]: many rendezvous nodes serve one set of networks.
//!
//! Client crate: `redis` 0.27 (tokio, connection-manager, cluster-async, sentinel), the most used
//! and maintained async Redis client for Rust; it speaks to one server, Sentinel and Cluster, and
//! to Valkey alike.
//!
//! Data model (every key starts with the configured prefix `P`, `meshpunch` by default; `{net}`
//! is the network name as a Redis Cluster hash tag, so all keys of one network live in one slot
//! and one script call or MGET may touch many of them):
//!
//! | key / channel | type | content |
//! |---|---|---|
//! | `P:{net}:peer:KEY` | string, TTL | JSON [`Owner`]: node id, connection id, since (unix ms) |
//! | `P:node:ID` | channel | [`NodeMsg`]s for node ID: deliveries, "your connection was superseded" |
//! | `P:net:NET` | channel | [`PresenceEvent`]s of one network |
//!
//! Nodes share nothing else. A presence key is owned by the node whose connection claimed it
//! last (newest wins: the previous owner's node is told on its channel and closes its connection
//! with GoAway{Superseded}); the owner's heartbeat refreshes it every TTL/4 and it lives 3/4 TTL,
//! and nodes with watchers re-read presence every TTL/4, so when a node dies its peers are seen
//! gone within the TTL. While Redis is unreachable a node keeps serving its own peers (local
//! deliveries and presence), reports not ready, reconnects with exponential backoff and then
//! re-publishes all its presence (a connection made elsewhere in the meantime wins).
//!
//! URL forms ([`RedisTarget`]): `redis://[user:pass@]host:port[/db]`, `rediss://...` (TLS),
//! `unix:///path/redis.sock`, `redis+sentinel://[user:pass@]h1:26379,h2:26379/MASTER[/db]`
//! (`rediss+sentinel://` for TLS), `redis+cluster://[user:pass@]h1:6379,h2:6379` or a
//! comma-separated list of `redis://` URLs (Cluster seeds).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use futures::StreamExt;
use meshpunch_proto::wire::PeerKey;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncCommands, AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind,
    RedisError, RedisFuture, Script, Value,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use super::{
    tell_local_watchers, BoxFuture, ConnId, Delivery, Envelope, Health, Inbox, PeerId, Registry,
    RegistryConfig, RegistryError, RevocationList, INBOX_CAPACITY,
};

// Metric names (one home each; listed in README).
/// Counter: failed attempts to connect to Redis (each followed by a backoff).
pub const CONNECT_FAILURES_TOTAL: &str = "meshpunch_rendezvous_redis_connect_failures_total";
/// Gauge: 1 while Redis is connected, 0 while degraded.
pub const REDIS_UP: &str = "meshpunch_rendezvous_redis_up";
/// Counter: connections to Redis lost.
pub const DISCONNECTS_TOTAL: &str = "meshpunch_rendezvous_redis_disconnects_total";
/// Counter: pub/sub messages received from other nodes (deliveries, presence events).
pub const MESSAGES_RECEIVED_TOTAL: &str = "meshpunch_rendezvous_redis_messages_received_total";
/// Counter: local presence claims found taken by a newer connection on a heartbeat or re-publish.
pub const CLAIMS_LOST_TOTAL: &str = "meshpunch_rendezvous_redis_claims_lost_total";
/// Counter: deliveries dropped because this node's inbox was full.
pub const INBOX_FULL_TOTAL: &str = "meshpunch_rendezvous_redis_inbox_full_total";
/// Counter: local connections closed because the same key connected to another node.
pub const SUPERSEDED_TOTAL: &str = "meshpunch_rendezvous_redis_superseded_total";
/// Counter: deliveries to peers on other nodes, label `result` = sent | node_gone | gone.
pub const DELIVERIES_TOTAL: &str = "meshpunch_rendezvous_redis_deliveries_total";

/// Errors of the Redis layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisBusError {
    /// The Redis URL could not be understood.
    #[error("invalid redis url {url:?}: {reason}")]
    BadUrl {
        /// The URL as given (password removed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis is not reachable right now; the node serves its local peers only.
    #[error("redis unavailable")]
    Unavailable,
    /// A Redis command failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A value stored in Redis or received on a channel is not what this version writes.
    #[error("malformed redis data: {0}")]
    Malformed(String),
}

/// Where the Redis service is: one server, a Sentinel-managed master, or a Cluster.
#[derive(Clone)]
pub enum RedisTarget {
    /// One server (`redis://`, `rediss://`, `redis+unix://`, `unix://`). Valkey included.
    Single(ConnectionInfo),
    /// A master found through Sentinel (`redis+sentinel://h1:26379,h2:26379/MASTER[/DB]`).
    Sentinel {
        /// The Sentinel servers.
        sentinels: Vec<ConnectionInfo>,
        /// The monitored master's name.
        master: String,
        /// How to talk to the master once found (TLS, credentials, db).
        node: SentinelNodeConnectionInfo,
    },
    /// A Cluster, given by seed nodes (`redis+cluster://h1:6379,h2:6379` or a list of URLs).
    Cluster(Vec<ConnectionInfo>),
}

impl std::fmt::Debug for RedisTarget {
    // Addresses only: credentials never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs = |v: &[ConnectionInfo]| v.iter().map(|i| i.addr.to_string()).collect::<Vec<_>>();
        match self {
            RedisTarget::Single(i) => write!(f, "Single({})", i.addr),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => {
                write!(f, "Sentinel({:?}, master {master})", addrs(sentinels))
            }
            RedisTarget::Cluster(seeds) => write!(f, "Cluster({:?})", addrs(seeds)),
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl FromStr for RedisTarget {
    type Err = RedisBusError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| RedisBusError::BadUrl {
            url: redact(url),
            reason: reason.to_string(),
        };
        let url = url.trim();
        // A list of URLs (comma or whitespace separated) names the seed nodes of a Cluster.
        let parts: Vec<&str> = url
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .collect();
        if parts.len() > 1 && parts.iter().all(|p| p.contains("://")) {
            let infos = parts
                .iter()
                .map(|p| ConnectionInfo::from_str(p).map_err(|e| bad(&e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(RedisTarget::Cluster(infos));
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let (base, kind) = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => {
                let info = ConnectionInfo::from_str(url).map_err(|e| bad(&e.to_string()))?;
                return Ok(RedisTarget::Single(info));
            }
            "redis+sentinel" => ("redis", "sentinel"),
            "rediss+sentinel" => ("rediss", "sentinel"),
            "redis+cluster" => ("redis", "cluster"),
            "rediss+cluster" => ("rediss", "cluster"),
            _ => return Err(bad("scheme must be redis, rediss, unix, redis+sentinel, rediss+sentinel, redis+cluster or rediss+cluster")),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
        if hosts.is_empty() {
            return Err(bad("no host"));
        }
        let with_auth = |host: &str, path: &str| match userinfo {
            Some(u) => format!("{base}://{u}@{host}/{path}"),
            None => format!("{base}://{host}/{path}"),
        };
        if kind == "cluster" {
            let infos = hosts
                .iter()
                .map(|h| {
                    ConnectionInfo::from_str(&with_auth(h, "")).map_err(|e| bad(&e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(RedisTarget::Cluster(infos));
        }
        let mut segs = path.split('/').filter(|s| !s.is_empty());
        let master = segs
            .next()
            .ok_or_else(|| bad("sentinel url needs /MASTER_NAME"))?
            .to_string();
        let db = segs.next().unwrap_or("0");
        // Sentinels are contacted without the master's credentials (they usually have none);
        // TLS follows the scheme.
        let sentinels = hosts
            .iter()
            .map(|h| {
                ConnectionInfo::from_str(&format!("{base}://{h}/")).map_err(|e| bad(&e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let master_info =
            ConnectionInfo::from_str(&with_auth(hosts[0], db)).map_err(|e| bad(&e.to_string()))?;
        let tls_mode = match master_info.addr {
            ConnectionAddr::TcpTls { insecure, .. } => Some(if insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            }),
            _ => None,
        };
        Ok(RedisTarget::Sentinel {
            sentinels,
            master,
            node: SentinelNodeConnectionInfo {
                tls_mode,
                redis_connection_info: Some(master_info.redis),
            },
        })
    }
}

/// Configuration of the Redis layer.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// Where Redis is.
    pub target: RedisTarget,
    /// This node's id: unique among the nodes of one service.
    pub node_id: String,
    /// How long a dead node's peers may still look present: presence keys live 3/4 of it and
    /// are refreshed every 1/4 of it; watchers re-read presence every 1/4 of it.
    pub presence_ttl: Duration,
    /// Prefix of every key and channel, so several services can share one Redis.
    pub key_prefix: String,
    /// Connect and response timeout of Redis commands.
    pub command_timeout: Duration,
    /// Longest wait between two reconnect attempts (exponential backoff from 100 ms).
    pub max_backoff: Duration,
}

impl RedisBusConfig {
    /// Heartbeat and sweep period: a quarter of the presence TTL.
    pub fn heartbeat(&self) -> Duration {
        (self.presence_ttl / 4).max(Duration::from_millis(100))
    }

    /// Lifetime set on a presence key: three heartbeats. With watchers sweeping every heartbeat,
    /// a dead node's peers are seen gone at most `presence_ttl` after it died.
    fn key_ttl_ms(&self) -> u64 {
        (self.heartbeat() * 3).as_millis().min(u128::from(u32::MAX)) as u64
    }

    /// A configuration with the defaults: TTL 30 s, prefix `meshpunch`, timeouts 2 s, backoff ≤ 5 s.
    pub fn new(target: RedisTarget, node_id: impl Into<String>) -> Self {
        RedisBusConfig {
            target,
            node_id: node_id.into(),
            presence_ttl: Duration::from_secs(30),
            key_prefix: "meshpunch".to_string(),
            command_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Who holds a presence key: the value stored under `P:{net}:peer:KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Node the peer is connected to.
    pub node: String,
    /// That node's id of the connection (unique per node and process).
    pub conn: String,
    /// When the connection registered (unix ms); decides conflicts after a Redis outage.
    pub since: u64,
    /// Opaque data the registry keeps with the presence.
    pub info: String,
}

/// A message to one node, published on its channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum NodeMsg {
    /// Deliver `payload` to the peer `key` of `network` on connection `conn` of the receiving node.
    Deliver {
        /// Network of both peers.
        network: String,
        /// Recipient's key.
        key: String,
        /// Recipient's connection id on the receiving node.
        conn: String,
        /// Opaque payload (the registry's encoded message).
        payload: String,
    },
    /// The receiving node's connection `conn` for `key` was replaced by a newer one on `by_node`.
    Superseded {
        /// Network of the peer.
        network: String,
        /// The peer's key.
        key: String,
        /// The replaced connection on the receiving node.
        conn: String,
        /// Node that holds the newer connection.
        by_node: String,
    },
}

/// Presence change of one peer, published on its network's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// The peer's key.
    pub key: String,
    /// Whether it came online (true) or went away (false).
    pub online: bool,
    /// Node that published the event.
    pub node: String,
    /// Connection the event is about.
    pub conn: String,
}

/// What the Redis layer reports to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A message for this node.
    Node(NodeMsg),
    /// A presence change in a network this node has interest in (may be this node's own).
    Presence {
        /// The network.
        network: String,
        /// The change.
        event: PresenceEvent,
    },
    /// A local claim was found taken by another connection (heartbeat or re-publish).
    Lost {
        /// Network of the peer.
        network: String,
        /// The peer's key.
        key: String,
        /// The local connection that lost it.
        conn: String,
        /// The node that holds it now.
        by_node: String,
    },
    /// Connected to Redis (again); local presence has been re-published.
    Up,
    /// Lost the connection to Redis; reconnecting with backoff.
    Down,
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Errors that mean "this connection is unusable": reconnect (and for Sentinel, look the master
/// up again: a demoted master answers READONLY).
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::ReadOnly
                | ErrorKind::MasterDown
                | ErrorKind::ClusterDown
                | ErrorKind::BusyLoadingError
                | ErrorKind::TryAgain
                | ErrorKind::ClusterConnectionNotFound
        )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Network names go into a hash tag: characters that would end it early are hex-encoded.
fn net_tag(network: &str) -> String {
    if network
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
    {
        network.to_string()
    } else {
        let hex: String = network.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    }
}

/// Claims a presence key. KEYS: presence key. ARGV: owner json, node, conn, since, ttl ms,
/// republish flag. Returns {1, previous json or ""} when claimed,
/// {0, current json} when a re-publish finds a newer owner.
const CLAIM_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[6] == '1' then
  local ok, c = pcall(cjson.decode, cur)
  if ok and type(c) == 'table' and not (c.node == ARGV[2] and c.conn == ARGV[3])
     and tonumber(c.since or 0) > tonumber(ARGV[4]) then
    return {0, cur}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[5]))
return {1, cur or ''}
"#;

/// Heartbeat of many claims of one network. KEYS: presence keys. ARGV: ttl ms, then the owner
/// prefix of each presence key. The owner prefix is the start of the JSON this
/// node wrote (`{"node":...,"conn":...,`): comparing it is much cheaper than decoding JSON, and
/// heartbeats are most of the Redis load. Returns per key 1 refreshed, 0 owned by someone else,
/// -1 gone.
const REFRESH_MANY_LUA: &str = r#"
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local prefix = ARGV[i + 1]
  local cur = redis.call('GET', KEYS[i])
  if not cur then
    out[i] = -1
  elseif string.sub(cur, 1, #prefix) == prefix then
    redis.call('PEXPIRE', KEYS[i], ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// The start of the JSON of an [`Owner`] with this node and connection (fields serialise in
/// declaration order: node, conn, since, info).
fn owner_prefix(node: &str, conn: &str) -> Result<String, RedisBusError> {
    let json =
        |v: &str| serde_json::to_string(v).map_err(|e| RedisBusError::Malformed(e.to_string()));
    Ok(format!(
        "{{\"node\":{},\"conn\":{},",
        json(node)?,
        json(conn)?
    ))
}

/// Claims refreshed per script call (all of one network, so one hash slot).
const REFRESH_BATCH: usize = 128;

/// Drops a claim if still ours. KEYS: presence key. ARGV: node, conn.
const RELEASE_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, c = pcall(cjson.decode, cur)
if not ok or type(c) ~= 'table' or c.node ~= ARGV[1] or c.conn ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

#[derive(Debug, Clone)]
struct Claim {
    conn: String,
    since: u64,
    info: String,
}

struct Shared {
    cfg: RedisBusConfig,
    conn: RwLock<Option<Conn>>,
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Network channels wanted, with how many local users want each.
    interest: Mutex<HashMap<String, usize>>,
    /// Local claims: (network, key) → claim. Re-published after reconnects, refreshed by heartbeat.
    claims: Mutex<HashMap<(String, String), Claim>>,
    up: AtomicBool,
    /// Wakes the supervisor when a command saw a connection error.
    broken: Notify,
    events: mpsc::Sender<BusEvent>,
    claim: Script,
    refresh_many: Script,
    release: Script,
}

/// Aborts the supervisor task when the last [`RedisBus`] clone goes away.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The Redis layer of one node (cheap to clone). Dropping the last clone stops its background
/// task and closes its connections.
#[derive(Clone)]
pub struct RedisBus {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("node_id", &self.shared.cfg.node_id)
            .field("up", &self.is_up())
            .finish()
    }
}

impl RedisBus {
    /// Starts the Redis layer. It connects in the background (and reconnects with backoff), so
    /// this succeeds while Redis is down: the node then serves its own peers and reports degraded.
    /// Events come out of `events`; the caller must keep reading it.
    pub fn start(cfg: RedisBusConfig, events: mpsc::Sender<BusEvent>) -> Self {
        let shared = Arc::new(Shared {
            cfg,
            conn: RwLock::new(None),
            sink: tokio::sync::Mutex::new(None),
            interest: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            broken: Notify::new(),
            events,
            claim: Script::new(CLAIM_LUA),
            refresh_many: Script::new(REFRESH_MANY_LUA),
            release: Script::new(RELEASE_LUA),
        });
        metrics::gauge!(REDIS_UP).set(0.0);
        let task = tokio::spawn(supervise(shared.clone()));
        RedisBus {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.cfg.node_id
    }

    /// Whether Redis is connected (the node's `/readyz`).
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    /// Claims the presence of `key` in `network` for local connection `conn`. The claim is kept
    /// (and re-published after a Redis outage) until [`RedisBus::release`]. Returns the previous
    /// owner when it was another connection; that owner's node has been told
    /// ([`NodeMsg::Superseded`]) already. With Redis down the claim is only recorded locally.
    pub async fn claim(
        &self,
        network: &str,
        key: &str,
        conn: &str,
        info: &str,
    ) -> Result<Option<Owner>, RedisBusError> {
        let claim = Claim {
            conn: conn.to_string(),
            since: now_ms(),
            info: info.to_string(),
        };
        lock(&self.shared.claims).insert((network.to_string(), key.to_string()), claim.clone());
        let conn_handle = self.shared.conn()?;
        claim_remote(&self.shared, conn_handle, network, key, &claim, false).await
    }

    /// Forgets the local claim of `conn` on `key` without touching Redis (the key belongs to a
    /// newer connection elsewhere now).
    pub fn forget(&self, network: &str, key: &str, conn: &str) {
        forget_claim(&self.shared, network, key, conn);
    }

    /// Drops the claim of `conn` on `key` (if it is still the owner) and tells the network.
    pub async fn release(&self, network: &str, key: &str, conn: &str) -> Result<(), RedisBusError> {
        {
            let mut claims = lock(&self.shared.claims);
            let k = (network.to_string(), key.to_string());
            if claims.get(&k).is_some_and(|c| c.conn == conn) {
                claims.remove(&k);
            }
        }
        let mut c = self.shared.conn()?;
        let s = &self.shared;
        let released: i64 = s
            .release
            .key(s.peer_key(network, key))
            .arg(&s.cfg.node_id)
            .arg(conn)
            .invoke_async(&mut c)
            .await
            .map_err(|e| s.failed(e))?;
        if released == 1 {
            let ev = PresenceEvent {
                key: key.into(),
                online: false,
                node: s.cfg.node_id.clone(),
                conn: conn.into(),
            };
            self.publish_presence(network, &ev).await?;
        }
        Ok(())
    }

    /// The current owner of `key` in `network`, if any.
    pub async fn lookup(&self, network: &str, key: &str) -> Result<Option<Owner>, RedisBusError> {
        let mut c = self.shared.conn()?;
        let v: Option<String> = c
            .get(self.shared.peer_key(network, key))
            .await
            .map_err(|e| self.shared.failed(e))?;
        v.map(|v| serde_json::from_str(&v).map_err(|e| RedisBusError::Malformed(e.to_string())))
            .transpose()
    }

    /// Which of `keys` (of `network`) have a presence key now.
    pub async fn present(
        &self,
        network: &str,
        keys: &[String],
    ) -> Result<HashSet<String>, RedisBusError> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let mut c = self.shared.conn()?;
        let mut found = HashSet::new();
        // All keys of one network share a hash slot, so MGET works on a Cluster too.
        for chunk in keys.chunks(256) {
            let names: Vec<String> = chunk
                .iter()
                .map(|k| self.shared.peer_key(network, k))
                .collect();
            let values: Vec<Option<String>> =
                c.mget(&names).await.map_err(|e| self.shared.failed(e))?;
            found.extend(
                chunk
                    .iter()
                    .zip(values)
                    .filter(|(_, v)| v.is_some())
                    .map(|(k, _)| k.clone()),
            );
        }
        Ok(found)
    }

    /// Publishes `msg` on `node`'s channel. Returns false when no subscriber got it (the node is
    /// gone), except on a Cluster, where the count covers one shard only and true is returned.
    pub async fn send_to_node(&self, node: &str, msg: &NodeMsg) -> Result<bool, RedisBusError> {
        let mut c = self.shared.conn()?;
        let body =
            serde_json::to_string(msg).map_err(|e| RedisBusError::Malformed(e.to_string()))?;
        let n: i64 = c
            .publish(self.shared.node_channel(node), body)
            .await
            .map_err(|e| self.shared.failed(e))?;
        Ok(n > 0 || matches!(c, Conn::Cluster(_)))
    }

    /// Adds `hash` to the shared revocation set and bumps its version (set first, so a node
    /// that sees the new version reads a set holding the hash).
    pub async fn revoke(&self, hash: &str) -> Result<(), RedisBusError> {
        let mut c = self.shared.conn()?;
        let (set, version) = self.shared.revocation_keys();
        let _: i64 = c.sadd(set, hash).await.map_err(|e| self.shared.failed(e))?;
        let _: i64 = c
            .incr(version, 1)
            .await
            .map_err(|e| self.shared.failed(e))?;
        Ok(())
    }

    /// The revocation set when its version differs from `known`.
    pub async fn revocations(
        &self,
        known: u64,
    ) -> Result<Option<(u64, Vec<String>)>, RedisBusError> {
        let mut c = self.shared.conn()?;
        let (set, version) = self.shared.revocation_keys();
        let v: Option<u64> = c.get(&version).await.map_err(|e| self.shared.failed(e))?;
        let v = v.unwrap_or(0);
        if v == known {
            return Ok(None);
        }
        let members: Vec<String> = c.smembers(set).await.map_err(|e| self.shared.failed(e))?;
        Ok(Some((v, members)))
    }

    /// Publishes a presence change on `network`'s channel.
    pub async fn publish_presence(
        &self,
        network: &str,
        ev: &PresenceEvent,
    ) -> Result<(), RedisBusError> {
        let mut c = self.shared.conn()?;
        let body =
            serde_json::to_string(ev).map_err(|e| RedisBusError::Malformed(e.to_string()))?;
        let _: i64 = c
            .publish(self.shared.net_channel(network), body)
            .await
            .map_err(|e| self.shared.failed(e))?;
        Ok(())
    }

    /// Adds (`true`) or removes one local user of `network`'s presence channel; the channel is
    /// subscribed while it has users (and re-subscribed after reconnects).
    pub async fn interest(&self, network: &str, on: bool) -> Result<(), RedisBusError> {
        let channel = self.shared.net_channel(network);
        let change = {
            let mut interest = lock(&self.shared.interest);
            let n = interest.entry(channel.clone()).or_insert(0);
            if on {
                *n += 1;
                *n == 1
            } else {
                *n = n.saturating_sub(1);
                let gone = *n == 0;
                if gone {
                    interest.remove(&channel);
                }
                gone
            }
        };
        if !change {
            return Ok(());
        }
        let mut sink = self.shared.sink.lock().await;
        // While disconnected the supervisor subscribes every wanted channel when it reconnects.
        let Some(s) = sink.as_mut() else {
            return Ok(());
        };
        let change = async {
            if on {
                s.subscribe(&channel).await
            } else {
                s.unsubscribe(&channel).await
            }
        };
        // A Redis that accepts the connection but never answers must not hang watch() calls.
        match tokio::time::timeout(self.shared.cfg.command_timeout, change).await {
            Ok(r) => r.map_err(|e| self.shared.failed(e)),
            Err(_) => {
                self.shared.broken.notify_one();
                Err(RedisBusError::Unavailable)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn conn(&self) -> Result<Conn, RedisBusError> {
        self.conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(RedisBusError::Unavailable)
    }

    fn failed(&self, e: RedisError) -> RedisBusError {
        if is_connection_error(&e) {
            self.broken.notify_one();
        }
        RedisBusError::Redis(e)
    }

    fn peer_key(&self, network: &str, key: &str) -> String {
        format!(
            "{}:{{{}}}:peer:{}",
            self.cfg.key_prefix,
            net_tag(network),
            key
        )
    }

    /// The revocation set and its version counter. One hash tag: both live on one Cluster slot.
    fn revocation_keys(&self) -> (String, String) {
        let p = &self.cfg.key_prefix;
        (
            format!("{p}:{{revoked}}:set"),
            format!("{p}:{{revoked}}:version"),
        )
    }

    fn node_channel(&self, node: &str) -> String {
        format!("{}:node:{}", self.cfg.key_prefix, node)
    }

    fn net_channel(&self, network: &str) -> String {
        format!("{}:net:{}", self.cfg.key_prefix, network)
    }

    /// Network name from a network channel name.
    fn channel_network<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(&self.cfg.key_prefix)?
            .strip_prefix(":net:")
    }
}

async fn claim_remote(
    s: &Shared,
    mut c: Conn,
    network: &str,
    key: &str,
    claim: &Claim,
    republish: bool,
) -> Result<Option<Owner>, RedisBusError> {
    let owner = Owner {
        node: s.cfg.node_id.clone(),
        conn: claim.conn.clone(),
        since: claim.since,
        info: claim.info.clone(),
    };
    let json =
        serde_json::to_string(&owner).map_err(|e| RedisBusError::Malformed(e.to_string()))?;
    let (claimed, prev): (i64, String) = s
        .claim
        .key(s.peer_key(network, key))
        .arg(json)
        .arg(&owner.node)
        .arg(&owner.conn)
        .arg(owner.since)
        .arg(s.cfg.key_ttl_ms())
        .arg(if republish { "1" } else { "0" })
        .invoke_async(&mut c)
        .await
        .map_err(|e| s.failed(e))?;
    let prev: Option<Owner> = if prev.is_empty() {
        None
    } else {
        serde_json::from_str(&prev).ok()
    };
    if claimed == 0 {
        // A re-publish found a newer connection elsewhere: ours is the stale one.
        let by_node = prev.as_ref().map(|p| p.node.clone()).unwrap_or_default();
        forget_claim(s, network, key, &claim.conn);
        let _ = s
            .events
            .send(BusEvent::Lost {
                network: network.into(),
                key: key.into(),
                conn: claim.conn.clone(),
                by_node,
            })
            .await;
        return Ok(prev);
    }
    let prev = prev.filter(|p| !(p.node == owner.node && p.conn == owner.conn));
    if let Some(p) = &prev {
        if p.node != owner.node {
            let msg = NodeMsg::Superseded {
                network: network.into(),
                key: key.into(),
                conn: p.conn.clone(),
                by_node: owner.node.clone(),
            };
            let body =
                serde_json::to_string(&msg).map_err(|e| RedisBusError::Malformed(e.to_string()))?;
            let _: i64 = c
                .publish(s.node_channel(&p.node), body)
                .await
                .map_err(|e| s.failed(e))?;
        }
    }
    let ev = PresenceEvent {
        key: key.into(),
        online: true,
        node: owner.node.clone(),
        conn: owner.conn.clone(),
    };
    let body = serde_json::to_string(&ev).map_err(|e| RedisBusError::Malformed(e.to_string()))?;
    let _: i64 = c
        .publish(s.net_channel(network), body)
        .await
        .map_err(|e| s.failed(e))?;
    Ok(prev)
}

fn forget_claim(s: &Shared, network: &str, key: &str, conn: &str) {
    let mut claims = lock(&s.claims);
    let k = (network.to_string(), key.to_string());
    if claims.get(&k).is_some_and(|c| c.conn == conn) {
        claims.remove(&k);
    }
}

async fn connect(cfg: &RedisBusConfig) -> Result<(Conn, redis::aio::PubSub), RedisError> {
    let acfg = AsyncConnectionConfig::new()
        .set_connection_timeout(cfg.command_timeout)
        .set_response_timeout(cfg.command_timeout);
    let timeout = |e: tokio::time::error::Elapsed| {
        RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, e))
    };
    match &cfg.target {
        RedisTarget::Single(info) => {
            let client = Client::open(info.clone())?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&acfg)
                .await?;
            let pubsub = tokio::time::timeout(cfg.command_timeout, client.get_async_pubsub())
                .await
                .map_err(timeout)??;
            Ok((Conn::Single(conn), pubsub))
        }
        RedisTarget::Sentinel {
            sentinels,
            master,
            node,
        } => {
            let mut sentinel = Sentinel::build(sentinels.clone())?;
            let client = tokio::time::timeout(
                cfg.command_timeout,
                sentinel.async_master_for(master, Some(node)),
            )
            .await
            .map_err(timeout)??;
            let conn = client
                .get_multiplexed_async_connection_with_config(&acfg)
                .await?;
            let pubsub = tokio::time::timeout(cfg.command_timeout, client.get_async_pubsub())
                .await
                .map_err(timeout)??;
            Ok((Conn::Single(conn), pubsub))
        }
        RedisTarget::Cluster(seeds) => {
            let client = redis::cluster::ClusterClient::builder(seeds.clone())
                .connection_timeout(cfg.command_timeout)
                .response_timeout(cfg.command_timeout)
                .build()?;
            let conn = tokio::time::timeout(cfg.command_timeout * 2, client.get_async_connection())
                .await
                .map_err(timeout)??;
            // Classic PUBLISH is broadcast over the cluster bus: one subscription on any node
            // receives every channel's messages.
            let mut last = None;
            for seed in seeds {
                match Client::open(seed.clone()) {
                    Ok(c) => match tokio::time::timeout(cfg.command_timeout, c.get_async_pubsub())
                        .await
                    {
                        Ok(Ok(p)) => return Ok((Conn::Cluster(conn), p)),
                        Ok(Err(e)) => last = Some(e),
                        Err(e) => last = Some(timeout(e)),
                    },
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                RedisError::from((ErrorKind::InvalidClientConfig, "no cluster seed"))
            }))
        }
    }
}

/// Connects, subscribes, re-publishes local claims, heartbeats; on any connection error starts
/// over with exponential backoff. Runs until the bus is dropped.
async fn supervise(s: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (conn, pubsub) = match connect(&s.cfg).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(node = %s.cfg.node_id, error = %e, retry_in = ?backoff, "redis connect failed");
                metrics::counter!(CONNECT_FAILURES_TOTAL).increment(1);
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(s.cfg.max_backoff);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        {
            // Hold the sink slot while subscribing: interest() changes made meanwhile wait for
            // it and then subscribe through the new sink themselves.
            let mut slot = s.sink.lock().await;
            let mut channels: HashSet<String> = lock(&s.interest).keys().cloned().collect();
            channels.insert(s.node_channel(&s.cfg.node_id));
            let mut ok = true;
            for ch in &channels {
                let subscribed =
                    tokio::time::timeout(s.cfg.command_timeout, sink.subscribe(ch)).await;
                if !matches!(subscribed, Ok(Ok(()))) {
                    tracing::warn!(channel = %ch, "redis subscribe failed or timed out");
                    ok = false;
                    break;
                }
            }
            if !ok {
                drop(slot);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(s.cfg.max_backoff);
                continue;
            }
            *slot = Some(sink);
        }
        *s.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        // Re-publish every local claim (newer owners elsewhere win and are reported as Lost).
        if republish_all(&s, &conn).await.is_err() {
            disconnect(&s).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        s.up.store(true, Ordering::Release);
        metrics::gauge!(REDIS_UP).set(1.0);
        tracing::info!(node = %s.cfg.node_id, "redis connected");
        let _ = s.events.send(BusEvent::Up).await;

        // Heartbeats run beside the subscription reader, so a large refresh never holds up
        // deliveries; any connection error they meet wakes `broken`.
        let heartbeat = AbortOnDrop(tokio::spawn(heartbeat_loop(s.clone(), conn.clone())));
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => dispatch(&s, msg).await,
                    None => { tracing::warn!(node = %s.cfg.node_id, "redis subscription closed"); break; }
                },
                _ = s.broken.notified() => { tracing::warn!(node = %s.cfg.node_id, "redis connection error"); break; }
            }
        }
        drop(heartbeat);
        disconnect(&s).await;
        // A connection error reported after this point belongs to the old connection.
        let _ = futures::FutureExt::now_or_never(s.broken.notified());
    }
}

async fn heartbeat_loop(s: Arc<Shared>, conn: Conn) {
    let mut tick = tokio::time::interval(s.cfg.heartbeat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = refresh_all(&s, &conn).await {
            tracing::warn!(node = %s.cfg.node_id, error = %e, "presence heartbeat failed");
            // Connection errors already woke the supervisor; anything else is retried next tick.
        }
    }
}

async fn disconnect(s: &Shared) {
    *s.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
    *s.sink.lock().await = None;
    if s.up.swap(false, Ordering::AcqRel) {
        metrics::gauge!(REDIS_UP).set(0.0);
        metrics::counter!(DISCONNECTS_TOTAL).increment(1);
        let _ = s.events.send(BusEvent::Down).await;
    }
}

async fn dispatch(s: &Shared, msg: redis::Msg) {
    let channel = msg.get_channel_name().to_string();
    let Ok(body) = msg.get_payload::<String>() else {
        return;
    };
    let event = if let Some(network) = s.channel_network(&channel) {
        match serde_json::from_str::<PresenceEvent>(&body) {
            Ok(event) => BusEvent::Presence {
                network: network.to_string(),
                event,
            },
            Err(e) => {
                tracing::warn!(%channel, error = %e, "malformed presence event");
                return;
            }
        }
    } else {
        match serde_json::from_str::<NodeMsg>(&body) {
            Ok(m) => BusEvent::Node(m),
            Err(e) => {
                tracing::warn!(%channel, error = %e, "malformed node message");
                return;
            }
        }
    };
    metrics::counter!(MESSAGES_RECEIVED_TOTAL).increment(1);
    let _ = s.events.send(event).await;
}

async fn republish_all(s: &Shared, conn: &Conn) -> Result<(), RedisBusError> {
    let claims: Vec<_> = lock(&s.claims)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let results = futures::stream::iter(claims)
        .map(|((net, key), claim)| async move {
            claim_remote(s, conn.clone(), &net, &key, &claim, true).await
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().try_for_each(|r| r.map(|_| ()))
}

/// Refreshes every local claim, one script call per network and batch of [`REFRESH_BATCH`].
async fn refresh_all(s: &Shared, conn: &Conn) -> Result<(), RedisBusError> {
    let mut by_net: HashMap<String, Vec<(String, Claim)>> = HashMap::new();
    for ((net, key), claim) in lock(&s.claims).iter() {
        by_net
            .entry(net.clone())
            .or_default()
            .push((key.clone(), claim.clone()));
    }
    let batches: Vec<(String, Vec<(String, Claim)>)> = by_net
        .into_iter()
        .flat_map(|(net, claims)| {
            claims
                .chunks(REFRESH_BATCH)
                .map(|c| (net.clone(), c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    let results = futures::stream::iter(batches)
        .map(|(net, batch)| refresh_batch(s, conn, net, batch))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().try_for_each(|r| r)
}

async fn refresh_batch(
    s: &Shared,
    conn: &Conn,
    net: String,
    batch: Vec<(String, Claim)>,
) -> Result<(), RedisBusError> {
    let mut inv = s.refresh_many.prepare_invoke();
    inv.arg(s.cfg.key_ttl_ms());
    for (key, claim) in &batch {
        let prefix = owner_prefix(&s.cfg.node_id, &claim.conn)?;
        inv.key(s.peer_key(&net, key)).arg(prefix);
    }
    let mut c = conn.clone();
    let results: Vec<i64> = inv.invoke_async(&mut c).await.map_err(|e| s.failed(e))?;
    for ((key, claim), r) in batch.into_iter().zip(results) {
        match r {
            1 => {}
            -1 => {
                // Expired (Redis lost its data, or we were paused past the TTL): claim again.
                claim_remote(s, conn.clone(), &net, &key, &claim, true).await?;
            }
            _ => {
                let by_node = match c.get::<_, Option<String>>(s.peer_key(&net, &key)).await {
                    Ok(v) => v
                        .and_then(|v| serde_json::from_str::<Owner>(&v).ok())
                        .map(|o| o.node)
                        .unwrap_or_default(),
                    Err(e) => return Err(s.failed(e)),
                };
                forget_claim(s, &net, &key, &claim.conn);
                metrics::counter!(CLAIMS_LOST_TOTAL).increment(1);
                let _ = s
                    .events
                    .send(BusEvent::Lost {
                        network: net.clone(),
                        key,
                        conn: claim.conn,
                        by_node,
                    })
                    .await;
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The Registry on top of the Redis layer.
// ------------------------------------------------------------------------------------------

/// Configuration of the Redis registry (the `[registry]` config section with `redis_url` set, or
/// `--redis URL --node-id ID`).
pub type RedisRegistryConfig = RedisBusConfig;

/// The Redis registry configuration for `[registry]` (`redis_url`, `presence_ttl`, `key_prefix`)
/// and this node's id.
pub fn config_from(
    cfg: &RegistryConfig,
    node_id: String,
) -> Result<RedisRegistryConfig, RegistryError> {
    let url = cfg.redis_url.as_deref().ok_or_else(|| {
        RegistryError::Unavailable("the redis backend needs redis_url (--redis URL)".into())
    })?;
    let target: RedisTarget = url
        .parse()
        .map_err(|e: RedisBusError| RegistryError::Unavailable(e.to_string()))?;
    let mut out = RedisBusConfig::new(target, node_id);
    if let Some(ttl) = &cfg.presence_ttl {
        let ttl = humantime::parse_duration(ttl).map_err(|e| {
            RegistryError::Unavailable(format!("registry.presence_ttl {ttl:?}: {e}"))
        })?;
        if ttl < Duration::from_secs(1) {
            return Err(RegistryError::Unavailable(
                "registry.presence_ttl must be at least 1s".into(),
            ));
        }
        out.presence_ttl = ttl;
    }
    if let Some(prefix) = &cfg.key_prefix {
        out.key_prefix = prefix.clone();
    }
    Ok(out)
}

/// A watched key as seen by this node: which local peers watch it and its last known state.
#[derive(Debug, Default)]
struct Watched {
    watchers: HashSet<PeerKey>,
    online: bool,
}

/// The node-local half: this node's connections, its peers' watches and its inbox.
#[derive(Debug)]
struct Local {
    node_id: String,
    owners: DashMap<PeerId, ConnId>,
    /// watched peer → local watchers and last known online state.
    watched: DashMap<PeerId, Watched>,
    /// local watcher → keys it watches.
    watching: DashMap<PeerId, Vec<PeerKey>>,
    inbox: mpsc::Sender<Envelope>,
}

impl Local {
    fn push(&self, to: PeerId, delivery: Delivery) -> Result<(), RegistryError> {
        self.inbox.try_send(Envelope { to, delivery }).map_err(|_| {
            metrics::counter!(INBOX_FULL_TOTAL).increment(1);
            RegistryError::Overloaded
        })
    }

    /// Records `peer`'s state and tells its local watchers if it changed.
    fn set_online(&self, peer: &PeerId, online: bool) {
        let watchers: Vec<PeerKey> = match self.watched.get_mut(peer) {
            Some(mut w) if w.online != online => {
                w.online = online;
                w.watchers.iter().copied().collect()
            }
            _ => return,
        };
        tell_local_watchers(&self.owners, watchers, peer, online, |to, d| {
            self.push(to, d)
        });
    }

    /// Removes every watch of `watcher`; returns the networks whose last watched key went away.
    fn unwatch_all(&self, watcher: &PeerId) -> usize {
        let mut dropped = 0;
        if let Some((_, keys)) = self.watching.remove(watcher) {
            for k in keys {
                let watched = PeerId {
                    network: watcher.network.clone(),
                    key: k,
                };
                if let dashmap::Entry::Occupied(mut e) = self.watched.entry(watched) {
                    e.get_mut().watchers.remove(&watcher.key);
                    if e.get().watchers.is_empty() {
                        e.remove();
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// A local connection lost `peer` to a newer connection elsewhere: forget it and have its
    /// connection closed with GoAway{Superseded}.
    /// Returns how many watched keys lost their last watcher (presence subscriptions to drop).
    fn superseded(&self, peer: PeerId, conn: ConnId, by_node: &str) -> usize {
        if self
            .owners
            .remove_if(&peer, |_, owner| *owner == conn)
            .is_none()
        {
            return 0;
        }
        let dropped = self.unwatch_all(&peer);
        tracing::info!(%peer, conn, by_node, "connection superseded by a newer one on another node");
        metrics::counter!(SUPERSEDED_TOTAL).increment(1);
        let _ = self.push(peer, Delivery::Superseded { conn });
        dropped
    }
}

/// [`Registry`] shared by many rendezvous nodes through Redis (or Valkey): presence keys with a
/// TTL kept alive by this node's heartbeat, deliveries to other nodes over their pub/sub
/// channels, presence events over per-network channels. Local peers keep being served while
/// Redis is away (`health()` then reports not ready); their presence is re-published when it
/// returns.
pub struct RedisRegistry {
    local: Arc<Local>,
    bus: RedisBus,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RedisRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("node_id", &self.local.node_id)
            .field("local_peers", &self.local.owners.len())
            .field("redis_up", &self.bus.is_up())
            .finish()
    }
}

impl RedisRegistry {
    /// Starts the registry and returns it with this node's inbox. Connecting to Redis happens in
    /// the background (with backoff), so this works while Redis is down.
    pub fn start(cfg: RedisRegistryConfig) -> (Self, Inbox) {
        let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
        let sweep = cfg.heartbeat();
        let cfg_settle = cfg.max_backoff + cfg.heartbeat();
        let local = Arc::new(Local {
            node_id: cfg.node_id.clone(),
            owners: DashMap::new(),
            watched: DashMap::new(),
            watching: DashMap::new(),
            inbox: inbox_tx,
        });
        let bus = RedisBus::start(cfg, ev_tx);
        let settle = cfg_settle;
        let task = tokio::spawn(event_loop(local.clone(), bus.clone(), ev_rx, sweep, settle));
        (RedisRegistry { local, bus, task }, inbox)
    }

    /// Whether Redis is connected right now.
    pub fn redis_up(&self) -> bool {
        self.bus.is_up()
    }

    /// Number of peers connected to this node.
    pub fn local_peers(&self) -> usize {
        self.local.owners.len()
    }

    async fn update_interest(&self, network: &str, on: bool) {
        if let Err(e) = self.bus.interest(network, on).await {
            tracing::debug!(network, error = %e, "presence subscription deferred to reconnect");
        }
    }
}

/// Capacity of the queue between the Redis reader and the registry's event loop.
const EVENT_CAPACITY: usize = 16_384;

fn bus_err(e: RedisBusError) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

impl Registry for RedisRegistry {
    fn node_id(&self) -> &str {
        &self.local.node_id
    }

    fn register<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let l = &self.local;
            match l.owners.insert(peer.clone(), conn) {
                Some(old) if old != conn => {
                    l.push(peer.clone(), Delivery::Superseded { conn: old })?
                }
                _ => {}
            }
            l.set_online(peer, true);
            // The claim tells the previous owner's node (if another) and the network's watchers.
            // With Redis down it is only recorded and published when Redis returns.
            match self
                .bus
                .claim(&peer.network, &peer.key.to_string(), &conn.to_string(), "")
                .await
            {
                Ok(Some(prev)) => {
                    tracing::debug!(%peer, conn, prev_node = %prev.node, prev_conn = %prev.conn, "took over presence")
                }
                Ok(None) => {}
                Err(RedisBusError::Unavailable) => {}
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "redis claim failed; re-published on reconnect")
                }
            }
            Ok(())
        })
    }

    fn unregister<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let l = &self.local;
            if l.owners
                .remove_if(peer, |_, owner| *owner == conn)
                .is_none()
            {
                // Superseded: the newer connection owns the presence now.
                return Ok(());
            }
            let dropped_watches = l.unwatch_all(peer);
            l.set_online(peer, false);
            for _ in 0..dropped_watches {
                self.update_interest(&peer.network, false).await;
            }
            match self
                .bus
                .release(&peer.network, &peer.key.to_string(), &conn.to_string())
                .await
            {
                Ok(()) | Err(RedisBusError::Unavailable) => Ok(()),
                Err(e) => {
                    // The key expires within the TTL anyway.
                    tracing::warn!(%peer, error = %e, "redis release failed");
                    Ok(())
                }
            }
        })
    }

    fn refresh<'a>(
        &'a self,
        _peer: &'a PeerId,
        _conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        // The node's heartbeat refreshes every local presence key every TTL/3.
        Box::pin(async { Ok(()) })
    }

    fn is_online<'a>(&'a self, peer: &'a PeerId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move {
            if self.local.owners.contains_key(peer) {
                return Ok(true);
            }
            match self.bus.lookup(&peer.network, &peer.key.to_string()).await {
                Ok(owner) => Ok(owner.is_some_and(|o| o.node != self.local.node_id)),
                // Without Redis only this node's peers are reachable.
                Err(RedisBusError::Unavailable) => Ok(false),
                Err(e) => Err(bus_err(e)),
            }
        })
    }

    fn deliver<'a>(
        &'a self,
        to: &'a PeerId,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if self.local.owners.contains_key(to) {
                return self.local.push(to.clone(), delivery);
            }
            let owner = match self.bus.lookup(&to.network, &to.key.to_string()).await {
                Ok(Some(o)) if o.node != self.local.node_id => o,
                Ok(_) => return Err(RegistryError::NotFound),
                Err(RedisBusError::Unavailable) => return Err(RegistryError::NotFound),
                Err(e) => return Err(bus_err(e)),
            };
            let env = Envelope {
                to: to.clone(),
                delivery,
            };
            let payload = serde_json::to_string(&env)
                .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
            let msg = NodeMsg::Deliver {
                network: to.network.clone(),
                key: to.key.to_string(),
                conn: owner.conn,
                payload,
            };
            match self.bus.send_to_node(&owner.node, &msg).await {
                Ok(true) => {
                    metrics::counter!(DELIVERIES_TOTAL, "result" => "sent").increment(1);
                    Ok(())
                }
                Ok(false) => {
                    metrics::counter!(DELIVERIES_TOTAL, "result" => "node_gone").increment(1);
                    Err(RegistryError::NotFound)
                }
                Err(RedisBusError::Unavailable) => Err(RegistryError::NotFound),
                Err(e) => Err(bus_err(e)),
            }
        })
    }

    fn watch<'a>(
        &'a self,
        watcher: &'a PeerId,
        keys: &'a [PeerKey],
    ) -> BoxFuture<'a, Result<Vec<(PeerKey, bool)>, RegistryError>> {
        Box::pin(async move {
            let l = &self.local;
            let dropped = l.unwatch_all(watcher);
            let mut unique: Vec<PeerKey> = keys.to_vec();
            unique.sort();
            unique.dedup();
            let mut added = 0usize;
            for k in &unique {
                let watched = PeerId {
                    network: watcher.network.clone(),
                    key: *k,
                };
                let mut e = l.watched.entry(watched).or_default();
                if e.watchers.is_empty() {
                    added += 1;
                }
                e.watchers.insert(watcher.key);
            }
            l.watching.insert(watcher.clone(), unique.clone());
            // Subscribe before reading the state, so no change falls in between.
            for _ in 0..added {
                self.update_interest(&watcher.network, true).await;
            }
            for _ in 0..dropped {
                self.update_interest(&watcher.network, false).await;
            }
            let remote_keys: Vec<String> = unique
                .iter()
                .filter(|k| {
                    !l.owners.contains_key(&PeerId {
                        network: watcher.network.clone(),
                        key: **k,
                    })
                })
                .map(|k| k.to_string())
                .collect();
            let remote = match self.bus.present(&watcher.network, &remote_keys).await {
                Ok(found) => found,
                Err(RedisBusError::Unavailable) => HashSet::new(),
                Err(e) => return Err(bus_err(e)),
            };
            let mut states = Vec::with_capacity(unique.len());
            for k in unique {
                let peer = PeerId {
                    network: watcher.network.clone(),
                    key: k,
                };
                let online = l.owners.contains_key(&peer) || remote.contains(&k.to_string());
                if let Some(mut w) = l.watched.get_mut(&peer) {
                    w.online = online;
                }
                states.push((k, online));
            }
            Ok(states)
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            if self.bus.is_up() {
                Health {
                    ready: true,
                    detail: format!("redis ok (node {})", self.local.node_id),
                }
            } else {
                Health {
                    ready: false,
                    detail: format!(
                        "redis unreachable: degraded, serving {} local peers (node {})",
                        self.local.owners.len(),
                        self.local.node_id
                    ),
                }
            }
        })
    }

    fn revoke<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if !super::is_revocation_hash(hash) {
                return Err(RegistryError::Unavailable(format!(
                    "not a token hash: {hash:?}"
                )));
            }
            self.bus.revoke(hash).await.map_err(bus_err)
        })
    }

    fn revocations(
        &self,
        known: u64,
    ) -> BoxFuture<'_, Result<Option<RevocationList>, RegistryError>> {
        Box::pin(async move {
            let Some((v, entries)) = self.bus.revocations(known).await.map_err(bus_err)? else {
                return Ok(None);
            };
            let (good, bad): (Vec<String>, Vec<String>) = entries
                .into_iter()
                .partition(|h| super::is_revocation_hash(h));
            if !bad.is_empty() {
                metrics::counter!(super::REVOCATIONS_MALFORMED_TOTAL).increment(bad.len() as u64);
                tracing::warn!(
                    count = bad.len(),
                    "ignoring malformed entries in the shared revocation set"
                );
            }
            Ok(Some((v, good)))
        })
    }
}

/// Applies what Redis reports to local state, and every `sweep` re-reads the presence of every
/// watched key, which catches peers of dead nodes (their keys expire) and events missed while
/// disconnected.
async fn event_loop(
    local: Arc<Local>,
    bus: RedisBus,
    mut events: mpsc::Receiver<BusEvent>,
    sweep: Duration,
    settle: Duration,
) {
    let mut tick = tokio::time::interval(sweep.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a reconnect Redis may have lost its data (a restart without persistence) and other
    // nodes may still be reconnecting: until they had time to re-publish (`settle`), a missing
    // key is not taken as "offline", so watchers see no offline/online flap.
    // The first connection needs no settling: nothing was lost before it.
    let mut settled_at = tokio::time::Instant::now();
    let mut reconnect = false;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(BusEvent::Up) => {
                    if reconnect {
                        settled_at = tokio::time::Instant::now() + settle;
                    }
                    reconnect = true;
                    let settled = tokio::time::Instant::now() >= settled_at;
                    sweep_watched(&local, &bus, settled).await;
                }
                Some(ev) => {
                    if let Some(gone) = handle_event(&local, ev) {
                        bus.forget(&gone.network, &gone.key, &gone.conn);
                        for _ in 0..gone.dropped_watches {
                            let _ = bus.interest(&gone.network, false).await;
                        }
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                let settled = tokio::time::Instant::now() >= settled_at;
                sweep_watched(&local, &bus, settled).await;
            }
        }
    }
}

/// A local connection that lost its key to a newer one elsewhere.
struct Superseded {
    network: String,
    key: String,
    conn: String,
    /// Watched keys of that network that lost their last watcher with it.
    dropped_watches: usize,
}

/// Applies one event; reports a superseded local connection for the caller to clean up.
fn handle_event(local: &Local, ev: BusEvent) -> Option<Superseded> {
    match ev {
        BusEvent::Node(NodeMsg::Deliver { payload, .. }) => {
            let env: Envelope = match serde_json::from_str(&payload) {
                Ok(env) => env,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed delivery from another node");
                    return None;
                }
            };
            if local.owners.contains_key(&env.to) {
                let _ = local.push(env.to, env.delivery);
            } else {
                // The peer left (or moved) after the sender looked it up; the offer times out.
                metrics::counter!(DELIVERIES_TOTAL, "result" => "gone").increment(1);
            }
            None
        }
        BusEvent::Node(NodeMsg::Superseded {
            network,
            key,
            conn,
            by_node,
        })
        | BusEvent::Lost {
            network,
            key,
            conn,
            by_node,
        } => {
            let (Ok(peer_key), Ok(conn_id)) = (key.parse::<PeerKey>(), conn.parse::<ConnId>())
            else {
                return None;
            };
            let peer = PeerId {
                network: network.clone(),
                key: peer_key,
            };
            let dropped_watches = local.superseded(peer, conn_id, &by_node);
            Some(Superseded {
                network,
                key,
                conn,
                dropped_watches,
            })
        }
        BusEvent::Presence { network, event } => {
            if event.node == local.node_id {
                return None; // applied locally already
            }
            let Ok(key) = event.key.parse::<PeerKey>() else {
                return None;
            };
            let peer = PeerId { network, key };
            if !event.online && local.owners.contains_key(&peer) {
                return None; // it moved here
            }
            local.set_online(&peer, event.online);
            None
        }
        BusEvent::Up | BusEvent::Down => None,
    }
}

/// Re-reads the presence of every watched key; `allow_offline` false applies only keys that
/// came online.
async fn sweep_watched(local: &Local, bus: &RedisBus, allow_offline: bool) {
    if !bus.is_up() {
        return; // keep the last known state until Redis answers again
    }
    let mut networks: Vec<String> = local
        .watched
        .iter()
        .map(|e| e.key().network.clone())
        .collect();
    networks.sort();
    networks.dedup();
    for network in networks {
        // Only the watched keys are read (MGET), whatever the size of the network.
        let peers: Vec<PeerId> = local
            .watched
            .iter()
            .filter(|e| e.key().network == network)
            .map(|e| e.key().clone())
            .collect();
        let remote: Vec<String> = peers
            .iter()
            .filter(|p| !local.owners.contains_key(*p))
            .map(|p| p.key.to_string())
            .collect();
        let present = match bus.present(&network, &remote).await {
            Ok(found) => found,
            Err(_) => return,
        };
        for peer in peers {
            let online =
                local.owners.contains_key(&peer) || present.contains(&peer.key.to_string());
            if online || allow_offline {
                local.set_online(&peer, online);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> RedisTarget {
        url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn url_forms() {
        assert!(matches!(
            target("redis://127.0.0.1:6379/"),
            RedisTarget::Single(_)
        ));
        assert!(
            matches!(target("redis://:pw@10.0.0.1:6379/2"), RedisTarget::Single(i) if i.redis.db == 2)
        );
        assert!(matches!(
            target("unix:///run/redis/redis.sock"),
            RedisTarget::Single(_)
        ));
        match target("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/3") {
            RedisTarget::Sentinel {
                sentinels,
                master,
                node,
            } => {
                assert_eq!(sentinels.len(), 2);
                assert_eq!(master, "mymaster");
                let info = node.redis_connection_info.expect("master info");
                assert_eq!((info.db, info.password.as_deref()), (3, Some("pw")));
                assert!(node.tls_mode.is_none());
                // Sentinels themselves are contacted without the master's password.
                assert!(sentinels.iter().all(|s| s.redis.password.is_none()));
            }
            other => panic!("{other:?}"),
        }
        match target("redis+cluster://u:p@c1:7000,c2:7001,c3:7002") {
            RedisTarget::Cluster(seeds) => {
                assert_eq!(seeds.len(), 3);
                assert!(seeds
                    .iter()
                    .all(|s| s.redis.password.as_deref() == Some("p")));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(target("redis://c1:7000, redis://c2:7001"), RedisTarget::Cluster(s) if s.len() == 2)
        );
        for bad in [
            "",
            "c1:7000",
            "http://x/",
            "redis+sentinel://s1:26379",
            "redis+cluster://",
        ] {
            assert!(bad.parse::<RedisTarget>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn errors_and_debug_never_show_passwords() {
        let e = "ftp://user:secret@h/"
            .parse::<RedisTarget>()
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| !e.contains("secret")));
        let t = target("redis+sentinel://:secret@s1:26379/m");
        assert!(!format!("{t:?}").contains("secret"));
        let t = target("redis://:secret@h:1/");
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn network_names_stay_inside_the_hash_tag() {
        assert_eq!(net_tag("acme-prod.eu"), "acme-prod.eu");
        assert_eq!(net_tag("a}b{"), "x617d627b");
    }

    #[test]
    fn ttl_bounds_detection() {
        let cfg = RedisBusConfig::new(target("redis://h/"), "n");
        assert_eq!(cfg.heartbeat(), Duration::from_millis(7500));
        // Key lifetime + one sweep period = the configured TTL.
        assert_eq!(
            Duration::from_millis(cfg.key_ttl_ms()) + cfg.heartbeat(),
            cfg.presence_ttl
        );
    }

    #[test]
    fn owner_prefix_matches_the_stored_json() {
        let o = Owner {
            node: "n\"1".into(),
            conn: "42".into(),
            since: 7,
            info: String::new(),
        };
        let json = serde_json::to_string(&o).expect("json");
        let prefix = owner_prefix(&o.node, &o.conn).expect("prefix");
        assert!(json.starts_with(&prefix), "{json} / {prefix}");
        assert!(!json.starts_with(&owner_prefix("n\"1", "4").expect("prefix")));
        assert!(!json.starts_with(&owner_prefix("n", "42").expect("prefix")));
    }

    #[test]
    fn messages_round_trip_as_json() {
        let m = NodeMsg::Superseded {
            network: "n".into(),
            key: "k".into(),
            conn: "1".into(),
            by_node: "b".into(),
        };
        let s = serde_json::to_string(&m).expect("json");
        assert_eq!(serde_json::from_str::<NodeMsg>(&s).expect("parse"), m);
        assert!(serde_json::from_str::<NodeMsg>("{\"t\":\"nope\"}").is_err());
    }
}
