//! Relay configuration: TOML file, overridden by command-line flags (which also read
//! `MESHPUNCH_RELAY_*` environment variables), with `--dev` defaults for a laptop.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use meshpunch_proto::addr::{Cidr, PeerPolicy};
use meshpunch_proto::turn::{
    Auth, Rate, ServerConfig, DEFAULT_ALLOCATION_BANDWIDTH, DEFAULT_NETWORK_BANDWIDTH,
    DEFAULT_NETWORK_QUOTA, DEFAULT_USER_QUOTA,
};
use serde::Deserialize;

pub use crate::stream::StreamConfig;

/// Default TURN/STUN port (RFC 8489 §18.5).
pub const DEFAULT_PORT: u16 = 3478;
/// `--dev` port: one above the default so a dev relay runs beside `meshpunch-rendezvous --dev`,
/// whose STUN server holds 3478.
pub const DEV_PORT: u16 = 3479;
/// Default relayed port range (the IANA dynamic range, like coturn).
pub const DEFAULT_PORTS: (u16, u16) = (49152, 65535);
/// Default realm.
pub const DEFAULT_REALM: &str = "meshpunch";
/// Default drain period on SIGTERM.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(25);

/// The TOML file (every key optional). See README "Relay configuration".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listening address for TURN/STUN over UDP (`0.0.0.0:3478`).
    pub listen: Option<SocketAddr>,
    /// More listening addresses (e.g. `["[::]:3478"]` next to an IPv4 `listen`).
    pub also_listen: Option<Vec<SocketAddr>>,
    /// IP addresses relayed ports are bound on (one relayed port per allocation per IP).
    pub relay_ips: Option<Vec<IpAddr>>,
    /// Relayed port range, `"LO-HI"`.
    pub ports: Option<String>,
    /// REALM.
    pub realm: Option<String>,
    /// TURN REST-API shared secret (coturn `static-auth-secret`).
    pub auth_secret: Option<String>,
    /// File holding the REST-API secret (first line), instead of `auth_secret` (keeps it out
    /// of the config file and the process list).
    pub auth_secret_file: Option<PathBuf>,
    /// Further accepted secrets (rotation).
    pub auth_secrets: Option<Vec<String>>,
    /// Static long-term users: `{ name = "password" }`.
    pub users: Option<HashMap<String, String>>,
    /// Allow loopback peers.
    pub allow_loopback_peers: Option<bool>,
    /// Allow private (RFC 1918, CGNAT, ULA) peers.
    pub allow_private_peers: Option<bool>,
    /// Admin HTTP (`/metrics`, `/healthz`) address.
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads (0 = one per CPU).
    pub workers: Option<usize>,
    /// Allocations per username at once (0 = unlimited; default 10).
    pub user_quota: Option<u32>,
    /// Permissions per allocation.
    pub max_permissions: Option<usize>,
    /// Channels per allocation.
    pub max_channels: Option<usize>,
    /// Per-allocation bandwidth limit in bytes/s (0 = unlimited).
    pub bandwidth_limit: Option<u64>,
    /// Burst of the bandwidth limit in bytes (default: one second's worth).
    pub bandwidth_burst: Option<u64>,
    /// STUN requests per second per source IP (0 = unlimited).
    pub request_rate: Option<u64>,
    /// Burst of `request_rate`.
    pub request_burst: Option<u64>,
    /// Unauthenticated answers (401, Binding) per second per source IP (0 = unlimited).
    pub unauth_rate: Option<u64>,
    /// Burst of `unauth_rate`.
    pub unauth_burst: Option<u64>,
    /// Default allocation lifetime in seconds.
    pub default_lifetime: Option<u64>,
    /// Maximum allocation lifetime in seconds.
    pub max_lifetime: Option<u64>,
    /// Nonce lifetime in seconds.
    pub nonce_lifetime: Option<u64>,
    /// Drain period after SIGTERM in seconds.
    pub drain_seconds: Option<u64>,
    /// Socket buffer size in bytes for the listening and relayed sockets.
    pub socket_buffer: Option<usize>,
    /// Use UDP GSO/GRO when the kernel supports it.
    pub gso: Option<bool>,
    /// Relay IP as bound → public IP to advertise (relay behind 1:1 NAT, like coturn's
    /// `external-ip`): `{ "10.0.0.5" = "203.0.113.7" }`.
    pub external_ips: Option<HashMap<IpAddr, IpAddr>>,
    /// Let two clients of this relay reach each other allocation to allocation (peer = one of
    /// the relay's own addresses, on a port of the relayed range only). Default true.
    pub relay_to_self: Option<bool>,
    /// Accept only RFC 8656 channel numbers 0x4000-0x4FFF (default: also RFC 5766's
    /// 0x5000-0x7FFF, as coturn does).
    pub strict_channel_range: Option<bool>,
    /// Allocations one network may hold over all its usernames (0 = unlimited; default 1024).
    pub network_quota: Option<u32>,
    /// Bandwidth of one network over all its allocations, bytes/s (0 = unlimited; default
    /// 125,000,000 = 1 Gbit/s).
    pub network_bandwidth_limit: Option<u64>,
    /// Burst of the per-network limit in bytes (default: 100 ms worth).
    pub network_bandwidth_burst: Option<u64>,
    /// Peer addresses never relayed to, as CIDRs (coturn's `denied-peer-ip`), checked after
    /// IPv6 spellings of IPv4 are reduced: `["10.0.0.0/8", "2001:db8::/32"]`.
    pub denied_peers: Option<Vec<String>>,
    /// TURN over TCP listening address (RFC 8656 §3.1; relayed transport stays UDP).
    pub tcp_listen: Option<SocketAddr>,
    /// TURN over TLS listening address (`turns:`; 443 gets through most firewalls).
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for `tls_listen` (re-read on SIGHUP and when it changes).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_listen`.
    pub tls_key: Option<PathBuf>,
    /// Open TCP + TLS connections at most (default 10,000).
    pub stream_max_connections: Option<usize>,
    /// Seconds a new TCP/TLS connection has to send its first whole message (default 10).
    pub stream_first_message_timeout: Option<u64>,
    /// Seconds a message may take from first to last byte (default 10).
    pub stream_stall_timeout: Option<u64>,
    /// Seconds a TLS handshake may take (default 10).
    pub tls_handshake_timeout: Option<u64>,
    /// TLS handshakes in progress at once (default 256).
    pub tls_max_handshakes: Option<usize>,
    /// Messages queued towards one TCP/TLS client before drops (default 512).
    pub stream_write_queue: Option<usize>,
}

/// Settings given on the command line (each overrides the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--dev`.
    pub dev: bool,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--relay-ip` (repeatable).
    pub relay_ips: Vec<IpAddr>,
    /// `--ports`.
    pub ports: Option<String>,
    /// `--realm`.
    pub realm: Option<String>,
    /// `--auth-secret`.
    pub auth_secret: Option<String>,
    /// `--allow-loopback-peers`.
    pub allow_loopback_peers: bool,
    /// `--allow-private-peers`.
    pub allow_private_peers: bool,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--denied-peer` (repeatable; added to the file's `denied_peers`).
    pub denied_peers: Vec<String>,
    /// `--tcp-listen`.
    pub tcp_listen: Option<SocketAddr>,
    /// `--tls-listen`.
    pub tls_listen: Option<SocketAddr>,
    /// `--cert`.
    pub cert: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
}

