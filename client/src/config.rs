//! The daemon's configuration file, in WireGuard's INI style, and `wg show IFACE dump`
//! parsing for `--wg-interface`.
//!
//! ```ini
//! [Interface]
//! PrivateKey = <base64>              # required (or taken from --wg-interface)
//! Rendezvous = meshpunch://TOKEN@rdv.example.com   # port 443; pin=spki:... optional
//! CaFile = /etc/meshpunch/ca.pem     # extra CA for the rendezvous (no pin) and relay (turns:) certificates
//! ListenPort = 41641                 # data socket port; 0 or absent = any free port
//! ControlSocket = /run/meshpunch.sock
//! WireGuardEndpoint = 127.0.0.1:51820  # where WireGuard listens (else learned from its packets)
//! HostCandidates = true              # offer interface addresses to peers
//! BindingLifetimeProbe = 15,30,60,120  # idle periods of the daemon's own lifetime measurement
//!                                    # (off = never; not used when BindingLifetime is set)
//! BindingLifetime = 30               # seconds, from `netcheck --long`: keepalive = half of it
//! BirthdaySockets = 256              # birthday probing, behind a symmetric NAT: extra sockets (0 = off)
//! BirthdayProbes = 2048              # birthday probing, towards a symmetric NAT: spray pings per session (0 = off)
//! PortMapping = on                   # ask the gateway to map the data socket's port (PCP, NAT-PMP, UPnP IGD)
//! Mode = tun                         # built-in WireGuard on a TUN device (like --tun); default proxy
//! TunName = meshpunch0               # the TUN device's name in Mode = tun (--tun NAME wins)
//! Address = 10.9.0.1/24, fd00:9::1/64  # tunnel addresses (Mode = tun), as wg-quick
//! MTU = 1412                         # TUN MTU (Mode = tun), default 1412 (docs/tun.md)
//!
//! [Peer]
//! PublicKey = <base64>               # required
//! Name = laptop                      # optional label for status
//! ProxyPort = 51901                  # optional fixed 127.0.0.1 port WireGuard talks to
//! Candidate = 192.0.2.7:41641        # optional known address of the peer's data socket
//! AllowedIPs = 10.9.0.2/32           # Mode = tun: the peer's tunnel prefixes (routes + source check)
//! PresharedKey = <base64>            # Mode = tun: optional WireGuard preshared key
//! ```
//!
//! Keys are case-insensitive, `#` and `;` start comments. WireGuard keys that mean nothing to
//! meshpunch (`DNS`, `Endpoint`, `PersistentKeepalive`, ...) are accepted and ignored, so a
//! `wg-quick` file can carry the meshpunch keys too; `Address`, `MTU`, `AllowedIPs` and
//! `PresharedKey` are checked always and used in `Mode = tun`. Anything else is an error
//! naming the file, the line and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::keys::{format_key, parse_key};
use crate::tun::allowed::{parse_list, IpNet};
use crate::tun::{TunPeer, TunSettings, MAX_MTU, MIN_MTU, MIN_MTU_IPV6};

/// How the daemon talks to WireGuard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// A separate WireGuard (kernel, boringtun-cli, wireguard-go) reaches each peer through a
    /// 127.0.0.1 proxy port.
    #[default]
    Proxy,
    /// Built-in userspace WireGuard on a TUN device (`--tun NAME`).
    Tun,
}

/// The TUN device name used by `Mode = tun` without `TunName` or `--tun`.
pub const DEFAULT_TUN_NAME: &str = "meshpunch0";

/// A configuration error with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {msg}", if *.line > 0 { format!(":{}", .line) } else { String::new() })]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line number (0 = the file as a whole).
    pub line: usize,
    /// What was wrong / expected.
    pub msg: String,
}

