//! `meshpunch-relay`: parses the command line and configuration, starts the workers and the
//! admin endpoint, drains on SIGTERM.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use meshpunch_relay::config::{self, FileConfig, Overrides, RelayConfig};
use meshpunch_relay::{admin, Relay};

/// TURN relay (RFC 8656 over UDP, TCP and TLS) for meshpunch; compatible with any TURN client.
#[derive(Debug, Parser)]
#[command(name = "meshpunch-relay", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "MESHPUNCH_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: listen on 127.0.0.1:3479 (beside the rendezvous dev STUN on 3478),
    /// relay on 127.0.0.1, allow loopback peers,
    /// generate (and keep) a shared secret if none is given.
    #[arg(long, env = "MESHPUNCH_RELAY_DEV")]
    dev: bool,
    /// UDP listening address (default 0.0.0.0:3478).
    #[arg(long, env = "MESHPUNCH_RELAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// IP address relayed ports are bound on (repeat for several).
    #[arg(long = "relay-ip", env = "MESHPUNCH_RELAY_IP", value_delimiter = ',')]
    relay_ip: Vec<IpAddr>,
    /// Relayed port range, LO-HI (default 49152-65535).
    #[arg(long, env = "MESHPUNCH_RELAY_PORTS")]
    ports: Option<String>,
    /// REALM (default "meshpunch").
    #[arg(long, env = "MESHPUNCH_RELAY_REALM")]
    realm: Option<String>,
    /// TURN REST-API shared secret (coturn --static-auth-secret).
    #[arg(long, env = "MESHPUNCH_RELAY_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Allow relaying to loopback addresses.
    #[arg(long, env = "MESHPUNCH_RELAY_ALLOW_LOOPBACK_PEERS")]
    allow_loopback_peers: bool,
    /// Allow relaying to private addresses (RFC 1918, CGNAT, ULA).
    #[arg(long, env = "MESHPUNCH_RELAY_ALLOW_PRIVATE_PEERS")]
    allow_private_peers: bool,
    /// Admin HTTP address for /metrics and /healthz.
    #[arg(long, env = "MESHPUNCH_RELAY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Never relay to this CIDR (repeat or comma-separate; added to `denied_peers`), like
    /// coturn's --denied-peer-ip. Matched in every IPv6 spelling of an IPv4 address.
    #[arg(
        long = "denied-peer",
        env = "MESHPUNCH_RELAY_DENIED_PEERS",
        value_delimiter = ','
    )]
    denied_peer: Vec<String>,
    /// TURN over TCP listening address (e.g. 0.0.0.0:3478); relayed transport stays UDP.
    #[arg(long, env = "MESHPUNCH_RELAY_TCP_LISTEN")]
    tcp_listen: Option<SocketAddr>,
    /// TURN over TLS listening address (e.g. 0.0.0.0:443); needs --cert and --key.
    #[arg(long, env = "MESHPUNCH_RELAY_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen (re-read on SIGHUP and when the file changes).
    #[arg(long, env = "MESHPUNCH_RELAY_CERT")]
    cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long, env = "MESHPUNCH_RELAY_KEY")]
    key: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(p) => RelayConfig::read_file(p)?,
        None => FileConfig::default(),
    };
    let needs_dev_secret = cli.dev
        && cli.auth_secret.is_none()
        && file.auth_secret.is_none()
        && file.auth_secret_file.is_none()
        && file.auth_secrets.as_ref().is_none_or(|v| v.is_empty())
        && file.users.as_ref().is_none_or(|u| u.is_empty());
    let dev_secret = if needs_dev_secret {
        let path = config::dev_secret_path();
        let s = config::dev_secret(&path)?;
        eprintln!("dev secret (kept in {}): {s}", path.display());
        // What to paste into the rendezvous config so its clients get this relay.
        let listen = cli.listen.or(file.listen).map_or_else(
            || format!("127.0.0.1:{}", config::DEV_PORT),
            |a| a.to_string(),
        );
        eprintln!(
            "rendezvous config for this relay:\n[[relay]]\nregion = \"dev\"\nurls = [\"turn:{listen}\"]\nsecret = \"{s}\""
        );
        Some(s)
    } else {
        None
    };
    let overrides = Overrides {
        dev: cli.dev,
        listen: cli.listen,
        relay_ips: cli.relay_ip,
        ports: cli.ports,
        realm: cli.realm,
        auth_secret: cli.auth_secret,
        allow_loopback_peers: cli.allow_loopback_peers,
        allow_private_peers: cli.allow_private_peers,
        admin_listen: cli.admin_listen,
        denied_peers: cli.denied_peer,
        tcp_listen: cli.tcp_listen,
        tls_listen: cli.tls_listen,
        cert: cli.cert,
        key: cli.key,
    };
    let cfg = RelayConfig::resolve(file, overrides, dev_secret)?;
    let handle = admin::install_recorder();
    let admin_addr = cfg.admin_listen;
    let relay = Relay::start(cfg)?;
    let control = relay.control();
    let mut stdout = std::io::stdout();
    for addr in relay.listen_addrs() {
        writeln!(stdout, "listening on {addr}")?;
    }
    if let Some(addr) = relay.tcp_addr() {
        writeln!(stdout, "listening on tcp {addr}")?;
    }
    if let Some(addr) = relay.tls_addr() {
        writeln!(stdout, "listening on tls {addr}")?;
    }
    stdout.flush()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        if let Some(addr) = admin_addr {
            let bound = admin::serve(addr, handle, control.clone())
                .await
                .with_context(|| format!("admin listener {addr}"))?;
            writeln!(stdout, "admin on {bound}")?;
            stdout.flush()?;
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining (new allocations refused)");
                    control.drain();
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping");
                    control.stop();
                    break;
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    control.reload_tls();
                }
            }
        }
        // A second signal stops at once.
        let stopper = control.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stopper.stop();
        });
        tokio::task::spawn_blocking(move || relay.join()).await?;
        tracing::info!("relay stopped");
        anyhow::Ok(())
    })
}
