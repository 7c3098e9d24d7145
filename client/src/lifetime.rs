//! The daemon's NAT keepalive interval: where it comes from (the `BindingLifetime` config key,
//! a cached measurement, a fresh measurement, or the default) and the background measurement
//! that drives [`meshpunch_proto::lifetime::LifetimeProbe`] from sockets of its own.
//!
//! Precedence: an explicit `BindingLifetime` in the config wins and nothing is measured. Else,
//! once the data socket knows its public address (STUN from the rendezvous' servers), a cached
//! result for that public IP younger than [`CACHE_TTL`] is used; otherwise the daemon measures
//! in the background (own sockets: the data socket, its mapping and the paths are never
//! touched) and keeps [`meshpunch_proto::nat::DEFAULT_KEEPALIVE`] until the result is in. A new public IP looks the
//! cache up again and, on a miss, measures again.
//!
//! The cache is a small JSON file next to the control socket (`<socket>.lifetime.json` with
//! the socket's extension replaced: `/run/meshpunch/meshpunch.sock` →
//! `/run/meshpunch/meshpunch.lifetime.json`), so every daemon on a machine has its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use meshpunch_proto::lifetime::{LifetimeProbe, Outcome, DEFAULT_STEPS_S};
use meshpunch_proto::nat::{keepalive_interval, BindingLifetime};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;

use crate::control::NatStatus;

/// How long a cached measurement is trusted for the same public IP.
pub const CACHE_TTL: Duration = Duration::from_secs(12 * 3600);
/// Entries kept in the cache file (one per public IP seen, newest first).
pub const CACHE_MAX_ENTRIES: usize = 16;
/// Wait before measuring again after a measurement failed or was impossible.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// How the daemon gets its keepalive interval.
#[derive(Debug, Clone)]
pub struct LifetimeOptions {
    /// `BindingLifetime` from the config (seconds): wins over everything else.
    pub configured: Option<u64>,
    /// Idle periods to test (`BindingLifetimeProbe`); `None` = never measure.
    pub steps: Option<Vec<Duration>>,
    /// Cache file (`None` = no cache).
    pub cache: Option<PathBuf>,
}

impl Default for LifetimeOptions {
    fn default() -> Self {
        LifetimeOptions {
            configured: None,
            steps: Some(default_steps()),
            cache: None,
        }
    }
}

/// [`DEFAULT_STEPS_S`] as durations.
pub fn default_steps() -> Vec<Duration> {
    DEFAULT_STEPS_S
        .iter()
        .map(|s| Duration::from_secs(*s))
        .collect()
}

/// The cache file of the daemon whose control socket is `control_socket`.
pub fn cache_path_for(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("lifetime.json")
}

/// Parses `BindingLifetimeProbe`: `off`, or idle periods in seconds separated by commas.
pub fn parse_steps(v: &str) -> Option<Option<Vec<Duration>>> {
    let v = v.trim();
    if matches!(
        v.to_ascii_lowercase().as_str(),
        "off" | "no" | "false" | "0"
    ) {
        return Some(None);
    }
    let mut out = Vec::new();
    for part in v.split(',') {
        let s: u64 = part.trim().parse().ok().filter(|s| *s > 0 && *s <= 3600)?;
        out.push(Duration::from_secs(s));
    }
    if out.is_empty() || out.len() > 8 {
        return None;
    }
    Some(Some(out))
}

/// One cached measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Public IP the measurement was made behind.
    pub public_ip: IpAddr,
    /// The result.
    pub lifetime: BindingLifetime,
    /// When (Unix seconds).
    pub measured_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    entries: Vec<CacheEntry>,
}

fn unix_now() -> u64 {
    meshpunch_proto::clock::unix_secs(SystemTime::now())
}

fn read_cache(path: &Path) -> Vec<CacheEntry> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok())
        .map(|c| c.entries)
        .unwrap_or_default()
}

/// The fresh cached result for `ip` in `path`, if any.
pub fn cache_lookup(path: &Path, ip: IpAddr, now_unix: u64) -> Option<CacheEntry> {
    read_cache(path).into_iter().find(|e| {
        e.public_ip == ip
            && e.measured_at <= now_unix
            && now_unix - e.measured_at < CACHE_TTL.as_secs()
    })
}