/// `[Interface]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Private key.
    pub private_key: Option<[u8; 32]>,
    /// `PrivateKeyFile`: a file holding the private key (like `wg set … private-key FILE`);
    /// read by `meshpunch up` when `PrivateKey` is not set.
    pub private_key_file: Option<PathBuf>,
    /// `FwMark`: the firewall mark (SO_MARK) of the data and pool sockets. `None` = not set
    /// (the `--wg-interface`'s fwmark, else none); `Some(None)` = `off`.
    pub fwmark: Option<Option<u32>>,
    /// Rendezvous connect string.
    pub rendezvous: Option<String>,
    /// Extra CA (PEM) trusted for the rendezvous certificate when the connect string has no
    /// pin (a self-hosted private CA).
    pub ca_file: Option<PathBuf>,
    /// Data socket port (0 = any).
    pub listen_port: u16,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Where WireGuard listens.
    pub wireguard_endpoint: Option<SocketAddr>,
    /// Whether to offer interface addresses as candidates.
    pub host_candidates: bool,
    /// `BindingLifetimeProbe`: idle periods the daemon's own lifetime measurement tests
    /// (`None` = not set: the default schedule; `Some(None)` = `off`). `BindingLifetime`
    /// wins over the measurement.
    pub binding_lifetime_probe: Option<Option<Vec<std::time::Duration>>>,
    /// NAT binding lifetime in seconds (as `netcheck --long` measured it).
    pub binding_lifetime: Option<u64>,
    /// Birthday probing: pool sockets when we are behind a symmetric NAT (None = default).
    pub birthday_sockets: Option<u16>,
    /// Birthday probing: spray pings per session towards a symmetric NAT (None = default).
    pub birthday_probes: Option<u16>,
    /// Birthday probing: IP TTL of unanswered pool pings (`None` = `auto`: measured; 0 =
    /// the system's TTL).
    pub birthday_ttl: Option<u8>,
    /// `PortMapping`: ask the default gateway for a port mapping of the data socket (PCP,
    /// NAT-PMP, UPnP IGD; see `docs/portmap.md`).
    pub port_mapping: PortMapping,
    /// `Mode`.
    pub mode: Mode,
    /// `TunName`.
    pub tun_name: Option<String>,
    /// `Address` (all lines, in order), with the line of each.
    pub addresses: Vec<(usize, IpNet)>,
    /// `MTU` and its line.
    pub mtu: Option<(usize, u32)>,
    /// Peers.
    pub peers: Vec<PeerConfig>,
    /// The WireGuard side of each peer (`peer_tun[i]` belongs to `peers[i]`), used in
    /// `Mode = tun`.
    pub peer_tun: Vec<PeerTun>,
}

/// `[Peer]` keys that only the built-in WireGuard uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTun {
    /// Line of the `[Peer]` header.
    pub line: usize,
    /// `AllowedIPs` (all lines), each with its line.
    pub allowed_ips: Vec<(usize, IpNet)>,
    /// `PresharedKey`.
    pub preshared_key: Option<[u8; 32]>,
}

/// `[Peer]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's WireGuard public key.
    pub public_key: [u8; 32],
    /// Label.
    pub name: Option<String>,
    /// Fixed local proxy port (0 = any).
    pub proxy_port: u16,
    /// Known addresses of the peer's data socket.
    pub candidates: Vec<SocketAddr>,
}

/// `PortMapping = on|off` (default on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PortMapping {
    /// Map the data socket's port through the default gateway when it offers PCP, NAT-PMP or
    /// UPnP IGD.
    #[default]
    On,
    /// Never: no packet to the gateway's port 5351 nor to SSDP (1900).
    Off,
}

impl PortMapping {
    /// Whether mapping is on.
    pub fn is_on(self) -> bool {
        self == PortMapping::On
    }
}

/// Most pool sockets `BirthdaySockets` may ask for (each is a file descriptor and a mapping
/// on the NAT).
pub const MAX_BIRTHDAY_SOCKETS: u16 = 1024;
/// Most spray pings `BirthdayProbes` may ask for per session (a quarter of the port range:
/// beyond that the spray is a port scan, not a birthday search).
pub const MAX_BIRTHDAY_PROBES: u16 = 16384;