/// The resolved configuration the relay runs with.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// More listening addresses.
    pub also_listen: Vec<SocketAddr>,
    /// Relay IPs.
    pub relay_ips: Vec<IpAddr>,
    /// Relayed port range (inclusive).
    pub ports: (u16, u16),
    /// Admin HTTP address.
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads.
    pub workers: usize,
    /// Allocations per username.
    pub user_quota: u32,
    /// Allocations per network.
    pub network_quota: u32,
    /// Bandwidth per network.
    pub network_bandwidth: Rate,
    /// Drain period.
    pub drain: Duration,
    /// Socket buffer size.
    pub socket_buffer: usize,
    /// GSO/GRO on.
    pub gso: bool,
    /// The sans-IO server configuration (realm, auth, policy, limits).
    pub server: ServerConfig,
    /// TURN over TCP/TLS.
    pub stream: StreamConfig,
}

/// Parses `"LO-HI"`.
pub fn parse_ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let (lo, hi) = s
        .split_once('-')
        .with_context(|| format!("port range {s:?} is not LO-HI"))?;
    let lo: u16 = lo.trim().parse().context("port range low end")?;
    let hi: u16 = hi.trim().parse().context("port range high end")?;
    if lo == 0 || lo > hi {
        bail!("port range {s:?} must satisfy 0 < LO <= HI");
    }
    Ok((lo, hi))
}

