//! `meshpunch-rendezvous`: parses the command line and config, then runs the server.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use meshpunch_rendezvous::config::Config;
use meshpunch_rendezvous::server::{load_token_secret, unix_now, Server};

/// meshpunch rendezvous: QUIC signalling, STUN, relay map and TURN credentials.
#[derive(Debug, Parser)]
#[command(name = "meshpunch-rendezvous", version)]
struct Cli {
    #[command(flatten)]
    opts: Opts,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Args)]
struct Opts {
    /// TOML config file.
    #[arg(long, global = true, env = "MESHPUNCH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Development mode: self-signed certificate, dev token, prints `connect: STRING`.
    #[arg(long, global = true, env = "MESHPUNCH_DEV")]
    dev: bool,
    /// Directory for generated state (certificate, token secret, dev token, connect file).
    #[arg(long, global = true, env = "MESHPUNCH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC listen address [default: 0.0.0.0:4433].
    #[arg(long, env = "MESHPUNCH_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// STUN listen address [default: 0.0.0.0:3478].
    #[arg(long, env = "MESHPUNCH_STUN_LISTEN", value_name = "ADDR")]
    stun_listen: Option<SocketAddr>,
    /// Alternate STUN address (second IP; other port) enabling RFC 5780.
    #[arg(long, env = "MESHPUNCH_STUN_ALT", value_name = "ADDR")]
    stun_alt: Option<SocketAddr>,
    /// Disable the STUN server.
    #[arg(long, conflicts_with_all = ["stun_listen", "stun_alt"])]
    no_stun: bool,
    /// Admin HTTP address (/metrics, /healthz, /readyz) [default: 127.0.0.1:9478].
    #[arg(long, env = "MESHPUNCH_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Disable the admin HTTP server.
    #[arg(long, conflicts_with = "admin_listen")]
    no_admin: bool,
    /// Host name or IP clients use to reach this server (goes into connect strings).
    #[arg(
        long,
        global = true,
        env = "MESHPUNCH_PUBLIC_HOST",
        value_name = "HOST"
    )]
    public_host: Option<String>,
    /// Certificate chain (PEM); reloaded on SIGHUP.
    #[arg(long, env = "MESHPUNCH_CERT", value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM); reloaded on SIGHUP.
    #[arg(long, env = "MESHPUNCH_KEY", value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Redis URL: use the shared Redis registry (several nodes).
    #[arg(long, env = "MESHPUNCH_REDIS_URL", value_name = "URL")]
    redis: Option<String>,
    /// Node id (default: random).
    #[arg(long, env = "MESHPUNCH_NODE_ID", value_name = "ID")]
    node_id: Option<String>,
    /// Interval between re-authentication challenges on live connections [default: 10m].
    #[arg(long, env = "MESHPUNCH_REAUTH_INTERVAL", value_name = "DURATION")]
    reauth_interval: Option<String>,
    /// Longest lifetime of the TURN credentials handed out (never past the token's expiry)
    /// [default: 1h].
    #[arg(long, env = "MESHPUNCH_CREDENTIAL_TTL", value_name = "DURATION")]
    credential_ttl: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Network tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Mints a token for a network (stateless; revoke it with `token revoke` or
    /// `revoked_tokens` in the config).
    Create {
        /// Network name ([A-Za-z0-9_-], up to 64 characters).
        #[arg(long)]
        network: String,
        /// Member token: admit only this WireGuard public key (as `wg pubkey` prints it), so
        /// one member can be revoked without re-keying the network.
        #[arg(long, value_name = "PUBKEY")]
        key: Option<String>,
        /// Validity: `30d`, `12h`, `90m`, `2w` or seconds.
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// Print a full connect string (needs the server's certificate in the data dir or
        /// config, and --public-host or the config's listen address) instead of the token.
        #[arg(long)]
        connect: bool,
    },
    /// Prints the `sha256:` form of a token, for the revocation list.
    Hash {
        /// The token.
        token: String,
    },
    /// Revokes a token on every node sharing the Redis registry (live connections close
    /// within a few seconds). With the memory registry, prints the `revoked_tokens` entry.
    Revoke {
        /// The token, or its `sha256:` hash (`token hash`).
        token: String,
    },
}

fn load_config(o: &Opts) -> anyhow::Result<Config> {
    let mut cfg = match &o.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    cfg.dev |= o.dev;
    if let Some(d) = &o.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(a) = o.listen {
        cfg.listen = a;
    }
    if let Some(a) = o.stun_listen {
        cfg.stun_listen = Some(a);
    }
    if let Some(a) = o.stun_alt {
        cfg.stun_alt = Some(a);
    }
    if o.no_stun {
        cfg.stun_listen = None;
        cfg.stun_alt = None;
    }
    if let Some(a) = o.admin_listen {
        cfg.admin_listen = Some(a);
    }
    if o.no_admin {
        cfg.admin_listen = None;
    }
    if let Some(h) = &o.public_host {
        cfg.public_host = Some(h.clone());
    }
    if let (Some(c), Some(k)) = (&o.cert, &o.key) {
        cfg.cert = Some(c.clone());
        cfg.key = Some(k.clone());
    }
    if let Some(r) = &o.redis {
        cfg.registry.redis_url = Some(r.clone());
    }
    if let Some(n) = &o.node_id {
        cfg.registry.node_id = Some(n.clone());
    }
    if let Some(d) = &o.reauth_interval {
        cfg.reauth_interval = humantime::parse_duration(d)
            .with_context(|| format!("invalid --reauth-interval {d:?} (examples: 10m, 90s)"))?;
    }
    if let Some(d) = &o.credential_ttl {
        cfg.turn_credential_ttl = humantime::parse_duration(d)
            .with_context(|| format!("invalid --credential-ttl {d:?} (examples: 1h, 30m)"))?;
    }
    if let Ok(s) = std::env::var("MESHPUNCH_TOKEN_SECRET") {
        cfg.token_secret = Some(s);
    }
    cfg.validate()?;
    Ok(cfg)
}

