//! `meshpunch`: keys, netcheck, the `up` daemon and its control commands.

use std::io::Read as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshpunch::config::{Config, PeerConfig};
use meshpunch::control::{self, Request};
use meshpunch::daemon;
use meshpunch::keys::{format_key, generate_private, parse_key, public_of, Identity};
use meshpunch::netcheck;
use meshpunch_proto::nat::{keepalive_interval, BindingLifetime};
use meshpunch_proto::path::PathConfig;

#[derive(Parser)]
#[command(
    name = "meshpunch",
    version,
    about = "Shortest paths between WireGuard peers: hole punching with relay fallback"
)]
struct Cli {
    /// Control socket of the daemon (default: $XDG_RUNTIME_DIR/meshpunch.sock,
    /// /run/meshpunch/meshpunch.sock as root, else ~/.local/state/meshpunch/meshpunch.sock).
    #[arg(long, global = true, env = "MESHPUNCH_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key (like `wg genkey`).
    Keygen,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Classify the NAT: UDP, public address, mapping, filtering, hairpin, relay latencies.
    Netcheck {
        /// Rendezvous connect string (gives the STUN servers and the relay map).
        #[arg(long, env = "MESHPUNCH_CONNECT")]
        connect: Option<String>,
        /// Extra CA (PEM) trusted for the rendezvous certificate (connect string without pin).
        #[arg(long, env = "MESHPUNCH_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Extra STUN server HOST:PORT (repeatable).
        #[arg(long)]
        stun: Vec<String>,
        /// Extra relay REGION=HOST:PORT (repeatable).
        #[arg(long)]
        relay: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also estimate the NAT binding lifetime (takes a few minutes).
        #[arg(long)]
        long: bool,
        /// Do not ask the gateway for a port mapping (no PCP / NAT-PMP / UPnP packet is sent).
        #[arg(long)]
        no_port_mapping: bool,
    },
    /// Run the daemon.
    Up {
        /// Config file (WireGuard INI style). Default: /etc/meshpunch/meshpunch.conf if it
        /// exists.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Take peers (and the private key, when the interface shows it) from this WireGuard
        /// interface, point each peer's endpoint at its local proxy port, keep it so (the
        /// interface is watched every 2 s) and restore the endpoints at exit.
        #[arg(long)]
        wg_interface: Option<String>,
        /// File holding the private key (like `wg set … private-key FILE`; overrides
        /// PrivateKey/PrivateKeyFile). Needed with --wg-interface on userspace WireGuard
        /// (boringtun), which does not show its private key.
        #[arg(long, value_name = "FILE")]
        private_key_file: Option<PathBuf>,
        /// SO_MARK of meshpunch's own sockets, or `off` (overrides FwMark). Default with
        /// --wg-interface: the interface's fwmark (wg-quick sets 51820 for a full tunnel).
        /// Needs CAP_NET_ADMIN.
        #[arg(long, value_name = "N|off")]
        fwmark: Option<String>,
        /// Built-in WireGuard: create TUN device NAME with the config's [Interface] Address
        /// and MTU, route each [Peer] AllowedIPs to it and run WireGuard in-process (no `wg`,
        /// no proxy ports). Same as `Mode = tun` with `TunName = NAME`. Needs root or
        /// CAP_NET_ADMIN.
        #[arg(long, value_name = "NAME", conflicts_with = "wg_interface")]
        tun: Option<String>,
        /// Rendezvous connect string (overrides the config's Rendezvous).
        #[arg(long, env = "MESHPUNCH_CONNECT")]
        connect: Option<String>,
        /// Extra CA (PEM) trusted for the rendezvous certificate (overrides CaFile).
        #[arg(long, env = "MESHPUNCH_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Data socket port (overrides ListenPort).
        #[arg(long)]
        listen_port: Option<u16>,
        /// Data socket IP (default: [::] dual-stack, falling back to 0.0.0.0).
        #[arg(long)]
        listen_ip: Option<IpAddr>,
        /// Do not offer interface addresses as candidates.
        #[arg(long)]
        no_host_candidates: bool,
        /// Do not ask the gateway for a port mapping (like `PortMapping = off`).
        #[arg(long)]
        no_port_mapping: bool,
        /// Write the data socket and proxy addresses as JSON to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Print the ready report (data socket, control socket, peers and their proxy ports or
        /// AllowedIPs) as JSON on stdout instead of one line for a person.
        #[arg(long)]
        json: bool,
        /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9642): paths by
        /// kind, path changes, failovers, bytes by path kind, probes, spray, relay allocation.
        #[arg(long, value_name = "ADDR", env = "MESHPUNCH_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Stop the running daemon cleanly (restores the --wg-interface endpoints).
    Down,
    /// Re-read the daemon's config like SIGHUP: added peers start, removed ones are dropped,
    /// changed ones updated; prints what changed (`+1 peer (laptop), -0, ~0`). An invalid
    /// config changes nothing and exits 1 with the reason.
    Reload,
    /// Show every peer's path.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer over its current path (like `tailscale ping`).
    Ping {
        /// Peer public key or name.
        peer: String,
        /// Number of pings.
        #[arg(short = 'c', long, default_value_t = 5)]
        count: u32,
        /// Seconds between pings.
        #[arg(short = 'i', long, default_value_t = 1.0)]
        interval: f64,
        /// Stop at the first pong over a direct or LAN path (up to `-c` pings, default 5; like
        /// `tailscale ping`); exit status 1 if none came over a direct path.
        #[arg(long)]
        until_direct: bool,
    },
    /// Test knobs: `debug block-direct PEER on|off` (alias force-relay), `debug block-relay PEER on|off`.
    Debug {
        /// block-direct, force-relay or block-relay.
        knob: String,
        /// Peer public key or name.
        peer: String,
        /// on or off.
        state: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshpunch: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshpunch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(s)
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve {s}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{s} resolves to no address"))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let sock = cli
        .control_socket
        .clone()
        .unwrap_or_else(control::default_socket_path);
    match cli.cmd {
        Cmd::Keygen => {
            println!("{}", format_key(&generate_private()));
        }
        Cmd::Pubkey => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            let k = parse_key(&s).map_err(|e| anyhow::anyhow!("stdin: {e}"))?;
            println!("{}", format_key(&public_of(&k)));
        }
        Cmd::Netcheck {
            connect,
            ca_file,
            stun,
            relay,
            json,
            long,
            no_port_mapping,
        } => {
            let mut targets = netcheck::Targets::default();
            if let Some(c) = connect {
                let ca_roots = match &ca_file {
                    Some(p) => meshpunch::tls::load_ca_file(p).map_err(anyhow::Error::msg)?,
                    None => Vec::new(),
                };
                if let Ok(cs) = c.parse() {
                    targets.rendezvous = Some((cs, ca_roots.clone()));
                }
                let (s, r) = meshpunch::rdvinfo::fetch(&c, ca_roots).await?;
                targets.stun.extend(s);
                targets.relays.extend(r);
            }
            for s in stun {
                targets.stun.push(resolve(&s).await?);
            }
            for r in relay {
                let (region, addr) = r.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--relay: expected REGION=HOST:PORT, found {r:?}")
                })?;
                targets.relays.push((
                    region.to_string(),
                    addr.to_string(),
                    resolve(addr).await.ok(),
                ));
            }
            if targets.stun.is_empty() && targets.relays.is_empty() && targets.rendezvous.is_none()
            {
                anyhow::bail!("nothing to test against: give --connect, --stun or --relay");
            }
            let opts = netcheck::Options {
                long,
                port_mapping: !no_port_mapping,
                ..Default::default()
            };
            let report = netcheck::run(&targets, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Cmd::Up {
            config,
            wg_interface,
            private_key_file,
            fwmark,
            tun,
            connect,
            ca_file,
            listen_port,
            listen_ip,
            no_host_candidates,
            no_port_mapping,
            ready_file,
            json,
            metrics_listen,
        } => {
            let config = config.or_else(|| {
                let p = PathBuf::from(DEFAULT_CONFIG);
                p.exists().then(|| {
                    tracing::info!(config = DEFAULT_CONFIG, "using the default config");
                    p
                })
            });
            let mut cfg = match &config {
                Some(p) => {
                    let cfg = Config::load(p)?;
                    if cfg.private_key.is_some() {
                        if let Some(w) = meshpunch::keys::key_file_warning(p) {
                            eprintln!("{w}");
                        }
                    }
                    cfg
                }
                None => Config {
                    host_candidates: true,
                    ..Config::default()
                },
            };
            if let Some(f) = private_key_file.as_ref().or(cfg.private_key_file.as_ref()) {
                cfg.private_key = Some(read_key_file(f)?);
            }
            let mut wg_dump = None;
            if let Some(iface) = &wg_interface {
                let d = meshpunch::wg::show_dump(iface)?;
                match (cfg.private_key, d.private_key, d.public_key) {
                    (None, Some(k), _) => cfg.private_key = Some(k),
                    (None, None, _) => anyhow::bail!(
                        "{iface} does not show its private key (userspace WireGuard such as boringtun hides it): pass --private-key-file FILE or set PrivateKey or PrivateKeyFile in [Interface]"
                    ),
                    (Some(k), _, Some(p)) if public_of(&k) != p => anyhow::bail!(
                        "the private key given is not {iface}'s: it belongs to {}, {iface} is {} (meshpunch must use the interface's own key pair)",
                        format_key(&public_of(&k)),
                        format_key(&p)
                    ),
                    _ => {}
                }
                for wp in &d.peers {
                    let k = &wp.public_key;
                    if !cfg.peers.iter().any(|p| p.public_key == *k) {
                        cfg.peers.push(PeerConfig {
                            public_key: *k,
                            name: None,
                            proxy_port: 0,
                            candidates: Vec::new(),
                        });
                    }
                }
                if cfg.wireguard_endpoint.is_none() && d.listen_port != 0 {
                    cfg.wireguard_endpoint =
                        Some(SocketAddr::from(([127, 0, 0, 1], d.listen_port)));
                }
                wg_dump = Some(d);
            }
            let private = cfg.private_key.ok_or_else(|| match &config {
                Some(p) => anyhow::anyhow!(
                    "no private key: set PrivateKey or PrivateKeyFile in [Interface] of {}, pass --private-key-file, or use --wg-interface",
                    p.display()
                ),
                None => anyhow::anyhow!(
                    "no private key and no config ({DEFAULT_CONFIG} does not exist): pass --config FILE, --private-key-file FILE or --wg-interface IFACE"
                ),
            })?;
            if cfg.peers.is_empty() && wg_interface.is_none() {
                anyhow::bail!("no peers: add [Peer] sections or use --wg-interface");
            }
            // Built-in WireGuard (`--tun NAME` or `Mode = tun`): checked before anything starts.
            let mut tun = if tun.is_some() || cfg.mode == meshpunch::config::Mode::Tun {
                if wg_interface.is_some() {
                    anyhow::bail!("Mode = tun (built-in WireGuard) and --wg-interface (an existing WireGuard interface) exclude each other: drop one");
                }
                let file = config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(no --config)".into());
                Some(cfg.tun_settings(&file, tun.as_deref())?)
            } else {
                None
            };
            let cli_connect = connect.clone();
            let rendezvous = connect.or(cfg.rendezvous.clone());
            if rendezvous.is_none() && cfg.peers.iter().all(|p| p.candidates.is_empty()) {
                anyhow::bail!("no rendezvous: set Rendezvous in [Interface] or pass --connect");
            }
            let ca_roots = match ca_file.or(cfg.ca_file.clone()) {
                Some(p) => meshpunch::tls::load_ca_file(&p).map_err(anyhow::Error::msg)?,
                None => Vec::new(),
            };
            let control_socket = cli
                .control_socket
                .clone()
                .or(cfg.control_socket.clone())
                .unwrap_or_else(control::default_socket_path);
            let listen = SocketAddr::new(
                listen_ip.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                listen_port.unwrap_or(cfg.listen_port),
            );
            let opts = daemon::Options {
                identity: Identity::from_private(private),
                rendezvous,
                listen,
                control_socket: control_socket.clone(),
                wireguard_endpoint: cfg.wireguard_endpoint,
                host_candidates: cfg.host_candidates && !no_host_candidates,
                peers: cfg.peers.clone(),
                exclude_interfaces: wg_interface.iter().cloned().collect(),
                ca_roots,
                path: PathConfig {
                    keepalive_interval: keepalive_interval(cfg.binding_lifetime.map(|s| {
                        BindingLifetime {
                            at_least_s: 0,
                            at_most_s: Some(s),
                        }
                    })),
                    birthday_sockets: cfg
                        .birthday_sockets
                        .unwrap_or(PathConfig::default().birthday_sockets),
                    birthday_probes: cfg
                        .birthday_probes
                        .unwrap_or(PathConfig::default().birthday_probes),
                    birthday_ttl: cfg.birthday_ttl.unwrap_or(0),
                    ..PathConfig::default()
                },
            };
            let lifetime = meshpunch::lifetime::LifetimeOptions {
                configured: cfg.binding_lifetime,
                steps: cfg
                    .binding_lifetime_probe
                    .clone()
                    .unwrap_or_else(|| Some(meshpunch::lifetime::default_steps())),
                cache: Some(meshpunch::lifetime::cache_path_for(&control_socket)),
            };
            // In tun mode the ready JSON lists each peer's AllowedIPs (there are no proxy ports).
            let tun_peers: Option<Vec<serde_json::Value>> = tun.as_ref().map(|t| {
                t.peers
                    .iter()
                    .map(|p| serde_json::json!({"public_key": format_key(&p.public_key), "name": p.label, "allowed_ips": p.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>()}))
                    .collect()
            });
            let tun_name = tun.as_ref().map(|t| t.name.clone());
            let reloader = Reloader {
                config: config.clone(),
                tun: tun.clone(),
                wg_interface: wg_interface.is_some(),
                cli_connect: cli_connect.clone(),
            };
            let explicit_mark = match fwmark.as_deref() {
                Some(v) => Some(meshpunch::config::parse_fwmark(v).ok_or_else(|| {
                    anyhow::anyhow!("--fwmark: expected off or a mark 1-4294967295, found {v:?}")
                })?),
                None => cfg.fwmark,
            };
            let mut fwmark = match explicit_mark {
                Some(m) => m,
                None => wg_dump.as_ref().and_then(|d| d.fwmark),
            };
            // A full tunnel in tun mode: meshpunch's own sockets carry the mark (51820 unless
            // FwMark says another), which is also the tunnel's routing table (wg-quick).
            if let Some(t) = tun.as_mut().filter(|t| t.full_tunnel.is_some()) {
                match explicit_mark {
                    Some(None) => anyhow::bail!("AllowedIPs 0.0.0.0/0 or ::/0 (a full tunnel) needs FwMark: meshpunch's own packets must stay out of the tunnel; drop `FwMark = off` / `--fwmark off`"),
                    Some(Some(m)) => t.full_tunnel = Some(m),
                    None => fwmark = t.full_tunnel,
                }
            }
            let wg_status = wg_interface.as_ref().map(|iface| {
                std::sync::Arc::new(std::sync::Mutex::new(control::WgInterfaceStatus {
                    name: iface.clone(),
                    state: "up".into(),
                    fwmark: wg_dump.as_ref().and_then(|d| d.fwmark),
                    ..Default::default()
                }))
            });
            meshpunch::fwmark::set_process_mark(fwmark);
            let extras = daemon::Extras {
                fwmark,
                wg_interface: wg_status.clone(),
                birthday_ttl_auto: cfg.birthday_ttl.is_none(),
            };
            let mut d = daemon::start_with_extras(opts, lifetime, tun, extras).await?;
            if cfg.port_mapping.is_on() && !no_port_mapping {
                d.start_port_mapping(Default::default())?;
            }
            let mut watch = None;
            if let (Some(iface), Some(dump), Some(st)) = (&wg_interface, &wg_dump, &wg_status) {
                let mut w = meshpunch::wg::Watcher::new(dump, &d.proxies);
                let mut first_err = None;
                for (wp, addr) in w.diff(dump) {
                    if let Err(e) = meshpunch::wg::set_endpoint(iface, &wp, addr) {
                        first_err.get_or_insert(e);
                    }
                }
                // Whatever was pointed already is put back, also when one peer failed.
                let h = meshpunch::wg::spawn_watcher(iface, w, st.clone(), Some(d.peer_control()));
                if let Some(e) = first_err {
                    let _ = h.stop().await;
                    return Err(e);
                }
                watch = Some(h);
            }
            let ready = serde_json::json!({
                "tun": tun_name,
                "data_addr": d.data_addr,
                "control_socket": control_socket,
                "public_key": format_key(&public_of(&private)),
                "peers": tun_peers.unwrap_or_else(|| d.proxies.iter().map(|(k, a)| serde_json::json!({"public_key": format_key(k), "proxy": a})).collect()),
            });
            if let Some(f) = ready_file {
                std::fs::write(&f, serde_json::to_vec_pretty(&ready)?)?;
            }
            if json {
                println!("{ready}");
            } else {
                let n = ready["peers"].as_array().map_or(0, Vec::len);
                let with = match &ready["tun"] {
                    serde_json::Value::String(t) => format!("built-in WireGuard on {t}"),
                    _ => match &wg_interface {
                        Some(i) => format!("WireGuard interface {i}"),
                        None => "proxy ports for WireGuard".to_string(),
                    },
                };
                println!(
                    "meshpunch up: {} {n} peer{}, {with}, data socket {}; `meshpunch{} status` shows the paths",
                    short_key(&format_key(&public_of(&private))),
                    if n == 1 { "" } else { "s" },
                    d.data_addr,
                    if control_socket != control::default_socket_path() { format!(" --control-socket {}", control_socket.display()) } else { String::new() },
                );
            }
            let _metrics = match metrics_listen {
                Some(addr) => {
                    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                        anyhow::anyhow!("--metrics-listen {addr}: cannot listen there ({e}); pick a free port, e.g. 127.0.0.1:9642")
                    })?;
                    tracing::info!(addr = %l.local_addr()?, "metrics on /metrics");
                    Some(AbortOnDrop(tokio::spawn(meshpunch::metrics::serve(
                        l,
                        control_socket.clone(),
                    ))))
                }
                None => None,
            };
            tracing::info!(data = %d.data_addr, control = %control_socket.display(), "meshpunch up");
            // SIGHUP and `meshpunch reload` re-read the config (peers, a rotated token in
            // `Rendezvous =`) without a restart.
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let mut reloads = d.reload_requests();
            loop {
                tokio::select! {
                    _ = d.wait() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = sigterm() => break,
                    _ = hup.recv() => {
                        let _ = reloader.reload(&d, "SIGHUP").await;
                    }
                    Some(reply) = async { match reloads.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                        let r = reloader.reload(&d, "meshpunch reload").await;
                        let _ = reply.send(r);
                    }
                }
            }
            if let Some(h) = watch {
                match h.stop().await {
                    Ok(n) => tracing::info!(restored = n, "WireGuard endpoints restored"),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "WireGuard endpoints not restored")
                    }
                }
            }
            // Clean exit: the gateway's port mapping is deleted before we go.
            d.shutdown().await;
            tracing::info!("meshpunch down");
        }
        Cmd::Down => {
            let Some(v) = request_running(&sock, &Request::Down, "down").await? else {
                return Ok(ExitCode::FAILURE);
            };
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                anyhow::bail!("{e}");
            }
            // The daemon removes its control socket last, after restoring the endpoints.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while sock.exists() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let pid = v.get("pid").and_then(|p| p.as_u64()).unwrap_or(0);
            if sock.exists() {
                anyhow::bail!(
                    "the daemon (pid {pid}) accepted the stop but has not exited after 10 s"
                );
            }
            println!("meshpunch down: daemon (pid {pid}) stopped");
        }
        Cmd::Reload => {
            let Some(v) = request_running(&sock, &Request::Reload, "reload").await? else {
                return Ok(ExitCode::FAILURE);
            };
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                eprintln!("meshpunch reload: {e}");
                return Ok(ExitCode::FAILURE);
            }
            let c: control::PeerChanges =
                serde_json::from_value(v.get("changes").cloned().unwrap_or_default())?;
            println!("meshpunch reload: {}", c.summary());
            if !c.errors.is_empty() {
                for e in &c.errors {
                    eprintln!("meshpunch reload: {e}");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Status { json } => {
            let v = control::request(&sock, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let st: control::Status = serde_json::from_value(v)?;
                print_status(&st);
            }
        }
        Cmd::Ping {
            peer,
            count,
            interval,
            until_direct,
        } => {
            let req = Request::Ping {
                peer: peer.clone(),
                count,
                interval_ms: (interval.max(0.0) * 1000.0) as u64,
            };
            let mut summary = control::PingSummary::default();
            control::request_lines(&sock, &req, |v| {
                if v.get("done").is_some() {
                    return false;
                }
                if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                    let seq = v.get("seq").and_then(|s| s.as_u64()).unwrap_or(0);
                    summary.lost();
                    println!("seq={seq} {e}");
                    return true;
                }
                if let Ok(l) = serde_json::from_value::<control::PingLine>(v) {
                    let Some(rtt) = l.rtt_ms else {
                        summary.lost();
                        return true;
                    };
                    summary.pong(rtt, l.path);
                    println!(
                        "pong from {} via {} ({}) in {:.2} ms",
                        l.remote.as_deref().unwrap_or("?"),
                        l.path.map(|p| p.as_str()).unwrap_or("?"),
                        l.seq,
                        rtt
                    );
                    if until_direct && summary.direct {
                        return false;
                    }
                }
                true
            })
            .await?;
            println!("{}", summary.line(&peer));
            if summary.received == 0 || (until_direct && !summary.direct) {
                if until_direct && summary.received > 0 {
                    println!("direct connection not established (only relayed pongs)");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Debug { knob, peer, state } => {
            let on = match state.as_str() {
                "on" | "true" | "1" => true,
                "off" | "false" | "0" => false,
                s => anyhow::bail!("expected on or off, found {s:?}"),
            };
            let v = control::request(&sock, &Request::Debug { peer, knob, on }).await?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                anyhow::bail!("{e}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Re-reads the config of a running daemon (SIGHUP, `meshpunch reload`).
struct Reloader {
    config: Option<PathBuf>,
    /// The TUN device as started (`--tun` / `Mode = tun`).
    tun: Option<meshpunch::tun::TunSettings>,
    wg_interface: bool,
    /// `--connect` wins over the config's `Rendezvous`.
    cli_connect: Option<String>,
}

impl Reloader {
    /// Re-reads the config and applies its rendezvous connect string and peers. Logs one
    /// line for the outcome (the daemon logs one per peer changed); on an error nothing
    /// changed.
    async fn reload(&self, d: &daemon::Daemon, why: &str) -> Result<control::PeerChanges, String> {
        let r = self.apply(d).await;
        d.record_reload(r.is_ok()).await;
        match &r {
            Ok(c) => tracing::info!(trigger = why, changes = %c.summary(), "config reloaded"),
            Err(e) => tracing::error!(trigger = why, "config not reloaded, nothing changed: {e}"),
        }
        r
    }

    async fn apply(&self, d: &daemon::Daemon) -> Result<control::PeerChanges, String> {
        let Some(p) = &self.config else {
            return Err(format!("the daemon was started without a config file (no --config, and {DEFAULT_CONFIG} did not exist): restart it with --config FILE to reload"));
        };
        let cfg = Config::load(p).map_err(|e| e.to_string())?;
        let file = p.display().to_string();
        let tun = match &self.tun {
            Some(t) => {
                if !cfg.peers.is_empty() {
                    let fresh = cfg
                        .tun_settings(&file, Some(&t.name))
                        .map_err(|e| e.to_string())?;
                    if fresh.addresses != t.addresses || fresh.mtu != t.mtu {
                        tracing::warn!(config = %file, "Address and MTU changes take effect at the next start; peers are reloaded now");
                    }
                    Some(fresh.peers)
                } else {
                    Some(Vec::new())
                }
            }
            None => None,
        };
        if cfg.peers.is_empty() && !self.wg_interface {
            return Err(format!("{file} has no [Peer] left: a daemon without peers is refused (to stop it, run `meshpunch down`)"));
        }
        let connect = self.cli_connect.clone().or(cfg.rendezvous.clone());
        if let Some(cs) = &connect {
            cs.parse::<meshpunch_proto::connect::ConnectString>()
                .map_err(|e| format!("{file}: Rendezvous: {e}"))?;
        }
        let changes = if self.wg_interface {
            // Peers follow the interface; only the rendezvous is reloaded.
            control::PeerChanges::default()
        } else {
            d.reload_peers(cfg.peers, tun)
                .await
                .map_err(|e| format!("{e:#}"))?
        };
        if let Some(cs) = connect {
            match d.reload_rendezvous(&cs).await {
                Ok(()) => tracing::info!("rendezvous connect string reloaded"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "rendezvous not reloaded"),
            }
        }
        Ok(changes)
    }
}

/// Config `meshpunch up` reads when no --config is given (if it exists).
const DEFAULT_CONFIG: &str = "/etc/meshpunch/meshpunch.conf";

/// Reads a private key file (one base64 key, like `wg genkey` writes), warning like `wg`
/// when others can read it.
fn read_key_file(p: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    let s = std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("private key file {}: {e}", p.display()))?;
    let k = parse_key(&s).map_err(|e| anyhow::anyhow!("private key file {}: {e}", p.display()))?;
    if let Some(w) = meshpunch::keys::key_file_warning(p) {
        eprintln!("{w}");
    }
    Ok(k)
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

fn print_status(st: &control::Status) {
    println!(
        "meshpunch {}  data {}  public {}  rendezvous {}{}",
        short_key(&st.public_key),
        st.data_addr,
        st.public_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        st.rendezvous.state,
        st.rendezvous
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    if let Some(o) = st.rendezvous.observed_addr {
        println!(
            "rendezvous observed {o} ({})",
            if st.rendezvous.shares_data_socket {
                "QUIC on the data socket"
            } else {
                "QUIC on a socket of its own"
            }
        );
    }
    if let Some(r) = &st.home_relay {
        println!(
            "home relay {} {} {} {}{}",
            r.region,
            r.server,
            r.state,
            r.relayed.map(|a| a.to_string()).unwrap_or_default(),
            r.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    if let Some(w) = &st.wg_interface {
        println!(
            "wireguard interface {} {}{}, fwmark {}, endpoints re-pointed {}{}",
            w.name,
            w.state,
            w.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            w.fwmark
                .map_or_else(|| "off".to_string(), |m| m.to_string()),
            w.reapplied_total,
            if w.unmanaged_peers.is_empty() {
                String::new()
            } else {
                format!(", not carried: {}", w.unmanaged_peers.join(" "))
            }
        );
    }
    if let Some(pm) = &st.portmap {
        println!(
            "port mapping: {}{}",
            meshpunch_proto::portmap::Report {
                upnp: pm.upnp,
                pmp: pm.pmp,
                pcp: pm.pcp,
                mapped: pm.mapped,
            }
            .to_line(),
            pm.protocol
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        );
    }
    if let Some(t) = &st.tun {
        println!(
            "tun {}  out {} packets  in {} packets  dropped: {} no peer, {} failed to decrypt, {} from outside AllowedIPs",
            t.name, t.tx_packets, t.rx_packets, t.no_peer, t.decrypt_failed, t.bad_source
        );
    }
    println!("{}", mtu_line(&st.mtu, st.tun.as_ref()));
    let b = &st.birthday;
    if b.pool_opened_total > 0 || b.spray_sent > 0 {
        println!(
            "birthday: mapping {:?}, pool {} open ({} opened), spray {} sent / {} answered, {} found",
            b.mapping, b.pool_open, b.pool_opened_total, b.spray_sent, b.spray_hits, b.found
        );
    }
    let region = st.home_relay.as_ref().map(|r| r.region.as_str());
    for p in &st.peers {
        println!("{}", peer_line(p, region));
    }
    println!(
        "nat keepalive {:.0} s ({}{}), binding lifetime {}",
        st.nat.keepalive_interval_s,
        st.nat.source,
        if st.nat.measuring { ", measuring" } else { "" },
        match (st.nat.binding_lifetime_s, st.nat.binding_lifetime_max_s) {
            (Some(a), Some(b)) if a != b => format!("{a}-{b} s"),
            (_, Some(b)) => format!("{b} s"),
            (Some(a), None) => format!("> {a} s"),
            (None, None) => "unknown".into(),
        }
    );
}

/// The first 8 characters of a base64 key and an ellipsis, as `wg show` users read keys.
fn short_key(key: &str) -> String {
    match key.get(..8) {
        Some(k) if key.len() > 8 => format!("{k}…"),
        _ => key.to_string(),
    }
}

/// 1023 B, 1.5 KiB, 12.3 MiB, 4.0 GiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// One `status` line per peer: name, short key, tunnel address, path (`lan`/`direct`/
/// `relay "region"`) and where to, RTT, bytes, and why the path is what it is.
fn peer_line(p: &control::PeerStatus, region: Option<&str>) -> String {
    let path = match (p.path, region) {
        (meshpunch_proto::path::PathKind::Relay, Some(r)) => format!("relay \"{r}\""),
        (k, _) => k.as_str().to_string(),
    };
    let tunnel = if p.allowed_ips.is_empty() {
        format!("proxy {}", p.proxy)
    } else {
        p.allowed_ips.join(",")
    };
    let from = match (p.local_socket, p.local_port) {
        (0, _) => String::new(),
        (n, Some(port)) => format!("  [from pool socket {n}, port {port}]"),
        (n, None) => format!("  [from pool socket {n}]"),
    };
    let mtu = p.mtu.map(|m| format!("  mtu {m}")).unwrap_or_default();
    format!(
        "{:<10} {:<9} {:<18} {:<16} {:<24} rtt {:>9}  tx {} rx {}{mtu}  {}{from}",
        p.name.as_deref().unwrap_or("-"),
        short_key(&p.public_key),
        tunnel,
        path,
        p.remote.as_deref().unwrap_or("-"),
        p.rtt_ms
            .map(|r| format!("{r:.2} ms"))
            .unwrap_or_else(|| "-".into()),
        human_bytes(p.tx_bytes),
        human_bytes(p.rx_bytes),
        p.reason
    )
}

/// The `mtu` line of `status`: the smallest measured path, what the WireGuard interface
/// should use (and, with `--tun`, what it has).
fn mtu_line(m: &control::MtuStatus, tun: Option<&control::TunStatus>) -> String {
    let path = m
        .path
        .map_or_else(|| "not measured yet".to_string(), |p| p.to_string());
    let iface = match tun {
        Some(t) => format!(", {} {} (configured {})", t.name, t.mtu, t.configured_mtu),
        None => format!(", set MTU = {} on the WireGuard interface", m.recommended),
    };
    let too_big = if m.send_too_big > 0 {
        format!(", {} sends refused as too big", m.send_too_big)
    } else {
        String::new()
    };
    let err = m
        .error
        .as_deref()
        .map(|e| format!(", error: {e}"))
        .unwrap_or_default();
    format!("mtu: path {path}{iface}{too_big}{err}")
}

/// Stops a background task when the daemon's scope ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `req` to the running daemon; `None` (after saying so on stderr) when no daemon
/// listens on `sock`, so `meshpunch CMD` can exit 1 with a message instead of an I/O error.
async fn request_running(
    sock: &std::path::Path,
    req: &Request,
    cmd: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    match control::request(sock, req).await {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            eprintln!(
                "meshpunch {cmd}: no daemon is running (nothing listens on {})",
                sock.display()
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod status_line_tests {
    use super::*;

    #[test]
    fn bytes_read_like_tailscale_status() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(short_key("AbCdEfGhIjKlMnOp="), "AbCdEfGh…");
    }

    #[test]
    fn mtu_line_says_what_to_set() {
        let mut m = control::MtuStatus {
            recommended: 1412,
            ..Default::default()
        };
        assert_eq!(
            mtu_line(&m, None),
            "mtu: path not measured yet, set MTU = 1412 on the WireGuard interface"
        );
        m.path = Some(1340);
        m.recommended = 1340;
        m.send_too_big = 3;
        let t = control::TunStatus {
            name: "mp0".into(),
            mtu: 1340,
            configured_mtu: 1412,
            ..Default::default()
        };
        assert_eq!(
            mtu_line(&m, Some(&t)),
            "mtu: path 1340, mp0 1340 (configured 1412), 3 sends refused as too big"
        );
    }
}
