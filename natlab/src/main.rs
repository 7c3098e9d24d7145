//! `natlab`: bring named NAT topologies up and down by hand, and the user-space shaper the
//! labs run inside their internet namespace.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use natlab::lab::{self, Lab};
use natlab::mesh::{Mesh, RelayImpl};
use natlab::shaper::{self, ShapeConfig, ShapeStats};
use natlab::TopologySpec;

/// Real NAT topologies in network namespaces, for meshpunch.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a named topology and leave it running (see `list`); prints a shell per host.
    Up {
        /// Topology name: cafe, pair, matrix, symmetric.
        name: String,
        /// Override the one-way delay to the servers (e.g. 50ms).
        #[arg(long, value_parser = shaper::parse_duration)]
        delay: Option<Duration>,
        /// Loss probability on the server link (0.0-1.0).
        #[arg(long)]
        loss: Option<f64>,
        /// Also start meshpunch-rendezvous and a relay on the server host and print the
        /// connect string and a `meshpunch up` command line per host.
        #[arg(long)]
        services: bool,
        /// With --services: run coturn's turnserver as the relay instead of meshpunch-relay.
        #[arg(long)]
        coturn: bool,
        /// Give servers, routers and hosts global IPv6 (no NAT) behind stateful firewalls.
        #[arg(long)]
        ipv6: bool,
        /// Seconds every NAT router keeps an idle UDP mapping (conntrack UDP timeouts).
        #[arg(long)]
        udp_timeout: Option<u64>,
    },
    /// Build a named topology for as long as this command runs (Ctrl-C or end of input removes it).
    Hold {
        /// Topology name: cafe, pair, matrix, symmetric.
        name: String,
    },
    /// Remove a topology brought up with `up` (its namespaces and processes).
    Down {
        /// Topology name given to `up`.
        name: String,
    },
    /// List known topologies and the lab namespaces that exist now.
    List,
    /// Remove labs left behind by killed test runs.
    Clean,
    /// Run the delay/loss shaper on an existing TUN device (inside a lab namespace).
    Shape {
        /// TUN device name.
        #[arg(long)]
        tun: String,
        /// One-way delay added to each packet (e.g. 25ms).
        #[arg(long, value_parser = shaper::parse_duration, default_value = "0")]
        delay: Duration,
        /// Probability that a packet is dropped (0.0-1.0).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up {
            name,
            delay,
            loss,
            services,
            coturn,
            ipv6,
            udp_timeout,
        } => up(&name, delay, loss, services, coturn, ipv6, udp_timeout),
        Cmd::Hold { name } => hold(&name),
        Cmd::Down { name } => {
            let gone = Lab::down(&name);
            if gone.is_empty() {
                println!("no lab called {name} is up");
            } else {
                println!("removed {} namespaces of lab {name}", gone.len());
            }
            Ok(())
        }
        Cmd::List => {
            println!("topologies:");
            for (n, d) in TopologySpec::catalogue() {
                println!("  {n:<10} {d}");
            }
            let all = lab::list_namespaces();
            let mut labs: Vec<String> = all
                .iter()
                .filter_map(|ns| {
                    let rest = ns.strip_prefix("nl-")?;
                    Some(rest.rsplit_once('-').map_or(rest, |(p, _)| p).to_string())
                })
                .collect();
            labs.dedup();
            println!(
                "up: {}",
                if labs.is_empty() {
                    "(none)".to_string()
                } else {
                    labs.join(", ")
                }
            );
            let tests = all.iter().filter(|n| n.starts_with("np")).count();
            if tests > 0 {
                println!("test-run namespaces: {tests} (removed when their run ends; `natlab clean` for stale ones)");
            }
            Ok(())
        }
        Cmd::Clean => {
            let gone = lab::cleanup_stale();
            println!("removed {} stale namespaces", gone.len());
            Ok(())
        }
        Cmd::Shape { tun, delay, loss } => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [libc::SIGTERM, libc::SIGINT] {
                // SAFETY: installing the default disposition is always valid; the process just ends.
                unsafe {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            eprintln!("shaping {tun}: delay {delay:?}, loss {loss}");
            shaper::run(
                &tun,
                ShapeConfig { delay, loss },
                stop,
                Arc::new(ShapeStats::default()),
            )
            .with_context(|| format!("shaper on {tun}"))
        }
    }
}

fn up(
    name: &str,
    delay: Option<Duration>,
    loss: Option<f64>,
    services: bool,
    coturn: bool,
    ipv6: bool,
    udp_timeout: Option<u64>,
) -> anyhow::Result<()> {
    if !natlab::testenv::is_root() {
        bail!("natlab up needs root (network namespaces, nftables)");
    }
    let Some(mut spec) = TopologySpec::named(name) else {
        bail!("unknown topology {name:?}; `natlab list` shows the known ones");
    };
    if lab::list_namespaces()
        .iter()
        .any(|n| n.starts_with(&format!("nl-{name}-")))
    {
        bail!("lab {name} is already up; `natlab down {name}` first");
    }
    if let Some(d) = delay {
        spec.server_delay = d;
    }
    if let Some(l) = loss {
        spec.server_loss = l;
    }
    let lab = Lab::persistent(name)?;
    let topo = match spec.build_in(lab) {
        Ok(topo) => topo,
        Err(e) => {
            Lab::down(name);
            return Err(e.into());
        }
    };
    print!("{}", topo.describe());
    if ipv6 {
        match topo.enable_ipv6(true) {
            Ok(v6) => {
                for (h, a) in v6 {
                    println!("  {h:<8} IPv6 {a}");
                }
                println!("  server   IPv6 {}", natlab::ipv6::SERVER_V6);
            }
            Err(e) => {
                Lab::down(name);
                return Err(e.into());
            }
        }
    }
    if let Some(t) = udp_timeout {
        if let Err(e) = topo.set_nat_udp_timeout(t) {
            Lab::down(name);
            return Err(e.into());
        }
        println!("NAT routers forget idle UDP mappings after {t} s");
    }
    if services {
        let relay = if coturn {
            RelayImpl::Coturn
        } else {
            RelayImpl::Meshpunch
        };
        match Mesh::start_with(topo, relay) {
            Ok(mesh) => {
                println!(
                    "rendezvous + STUN + relay running on the server; connect string:\n  {}",
                    mesh.connect
                );
                println!("a daemon on a host (write a config with [Interface] PrivateKey/Rendezvous and [Peer]s first):");
                println!(
                    "  ip netns exec {} {} up --config FILE --control-socket /tmp/natlab/HOST.sock",
                    mesh.topo.lab.ns("HOST"),
                    mesh.bins.client.display()
                );
            }
            Err(e) => {
                Lab::down(name);
                return Err(e.into());
            }
        }
    }
    println!("remove with: natlab down {name}");
    Ok(())
}

fn hold(name: &str) -> anyhow::Result<()> {
    if !natlab::testenv::is_root() {
        bail!("natlab hold needs root (network namespaces, nftables)");
    }
    let Some(spec) = TopologySpec::named(name) else {
        bail!("unknown topology {name:?}; `natlab list` shows the known ones");
    };
    let topo = spec.build()?;
    print!("{}", topo.describe());
    println!("removed when this command ends (Ctrl-C or end of input)");
    std::io::Write::flush(&mut std::io::stdout())?;
    // Ctrl-C ends the process; the lab's guardian removes the namespaces then.
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 {
        line.clear();
    }
    drop(topo);
    Ok(())
}
