//! `meshpunch-loadtest`: command-line driver of the load generator (see the crate docs).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use meshpunch_loadtest::engine::{Pattern, Sizes};
use meshpunch_loadtest::forwarder::Forwarder;
use meshpunch_loadtest::load::{self, LoadOptions, Target};
use meshpunch_loadtest::punch::{self, PunchOptions};
use meshpunch_loadtest::rendezvous::{self, RendezvousOptions};
use meshpunch_loadtest::stream::{TlsOptions, Transport};

/// Load generator for meshpunch rendezvous nodes and any TURN server.
#[derive(Parser, Debug)]
#[command(name = "meshpunch-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Push ChannelData through a TURN server (ours, coturn, any RFC 8656 server).
    Relay {
        /// TURN server address (its UDP, TCP or TLS listener, as --transport says).
        #[arg(long)]
        server: SocketAddr,
        /// How clients reach the server: udp, or one TCP / TLS connection per client (TURN
        /// over TCP/TLS, RFC 8656 §3.1). Peers are on UDP whatever this is.
        #[arg(long, value_enum, default_value = "udp")]
        transport: TransportArg,
        /// --transport tls: PEM file of the certificate(s) to trust (the relay's self-signed
        /// certificate, or its CA).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// --transport tls: name the certificate must carry [the server's IP address].
        #[arg(long)]
        tls_name: Option<String>,
        /// TURN REST-API shared secret (coturn: static-auth-secret).
        #[arg(long, env = "MESHPUNCH_TURN_SECRET")]
        secret: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Push the same load through a bare forwarder (`meshpunch-loadtest forwarder`).
    Bare {
        /// Forwarder address.
        #[arg(long)]
        server: SocketAddr,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Send straight from clients to peers: the load generator's own ceiling.
    Direct {
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Many QUIC clients register, watch a partner and exchange offers with a rendezvous.
    Rendezvous {
        /// Connect string of the rendezvous (`meshpunch://TOKEN@host:port?pin=…`), or `@FILE`
        /// to read it from a file (the server's `data_dir/connect`).
        #[arg(long, env = "MESHPUNCH_CONNECT")]
        connect: String,
        /// Clients to register and keep connected at once.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// New connections per second (0: as fast as --concurrency allows).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Registrations in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Offers exchanged between client pairs once everyone is registered.
        #[arg(long, default_value_t = 200)]
        offers: usize,
        /// Offers per second.
        #[arg(long, default_value_t = 500.0)]
        offer_rate: f64,
        /// Clients sharing one QUIC endpoint (UDP socket, and source IP when spread; keep it
        /// within the server's per-IP connection and registration-burst limits).
        #[arg(long, default_value_t = 32)]
        clients_per_endpoint: usize,
        /// Keep every endpoint on 127.0.0.1 instead of spreading over 127.0.1.x (a loopback
        /// server's per-IP limits then apply to the whole load).
        #[arg(long)]
        no_spread: bool,
        /// Hold everyone connected this long after the offers (e.g. 10s).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Server process id: report its RSS per connected client and CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time from "connect to peer" to the first authenticated direct reply, over many pairs
    /// of real rendezvous clients on this host.
    Punch {
        /// Connect string of the rendezvous, or `@FILE`.
        #[arg(long, env = "MESHPUNCH_CONNECT")]
        connect: String,
        /// Pairs to punch.
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        /// Pairs punching at the same time.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the bare recvmmsg/sendmmsg UDP forwarder (the upper bound for a relay).
    Forwarder {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:3478")]
        listen: SocketAddr,
        /// Worker threads (SO_REUSEPORT sockets).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Udp,
    Tcp,
    Tls,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Traffic pattern: realistic (interleaved over all flows, many peers, WireGuard size mix)
    /// or bulk (runs of up to 64 datagrams per client to one peer, the earlier tables).
    #[arg(long, value_enum, default_value = "realistic")]
    pattern: Pattern,
    /// Concurrent clients, one allocation and socket each [realistic 64, bulk 16].
    #[arg(long)]
    clients: Option<usize>,
    /// Channels per client, each to its own peer and with its own sequence numbers
    /// [realistic 4, bulk 1].
    #[arg(long)]
    peers_per_client: Option<usize>,
    /// Peer sockets receiving the load [realistic 256, bulk 1].
    #[arg(long)]
    peers: Option<usize>,
    /// Offered datagrams per second over all clients (start rate with --find-max).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Payload bytes per datagram as the peer receives it, or wg-mix (see loadtest/README.md)
    /// [realistic wg-mix, bulk 100].
    #[arg(long, value_parser = Sizes::parse)]
    size: Option<Sizes>,
    /// Realistic pattern: send runs of 1..=N datagrams per flow visit (1: no bursts).
    #[arg(long, default_value_t = 1)]
    burst: usize,
    /// Every other flow visit sends peer → client through the server instead (relay and
    /// direct modes): both directions of a WireGuard session.
    #[arg(long)]
    bidirectional: bool,
    /// Receiver threads over the peer sockets (0: one per 128 peers, at most 4).
    #[arg(long, default_value_t = 0)]
    receivers: usize,
    /// Seed of the flow order and size draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Sending time (per trial with --find-max), e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Address the peer sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    peer_ip: IpAddr,
    /// Address the client sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: IpAddr,
    /// Search the highest rate with loss under --max-loss (doubling, then bisecting; a rate
    /// passes only with two passing trials in a row).
    #[arg(long)]
    find_max: bool,
    /// Loss limit of --find-max, in percent.
    #[arg(long, default_value_t = 1.0)]
    max_loss: f64,
    /// Highest rate --find-max offers.
    #[arg(long, default_value_t = 4_000_000)]
    ceiling: u64,
    /// Server process id: report its CPU use.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn run_load(target: Target, a: LoadArgs) -> anyhow::Result<()> {
    load::raise_limits();
    let base = match a.pattern {
        Pattern::Realistic => LoadOptions::realistic(),
        Pattern::Bulk => LoadOptions::bulk(),
    };
    let opts = LoadOptions {
        clients: a.clients.unwrap_or(base.clients),
        peers_per_client: a.peers_per_client.unwrap_or(base.peers_per_client),
        peers: a.peers.unwrap_or(base.peers),
        sizes: a.size.unwrap_or(base.sizes),
        pattern: a.pattern,
        burst: a.burst,
        receivers: a.receivers,
        seed: a.seed,
        bidirectional: a.bidirectional,
        rate: a.rate,
        duration: a.duration,
        peer_ip: a.peer_ip,
        client_ip: a.client_ip,
        server_pid: a.server_pid,
    };
    let report = if a.find_max {
        if !(0.0..100.0).contains(&a.max_loss) {
            bail!("--max-loss is a percentage in [0, 100)");
        }
        let quiet = a.json;
        load::run_find_max(&target, &opts, a.max_loss / 100.0, a.ceiling, |t| {
            if !quiet {
                eprintln!(
                    "  trial: offered {:>9} pps  delivered {:>11.0} pps  loss {:.3}%  dup {}  reord {}{}",
                    t.rate,
                    t.pps,
                    t.loss * 100.0,
                    t.duplicates,
                    t.reordered,
                    if t.generator_limited { "  (generator-limited)" } else { "" }
                );
            }
        })
    } else {
        load::run_once(&target, &opts)
    }
    .with_context(|| format!("{} load", target.mode()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", load::table(&report));
    }
    Ok(())
}

/// A connect string given as is, or `@FILE` to read it from a file.
fn read_connect(arg: String) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading connect string from {path}")),
        None => Ok(arg),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Relay {
            server,
            transport,
            ca,
            tls_name,
            secret,
            load,
        } => {
            let transport = match (transport, ca) {
                (TransportArg::Udp, None) => Transport::Udp,
                (TransportArg::Tcp, None) => Transport::Tcp,
                (TransportArg::Tls, Some(ca)) => {
                    let name = tls_name.unwrap_or_else(|| server.ip().to_string());
                    Transport::Tls(
                        TlsOptions::from_ca_file(&ca, &name).map_err(anyhow::Error::msg)?,
                    )
                }
                (TransportArg::Tls, None) => {
                    bail!("--transport tls needs --ca FILE (the relay's certificate or its CA)")
                }
                (_, Some(_)) => bail!("--ca is for --transport tls"),
            };
            run_load(
                Target::Turn {
                    server,
                    secret,
                    transport,
                },
                load,
            )
        }
        Cmd::Bare { server, load } => run_load(Target::Bare(server), load),
        Cmd::Direct { load } => run_load(Target::Direct, load),
        Cmd::Rendezvous {
            connect,
            clients,
            rate,
            concurrency,
            offers,
            offer_rate,
            clients_per_endpoint,
            no_spread,
            hold,
            server_pid,
            json,
        } => {
            let opts = RendezvousOptions {
                connect: read_connect(connect)?,
                clients,
                rate,
                concurrency,
                offers,
                offer_rate,
                clients_per_endpoint,
                spread_source_ips: !no_spread,
                server_pid,
                hold,
                ..RendezvousOptions::default()
            };
            let r = rendezvous::run(&opts).context("rendezvous load")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", rendezvous::table(&r));
            }
            Ok(())
        }
        Cmd::Punch {
            connect,
            pairs,
            concurrency,
            json,
        } => {
            let opts = PunchOptions {
                connect: read_connect(connect)?,
                pairs,
                concurrency,
                ..PunchOptions::default()
            };
            let r = punch::run(&opts).context("punch")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", punch::table(&r));
            }
            Ok(())
        }
        Cmd::Forwarder { listen, threads } => {
            let f = Forwarder::start(listen, threads).context("starting the forwarder")?;
            println!("listening on {}", f.local_addr());
            f.join();
            Ok(())
        }
    }
}