/// Stores `entry` in `path` (replacing the entry for its IP; written to a temporary file and
/// renamed so a crash never leaves half a file).
pub fn cache_store(path: &Path, entry: CacheEntry) -> std::io::Result<()> {
    let mut entries = read_cache(path);
    entries.retain(|e| e.public_ip != entry.public_ip);
    entries.insert(0, entry);
    entries.truncate(CACHE_MAX_ENTRIES);
    let bytes = serde_json::to_vec_pretty(&CacheFile { entries }).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Where the keepalive interval came from (`nat.source` in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing known yet (or measuring is off): [`meshpunch_proto::nat::DEFAULT_KEEPALIVE`].
    Default,
    /// `BindingLifetime` in the config.
    Config,
    /// A measurement from the cache file.
    Cached,
    /// Measured by this daemon.
    Measured,
}

impl Source {
    /// The status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::Config => "config",
            Source::Cached => "cached",
            Source::Measured => "measured",
        }
    }
}

/// A measurement the engine should start: run [`measure`] and hand the result back.
#[derive(Debug, Clone)]
pub struct Job {
    /// STUN server (RFC 5780) to test against.
    pub server: SocketAddr,
    /// Idle periods.
    pub steps: Vec<Duration>,
    /// Public IP it is for.
    pub public_ip: IpAddr,
}

/// The engine's view of the binding lifetime.
#[derive(Debug)]
pub struct LifetimeState {
    opts: LifetimeOptions,
    source: Source,
    lifetime: Option<BindingLifetime>,
    keepalive: Duration,
    /// Public IP the current value (or the running measurement) belongs to.
    public_ip: Option<IpAddr>,
    measuring: bool,
    retry_at: Option<Instant>,
    error: Option<String>,
    /// The running measurement (aborted when replaced or when the engine goes away).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for LifetimeState {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl LifetimeState {
    /// Initial state: the configured lifetime, or the default until something is known.
    pub fn new(opts: LifetimeOptions) -> Self {
        let (source, lifetime) = match opts.configured {
            Some(s) => (
                Source::Config,
                Some(BindingLifetime {
                    at_least_s: 0,
                    at_most_s: Some(s),
                }),
            ),
            None => (Source::Default, None),
        };
        LifetimeState {
            keepalive: keepalive_interval(lifetime),
            opts,
            source,
            lifetime,
            public_ip: None,
            measuring: false,
            retry_at: None,
            error: None,
            task: None,
        }
    }

    /// Keeps the task running `job` (a previous one, for an old public IP, is aborted).
    pub fn set_task(&mut self, task: tokio::task::JoinHandle<()>) {
        if let Some(old) = self.task.replace(task) {
            old.abort();
        }
    }

    /// Whether the lifetime comes from the config (`BindingLifetime`): nothing is measured.
    pub fn is_configured(&self) -> bool {
        self.source == Source::Config
    }

    /// The keepalive interval to use now.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The data socket's public address is `public` (a STUN answer), the STUN servers are
    /// `stun`. Returns `Some(true)` when the keepalive changed (from the cache) and a job
    /// when a measurement must start.
    pub fn on_public_addr(
        &mut self,
        now: Instant,
        public: SocketAddr,
        stun: &[SocketAddr],
    ) -> (bool, Option<Job>) {
        if self.source == Source::Config {
            return (false, None);
        }
        let ip = public.ip();
        let same_ip = self.public_ip == Some(ip);
        if same_ip && (self.measuring || matches!(self.source, Source::Measured | Source::Cached)) {
            return (false, None);
        }
        if same_ip && self.retry_at.is_some_and(|t| now < t) {
            return (false, None);
        }
        let Some(steps) = self.opts.steps.clone() else {
            return (false, None);
        };
        self.public_ip = Some(ip);
        if let Some(path) = &self.opts.cache {
            if let Some(e) = cache_lookup(path, ip, unix_now()) {
                tracing::info!(public_ip = %ip, at_least_s = e.lifetime.at_least_s, at_most_s = ?e.lifetime.at_most_s, "NAT binding lifetime from the cache");
                let changed = self.set(Source::Cached, Some(e.lifetime));
                return (changed, None);
            }
        }
        // A new public IP without a cached value: back to the default until measured.
        let changed = if self.source != Source::Default {
            self.set(Source::Default, None)
        } else {
            false
        };
        let Some(server) = stun.iter().find(|s| s.is_ipv4() == ip.is_ipv4()).copied() else {
            // Look again (cache file included) only after the retry time, not on every STUN
            // answer of the data socket.
            self.retry_at = Some(now + RETRY_AFTER);
            return (changed, None);
        };
        self.measuring = true;
        self.error = None;
        tracing::info!(public_ip = %ip, %server, steps = ?steps, "measuring the NAT binding lifetime in the background");
        (
            changed,
            Some(Job {
                server,
                steps,
                public_ip: ip,
            }),
        )
    }