/// Where `--dev` keeps its generated secret: `$XDG_STATE_HOME/meshpunch/relay-dev-secret`,
/// else `$HOME/.local/state/meshpunch/...`, else `/var/lib/meshpunch/...` as root or
/// `/run/user/UID/meshpunch/...`. Never a shared directory such as `/tmp`, where another user
/// could plant a secret of their choosing.
pub fn dev_secret_path() -> PathBuf {
    let abs = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let base = std::env::var_os("XDG_STATE_HOME")
        .and_then(abs)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(abs)
                .map(|h| h.join(".local/state"))
        })
        .unwrap_or_else(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            match unsafe { libc::geteuid() } {
                0 => PathBuf::from("/var/lib"),
                uid => PathBuf::from(format!("/run/user/{uid}")),
            }
        });
    base.join("meshpunch").join("relay-dev-secret")
}

/// Reads the `--dev` secret, generating and persisting one on first use.
///
/// The directory is created 0700; an existing one must belong to this user or root and must
/// not be writable by group or others. An existing secret is read only if it is a regular file
/// (not a symlink: `O_NOFOLLOW`) owned by this user with no group/other permission bits. A new
/// one is created 0600 from the first byte (`O_CREAT|O_EXCL`, no chmod afterwards) under a
/// temporary name and renamed into place.
pub fn dev_secret(path: &Path) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};

    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let dm = std::fs::metadata(&dir).with_context(|| format!("examining {}", dir.display()))?;
    if (dm.uid() != uid && dm.uid() != 0) || dm.mode() & 0o022 != 0 {
        bail!(
            "refusing to keep the dev secret in {}: the directory must belong to you (uid {uid}) \
             or root and be writable only by its owner (it is uid {}, mode {:04o})",
            dir.display(),
            dm.uid(),
            dm.mode() & 0o7777
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            let m = f
                .metadata()
                .with_context(|| format!("examining {}", path.display()))?;
            if !m.is_file() || m.uid() != uid || m.mode() & 0o077 != 0 {
                bail!(
                    "refusing the dev secret in {}: it must be a regular file owned by you (uid \
                     {uid}) with mode 0600 (it is uid {}, mode {:04o}); remove it to generate a \
                     new one",
                    path.display(),
                    m.uid(),
                    m.mode() & 0o7777
                );
            }
            let mut s = String::new();
            f.read_to_string(&mut s)
                .with_context(|| format!("reading {}", path.display()))?;
            let s = s.trim().to_owned();
            if !s.is_empty() {
                return Ok(s);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening {} (a symlink is refused)", path.display()))
        }
    }
    let bytes: [u8; 24] = rand::random();
    let secret = hex_encode(&bytes);
    let tmp = dir.join(format!(".relay-dev-secret.{:08x}", rand::random::<u32>()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{secret}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(secret)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl RelayConfig {
    /// Merges file, flags and `--dev` defaults. `dev_secret` is the secret `--dev` uses when no
    /// other is configured.
    pub fn resolve(
        file: FileConfig,
        o: Overrides,
        dev_secret: Option<String>,
    ) -> anyhow::Result<RelayConfig> {
        let dev = o.dev;
        let listen = o.listen.or(file.listen).unwrap_or(if dev {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEV_PORT)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT)
        });
        let mut relay_ips = if o.relay_ips.is_empty() {
            file.relay_ips.clone().unwrap_or_default()
        } else {
            o.relay_ips.clone()
        };
        if relay_ips.is_empty() {
            if listen.ip().is_unspecified() {
                bail!(
                    "set relay_ips / --relay-ip: the listening address {listen} is a wildcard, \
                     and relayed addresses must be concrete IPs clients can reach"
                );
            }
            relay_ips.push(listen.ip());
        }
        let ports = match o.ports.as_deref().or(file.ports.as_deref()) {
            Some(s) => parse_ports(s)?,
            None => DEFAULT_PORTS,
        };
        let realm = o
            .realm
            .or(file.realm)
            .unwrap_or_else(|| DEFAULT_REALM.to_owned());
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        if let Some(s) = o.auth_secret.or(file.auth_secret) {
            secrets.push(s.into_bytes());
        }
        if let Some(path) = &file.auth_secret_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading auth_secret_file {}", path.display()))?;
            let secret = text.lines().next().unwrap_or("").trim();
            if secret.is_empty() {
                bail!("auth_secret_file {} is empty", path.display());
            }
            secrets.push(secret.as_bytes().to_vec());
        }
        for s in file.auth_secrets.unwrap_or_default() {
            secrets.push(s.into_bytes());
        }
        let users = file.users.unwrap_or_default();
        if secrets.is_empty() && users.is_empty() {
            match dev_secret {
                Some(s) if dev => secrets.push(s.into_bytes()),
                _ => bail!(
                    "no credentials: set auth_secret / --auth-secret (or users), or use --dev"
                ),
            }
        }
        let allow_loopback = o.allow_loopback_peers || file.allow_loopback_peers.unwrap_or(dev);
        let allow_private = o.allow_private_peers || file.allow_private_peers.unwrap_or(false);
        let external_ips: Vec<(IpAddr, IpAddr)> =
            file.external_ips.unwrap_or_default().into_iter().collect();
        let mut own_addrs = relay_ips.clone();
        for l in file.also_listen.iter().flatten() {
            if !l.ip().is_unspecified() {
                own_addrs.push(l.ip());
            }
        }
        own_addrs.extend(external_ips.iter().map(|(_, public)| *public));
        if !listen.ip().is_unspecified() {
            own_addrs.push(listen.ip());
        }
        let tcp_listen = o.tcp_listen.or(file.tcp_listen);
        let tls_listen = o.tls_listen.or(file.tls_listen);
        for l in tcp_listen.iter().chain(tls_listen.iter()) {
            if !l.ip().is_unspecified() && !own_addrs.contains(&l.ip()) {
                own_addrs.push(l.ip());
            }
        }
        let cert = o.cert.or(file.tls_cert);
        let key = o.key.or(file.tls_key);
        if tls_listen.is_some() && (cert.is_none() || key.is_none()) {
            bail!("tls_listen / --tls-listen needs a certificate: --cert FILE --key FILE (tls_cert, tls_key)");
        }
        let defaults = StreamConfig::default();
        let stream = StreamConfig {
            tcp_listen,
            tls_listen,
            cert,
            key,
            max_connections: file
                .stream_max_connections
                .unwrap_or(defaults.max_connections),
            first_message_timeout: file
                .stream_first_message_timeout
                .map_or(defaults.first_message_timeout, |s| {
                    Duration::from_secs(s.max(1))
                }),
            stall_timeout: file
                .stream_stall_timeout
                .map_or(defaults.stall_timeout, |s| Duration::from_secs(s.max(1))),
            idle_timeout: defaults.idle_timeout,
            handshake_timeout: file
                .tls_handshake_timeout
                .map_or(defaults.handshake_timeout, |s| {
                    Duration::from_secs(s.max(1))
                }),
            max_handshakes: file.tls_max_handshakes.unwrap_or(defaults.max_handshakes),
            write_queue: file.stream_write_queue.unwrap_or(defaults.write_queue),
        };
        let nonce_key: [u8; 32] = rand::random();
        let mut server = ServerConfig::new(realm, Auth { secrets, users }, nonce_key);
        let mut denied = Vec::new();
        for text in file
            .denied_peers
            .iter()
            .flatten()
            .chain(o.denied_peers.iter())
        {
            let cidr: Cidr = text
                .parse()
                .with_context(|| format!("denied_peers / --denied-peer entry {text:?}"))?;
            denied.push(cidr);
        }
        server.policy = PeerPolicy {
            allow_loopback,
            allow_private,
            own_addrs,
            denied,
        };
        if let Some(v) = file.max_permissions {
            server.max_permissions = v;
        }
        server.external_ips = external_ips;
        if file.relay_to_self.unwrap_or(true) {
            server.self_relay_ports = Some(ports);
        }
        if file.strict_channel_range.unwrap_or(false) {
            server.channel_max = meshpunch_proto::channeldata::CHANNEL_MAX;
        }
        if let Some(v) = file.max_channels {
            server.max_channels = v;
        }
        // Finite by default (sized in docs/relay.md from BENCHMARKS.md); 0 = unlimited.
        let bw = file
            .bandwidth_limit
            .unwrap_or(DEFAULT_ALLOCATION_BANDWIDTH.per_sec);
        // The burst must hold the largest datagram, or big packets could never pass.
        server.bandwidth = Rate {
            per_sec: bw,
            burst: file.bandwidth_burst.unwrap_or(bw / 10).max(65_536),
        };
        let net_bw = file
            .network_bandwidth_limit
            .unwrap_or(DEFAULT_NETWORK_BANDWIDTH.per_sec);
        let network_bandwidth = Rate {
            per_sec: net_bw,
            burst: file
                .network_bandwidth_burst
                .unwrap_or(net_bw / 10)
                .max(65_536),
        };
        if let Some(r) = file.request_rate {
            server.request_rate = Rate {
                per_sec: r,
                burst: file.request_burst.unwrap_or(r * 2),
            };
        }
        if let Some(r) = file.unauth_rate {
            server.unauth_rate = Rate {
                per_sec: r,
                burst: file.unauth_burst.unwrap_or(r * 2),
            };
        }
        if let Some(s) = file.default_lifetime {
            server.default_lifetime = Duration::from_secs(s.max(1));
        }
        if let Some(s) = file.max_lifetime {
            server.max_lifetime = Duration::from_secs(s.max(1));
        }
        if let Some(s) = file.nonce_lifetime {
            server.nonce_lifetime = Duration::from_secs(s.max(1));
        }
        let workers = match file.workers.unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(RelayConfig {
            listen,
            also_listen: file.also_listen.unwrap_or_default(),
            relay_ips,
            ports,
            admin_listen: o.admin_listen.or(file.admin_listen),
            workers,
            user_quota: file
                .user_quota
                .unwrap_or(if dev { 0 } else { DEFAULT_USER_QUOTA }),
            network_quota: file.network_quota.unwrap_or(if dev {
                0
            } else {
                DEFAULT_NETWORK_QUOTA
            }),
            network_bandwidth,
            drain: file
                .drain_seconds
                .map_or(DEFAULT_DRAIN, Duration::from_secs),
            socket_buffer: file.socket_buffer.unwrap_or(4 << 20),
            gso: file.gso.unwrap_or(true),
            stream: StreamConfig {
                // Nothing is heard for longer than an allocation can live.
                idle_timeout: server.max_lifetime + Duration::from_secs(60),
                ..stream
            },
            server,
        })
    }

    /// Reads a TOML file.
    pub fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(parse_ports("49152-65535").unwrap(), (49152, 65535));
        assert!(parse_ports("5-4").is_err());
        assert!(parse_ports("0-4").is_err());
        assert!(parse_ports("x").is_err());
    }

    #[test]
    fn flags_override_file_and_every_key_parses() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:3478"
            also_listen = ["[::1]:3478"]
            relay_ips = ["127.0.0.1"]
            ports = "40000-40100"
            realm = "file"
            auth_secret = "s1"
            auth_secrets = ["s0"]
            users = { alice = "pw" }
            allow_loopback_peers = false
            allow_private_peers = true
            admin_listen = "127.0.0.1:9641"
            workers = 2
            user_quota = 3
            max_permissions = 10
            max_channels = 11
            bandwidth_limit = 1000000
            bandwidth_burst = 2000000
            request_rate = 100
            request_burst = 150
            unauth_rate = 10
            unauth_burst = 20
            default_lifetime = 300
            max_lifetime = 1200
            nonce_lifetime = 120
            drain_seconds = 5
            socket_buffer = 1048576
            gso = false
            strict_channel_range = true
            relay_to_self = false
            external_ips = { "127.0.0.1" = "203.0.113.9" }
            network_quota = 50
            network_bandwidth_limit = 5000000
            network_bandwidth_burst = 600000
            denied_peers = ["10.0.0.0/8", "2001:db8::/32"]
            "#,
        )
        .unwrap();
        let o = Overrides {
            realm: Some("flag".into()),
            allow_loopback_peers: true,
            denied_peers: vec!["169.254.169.254".into()],
            ..Default::default()
        };
        let c = RelayConfig::resolve(file, o, None).unwrap();
        assert_eq!(c.server.realm, "flag");
        assert_eq!(c.network_quota, 50);
        assert_eq!(
            c.network_bandwidth,
            Rate {
                per_sec: 5_000_000,
                burst: 600_000
            }
        );
        assert_eq!(c.server.policy.denied.len(), 3);
        assert_eq!(c.ports, (40000, 40100));
        assert_eq!(c.also_listen, vec!["[::1]:3478".parse().unwrap()]);
        assert!(c.server.policy.allow_loopback && c.server.policy.allow_private);
        assert_eq!(c.server.auth.secrets.len(), 2);
        assert_eq!(c.workers, 2);
        assert_eq!(c.user_quota, 3);
        assert_eq!(c.server.bandwidth.per_sec, 1_000_000);
        assert_eq!(c.server.max_lifetime, Duration::from_secs(1200));
        assert!(!c.gso);
        assert_eq!(c.server.channel_max, 0x4FFF);
        assert_eq!(c.server.self_relay_ports, None);
        assert_eq!(c.server.external_ips.len(), 1);
        assert!(c
            .server
            .policy
            .own_addrs
            .contains(&"203.0.113.9".parse().unwrap()));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }

    #[test]
    fn limits_are_finite_by_default() {
        let c = RelayConfig::resolve(
            FileConfig::default(),
            Overrides {
                listen: Some("127.0.0.1:3478".parse().unwrap()),
                auth_secret: Some("s".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(c.user_quota, DEFAULT_USER_QUOTA);
        assert_eq!(c.network_quota, DEFAULT_NETWORK_QUOTA);
        assert_eq!(c.server.bandwidth, DEFAULT_ALLOCATION_BANDWIDTH);
        assert_eq!(c.network_bandwidth, DEFAULT_NETWORK_BANDWIDTH);
        // 0 still switches a limit off, as documented.
        let c = RelayConfig::resolve(
            toml::from_str("bandwidth_limit = 0\nnetwork_bandwidth_limit = 0").unwrap(),
            Overrides {
                listen: Some("127.0.0.1:3478".parse().unwrap()),
                auth_secret: Some("s".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(c.server.bandwidth.per_sec, 0);
        assert_eq!(c.network_bandwidth.per_sec, 0);
    }

    #[test]
    fn dev_mode_needs_nothing_else() {
        let c = RelayConfig::resolve(
            FileConfig::default(),
            Overrides {
                dev: true,
                ..Default::default()
            },
            Some("devsecret".into()),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:3479".parse().unwrap());
        assert_eq!(c.relay_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(c.server.policy.allow_loopback);
        assert!(RelayConfig::resolve(FileConfig::default(), Overrides::default(), None).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("turn-secret");
        std::fs::write(&f, "from-file\n").unwrap();
        let c = RelayConfig::resolve(
            FileConfig {
                auth_secret_file: Some(f),
                listen: Some("127.0.0.1:0".parse().unwrap()),
                ..Default::default()
            },
            Overrides::default(),
            None,
        )
        .unwrap();
        assert_eq!(c.server.auth.secrets, vec![b"from-file".to_vec()]);
        let p = dir.path().join("x/secret");
        let s1 = dev_secret(&p).unwrap();
        assert_eq!(dev_secret(&p).unwrap(), s1, "persisted");
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn dev_secret_is_private_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/meshpunch/relay-dev-secret");
        dev_secret(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(
            mode(p.parent().unwrap()),
            0o700,
            "directory created private"
        );
        assert_eq!(
            std::fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn dev_secret_planted_in_a_shared_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o1777);
        let p = shared.join("relay-dev-secret");
        std::fs::write(&p, "attacker-chosen\n").unwrap();
        chmod(&p, 0o600);
        let e = dev_secret(&p).unwrap_err().to_string();
        assert!(e.contains("writable only by its owner"), "{e}");
    }

    #[test]
    fn dev_secret_symlink_or_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "attacker-chosen\n").unwrap();
        chmod(&target, 0o600);
        let d = dir.path().join("state");
        std::fs::create_dir(&d).unwrap();
        let link = d.join("relay-dev-secret");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(dev_secret(&link).is_err(), "a symlink is not followed");
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, "old\n").unwrap();
        chmod(&link, 0o644);
        let e = dev_secret(&link).unwrap_err().to_string();
        assert!(e.contains("mode 0600"), "{e}");
    }

    #[test]
    fn dev_secret_path_is_never_in_tmp() {
        assert!(!dev_secret_path().starts_with(std::env::temp_dir()));
    }
}