fn token_cmd(cfg: Config, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            network,
            key,
            ttl,
            connect,
        } => {
            let Some(secs) = meshpunch_proto::token::parse_ttl(&ttl) else {
                bail!("invalid --ttl {ttl:?} (examples: 30d, 12h, 3600)");
            };
            let key = key
                .map(|k| {
                    k.parse::<meshpunch_proto::wire::PeerKey>()
                        .map(|k| k.0)
                        .with_context(|| format!("--key {k:?}"))
                })
                .transpose()?;
            let secret = load_token_secret(&cfg)?;
            let token = meshpunch_proto::token::mint_for(
                &secret,
                &network,
                unix_now().saturating_add(secs),
                key,
            )?;
            if connect {
                let ck = match (&cfg.cert, &cfg.key) {
                    (Some(c), Some(k)) => meshpunch_rendezvous::tls::load_pem(c, k)?,
                    _ => meshpunch_rendezvous::tls::load_pem(
                        &cfg.data_dir.join("cert.pem"),
                        &cfg.data_dir.join("key.pem"),
                    )
                    .context("no certificate yet: start the server once or pass --cert/--key")?,
                };
                let host = cfg.public_host.clone().unwrap_or_else(|| {
                    if cfg.listen.ip().is_unspecified() {
                        "127.0.0.1".to_string()
                    } else {
                        cfg.listen.ip().to_string()
                    }
                });
                let stun = cfg
                    .stun_listen
                    .map(|s| meshpunch_proto::connect::join_host_port(&host, s.port()));
                let cs = meshpunch_proto::connect::ConnectString {
                    token,
                    host,
                    port: cfg.listen.port(),
                    pin: ck.pin(),
                    stun,
                };
                println!("{cs}");
            } else {
                println!("{token}");
            }
            Ok(())
        }
        TokenCmd::Hash { token } => {
            println!("sha256:{}", meshpunch_proto::token::token_hash(&token));
            Ok(())
        }
        TokenCmd::Revoke { token } => {
            let Some(hash) = meshpunch_proto::token::revocation_hash(&token) else {
                bail!("{token:?} is neither a token (mpt1./mpt2.…) nor a token hash (sha256:<64 hex>)");
            };
            if meshpunch_rendezvous::registry::backend_name(&cfg.registry) == "memory" {
                bail!(
                    "the memory registry lives inside one server process: add \"sha256:{hash}\" \
                     to revoked_tokens in its config and send it SIGHUP (systemctl reload), or \
                     run the nodes with the redis registry (--redis URL) to revoke from here"
                );
            }
            tokio::runtime::Runtime::new()?.block_on(async {
                let (registry, _inbox) =
                    meshpunch_rendezvous::registry::build(&cfg.registry).await?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match registry.revoke(&hash).await {
                        Ok(()) => break,
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            bail!("revoking through the registry: {e}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                println!(
                    "revoked sha256:{hash}; every node closes its connections within a few seconds"
                );
                Ok(())
            })
        }
    }
}

async fn serve(cfg: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let (data_dir, dev_network) = (cfg.data_dir.clone(), cfg.dev_network.clone());
    let server = Server::start(cfg).await?;
    if let Some(cs) = server.dev_connect() {
        println!("connect: {cs}");
        eprintln!(
            "the connect string holds a secret (a token for network {:?}): give it only to \
             machines that may join; a copy is in {} (mode 0600)",
            dev_network,
            data_dir.join("connect").display()
        );
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match server.reload_tls() {
                    Ok(pin) => tracing::info!(pin = %hex::encode(pin), "certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old one"),
                }
                if let Some(path) = &config_file {
                    match Config::from_file(path) {
                        Ok(fresh) => match server.set_revoked_tokens(&fresh.revoked_tokens) {
                            Ok(()) => tracing::info!(entries = fresh.revoked_tokens.len(), "revocation list reloaded"),
                            Err(e) => tracing::error!(error = %e, "revoked_tokens not reloaded; keeping the old list"),
                        },
                        Err(e) => tracing::error!(error = %e, "config reload failed; keeping the old revocation list"),
                    }
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("draining: telling clients to reconnect elsewhere");
    server.drain(Duration::from_secs(10)).await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = load_config(&cli.opts)?;
    match cli.cmd {
        Some(Cmd::Token(t)) => token_cmd(cfg, t),
        None => tokio::runtime::Runtime::new()?.block_on(serve(cfg, cli.opts.config.clone())),
    }
}