    /// A measurement for `public_ip` ended. Returns whether the keepalive changed.
    pub fn on_result(&mut self, now: Instant, public_ip: IpAddr, outcome: Outcome) -> bool {
        if self.public_ip != Some(public_ip) || self.source == Source::Config {
            // Stale (the public IP changed meanwhile; a new measurement runs or will).
            return false;
        }
        self.measuring = false;
        match outcome {
            Outcome::Measured(l) => {
                tracing::info!(public_ip = %public_ip, at_least_s = l.at_least_s, at_most_s = ?l.at_most_s, keepalive_s = keepalive_interval(Some(l)).as_secs(), "NAT binding lifetime measured");
                if let Some(path) = &self.opts.cache {
                    let e = CacheEntry {
                        public_ip,
                        lifetime: l,
                        measured_at: unix_now(),
                    };
                    if let Err(err) = cache_store(path, e) {
                        tracing::warn!(error = %err, path = %path.display(), "cannot write the binding-lifetime cache");
                    }
                }
                self.set(Source::Measured, Some(l))
            }
            Outcome::Unsupported(why) | Outcome::Failed(why) => {
                tracing::info!(reason = %why, "NAT binding lifetime not measured; default keepalive");
                self.error = Some(why);
                self.retry_at = Some(now + RETRY_AFTER);
                false
            }
        }
    }

    fn set(&mut self, source: Source, lifetime: Option<BindingLifetime>) -> bool {
        self.source = source;
        self.lifetime = lifetime;
        let k = keepalive_interval(lifetime);
        let changed = k != self.keepalive;
        self.keepalive = k;
        changed
    }

    /// The `nat` object of `meshpunch status --json`.
    pub fn status(&self) -> NatStatus {
        NatStatus {
            binding_lifetime_s: self.lifetime.and_then(|l| match self.source {
                Source::Config => l.at_most_s,
                _ => Some(l.at_least_s),
            }),
            binding_lifetime_max_s: self.lifetime.and_then(|l| l.at_most_s),
            keepalive_interval_s: self.keepalive.as_secs_f64(),
            source: self.source.as_str().to_string(),
            measuring: self.measuring,
            public_ip: self.public_ip,
            error: self.error.clone(),
        }
    }
}

