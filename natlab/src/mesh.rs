//! meshpunch inside a lab: the rendezvous and the relay on the server host, a `meshpunch up`
//! daemon per host, and helpers to read each daemon's path choice and to send traffic through
//! its proxy ports.
//!
//! Addresses: rendezvous QUIC on `203.0.113.10:4433` and TLS over TCP on `203.0.113.10:443`,
//! STUN on `203.0.113.10:3478` with the RFC
//! 5780 alternate `203.0.113.11:3479`, TURN relay on `203.0.113.20:3478` (region `lab`, REST
//! credentials from a shared secret; [`Mesh::relay_over_ipv6`] adds `[2001:db8:ffff::10]:3478`
//! as the region's UDP URI). Each daemon's config is written in WireGuard's INI style
//! (`[Interface]` / `[Peer]`) to the lab's log directory; its control socket is there too.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::topo::{Topology, SERVER_ALTERNATE, SERVER_PRIMARY, SERVER_RELAY};
use crate::{Error, RttStats};

/// Rendezvous QUIC port.
pub const RENDEZVOUS_PORT: u16 = 4433;
/// Rendezvous TLS-over-TCP port (443, like production: a `udp-blocked-all` site lets TCP out
/// only to 443 and 80; connect strings carry `tcp=443`).
pub const RENDEZVOUS_TCP_PORT: u16 = 443;
/// STUN port on the primary address.
pub const STUN_PORT: u16 = 3478;
/// STUN port on the alternate address (other IP and other port, RFC 5780).
pub const STUN_ALT_PORT: u16 = 3479;
/// TURN port of the relay.
pub const RELAY_PORT: u16 = 3478;
/// TURN-over-TLS port of the relay (443, like production: a `udp-blocked-all` site lets TCP
/// out only to 443 and 80). Its certificate (IP SAN [`SERVER_RELAY`], made with `openssl` per
/// lab) is every daemon's `CaFile`.
pub const RELAY_TLS_PORT: u16 = 443;
/// Shared TURN REST secret between rendezvous and relay.
pub const RELAY_SECRET: &str = "natlab-turn-secret";
/// Region name of the lab's relay.
pub const RELAY_REGION: &str = "lab";
/// Data socket port of every daemon (the same on every host; hosts have their own stacks).
pub const DATA_PORT: u16 = 41641;

const RDV_PROC: &str = "rendezvous";
const RELAY_PROC: &str = "relay";

/// Which TURN server plays the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayImpl {
    /// `meshpunch-relay`.
    #[default]
    Meshpunch,
    /// coturn's `turnserver` with `use-auth-secret` (any RFC 8656 server must do).
    Coturn,
}

/// The three meshpunch binaries.
#[derive(Debug, Clone)]
pub struct MeshBins {
    /// `meshpunch-rendezvous`.
    pub rendezvous: PathBuf,
    /// `meshpunch-relay`.
    pub relay: PathBuf,
    /// `meshpunch`.
    pub client: PathBuf,
}

impl MeshBins {
    /// Finds the binaries next to the test executable, building missing ones.
    pub fn find() -> Result<MeshBins, Error> {
        Ok(MeshBins {
            rendezvous: crate::bins::find("meshpunch-rendezvous", "meshpunch-rendezvous")?,
            relay: crate::bins::find("meshpunch-relay", "meshpunch-relay")?,
            client: crate::bins::find("meshpunch", "meshpunch")?,
        })
    }

    /// What the binaries cannot do yet that the scenarios need (from their `--help`), or
    /// `None` when they are complete enough. The scenarios pass it to
    /// [`crate::testenv::require_features`]: a skip with a reason outside CI, a failure in CI.
    pub fn missing_features(&self) -> Option<String> {
        let help = |bin: &PathBuf, args: &[&str]| -> String {
            std::process::Command::new(bin)
                .args(args)
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default()
        };
        let mut missing = Vec::new();
        let rdv = help(&self.rendezvous, &["--help"]);
        if !rdv.contains("--config") {
            missing.push("meshpunch-rendezvous --config".to_string());
        }
        let relay = help(&self.relay, &["--help"]);
        for flag in ["--listen", "--relay-ip", "--auth-secret"] {
            if !relay.contains(flag) {
                missing.push(format!("meshpunch-relay {flag}"));
            }
        }
        let client = help(&self.client, &["--help"]);
        for cmd in ["up", "status", "netcheck"] {
            if !client.lines().any(|l| l.trim_start().starts_with(cmd)) {
                missing.push(format!("meshpunch {cmd}"));
            }
        }
        if missing.is_empty() {
            None
        } else {
            Some(missing.join(", "))
        }
    }
}

