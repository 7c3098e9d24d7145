//! `--wg-interface`: read the peers of an existing WireGuard interface with `wg show IFACE
//! dump` and point each peer's endpoint at its local proxy port with `wg set`; then keep it
//! that way ([`spawn_watcher`]) and put the endpoints back at exit ([`WatchHandle::stop`]).
//!
//! The watcher polls `wg show IFACE dump` every [`WATCH_INTERVAL`] rather than listening on
//! netlink: WireGuard's generic-netlink family sends no notifications (an endpoint changed by
//! `wg syncconf` or a re-created interface is only visible by asking again), and userspace
//! implementations (boringtun, wireguard-go) have no netlink at all, only the UAPI socket `wg`
//! speaks. One `wg show` every 2 s costs a fork and a few hundred bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{parse_wg_dump, WgDump, WgPeer};
use crate::keys::format_key;

/// Runs `wg show IFACE dump` and parses it.
pub fn show_dump(iface: &str) -> anyhow::Result<WgDump> {
    let out = Command::new("wg")
        .args(["show", iface, "dump"])
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `wg show {iface} dump`: {e} (is wireguard-tools installed?)"
            )
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "`wg show {iface} dump` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_wg_dump(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| anyhow::anyhow!("`wg show {iface} dump`: {e}"))
}

/// Points `peer` of `iface` at `endpoint`: removes the peer, then adds it again with the new
/// endpoint (keeping its allowed IPs, keepalive and preshared key). Userspace WireGuard
/// (boringtun) cannot modify an existing peer, and it must be two `wg set` calls: in one call
/// `wg` merges both sections of the same key into one peer that still carries `remove`, which
/// leaves the interface with no peer at all. The kernel accepts this form as well.
pub fn set_endpoint(iface: &str, peer: &WgPeer, endpoint: SocketAddr) -> anyhow::Result<()> {
    readd_peer(iface, peer, Some(endpoint))
}

/// [`set_endpoint`] with an optional endpoint (`None`: the peer is re-added without one, as
/// it was before meshpunch pointed it somewhere).
pub fn readd_peer(iface: &str, peer: &WgPeer, endpoint: Option<SocketAddr>) -> anyhow::Result<()> {
    let k = format_key(&peer.public_key);
    let shown = endpoint.map_or_else(|| "none".to_string(), |e| e.to_string());
    run_wg(
        iface,
        &k,
        &shown,
        &[
            "set".into(),
            iface.into(),
            "peer".into(),
            k.clone(),
            "remove".into(),
        ],
    )?;
    let mut args: Vec<String> = vec![
        "set".into(),
        iface.into(),
        "peer".into(),
        k.clone(),
        "allowed-ips".into(),
        peer.allowed_ips.clone(),
    ];
    if let Some(e) = endpoint {
        args.push("endpoint".into());
        args.push(e.to_string());
    }
    if let Some(ka) = peer.persistent_keepalive {
        args.push("persistent-keepalive".into());
        args.push(ka.to_string());
    }
    // The preshared key goes through a private temporary file, never the command line.
    let psk_file = match &peer.preshared_key {
        Some(psk) => {
            let f = tempfile_with(psk)?;
            args.push("preshared-key".into());
            args.push(f.display().to_string());
            Some(f)
        }
        None => None,
    };
    let res = run_wg(iface, &k, &shown, &args);
    if let Some(f) = psk_file {
        let _ = std::fs::remove_file(f);
    }
    res
}

