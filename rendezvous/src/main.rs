//! `meshpunch-rendezvous`: parses the command line and config, then runs the server.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use meshpunch_rendezvous::config::{default_acme_http_listen, AcmeSettings, Config};
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
    /// TLS-over-TCP listen address, the fallback for clients whose network blocks UDP
    /// [default: the --listen address and port].
    #[arg(long, env = "MESHPUNCH_TCP_LISTEN", value_name = "ADDR")]
    tcp_listen: Option<SocketAddr>,
    /// Do not serve the TLS-over-TCP fallback.
    #[arg(long, conflicts_with = "tcp_listen")]
    no_tcp: bool,
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
    /// UDP port clients use (connect strings) when it differs from the listen port.
    #[arg(
        long,
        global = true,
        env = "MESHPUNCH_PUBLIC_PORT",
        value_name = "PORT"
    )]
    public_port: Option<u16>,
    /// Obtain and renew the certificate for this DNS name from an ACME CA (Let's Encrypt
    /// unless --acme-directory); clients then need no pin.
    #[arg(long, env = "MESHPUNCH_ACME_DOMAIN", value_name = "NAME",
          requires = "acme_contact", conflicts_with_all = ["cert", "key"])]
    acme_domain: Option<String>,
    /// Contact e-mail of the ACME account.
    #[arg(
        long,
        env = "MESHPUNCH_ACME_CONTACT",
        value_name = "EMAIL",
        requires = "acme_domain"
    )]
    acme_contact: Option<String>,
    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(
        long,
        env = "MESHPUNCH_ACME_DIRECTORY",
        value_name = "URL",
        requires = "acme_domain"
    )]
    acme_directory: Option<String>,
    /// CA (PEM) to trust for the ACME server's own HTTPS (a test CA such as Pebble's).
    #[arg(
        long,
        env = "MESHPUNCH_ACME_CA_FILE",
        value_name = "FILE",
        requires = "acme_domain"
    )]
    acme_ca_file: Option<PathBuf>,
    /// TCP address of the http-01 challenge listener [default: [::]:80].
    #[arg(
        long,
        env = "MESHPUNCH_ACME_HTTP_LISTEN",
        value_name = "ADDR",
        requires = "acme_domain"
    )]
    acme_http_listen: Option<SocketAddr>,
    /// Re-read certificate, key and the config's revocation list only on SIGHUP, not when the
    /// files change.
    #[arg(long, env = "MESHPUNCH_NO_WATCH")]
    no_watch: bool,
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
        /// Print a full connect string instead of the token: host from --public-host (or the
        /// ACME domain, else the listen address), port from --public-port (else the listen
        /// port), SPKI pin of the server's certificate (none with ACME).
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
    if let Some(a) = o.tcp_listen {
        cfg.tcp_listen = Some(a);
    }
    if o.no_tcp {
        cfg.tcp = false;
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
    if o.no_watch {
        cfg.watch_files = false;
    }
    if let Some(p) = o.public_port {
        cfg.public_port = Some(p);
    }
    if let (Some(domain), Some(contact)) = (&o.acme_domain, &o.acme_contact) {
        let base = cfg.acme.take();
        cfg.acme = Some(AcmeSettings {
            domain: domain.clone(),
            contact: contact.clone(),
            directory: o
                .acme_directory
                .clone()
                .or(base.as_ref().map(|b| b.directory.clone()))
                .unwrap_or_else(|| meshpunch_certs::acme::LETS_ENCRYPT.to_string()),
            ca_file: o
                .acme_ca_file
                .clone()
                .or(base.as_ref().and_then(|b| b.ca_file.clone())),
            http_listen: o
                .acme_http_listen
                .or(base.as_ref().map(|b| b.http_listen))
                .unwrap_or_else(default_acme_http_listen),
        });
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
                let pins = match meshpunch_rendezvous::tls::stored_cert(&cfg)
                    .context("no certificate yet: start the server once or pass --cert/--key")?
                {
                    Some(ck) => vec![meshpunch_proto::connect::Pin::Spki(ck.spki_pin())],
                    None => Vec::new(),
                };
                let host = cfg
                    .public_host
                    .clone()
                    .or(cfg.acme.as_ref().map(|a| a.domain.clone()))
                    .unwrap_or_else(|| {
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
                    port: cfg.public_port.unwrap_or(cfg.listen.port()),
                    pins,
                    stun,
                    addrs: Vec::new(),
                    tcp_port: cfg.connect_tcp_port(cfg.listen.port(), None),
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

/// Re-reads the revocation list from the config file (SIGHUP, or the file changed).
fn reload_revocations(server: &Server, path: &std::path::Path) {
    match Config::from_file(path) {
        Ok(fresh) => match server.set_revoked_tokens(&fresh.revoked_tokens) {
            Ok(()) => tracing::info!(
                entries = fresh.revoked_tokens.len(),
                "revocation list reloaded"
            ),
            Err(e) => {
                tracing::error!(error = %e, "revoked_tokens not reloaded; keeping the old list")
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the old revocation list")
        }
    }
}

fn mtime(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

async fn serve(cfg: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let (data_dir, dev_network) = (cfg.data_dir.clone(), cfg.dev_network.clone());
    let watch_files = cfg.watch_files;
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
    // The config file is watched like the certificate files (meshpunch-certs polls those):
    // a new revocation list applies within a few seconds even without SIGHUP.
    let mut watch = tokio::time::interval(meshpunch_certs::WATCH_INTERVAL);
    let mut config_mtime = config_file.as_deref().and_then(mtime);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match server.reload_tls() {
                    Ok(pin) => tracing::info!(spki = %meshpunch_proto::connect::Pin::Spki(pin), "certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old one"),
                }
                if let Some(path) = &config_file {
                    config_mtime = mtime(path);
                    reload_revocations(&server, path);
                }
            }
            _ = watch.tick() => {
                if let Some(path) = config_file.as_ref().filter(|_| watch_files) {
                    let now = mtime(path);
                    if now != config_mtime {
                        config_mtime = now;
                        tracing::info!(path = %path.display(), "config file changed");
                        reload_revocations(&server, path);
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