/// A daemon's identity and files.
#[derive(Debug, Clone)]
pub struct Node {
    /// Host it runs in.
    pub host: String,
    /// WireGuard private key (base64).
    pub private_key: String,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Control socket.
    pub control: PathBuf,
    /// Config file.
    pub config: PathBuf,
}

/// How to start one daemon.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Hosts whose daemons are this daemon's peers.
    pub peers: Vec<String>,
    /// `WireGuardEndpoint`: where packets from peers are delivered.
    pub wireguard_endpoint: Option<SocketAddr>,
    /// Fixed proxy port per peer host (`ProxyPort`).
    pub proxy_ports: BTreeMap<String, u16>,
    /// `HostCandidates` (offer interface addresses); `None` = the daemon's default (true).
    pub host_candidates: Option<bool>,
    /// Take the peers from this WireGuard interface (`--wg-interface`) instead of `peers`.
    pub wg_interface: Option<String>,
    /// Keys to use (`(private, public)`), e.g. the WireGuard interface's own. Peers' configs
    /// written before this take the old key: use [`Mesh::set_keys`] first for every host.
    pub keys: Option<(String, String)>,
    /// Extra `[Interface]` lines, e.g. `BindingLifetimeProbe = 3,6,9,12`.
    pub interface_extra: Vec<String>,
    /// Write the private key to a file of its own (mode 0600) and pass `--private-key-file`
    /// instead of `PrivateKey` in the config.
    pub key_file: bool,
    /// Extra command-line arguments of `meshpunch up`.
    pub extra_args: Vec<String>,
    /// Built-in WireGuard: `--tun NAME` with this `[Interface] Address` (e.g. `10.9.0.1/24`).
    pub tun: Option<TunOptions>,
}

/// `meshpunch up --tun NAME`: the daemon runs WireGuard itself on a TUN device.
#[derive(Debug, Clone, Default)]
pub struct TunOptions {
    /// TUN device name.
    pub name: String,
    /// `[Interface] Address`.
    pub address: String,
    /// `[Peer] AllowedIPs` per peer host.
    pub allowed_ips: BTreeMap<String, String>,
}

/// What `meshpunch status --json` says about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    /// `lan`, `direct`, `relay` or `none`.
    pub path: String,
    /// Remote endpoint of the path.
    pub remote: Option<String>,
    /// Smoothed RTT in ms.
    pub rtt_ms: Option<f64>,
    /// Local proxy address WireGuard talks to for this peer.
    pub proxy: Option<SocketAddr>,
    /// Why this path.
    pub reason: String,
}

/// A running meshpunch deployment in a lab topology.
#[derive(Debug)]
pub struct Mesh {
    /// The topology (and lab) it runs in.
    pub topo: Topology,
    /// Binaries used.
    pub bins: MeshBins,
    /// Connect string printed by the rendezvous.
    pub connect: String,
    nodes: BTreeMap<String, Node>,
    rdv_dir: PathBuf,
    /// The relay's self-signed TLS certificate (the daemons' `CaFile`), once made.
    relay_ca: Option<PathBuf>,
    /// The relay also listens on [`crate::ipv6::SERVER_V6`] and the relay map's UDP URI is
    /// that IPv6 literal ([`Mesh::relay_over_ipv6`]).
    relay_v6: bool,
    /// Which relay runs.
    relay_impl: RelayImpl,
}

impl Mesh {
    /// Starts the relay (`meshpunch-relay`) and the rendezvous on the server host.
    pub fn start(topo: Topology) -> Result<Mesh, Error> {
        Self::start_with(topo, RelayImpl::Meshpunch)
    }