fn run_wg(iface: &str, k: &str, endpoint: &str, args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("wg")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `wg set`: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`wg set {iface} peer {k} ...` (endpoint {endpoint}) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tempfile_with(content: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = std::env::temp_dir().join(format!(
        "meshpunch-psk-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(content.as_bytes())?;
    Ok(path)
}

/// How often the watcher reads `wg show IFACE dump` (so an endpoint is re-applied within
/// 2 s plus the `wg set` time after the interface came back or someone changed it).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The pure part of the watcher: which peers to re-point and what to restore at exit.
#[derive(Debug, Clone)]
pub struct Watcher {
    /// Where each peer must point: its proxy port.
    proxies: HashMap<[u8; 32], SocketAddr>,
    /// Each peer's endpoint as `wg show` last showed it before we changed it (`None`: it
    /// had none). Set from the first dump, and again whenever someone else sets an endpoint
    /// (`wg syncconf`, a re-created interface): that is the endpoint to restore.
    original: HashMap<[u8; 32], Option<SocketAddr>>,
    /// Polls in a row each tracked peer was missing from the interface.
    absent: HashMap<[u8; 32], u32>,
}

/// Polls in a row a peer must be missing from the interface before it is dropped.
pub const GONE_AFTER: u32 = 2;

impl Watcher {
    /// A watcher for these proxy ports, remembering the endpoints `first` shows.
    pub fn new(first: &WgDump, proxies: &[([u8; 32], SocketAddr)]) -> Watcher {
        let mut w = Watcher {
            proxies: proxies.iter().copied().collect(),
            original: HashMap::new(),
            absent: HashMap::new(),
        };
        w.remember(first);
        w
    }

    fn is_ours(&self, ep: Option<SocketAddr>) -> bool {
        ep.is_some_and(|e| self.proxies.values().any(|p| *p == e))
    }

    fn remember(&mut self, dump: &WgDump) {
        for p in &dump.peers {
            if self.proxies.contains_key(&p.public_key) && !self.is_ours(p.endpoint) {
                self.original.insert(p.public_key, p.endpoint);
            }
        }
    }

    /// The peers of `dump` that do not point at their proxy port, with that port (and the
    /// endpoints they show are remembered as the ones to restore).
    pub fn diff(&mut self, dump: &WgDump) -> Vec<(WgPeer, SocketAddr)> {
        self.remember(dump);
        dump.peers
            .iter()
            .filter_map(|p| {
                let proxy = *self.proxies.get(&p.public_key)?;
                (p.endpoint != Some(proxy)).then(|| (p.clone(), proxy))
            })
            .collect()
    }

    /// What to set back at exit: every peer of `dump` that still points at its proxy port,
    /// with the endpoint it had before (`None`: none). Peers someone else re-pointed since
    /// are left alone.
    pub fn restore_plan(&self, dump: &WgDump) -> Vec<(WgPeer, Option<SocketAddr>)> {
        dump.peers
            .iter()
            .filter(|p| {
                p.endpoint.is_some() && p.endpoint == self.proxies.get(&p.public_key).copied()
            })
            .map(|p| {
                (
                    p.clone(),
                    self.original.get(&p.public_key).copied().flatten(),
                )
            })
            .collect()
    }

    /// Starts keeping `key` pointed at `proxy` (a peer added at run time).
    pub fn track(&mut self, key: [u8; 32], proxy: SocketAddr) {
        self.proxies.insert(key, proxy);
        self.absent.remove(&key);
    }

    /// Stops tracking `key` (removed from the interface).
    pub fn untrack(&mut self, key: &[u8; 32]) {
        self.proxies.remove(key);
        self.original.remove(key);
        self.absent.remove(key);
    }

    /// Tracked peers missing from `dump` in [`GONE_AFTER`] polls in a row: removed from the
    /// interface (one poll is not enough: `wg-quick up` creates the interface before it adds
    /// the peers).
    pub fn removed_peers(&mut self, dump: &WgDump) -> Vec<[u8; 32]> {
        let keys: Vec<[u8; 32]> = self.proxies.keys().copied().collect();
        let mut out = Vec::new();
        for k in keys {
            if dump.peers.iter().any(|p| p.public_key == k) {
                self.absent.remove(&k);
            } else {
                let n = self.absent.entry(k).or_insert(0);
                *n += 1;
                if *n >= GONE_AFTER {
                    out.push(k);
                }
            }
        }
        out
    }

    /// Peers of `dump` meshpunch has no proxy port for (added to the interface since).
    pub fn unknown_peers<'a>(&self, dump: &'a WgDump) -> Vec<&'a WgPeer> {
        dump.peers
            .iter()
            .filter(|p| !self.proxies.contains_key(&p.public_key))
            .collect()
    }
}

/// The watched interface as `meshpunch status` shows it.
pub type SharedStatus = Arc<Mutex<crate::control::WgInterfaceStatus>>;

/// A running watcher: stop it with [`WatchHandle::stop`].
pub struct WatchHandle {
    iface: String,
    watcher: Arc<Mutex<Watcher>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Watches `iface` every [`WATCH_INTERVAL`]: re-points peers whose endpoint is not their
/// proxy port (the interface was re-created, `wg syncconf` changed it), notes in `status` when
/// the interface is gone (logged once) and when it is back; with `peers`, carries peers added
/// to the interface and drops removed ones.
pub fn spawn_watcher(
    iface: &str,
    watcher: Watcher,
    status: SharedStatus,
    peers: Option<crate::daemon::PeerControl>,
) -> WatchHandle {
    let watcher = Arc::new(Mutex::new(watcher));
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let w = watcher.clone();
    let name = iface.to_string();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = stop_rx.changed() => return,
            }
            let n = name.clone();
            let dump = tokio::task::spawn_blocking(move || show_dump(&n)).await;
            let dump = match dump {
                Ok(d) => d,
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
            let fixes = match dump {
                Err(e) => {
                    if let Ok(mut st) = status.lock() {
                        if st.state != "gone" {
                            tracing::warn!(iface = %name, error = %format!("{e:#}"), "WireGuard interface gone; re-pointing its peers when it is back");
                            st.state = "gone".into();
                            st.gone_since_unix = Some(unix_s());
                        }
                        st.error = Some(format!("{e:#}"));
                    }
                    continue;
                }
                Ok(d) => {
                    let (unknown, gone) = match w.lock() {
                        Ok(mut w) => (
                            w.unknown_peers(&d)
                                .into_iter()
                                .map(|p| p.public_key)
                                .collect::<Vec<_>>(),
                            w.removed_peers(&d),
                        ),
                        Err(_) => return,
                    };
                    let mut unmanaged = Vec::new();
                    for k in unknown {
                        let added = match &peers {
                            Some(pc) => pc.add(k).await,
                            None => Err(anyhow::anyhow!("restart meshpunch to carry it")),
                        };
                        match added {
                            Ok(proxy) => {
                                tracing::info!(iface = %name, peer = %format_key(&k), %proxy, "peer added to the interface: carried");
                                if let Ok(mut w) = w.lock() {
                                    w.track(k, proxy);
                                }
                            }
                            Err(e) => {
                                tracing::debug!(iface = %name, peer = %format_key(&k), error = %e, "peer not carried");
                                unmanaged.push(format_key(&k));
                            }
                        }
                    }
                    for k in gone {
                        if let Some(pc) = &peers {
                            pc.remove(k).await;
                        }
                        tracing::info!(iface = %name, peer = %format_key(&k), "peer removed from the interface: dropped");
                        if let Ok(mut w) = w.lock() {
                            w.untrack(&k);
                        }
                    }
                    if let Ok(mut st) = status.lock() {
                        if st.state == "gone" {
                            tracing::info!(iface = %name, "WireGuard interface is back");
                        }
                        st.state = "up".into();
                        st.gone_since_unix = None;
                        st.error = None;
                        st.fwmark = d.fwmark;
                        if unmanaged != st.unmanaged_peers {
                            if !unmanaged.is_empty() {
                                tracing::warn!(iface = %name, peers = ?unmanaged, "peers on the interface that meshpunch does not carry");
                            }
                            st.unmanaged_peers = unmanaged;
                        }
                    }
                    match w.lock() {
                        Ok(mut w) => w.diff(&d),
                        Err(_) => return,
                    }
                }
            };
            for (peer, proxy) in fixes {
                let n = name.clone();
                let k = format_key(&peer.public_key);
                let was = peer.endpoint;
                let r = tokio::task::spawn_blocking(move || set_endpoint(&n, &peer, proxy)).await;
                match r {
                    Ok(Ok(())) => {
                        tracing::info!(iface = %name, peer = %k, was = ?was.map(|e| e.to_string()), %proxy, "re-pointed WireGuard peer at its proxy port");
                        if let Ok(mut st) = status.lock() {
                            st.reapplied_total += 1;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(iface = %name, peer = %k, error = %format!("{e:#}"), "cannot re-point WireGuard peer");
                        if let Ok(mut st) = status.lock() {
                            st.error = Some(format!("{e:#}"));
                        }
                    }
                    Err(_) => {}
                }
            }
        }
    });
    WatchHandle {
        iface: iface.to_string(),
        watcher,
        stop,
        task,
    }
}