const IGNORED_WG_KEYS: &[&str] = &[
    "dns",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "endpoint",
    "persistentkeepalive",
];

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            msg: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses configuration text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        #[derive(PartialEq)]
        enum Section {
            None,
            Interface,
            Peer,
        }
        let err = |line: usize, msg: String| ConfigError {
            file: file.to_string(),
            line,
            msg,
        };
        let mut cfg = Config {
            host_candidates: true,
            ..Config::default()
        };
        let mut section = Section::None;
        let mut peer: Option<(usize, PeerBuilder)> = None;
        let finish_peer =
            |p: Option<(usize, PeerBuilder)>, cfg: &mut Config| -> Result<(), ConfigError> {
                if let Some((line, b)) = p {
                    let public_key = b.public_key.ok_or_else(|| {
                        err(
                            line,
                            "[Peer] section without PublicKey = <base64 key>".into(),
                        )
                    })?;
                    if cfg.peers.iter().any(|p| p.public_key == public_key) {
                        return Err(err(line, "duplicate [Peer] PublicKey".into()));
                    }
                    cfg.peer_tun.push(PeerTun {
                        line,
                        allowed_ips: b.allowed_ips,
                        preshared_key: b.preshared_key,
                    });
                    cfg.peers.push(PeerConfig {
                        public_key,
                        name: b.name,
                        proxy_port: b.proxy_port,
                        candidates: b.candidates,
                    });
                }
                Ok(())
            };
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.split(['#', ';']).next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                match line.to_ascii_lowercase().as_str() {
                    "[interface]" => {
                        finish_peer(peer.take(), &mut cfg)?;
                        section = Section::Interface;
                    }
                    "[peer]" => {
                        finish_peer(peer.take(), &mut cfg)?;
                        section = Section::Peer;
                        peer = Some((n, PeerBuilder::default()));
                    }
                    _ => {
                        return Err(err(
                            n,
                            format!("unknown section {line}; expected [Interface] or [Peer]"),
                        ))
                    }
                }
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(err(
                    n,
                    format!("expected 'Key = Value' or a [Section], found {line:?}"),
                ));
            };
            let key = k.trim().to_ascii_lowercase();
            let v = v.trim();
            if IGNORED_WG_KEYS.contains(&key.as_str()) {
                continue;
            }
            match section {
                Section::None => {
                    return Err(err(
                        n,
                        format!("{} outside a section; expected [Interface] or [Peer] first", k.trim()),
                    ))
                }
                Section::Interface => match key.as_str() {
                    "privatekey" => {
                        cfg.private_key = Some(parse_key(v).map_err(|e| {
                            err(n, format!("PrivateKey: {e}"))
                        })?)
                    }
                    "privatekeyfile" => {
                        if v.is_empty() {
                            return Err(err(n, "PrivateKeyFile: expected the path of a file holding the private key".into()));
                        }
                        cfg.private_key_file = Some(PathBuf::from(v))
                    }
                    "fwmark" => {
                        cfg.fwmark = Some(parse_fwmark(v).ok_or_else(|| {
                            err(n, format!("FwMark: expected off or a mark 1-4294967295 (decimal or 0x hex), found {v:?}"))
                        })?)
                    }
                    "rendezvous" => {
                        if !v.starts_with("meshpunch://") {
                            return Err(err(
                                n,
                                "Rendezvous: expected a connect string meshpunch://TOKEN@HOST[:PORT][?pin=spki:HEX]".into(),
                            ));
                        }
                        cfg.rendezvous = Some(v.to_string())
                    }
                    "cafile" => {
                        if v.is_empty() {
                            return Err(err(n, "CaFile: expected the path of a PEM CA certificate".into()));
                        }
                        cfg.ca_file = Some(PathBuf::from(v))
                    }
                    "listenport" => {
                        cfg.listen_port = v.parse().map_err(|_| {
                            err(n, format!("ListenPort: expected a UDP port 0-65535, found {v:?}"))
                        })?
                    }
                    "controlsocket" => cfg.control_socket = Some(PathBuf::from(v)),
                    "wireguardendpoint" => {
                        cfg.wireguard_endpoint = Some(v.parse().map_err(|_| {
                            err(n, format!("WireGuardEndpoint: expected IP:PORT, found {v:?}"))
                        })?)
                    }
                    "bindinglifetimeprobe" => {
                        cfg.binding_lifetime_probe = Some(crate::lifetime::parse_steps(v).ok_or_else(|| {
                            err(n, format!("BindingLifetimeProbe: expected off or idle periods in seconds like 15,30,60,120 (1-3600 s, at most 8), found {v:?}"))
                        })?)
                    }
                    "bindinglifetime" => {
                        cfg.binding_lifetime = Some(v.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                            err(n, format!("BindingLifetime: expected seconds (a positive integer), found {v:?}"))
                        })?)
                    }
                    "birthdaysockets" => {
                        cfg.birthday_sockets = Some(v.parse().ok().filter(|n| *n <= MAX_BIRTHDAY_SOCKETS).ok_or_else(|| {
                            err(n, format!("BirthdaySockets: expected 0-{MAX_BIRTHDAY_SOCKETS} (0 = off), found {v:?}"))
                        })?)
                    }
                    "birthdayprobes" => {
                        cfg.birthday_probes = Some(v.parse().ok().filter(|n| *n <= MAX_BIRTHDAY_PROBES).ok_or_else(|| {
                            err(n, format!("BirthdayProbes: expected 0-{MAX_BIRTHDAY_PROBES} (0 = off), found {v:?}"))
                        })?)
                    }
                    "birthdayttl" => {
                        cfg.birthday_ttl = if v.eq_ignore_ascii_case("auto") {
                            None
                        } else {
                            Some(v.parse().ok().ok_or_else(|| {
                                err(n, format!("BirthdayTtl: expected auto or 0-255 (0 = the system's TTL), found {v:?}"))
                            })?)
                        }
                    }
                    "portmapping" => {
                        cfg.port_mapping = match parse_bool(v) {
                            Some(true) => PortMapping::On,
                            Some(false) => PortMapping::Off,
                            None => return Err(err(n, format!("PortMapping: expected on or off, found {v:?}"))),
                        }
                    }
                    "hostcandidates" => {
                        cfg.host_candidates = parse_bool(v).ok_or_else(|| {
                            err(n, format!("HostCandidates: expected true or false, found {v:?}"))
                        })?
                    }
                    "mode" => {
                        cfg.mode = match v.to_ascii_lowercase().as_str() {
                            "tun" => Mode::Tun,
                            "proxy" => Mode::Proxy,
                            _ => return Err(err(n, format!("Mode: expected tun (built-in WireGuard) or proxy (a separate WireGuard through proxy ports), found {v:?}"))),
                        }
                    }
                    "tunname" => {
                        if !crate::tun::sys::valid_name(v) {
                            return Err(err(n, format!("TunName: expected an interface name of 1-15 characters without '/', ':' or spaces, found {v:?}")));
                        }
                        cfg.tun_name = Some(v.to_string())
                    }
                    "address" => {
                        let list = parse_list(v).map_err(|e| err(n, format!("Address: {e}")))?;
                        if list.is_empty() {
                            return Err(err(n, "Address: expected one or more addresses with prefix length, like 10.9.0.1/24, fd00:9::1/64".into()));
                        }
                        cfg.addresses.extend(list.into_iter().map(|a| (n, a)));
                    }
                    "mtu" => {
                        let m = v.parse::<u32>().ok().filter(|m| (MIN_MTU..=MAX_MTU).contains(m)).ok_or_else(|| {
                            err(n, format!("MTU: expected {MIN_MTU}-{MAX_MTU} bytes, found {v:?}"))
                        })?;
                        cfg.mtu = Some((n, m));
                    }
                    _ => {
                        return Err(err(n, format!(
                            "unknown [Interface] key {}; expected PrivateKey, PrivateKeyFile, Rendezvous, CaFile, ListenPort, ControlSocket, WireGuardEndpoint, FwMark, HostCandidates, BindingLifetime, BindingLifetimeProbe, BirthdaySockets, BirthdayProbes, Mode, TunName, Address, MTU or PortMapping",
                            k.trim()
                        )))
                    }
                },
                Section::Peer => {
                    let Some((_, b)) = peer.as_mut() else {
                        return Err(err(n, "key outside [Peer]".into()));
                    };
                    match key.as_str() {
                        "publickey" => {
                            b.public_key = Some(
                                parse_key(v).map_err(|e| err(n, format!("PublicKey: {e}")))?,
                            )
                        }
                        "name" => b.name = Some(v.to_string()),
                        "proxyport" => {
                            b.proxy_port = v.parse().map_err(|_| {
                                err(n, format!("ProxyPort: expected a UDP port 0-65535, found {v:?}"))
                            })?
                        }
                        "candidate" => {
                            for part in v.split(',') {
                                let part = part.trim();
                                b.candidates.push(part.parse().map_err(|_| {
                                    err(n, format!("Candidate: expected IP:PORT, found {part:?}"))
                                })?);
                            }
                        }
                        "allowedips" => {
                            let list = parse_list(v).map_err(|e| err(n, format!("AllowedIPs: {e}")))?;
                            b.allowed_ips.extend(list.into_iter().map(|a| (n, a)));
                        }
                        "presharedkey" => {
                            b.preshared_key = Some(
                                parse_key(v).map_err(|e| err(n, format!("PresharedKey: {e}")))?,
                            )
                        }
                        _ => {
                            return Err(err(n, format!(
                                "unknown [Peer] key {}; expected PublicKey, Name, ProxyPort, Candidate, AllowedIPs or PresharedKey",
                                k.trim()
                            )))
                        }
                    }
                }
            }
        }
        finish_peer(peer.take(), &mut cfg)?;
        Ok(cfg)
    }
}