    /// Starts the given relay implementation and the rendezvous on the server host.
    pub fn start_with(topo: Topology, relay: RelayImpl) -> Result<Mesh, Error> {
        let bins = MeshBins::find()?;
        let rdv_dir = topo.lab.log_dir().join("rendezvous-data");
        std::fs::create_dir_all(&rdv_dir)?;
        let mut mesh = Mesh {
            topo,
            bins,
            connect: String::new(),
            nodes: BTreeMap::new(),
            rdv_dir,
            relay_ca: None,
            relay_v6: false,
            relay_impl: relay,
        };
        match relay {
            RelayImpl::Meshpunch => mesh.start_relay()?,
            RelayImpl::Coturn => mesh.start_coturn()?,
        }
        mesh.start_rendezvous()?;
        Ok(mesh)
    }

    fn start_coturn(&mut self) -> Result<(), Error> {
        let bin = crate::testenv::which("turnserver")
            .ok_or_else(|| Error::Setup("coturn's turnserver is not installed".into()))?;
        let relay = SERVER_RELAY.to_string();
        let secret = format!("--static-auth-secret={RELAY_SECRET}");
        let (crt, key) = self.relay_cert()?;
        let (crt, key) = (crt.display().to_string(), key.display().to_string());
        // `-c /dev/null`: ignore Debian's /etc/turnserver.conf.
        let pidfile = self
            .topo
            .lab
            .log_dir()
            .join("turnserver.pid")
            .display()
            .to_string();
        let mut args: Vec<String> = [
            "-c",
            "/dev/null",
            "--pidfile",
            &pidfile,
            "--listening-ip",
            &relay,
            "--listening-port",
            &RELAY_PORT.to_string(),
            "--relay-ip",
            &relay,
            "--use-auth-secret",
            &secret,
            "--realm",
            "meshpunch",
            "--fingerprint",
            // TURN over TLS on 443 (the `turns:` URI), like meshpunch-relay's.
            "--tls-listening-port",
            &RELAY_TLS_PORT.to_string(),
            "--cert",
            &crt,
            "--pkey",
            &key,
            "--no-dtls",
            "--no-tcp-relay",
            "--no-cli",
            "--no-rfc5780",
            "--log-file",
            "stdout",
            "--simple-log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut want = format!("{relay}:{RELAY_PORT}");
        if self.relay_v6 {
            let v6 = Self::relay_v6_addr();
            args.extend(["--listening-ip".to_string(), v6.ip().to_string()]);
            want = v6.to_string();
        }
        let server = self.topo.server.clone();
        self.topo.lab.spawn(&server, RELAY_PROC, &bin, &args)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .topo
            .lab
            .exec(&server, "ss", &["-uln"])?
            .contains(&want)
        {
            if Instant::now() > deadline || !self.topo.lab.is_running(RELAY_PROC) {
                return Err(Error::Setup(format!(
                    "turnserver did not listen on {want}: {}",
                    self.topo.lab.log(RELAY_PROC)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A self-signed certificate for the relay's IP ([`SERVER_RELAY`] as IP SAN) and its key.
    fn relay_cert(&mut self) -> Result<(PathBuf, PathBuf), Error> {
        let dir = self.topo.lab.log_dir().join("relay-tls");
        std::fs::create_dir_all(&dir)?;
        let (crt, key) = (dir.join("relay.crt"), dir.join("relay.key"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=natlab relay"])
            .arg("-addext")
            .arg(format!("subjectAltName=IP:{SERVER_RELAY}"))
            // An end-entity certificate (webpki refuses a CA certificate as the server's).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .map_err(|e| Error::Setup(format!("openssl (for the relay's TLS certificate): {e}")))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        self.relay_ca = Some(crt.clone());
        Ok((crt, key))
    }

    /// Restarts the relay to listen also on the server's IPv6 address
    /// ([`crate::ipv6::SERVER_V6`], port [`RELAY_PORT`]; call after
    /// [`Topology::enable_ipv6`]) and the rendezvous with a relay map whose UDP URI is that
    /// IPv6 literal (`turn:[2001:db8:ffff::10]:3478`, then the IPv4 `turn:` and `turns:`), so
    /// daemons started afterwards reach the relay over IPv6. Relayed addresses stay IPv4 (no
    /// REQUESTED-ADDRESS-FAMILY: RFC 6156's default). meshpunch-relay gets it as
    /// `also_listen`, coturn as a second `--listening-ip`.
    pub fn relay_over_ipv6(&mut self) -> Result<(), Error> {
        if !self.topo.lab.is_running(RELAY_PROC) || self.relay_v6 {
            return Err(Error::Setup(
                "relay_over_ipv6: needs a running meshpunch-relay, once".into(),
            ));
        }
        self.topo.lab.stop(RELAY_PROC);
        self.relay_v6 = true;
        match self.relay_impl {
            RelayImpl::Meshpunch => self.start_relay()?,
            RelayImpl::Coturn => self.start_coturn()?,
        }
        self.stop_rendezvous();
        self.start_rendezvous()
    }

    /// The relay's IPv6 listening address (see [`Mesh::relay_over_ipv6`]).
    pub fn relay_v6_addr() -> SocketAddr {
        SocketAddr::from((crate::ipv6::SERVER_V6, RELAY_PORT))
    }

    fn start_relay(&mut self) -> Result<(), Error> {
        let (crt, key) = self.relay_cert()?;
        let mut args: Vec<String> = [
            "--listen",
            &SocketAddr::from((SERVER_RELAY, RELAY_PORT)).to_string(),
            "--relay-ip",
            &SERVER_RELAY.to_string(),
            "--auth-secret",
            RELAY_SECRET,
            "--admin-listen",
            &SocketAddr::from((SERVER_RELAY, 9479)).to_string(),
            "--tls-listen",
            &SocketAddr::from((SERVER_RELAY, RELAY_TLS_PORT)).to_string(),
            "--cert",
            &crt.display().to_string(),
            "--key",
            &key.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut ready = format!(
            "listening on {}",
            SocketAddr::from((SERVER_RELAY, RELAY_PORT))
        );
        if self.relay_v6 {
            // `also_listen` is a config-file key; the flags above override the rest.
            let v6 = Self::relay_v6_addr();
            let path = self.topo.lab.log_dir().join("relay.toml");
            std::fs::write(&path, format!("also_listen = [\"{v6}\"]\n"))?;
            args.extend(["--config".to_string(), path.display().to_string()]);
            ready = format!("listening on {v6}");
        }
        let server = self.topo.server.clone();
        let bin = self.bins.relay.clone();
        self.topo.lab.spawn_env(
            &server,
            RELAY_PROC,
            &bin,
            &args,
            &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
        )?;
        self.wait_log(RELAY_PROC, &ready, Duration::from_secs(20))
    }

    /// Starts (or restarts) the rendezvous; its data directory (token secret, certificate)
    /// survives restarts, so connect strings stay valid.
    pub fn start_rendezvous(&mut self) -> Result<(), Error> {
        // The first UDP URI is the one daemons use (see `Mesh::relay_over_ipv6`).
        let v6 = if self.relay_v6 {
            format!("\"turn:{}\", ", Self::relay_v6_addr())
        } else {
            String::new()
        };
        let config = format!(
            "listen = \"{}\"\ntcp_listen = \"{}\"\nstun_listen = \"{}\"\nstun_alt = \"{}\"\nadmin_listen = \"{}\"\n\
             data_dir = \"{}\"\ndev = true\n\n[[relay]]\nregion = \"{RELAY_REGION}\"\n\
             urls = [{v6}\"turn:{}\", \"turns:{}\"]\nsecret = \"{RELAY_SECRET}\"\n",
            SocketAddr::from((SERVER_PRIMARY, RENDEZVOUS_PORT)),
            SocketAddr::from((SERVER_PRIMARY, RENDEZVOUS_TCP_PORT)),
            SocketAddr::from((SERVER_PRIMARY, STUN_PORT)),
            SocketAddr::from((SERVER_ALTERNATE, STUN_ALT_PORT)),
            SocketAddr::from((SERVER_PRIMARY, 9478)),
            self.rdv_dir.display(),
            SocketAddr::from((SERVER_RELAY, RELAY_PORT)),
            SocketAddr::from((SERVER_RELAY, RELAY_TLS_PORT)),
        );
        let path = self.topo.lab.log_dir().join("rendezvous.toml");
        std::fs::write(&path, config)?;
        let connect_file = self.rdv_dir.join("connect");
        let _ = std::fs::remove_file(&connect_file);
        let args = vec!["--config".to_string(), path.display().to_string()];
        let server = self.topo.server.clone();
        let bin = self.bins.rendezvous.clone();
        self.topo.lab.spawn_env(
            &server,
            RDV_PROC,
            &bin,
            &args,
            &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&connect_file) {
                if !s.trim().is_empty() {
                    self.connect = s.trim().to_string();
                    return Ok(());
                }
            }
            if Instant::now() > deadline || !self.topo.lab.is_running(RDV_PROC) {
                return Err(Error::Setup(format!(
                    "rendezvous did not write {}: {}",
                    connect_file.display(),
                    self.topo.lab.log(RDV_PROC)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the rendezvous (SIGTERM).
    pub fn stop_rendezvous(&mut self) {
        self.topo.lab.stop(RDV_PROC);
    }

    fn wait_log(&mut self, proc_name: &str, needle: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.topo.lab.log(proc_name).contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline || !self.topo.lab.is_running(proc_name) {
                return Err(Error::Setup(format!(
                    "{proc_name} did not print {needle:?}: {}",
                    self.topo.lab.log(proc_name)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Identity and files of the daemon on `host` (keys made on first use).
    pub fn node(&mut self, host: &str) -> Result<Node, Error> {
        if let Some(n) = self.nodes.get(host) {
            return Ok(n.clone());
        }
        let (private_key, public_key) = crate::wg::keypair()?;
        let dir = self.topo.lab.log_dir().to_path_buf();
        let n = Node {
            host: host.to_string(),
            private_key,
            public_key,
            control: dir.join(format!("{host}.sock")),
            config: dir.join(format!("{host}.conf")),
        };
        self.nodes.insert(host.to_string(), n.clone());
        Ok(n)
    }

    /// Uses `keys` (private, public) for the daemon on `host` (before it is first used).
    pub fn set_keys(&mut self, host: &str, keys: (String, String)) -> Result<(), Error> {
        let mut n = self.node(host)?;
        n.private_key = keys.0;
        n.public_key = keys.1;
        self.nodes.insert(host.to_string(), n);
        Ok(())
    }

    /// Writes the config and starts `meshpunch up` on `host`.
    pub fn up(&mut self, host: &str, opts: &UpOptions) -> Result<(), Error> {
        if let Some(k) = opts.keys.clone() {
            self.set_keys(host, k)?;
        }
        let me = self.node(host)?;
        let key_path = me.config.with_extension("key");
        let mut conf = if opts.key_file {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::remove_file(&key_path);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)?;
            f.write_all(format!("{}\n", me.private_key).as_bytes())?;
            self.topo.lab.remove_on_teardown(key_path.clone());
            String::from("[Interface]\n")
        } else {
            format!("[Interface]\nPrivateKey = {}\n", me.private_key)
        };
        conf.push_str(&format!(
            "Rendezvous = {}\nListenPort = {DATA_PORT}\nControlSocket = {}\n",
            self.connect,
            me.control.display()
        ));
        if let Some(ep) = opts.wireguard_endpoint {
            conf.push_str(&format!("WireGuardEndpoint = {ep}\n"));
        }
        if let Some(h) = opts.host_candidates {
            conf.push_str(&format!("HostCandidates = {h}\n"));
        }
        if let Some(ca) = &self.relay_ca {
            conf.push_str(&format!("CaFile = {}\n", ca.display()));
        }
        for line in &opts.interface_extra {
            conf.push_str(line);
            conf.push('\n');
        }
        if let Some(t) = &opts.tun {
            conf.push_str(&format!("Address = {}\n", t.address));
        }
        if opts.wg_interface.is_none() {
            for p in &opts.peers {
                let peer = self.node(p)?;
                conf.push_str(&format!(
                    "\n[Peer]\nPublicKey = {}\nName = {p}\n",
                    peer.public_key
                ));
                if let Some(port) = opts.proxy_ports.get(p) {
                    conf.push_str(&format!("ProxyPort = {port}\n"));
                }
                if let Some(a) = opts.tun.as_ref().and_then(|t| t.allowed_ips.get(p)) {
                    conf.push_str(&format!("AllowedIPs = {a}\n"));
                }
            }
        }
        std::fs::write(&me.config, conf)?;
        let _ = std::fs::remove_file(&me.control);
        let mut args = vec![
            "up".to_string(),
            "--config".to_string(),
            me.config.display().to_string(),
            "--control-socket".to_string(),
            me.control.display().to_string(),
        ];
        if let Some(wg) = &opts.wg_interface {
            args.push("--wg-interface".to_string());
            args.push(wg.clone());
        }
        if opts.key_file {
            args.push("--private-key-file".to_string());
            args.push(key_path.display().to_string());
        }
        args.extend(opts.extra_args.iter().cloned());
        if let Some(t) = &opts.tun {
            args.push("--tun".to_string());
            args.push(t.name.clone());
        }
        let bin = self.bins.client.clone();
        self.topo.lab.spawn_env(
            host,
            &daemon_proc(host),
            &bin,
            &args,
            &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.control.exists() {
            if Instant::now() > deadline || !self.topo.lab.is_running(&daemon_proc(host)) {
                return Err(Error::Setup(format!(
                    "meshpunch up on {host} did not open its control socket: {}",
                    self.topo.lab.log(&daemon_proc(host))
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Process id of the daemon on `host`, while it runs.
    pub fn daemon_pid(&self, host: &str) -> Option<u32> {
        self.topo.lab.pid(&daemon_proc(host))
    }

    /// Process id of the relay on the server host.
    pub fn relay_pid(&self) -> Option<u32> {
        self.topo.lab.pid(RELAY_PROC)
    }

    /// Stops the daemon on `host`.
    pub fn down(&mut self, host: &str) {
        self.topo.lab.stop(&daemon_proc(host));
    }

    /// Log of the daemon on `host`.
    pub fn daemon_log(&self, host: &str) -> String {
        self.topo.lab.log(&daemon_proc(host))
    }

    /// Runs the client binary with `args` inside `host`.
    pub fn client(&self, host: &str, args: &[&str]) -> Result<String, Error> {
        let bin = self.bins.client.display().to_string();
        self.topo.lab.exec(host, &bin, args)
    }

    /// `meshpunch netcheck --connect … --json` on `host`, parsed (up to three tries: a run can
    /// fail with "rendezvous: no registration").
    pub fn netcheck(&self, host: &str) -> Result<serde_json::Value, Error> {
        let mut out = self.client(host, &["netcheck", "--connect", &self.connect, "--json"]);
        for _ in 0..2 {
            if out.is_ok() {
                break;
            }
            out = self.client(host, &["netcheck", "--connect", &self.connect, "--json"]);
        }
        let out = out?;
        serde_json::from_str(&out)
            .map_err(|e| Error::Setup(format!("netcheck JSON on {host}: {e}: {out}")))
    }

    /// `meshpunch status --json` of the daemon on `host`, parsed.
    pub fn status(&mut self, host: &str) -> Result<serde_json::Value, Error> {
        let n = self.node(host)?;
        let ctl = n.control.display().to_string();
        let out = self.client(host, &["--control-socket", &ctl, "status", "--json"])?;
        serde_json::from_str(&out)
            .map_err(|e| Error::Setup(format!("status JSON on {host}: {e}: {out}")))
    }

    /// What `host`'s daemon says about its peer on host `peer`.
    pub fn peer(&mut self, host: &str, peer: &str) -> Result<PeerView, Error> {
        let key = self.node(peer)?.public_key;
        let st = self.status(host)?;
        let peers = st
            .get("peers")
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default();
        let p = peers
            .iter()
            .find(|p| p.get("public_key").and_then(|k| k.as_str()) == Some(key.as_str()))
            .ok_or_else(|| Error::Setup(format!("{host}: no peer {peer} in status: {st}")))?;
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Ok(PeerView {
            path: s("path").unwrap_or_else(|| "none".into()),
            remote: s("remote"),
            rtt_ms: p.get("rtt_ms").and_then(|v| v.as_f64()),
            proxy: s("proxy").and_then(|a| a.parse().ok()),
            reason: s("reason").unwrap_or_default(),
        })
    }

    /// Polls until `host` has a candidate pair through the relay towards `peer` (it knows the
    /// peer's relayed candidate); returns how long that took.
    pub fn wait_relay_pair(
        &mut self,
        host: &str,
        peer: &str,
        timeout: Duration,
    ) -> Result<Duration, Error> {
        let key = self.node(peer)?.public_key;
        let start = Instant::now();
        loop {
            if let Ok(st) = self.status(host) {
                let has = st
                    .get("peers")
                    .and_then(|p| p.as_array())
                    .into_iter()
                    .flatten()
                    .filter(|p| p.get("public_key").and_then(|k| k.as_str()) == Some(key.as_str()))
                    .flat_map(|p| {
                        p.get("pairs")
                            .and_then(|x| x.as_array())
                            .cloned()
                            .unwrap_or_default()
                    })
                    .any(|pair| {
                        pair.get("remote")
                            .and_then(|r| r.get("via"))
                            .and_then(|v| v.as_str())
                            == Some("relay")
                    });
                if has {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::Setup(format!(
                    "{host}: no relay pair towards {peer} after {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls until `host`'s path to `peer` is one of `paths`; returns the view and the time it took.
    pub fn wait_path(
        &mut self,
        host: &str,
        peer: &str,
        paths: &[&str],
        timeout: Duration,
    ) -> Result<(PeerView, Duration), Error> {
        let start = Instant::now();
        loop {
            let v = self.peer(host, peer);
            if let Ok(v) = &v {
                if paths.contains(&v.path.as_str()) {
                    return Ok((v.clone(), start.elapsed()));
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::Setup(format!(
                    "{host} -> {peer}: path not in {paths:?} after {timeout:?}; last: {v:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn daemon_proc(host: &str) -> String {
    format!("meshpunch-{host}")
}

/// A [`FakeWg`] echoing on its own thread ([`FakeWg::spawn_echo`]); dropping it stops and
/// joins the thread.
#[derive(Debug)]
pub struct Echo {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// The echo's address (the daemon's `WireGuardEndpoint`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP endpoint in a host standing in for WireGuard: it sends datagrams to the daemon's
/// proxy port and receives what the daemon delivers, or echoes what it receives.
#[derive(Debug)]
pub struct FakeWg {
    sock: UdpSocket,
}

impl FakeWg {
    /// Binds `127.0.0.1:port` (0 = any) in `host`.
    pub fn bind(topo: &Topology, host: &str, port: u16) -> Result<FakeWg, Error> {
        let sock = topo
            .lab
            .udp_socket(host, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
        Ok(FakeWg { sock })
    }

    /// Its address (the daemon's `WireGuardEndpoint`).
    pub fn addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.sock.local_addr()?)
    }

    /// Echoes on a thread of its own until the returned [`Echo`] is dropped.
    pub fn spawn_echo(self) -> Result<Echo, Error> {
        let addr = self.addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || self.echo_until(s));
        Ok(Echo {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Echoes every datagram back to its sender until `stop` is set (run on a thread).
    pub fn echo_until(self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.sock.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                let _ = self.sock.send_to(&buf[..n], from);
            }
        }
    }

    /// Sends `count` numbered datagrams to `proxy`, `interval` apart, and times each echo
    /// (an echo later than `timeout` counts as lost). Returns ping-style statistics.
    pub fn rtt(
        &self,
        proxy: SocketAddr,
        count: u32,
        interval: Duration,
        timeout: Duration,
    ) -> Result<RttStats, Error> {
        self.sock.set_read_timeout(Some(Duration::from_millis(5)))?;
        let mut buf = [0u8; 2048];
        let mut samples = Vec::new();
        for seq in 0..count {
            // Framed like a WireGuard transport message so the daemon carries it.
            let mut msg = [0u8; 48];
            msg[..4].copy_from_slice(&crate::traffic::WG_HEADER);
            msg[4..8].copy_from_slice(b"nlrt");
            msg[8..12].copy_from_slice(&seq.to_be_bytes());
            let sent = Instant::now();
            self.sock.send_to(&msg, proxy)?;
            let deadline = sent + timeout;
            while Instant::now() < deadline {
                if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                    if n >= 12 && &buf[4..8] == b"nlrt" && buf[8..12] == seq.to_be_bytes() {
                        samples.push(sent.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                }
            }
            let next = sent + interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        RttStats::from_samples(count, &samples)
            .ok_or_else(|| Error::Setup(format!("no echo to any of {count} datagrams")))
    }
}