impl WatchHandle {
    /// Stops watching (after the current round) and points every peer that still uses its
    /// proxy port back at the endpoint it had before. Returns how many were restored.
    pub async fn stop(self) -> anyhow::Result<usize> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let watcher = self
            .watcher
            .lock()
            .map_err(|_| anyhow::anyhow!("watcher state poisoned"))?
            .clone();
        let iface = self.iface.clone();
        tokio::task::spawn_blocking(move || restore(&iface, &watcher))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
    }
}

/// Puts back the endpoints `watcher` remembers on `iface` (see [`Watcher::restore_plan`]).
pub fn restore(iface: &str, watcher: &Watcher) -> anyhow::Result<usize> {
    let dump = show_dump(iface)?;
    let plan = watcher.restore_plan(&dump);
    let mut n = 0;
    let mut first_err = None;
    for (peer, ep) in plan {
        match readd_peer(iface, &peer, ep) {
            Ok(()) => n += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(k: u8, ep: Option<&str>) -> WgPeer {
        WgPeer {
            public_key: [k; 32],
            preshared_key: None,
            endpoint: ep.map(|e| e.parse().unwrap()),
            allowed_ips: format!("10.0.0.{k}/32"),
            persistent_keepalive: None,
        }
    }

    fn dump(peers: Vec<WgPeer>) -> WgDump {
        WgDump {
            private_key: None,
            public_key: None,
            listen_port: 51820,
            fwmark: None,
            peers,
        }
    }

    #[test]
    fn diff_re_points_and_restore_puts_back_the_original() {
        let pa: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let pb: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let first = dump(vec![peer(1, Some("192.0.2.1:51820")), peer(2, None)]);
        let mut w = Watcher::new(&first, &[([1; 32], pa), ([2; 32], pb)]);
        // Start: both need pointing.
        let fix = w.diff(&first);
        assert_eq!(fix.len(), 2);
        // Applied: nothing to do.
        let applied = dump(vec![
            peer(1, Some("127.0.0.1:40001")),
            peer(2, Some("127.0.0.1:40002")),
        ]);
        assert!(w.diff(&applied).is_empty());
        // Interface re-created (wg-quick down/up): the config's endpoint is back; re-point it.
        let recreated = dump(vec![peer(1, Some("192.0.2.1:51820")), peer(2, None)]);
        let fix = w.diff(&recreated);
        assert_eq!(fix.iter().map(|f| f.1).collect::<Vec<_>>(), vec![pa, pb]);
        // `wg syncconf` gave peer 1 a new endpoint: that is what exit restores.
        let synced = dump(vec![
            peer(1, Some("198.51.100.9:51820")),
            peer(2, Some("127.0.0.1:40002")),
        ]);
        assert_eq!(w.diff(&synced).len(), 1);
        let plan = w.restore_plan(&applied);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].1, Some("198.51.100.9:51820".parse().unwrap()));
        assert_eq!(plan[1].1, None);
        // A peer someone else pointed elsewhere is not touched at exit.
        let other = dump(vec![
            peer(1, Some("203.0.113.5:1")),
            peer(2, Some("127.0.0.1:40002")),
        ]);
        let plan = w.restore_plan(&other);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].0.public_key, [2; 32]);
    }

    #[test]
    fn a_peer_is_dropped_only_after_missing_twice_and_can_come_back() {
        let pa: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let with = dump(vec![peer(1, None)]);
        let mut w = Watcher::new(&with, &[([1; 32], pa)]);
        // `wg-quick up`: the interface exists a moment before its peers.
        assert!(w.removed_peers(&dump(vec![])).is_empty());
        assert!(w.removed_peers(&with).is_empty());
        assert!(w.removed_peers(&dump(vec![])).is_empty());
        assert_eq!(w.removed_peers(&dump(vec![])), vec![[1; 32]]);
        w.untrack(&[1; 32]);
        assert_eq!(w.unknown_peers(&with).len(), 1);
        w.track([1; 32], pa);
        assert!(w.unknown_peers(&with).is_empty());
        assert_eq!(w.diff(&with).len(), 1);
    }

    #[test]
    fn unknown_peers_are_reported_not_touched() {
        let pa: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let d = dump(vec![peer(1, None), peer(3, Some("192.0.2.3:1"))]);
        let mut w = Watcher::new(&d, &[([1; 32], pa)]);
        assert_eq!(w.unknown_peers(&d).len(), 1);
        let fix = w.diff(&d);
        assert_eq!(fix.len(), 1);
        assert_eq!(fix[0].0.public_key, [1; 32]);
        // A peer removed from the interface: nothing to do, nothing to restore.
        assert!(w.diff(&dump(vec![])).is_empty());
        assert!(w.restore_plan(&dump(vec![])).is_empty());
    }
}