/// Runs one binding-lifetime search against `server` from fresh sockets (never the data
/// socket). Takes about the longest period tested at most.
pub async fn measure(server: SocketAddr, steps: &[Duration]) -> Outcome {
    let mut m = LifetimeProbe::new(Instant::now(), server, steps, rand::random());
    let any = if server.is_ipv4() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    };
    let mut socks = Vec::new();
    for _ in 0..m.sockets() {
        match UdpSocket::bind(any).await {
            Ok(s) => {
                // `FwMark`: the probes must leave like the data socket's packets do.
                if let Err(e) = crate::fwmark::apply(&s) {
                    return Outcome::Failed(format!("cannot mark a probe socket: {e}"));
                }
                socks.push(s)
            }
            Err(e) => return Outcome::Failed(format!("cannot bind a probe socket: {e}")),
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(64);
    let socks: Vec<std::sync::Arc<UdpSocket>> =
        socks.into_iter().map(std::sync::Arc::new).collect();
    // Readers die with this future, also when it is aborted (no socket outlives the search).
    struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            for r in &self.0 {
                r.abort();
            }
        }
    }
    let mut readers = AbortAll(Vec::new());
    for (i, s) in socks.iter().enumerate() {
        let s = s.clone();
        let tx = tx.clone();
        readers.0.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                match s.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    drop(tx);
    let outcome = loop {
        while let Some(t) = m.poll_transmit() {
            if let Some(s) = socks.get(t.socket) {
                let _ = s.send_to(&t.payload, t.dest).await;
            }
        }
        if let Some(o) = m.outcome() {
            break o.clone();
        }
        let Some(deadline) = m.poll_timeout() else {
            break Outcome::Failed("search stopped".into());
        };
        tokio::select! {
            r = rx.recv() => match r {
                Some((i, from, bytes)) => m.handle(Instant::now(), i, from, &bytes),
                None => break Outcome::Failed("probe sockets closed".into()),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                m.handle_timeout(Instant::now());
            }
        }
    };
    drop(readers);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshpunch_proto::nat::DEFAULT_KEEPALIVE;

    #[test]
    fn steps_parse() {
        assert_eq!(parse_steps("off"), Some(None));
        assert_eq!(
            parse_steps("3, 6,9"),
            Some(Some(vec![
                Duration::from_secs(3),
                Duration::from_secs(6),
                Duration::from_secs(9)
            ]))
        );
        assert_eq!(parse_steps("x"), None);
        assert_eq!(parse_steps("0"), Some(None));
        assert_eq!(parse_steps("5,0"), None);
    }

    #[test]
    fn config_key_parses_and_bad_values_name_the_line() {
        use crate::config::Config;
        let c = Config::parse("x.conf", "[Interface]\nBindingLifetimeProbe = off\n").unwrap();
        assert_eq!(c.binding_lifetime_probe, Some(None));
        let c = Config::parse("x.conf", "[Interface]\nbindinglifetimeprobe = 4, 8\n").unwrap();
        assert_eq!(
            c.binding_lifetime_probe,
            Some(Some(vec![Duration::from_secs(4), Duration::from_secs(8)]))
        );
        assert_eq!(
            Config::parse("x.conf", "").unwrap().binding_lifetime_probe,
            None
        );
        let e =
            Config::parse("x.conf", "[Interface]\n\nBindingLifetimeProbe = soon\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(
            e.msg.contains("BindingLifetimeProbe: expected off or"),
            "{e}"
        );
    }

    #[test]
    fn cache_round_trip_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let path = cache_path_for(&sock);
        assert_eq!(path, dir.path().join("d.lifetime.json"));
        let ip: IpAddr = "198.51.100.2".parse().unwrap();
        let l = BindingLifetime {
            at_least_s: 30,
            at_most_s: Some(60),
        };
        let now = unix_now();
        cache_store(
            &path,
            CacheEntry {
                public_ip: ip,
                lifetime: l,
                measured_at: now,
            },
        )
        .unwrap();
        assert_eq!(cache_lookup(&path, ip, now).map(|e| e.lifetime), Some(l));
        assert!(cache_lookup(&path, "192.0.2.1".parse().unwrap(), now).is_none());
        assert!(cache_lookup(&path, ip, now + CACHE_TTL.as_secs()).is_none());
    }

    #[test]
    fn config_wins_and_cache_is_used_per_public_ip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.lifetime.json");
        let now = Instant::now();
        let stun = ["203.0.113.10:3478".parse().unwrap()];
        let pub1: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        let pub2: SocketAddr = "198.51.100.6:4000".parse().unwrap();

        let mut cfg = LifetimeState::new(LifetimeOptions {
            configured: Some(20),
            cache: Some(path.clone()),
            ..Default::default()
        });
        assert_eq!(cfg.keepalive(), Duration::from_secs(10));
        assert!(cfg.on_public_addr(now, pub1, &stun).1.is_none());
        assert_eq!(cfg.status().source, "config");

        let mut s = LifetimeState::new(LifetimeOptions {
            cache: Some(path.clone()),
            ..Default::default()
        });
        assert_eq!(s.keepalive(), DEFAULT_KEEPALIVE);
        let (_, job) = s.on_public_addr(now, pub1, &stun);
        let job = job.unwrap();
        assert!(s.status().measuring);
        // The same address again while measuring: no second job.
        assert!(s.on_public_addr(now, pub1, &stun).1.is_none());
        let l = BindingLifetime {
            at_least_s: 9,
            at_most_s: Some(12),
        };
        assert!(s.on_result(now, job.public_ip, Outcome::Measured(l)));
        assert_eq!(s.keepalive(), Duration::from_secs(6));
        let st = s.status();
        assert_eq!(
            (st.source.as_str(), st.binding_lifetime_s, st.measuring),
            ("measured", Some(9), false)
        );

        // A restarted daemon takes it from the cache.
        let mut r = LifetimeState::new(LifetimeOptions {
            cache: Some(path.clone()),
            ..Default::default()
        });
        let (changed, job) = r.on_public_addr(now, pub1, &stun);
        assert!(changed && job.is_none());
        assert_eq!(r.status().source, "cached");
        // A new public IP: default again and a new measurement.
        let (changed, job) = r.on_public_addr(now, pub2, &stun);
        assert!(changed && job.is_some());
        assert_eq!(r.status().source, "default");
        // A result for the old IP is stale.
        assert!(!r.on_result(now, pub1.ip(), Outcome::Measured(l)));
    }
}