#[derive(Default)]
struct PeerBuilder {
    public_key: Option<[u8; 32]>,
    name: Option<String>,
    proxy_port: u16,
    candidates: Vec<SocketAddr>,
    allowed_ips: Vec<(usize, IpNet)>,
    preshared_key: Option<[u8; 32]>,
}

/// A peer's label in messages: its `Name`, else the first 8 characters of its key.
pub fn peer_label(p: &PeerConfig) -> String {
    match &p.name {
        Some(n) => n.clone(),
        None => format_key(&p.public_key).chars().take(8).collect(),
    }
}

impl Config {
    /// The TUN device settings for `Mode = tun` / `--tun NAME` (`name` overrides `TunName`),
    /// checked: at least one `Address`, every peer with `AllowedIPs`, no prefix claimed by two
    /// peers (a default prefix, `0.0.0.0/0` or `::/0`, makes a full tunnel: `full_tunnel` is
    /// set to wg-quick's 51820, which the caller replaces with the configured `FwMark`), an MTU an
    /// IPv6 address can live with. `file` names the configuration in errors.
    pub fn tun_settings(&self, file: &str, name: Option<&str>) -> Result<TunSettings, ConfigError> {
        let err = |line: usize, msg: String| ConfigError {
            file: file.to_string(),
            line,
            msg,
        };
        let name = name
            .or(self.tun_name.as_deref())
            .unwrap_or(DEFAULT_TUN_NAME)
            .to_string();
        if !crate::tun::sys::valid_name(&name) {
            return Err(err(
                0,
                format!("TUN name {name:?}: expected 1-15 characters without '/', ':' or spaces"),
            ));
        }
        if self.addresses.is_empty() {
            return Err(err(0, "Mode = tun needs the tunnel address: add Address = 10.9.0.1/24 (and/or an IPv6 one) to [Interface]".into()));
        }
        let any_v6 = self.addresses.iter().any(|(_, a)| a.is_ipv6());
        let mtu = match self.mtu {
            Some((line, m)) if any_v6 && m < MIN_MTU_IPV6 => {
                return Err(err(line, format!("MTU: {m} is below {MIN_MTU_IPV6}, the minimum for an interface with an IPv6 Address (RFC 8200)")))
            }
            Some((_, m)) => m,
            None => crate::tun::DEFAULT_MTU,
        };
        if self.peers.is_empty() {
            return Err(err(
                0,
                "Mode = tun needs at least one [Peer] with PublicKey and AllowedIPs".into(),
            ));
        }
        let mut peers = Vec::with_capacity(self.peers.len());
        for (p, t) in self.peers.iter().zip(&self.peer_tun) {
            let label = peer_label(p);
            if t.allowed_ips.is_empty() {
                return Err(err(t.line, format!("[Peer] {label}: Mode = tun needs AllowedIPs (the peer's tunnel address, like AllowedIPs = 10.9.0.2/32)")));
            }
            peers.push(TunPeer {
                label,
                public_key: p.public_key,
                preshared_key: t.preshared_key,
                allowed_ips: t.allowed_ips.iter().map(|(_, a)| *a).collect(),
            });
        }
        if let Err(o) = crate::tun::routing_table(&peers) {
            // The line of the second claim.
            let line = self
                .peer_tun
                .iter()
                .zip(&peers)
                .filter(|(_, p)| p.label == o.second)
                .flat_map(|(t, _)| t.allowed_ips.iter())
                .find(|(_, a)| a.network() == o.prefix)
                .map(|(l, _)| *l)
                .unwrap_or(0);
            return Err(err(line, o.to_string()));
        }
        Ok(TunSettings {
            name,
            addresses: self.addresses.iter().map(|(_, a)| *a).collect(),
            mtu,
            full_tunnel: peers
                .iter()
                .any(|p| p.allowed_ips.iter().any(|a| a.len == 0))
                .then_some(crate::tun::FULL_TUNNEL_MARK),
            peers,
        })
    }
}

/// Parses a firewall mark as `wg` and wg-quick write it: `off` (or 0) = no mark, else a
/// decimal or `0x` hexadecimal 32-bit number.
pub fn parse_fwmark(v: &str) -> Option<Option<u32>> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok()?,
        None => v.parse().ok()?,
    };
    Some((n != 0).then_some(n))
}

/// What `wg show IFACE dump` says about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDump {
    /// Interface private key (`None` if not readable / `(none)`).
    pub private_key: Option<[u8; 32]>,
    /// Interface public key.
    pub public_key: Option<[u8; 32]>,
    /// WireGuard's listen port.
    pub listen_port: u16,
    /// The interface's firewall mark (`None` = off; wg-quick sets 51820 on a default-route
    /// tunnel).
    pub fwmark: Option<u32>,
    /// The peers.
    pub peers: Vec<WgPeer>,
}

/// One peer line of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Public key.
    pub public_key: [u8; 32],
    /// Preshared key (base64), if any.
    pub preshared_key: Option<String>,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs, comma-separated as `wg` prints them (empty = none).
    pub allowed_ips: String,
    /// Persistent keepalive in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// Parses `wg show IFACE dump` output (tab-separated; first line is the interface).
pub fn parse_wg_dump(text: &str) -> Result<WgDump, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or("empty `wg show dump` output")?;
    let f: Vec<&str> = first.split('\t').collect();
    if f.len() < 3 {
        return Err(format!(
            "interface line: expected 4 tab-separated fields, found {first:?}"
        ));
    }
    let key = |s: &str| parse_key(s).ok();
    let listen_port = f[2]
        .parse()
        .map_err(|_| format!("interface line: bad listen port {:?}", f[2]))?;
    let mut peers = Vec::new();
    for l in lines {
        let p: Vec<&str> = l.split('\t').collect();
        if p.len() < 3 {
            return Err(format!(
                "peer line: expected 8 tab-separated fields, found {l:?}"
            ));
        }
        let pk = parse_key(p[0]).map_err(|e| format!("peer line: {e}"))?;
        let field = |i: usize| p.get(i).copied().unwrap_or("");
        peers.push(WgPeer {
            public_key: pk,
            preshared_key: parse_key(field(1)).ok().map(|_| field(1).to_string()),
            endpoint: field(2).parse().ok(),
            allowed_ips: match field(3) {
                "(none)" => String::new(),
                a => a.to_string(),
            },
            persistent_keepalive: field(7).parse().ok().filter(|k| *k > 0),
        });
    }
    Ok(WgDump {
        private_key: key(f[0]),
        public_key: key(f[1]),
        listen_port,
        fwmark: f.get(3).and_then(|m| parse_fwmark(m)).flatten(),
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{format_key, generate_private, public_of};

    #[test]
    fn parses_interface_and_peers() {
        let sk = generate_private();
        let pk = public_of(&generate_private());
        let text = format!(
            "# meshpunch\n[Interface]\nPrivateKey = {}\nRendezvous = meshpunch://t@127.0.0.1:4433?pin=00\nListenPort = 41641\nAddress = 10.9.0.1/24\nControlSocket=/tmp/x.sock\n\n[Peer]\nPublicKey = {}\nName = bob ; comment\nProxyPort = 51999\nCandidate = 192.0.2.1:5, 192.0.2.2:6\nAllowedIPs = 10.9.0.2/32\n",
            format_key(&sk),
            format_key(&pk)
        );
        let c = Config::parse("a.conf", &text).unwrap();
        assert_eq!(c.private_key, Some(sk));
        assert_eq!(c.listen_port, 41641);
        assert_eq!(c.binding_lifetime, None);
        assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/x.sock")));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key, pk);
        assert_eq!(c.peers[0].name.as_deref(), Some("bob"));
        assert_eq!(c.peers[0].proxy_port, 51999);
        assert_eq!(c.peers[0].candidates.len(), 2);
        assert_eq!((c.birthday_sockets, c.birthday_probes), (None, None));
    }

    #[test]
    fn ca_file_key() {
        let c = Config::parse(
            "c.conf",
            "[Interface]\nRendezvous = meshpunch://t@rdv.example.com\nCaFile = /etc/meshpunch/ca.pem\n",
        )
        .unwrap();
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/meshpunch/ca.pem")));
        let e = Config::parse("c.conf", "[Interface]\nCaFile =\n").unwrap_err();
        assert!(e.msg.contains("CaFile: expected"), "{e}");
    }

    #[test]
    fn birthday_keys_are_bounded() {
        let c = Config::parse(
            "b.conf",
            "[Interface]\nBirthdaySockets = 64\nbirthdayprobes = 0\n",
        )
        .unwrap();
        assert_eq!((c.birthday_sockets, c.birthday_probes), (Some(64), Some(0)));
        let e = Config::parse("b.conf", "[Interface]\nBirthdaySockets = 5000\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.msg.contains("BirthdaySockets: expected 0-1024"), "{e}");
        let e = Config::parse("b.conf", "[Interface]\nBirthdayProbes = -1\n").unwrap_err();
        assert!(e.msg.contains("BirthdayProbes: expected"), "{e}");
        let c = Config::parse("b.conf", "[Interface]\nBirthdayTtl = 3\n").unwrap();
        assert_eq!(c.birthday_ttl, Some(3));
        let c = Config::parse("b.conf", "[Interface]\nBirthdayTtl = auto\n").unwrap();
        assert_eq!(c.birthday_ttl, None);
        let e = Config::parse("b.conf", "[Interface]\nBirthdayTtl = 256\n").unwrap_err();
        assert!(e.msg.contains("BirthdayTtl: expected auto or 0-255"), "{e}");
    }

    #[test]
    fn port_mapping_is_on_unless_turned_off() {
        assert_eq!(
            Config::parse("p.conf", "[Interface]\n")
                .unwrap()
                .port_mapping,
            PortMapping::On
        );
        assert_eq!(Config::default().port_mapping, PortMapping::On);
        let c = Config::parse("p.conf", "[Interface]\nPortMapping = off\n").unwrap();
        assert_eq!(c.port_mapping, PortMapping::Off);
        let c = Config::parse("p.conf", "[Interface]\nportmapping = on\n").unwrap();
        assert!(c.port_mapping.is_on());
        let e = Config::parse("p.conf", "[Interface]\n\nPortMapping = upnp\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.msg.contains("PortMapping: expected on or off"), "{e}");
    }

    #[test]
    fn bad_line_names_file_line_and_expectation() {
        let e = Config::parse("x.conf", "[Interface]\nListenPort = lots\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.file, "x.conf");
        assert!(e
            .to_string()
            .starts_with("x.conf:2: ListenPort: expected a UDP port"));
        let e = Config::parse("x.conf", "[Interface]\n\nFoo = 1\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.msg.contains("expected PrivateKey"));
        let e = Config::parse("x.conf", "[Peer]\nName = a\n").unwrap_err();
        assert!(e.msg.contains("without PublicKey"), "{e}");
        let e = Config::parse("x.conf", "[Peer]\nPublicKey = nope\n").unwrap_err();
        assert!(e.msg.contains("PublicKey: expected a WireGuard key"), "{e}");
        let e = Config::parse("x.conf", "garbage\n").unwrap_err();
        assert!(e.msg.contains("expected 'Key = Value'"), "{e}");
        let e = Config::parse("x.conf", "[Wat]\n").unwrap_err();
        assert!(e.msg.contains("unknown section"), "{e}");
    }

    fn tun_conf(extra_iface: &str, peers: &[(&str, &str)]) -> String {
        let mut t = format!(
            "[Interface]\nPrivateKey = {}\nMode = tun\n{extra_iface}",
            format_key(&generate_private())
        );
        for (name, allowed) in peers {
            t.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nName = {name}\n{allowed}\n",
                format_key(&public_of(&generate_private()))
            ));
        }
        t
    }

    #[test]
    fn tun_mode_keys_like_wg_quick() {
        let psk = format_key(&generate_private());
        let text = tun_conf(
            "Address = 10.9.0.1/24\nAddress = fd00:9::1/64\nMTU = 1380\nTunName = mp7\n",
            &[
                ("b", &format!("AllowedIPs = 10.9.0.2/32, fd00:9::2/128\nPresharedKey = {psk}\nPersistentKeepalive = 25")),
                ("c", "AllowedIPs = 10.9.0.3/32\nAllowedIPs = 192.168.50.0/24"),
            ],
        );
        let c = Config::parse("t.conf", &text).unwrap();
        assert_eq!(c.mode, Mode::Tun);
        let s = c.tun_settings("t.conf", None).unwrap();
        assert_eq!(s.name, "mp7");
        assert_eq!(s.mtu, 1380);
        assert_eq!(
            s.addresses,
            vec![
                "10.9.0.1/24".parse().unwrap(),
                "fd00:9::1/64".parse().unwrap()
            ]
        );
        assert_eq!(s.peers[0].label, "b");
        assert_eq!(s.peers[0].allowed_ips.len(), 2);
        assert_eq!(s.peers[0].preshared_key, Some(parse_key(&psk).unwrap()));
        assert_eq!(s.peers[1].allowed_ips.len(), 2);
        assert_eq!(s.peers[1].preshared_key, None);
        // --tun NAME wins over TunName; the default MTU fits an IPv6 relay path.
        let c = Config::parse(
            "t.conf",
            &tun_conf(
                "Address = 10.9.0.1/24\n",
                &[("b", "AllowedIPs = 10.9.0.2/32")],
            ),
        )
        .unwrap();
        let s = c.tun_settings("t.conf", Some("mpx")).unwrap();
        assert_eq!((s.name.as_str(), s.mtu), ("mpx", crate::tun::DEFAULT_MTU));
        assert_eq!(
            c.tun_settings("t.conf", None).unwrap().name,
            DEFAULT_TUN_NAME
        );
        // Proxy mode is the default and ignores the TUN keys.
        let c = Config::parse("p.conf", "[Interface]\nAddress = 10.9.0.1/24\n").unwrap();
        assert_eq!(c.mode, Mode::Proxy);
    }

    #[test]
    fn overlapping_allowed_ips_name_both_peers() {
        let text = tun_conf(
            "Address = 10.9.0.1/24\n",
            &[
                ("alice", "AllowedIPs = 10.9.0.2/32"),
                ("bob", "AllowedIPs = 10.9.0.3/32"),
                ("carol", "AllowedIPs = 10.9.0.4/32, 10.9.0.3/32"),
            ],
        );
        let c = Config::parse("o.conf", &text).unwrap();
        let e = c.tun_settings("o.conf", None).unwrap_err();
        assert!(e.msg.contains("10.9.0.3/32"), "{e}");
        assert!(e.msg.contains("bob") && e.msg.contains("carol"), "{e}");
        assert_eq!(
            e.line,
            text.lines()
                .position(|l| l.contains("10.9.0.4/32"))
                .unwrap()
                + 1
        );
        // Nested prefixes are WireGuard's longest-prefix routing, not an error.
        let text = tun_conf(
            "Address = 10.9.0.1/24\n",
            &[
                ("gw", "AllowedIPs = 10.0.0.0/8"),
                ("b", "AllowedIPs = 10.9.0.2/32"),
            ],
        );
        Config::parse("o.conf", &text)
            .unwrap()
            .tun_settings("o.conf", None)
            .unwrap();
    }

    #[test]
    fn tun_mode_errors_say_what_to_fix() {
        let t = |iface: &str, peers: &[(&str, &str)]| {
            let c = Config::parse("e.conf", &tun_conf(iface, peers)).unwrap();
            c.tun_settings("e.conf", None).unwrap_err().to_string()
        };
        assert!(t("", &[("b", "AllowedIPs = 10.9.0.2/32")]).contains("add Address = "));
        assert!(t("Address = 10.9.0.1/24\n", &[("b", "")]).contains("needs AllowedIPs"));
        assert!(t("Address = 10.9.0.1/24\n", &[]).contains("at least one [Peer]"));
        // A full tunnel is accepted (policy routing with fwmark 51820, like wg-quick).
        let c = Config::parse(
            "e.conf",
            &tun_conf(
                "Address = 10.9.0.1/24\n",
                &[("b", "AllowedIPs = 0.0.0.0/0, ::/0")],
            ),
        )
        .unwrap();
        let ts = c.tun_settings("e.conf", None).unwrap();
        assert_eq!(ts.full_tunnel, Some(crate::tun::FULL_TUNNEL_MARK));
        assert!(t(
            "Address = fd00::1/64\nMTU = 1200\n",
            &[("b", "AllowedIPs = fd00::2/128")]
        )
        .contains("RFC 8200"));
        let p = |text: &str| Config::parse("e.conf", text).unwrap_err().to_string();
        assert!(p("[Interface]\nMode = kernel\n").contains("Mode: expected tun"));
        assert!(p("[Interface]\nMTU = 70000\n").contains("MTU: expected 576-"));
        assert!(p("[Interface]\nAddress = 10.9.0.1/40\n").contains("Address: prefix length"));
        assert!(p("[Interface]\nAddress = ,\n").contains("Address: expected one or more"));
        assert!(p("[Interface]\nTunName = this-name-is-too-long\n").contains("TunName: expected"));
        let k = format_key(&public_of(&generate_private()));
        assert!(p(&format!(
            "[Peer]\nPublicKey = {k}\nAllowedIPs = 10.9.0.300/32\n"
        ))
        .contains("e.conf:3: AllowedIPs: expected an IP prefix"));
        assert!(
            p(&format!("[Peer]\nPublicKey = {k}\nPresharedKey = short\n"))
                .contains("PresharedKey: ")
        );
    }

    #[test]
    fn parses_wg_dump() {
        let a = format_key(&generate_private());
        let b = format_key(&public_of(&generate_private()));
        let text = format!(
            "{a}\t{b}\t51820\toff\n{b}\t(none)\t127.0.0.1:5000\t10.0.0.2/32\t0\t0\t0\toff\n{b}\t(none)\t(none)\t10.0.0.3/32\t0\t0\t0\toff\n"
        );
        let d = parse_wg_dump(&text).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].endpoint, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(d.peers[0].allowed_ips, "10.0.0.2/32");
        assert_eq!(d.peers[0].persistent_keepalive, None);
        assert_eq!(d.peers[1].endpoint, None);
        assert!(d.private_key.is_some());
        assert_eq!(d.fwmark, None);
    }

    /// boringtun (userspace) prints `(none)` where the kernel prints the private key; a
    /// wg-quick full tunnel sets fwmark 51820 (printed in hex by some versions).
    #[test]
    fn parses_wg_dump_with_hidden_private_key_and_fwmark() {
        let b = format_key(&public_of(&generate_private()));
        let text = format!("(none)\t{b}\t51820\t51820\n{b}\t(none)\t(none)\t(none)\t0\t0\t0\t25\n");
        let d = parse_wg_dump(&text).unwrap();
        assert_eq!(d.private_key, None);
        assert_eq!(d.public_key, Some(parse_key(&b).unwrap()));
        assert_eq!(d.fwmark, Some(51820));
        assert_eq!(d.peers[0].allowed_ips, "");
        assert_eq!(d.peers[0].persistent_keepalive, Some(25));
        let d = parse_wg_dump(&format!("(none)\t{b}\t0\t0xca6c\n")).unwrap();
        assert_eq!(d.fwmark, Some(0xca6c));
        assert_eq!(d.listen_port, 0);
    }

    #[test]
    fn parses_private_key_file_and_fwmark() {
        let c = Config::parse(
            "x.conf",
            "[Interface]\nPrivateKeyFile = /etc/wireguard/wg0.key\nFwMark = 0xca6c\n",
        )
        .unwrap();
        assert_eq!(
            c.private_key_file,
            Some(PathBuf::from("/etc/wireguard/wg0.key"))
        );
        assert_eq!(c.fwmark, Some(Some(51820)));
        let c = Config::parse("x.conf", "[Interface]\nFwMark = off\n").unwrap();
        assert_eq!(c.fwmark, Some(None));
        let e = Config::parse("x.conf", "[Interface]\nFwMark = lots\n").unwrap_err();
        assert!(e.msg.contains("FwMark: expected off or a mark"), "{e}");
    }
}
