//! `meshpunch netcheck`: classify the NAT in front of this host from STUN tests run from one
//! UDP socket (RFC 5780 §4.3 mapping, §4.4 filtering when the server has a second address),
//! check hairpinning, measure latency to every relay region, and with `--long` estimate how
//! long the NAT keeps an idle mapping, and (unless turned off) ask the default gateway for a
//! port mapping of the test socket with PCP / NAT-PMP / UPnP ([`crate::portmap`]), reporting
//! what it offers and the mapped address, then deleting the mapping. The decisions live in [`meshpunch_proto::nat`]; this
//! module only sends and receives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshpunch_proto::lifetime::Outcome;
use meshpunch_proto::nat::{
    LifetimeSearch, MappingObservation, NetcheckReport, RelayLatency, LIFETIME_STEPS_S,
};
use meshpunch_proto::stun;
use tokio::net::UdpSocket;

/// What to test against.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// STUN servers (the first one with OTHER-ADDRESS is used for the RFC 5780 tests).
    pub stun: Vec<SocketAddr>,
    /// Relay regions: (region, display address, resolved address).
    pub relays: Vec<(String, String, Option<SocketAddr>)>,
    /// The rendezvous (and extra CAs) to test QUIC against the TLS-over-TCP fallback
    /// (`tcp_fallback` in the report).
    pub rendezvous: Option<(
        meshpunch_proto::connect::ConnectString,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    )>,
}

/// Options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Estimate the binding lifetime (takes minutes).
    pub long: bool,
    /// Longest idle period of the lifetime test.
    pub long_max: Duration,
    /// Time to wait for each answer (with retransmits every 500 ms).
    pub timeout: Duration,
    /// Ask the default gateway for a port mapping (PCP, NAT-PMP, UPnP IGD).
    pub port_mapping: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            long: false,
            long_max: Duration::from_secs(180),
            timeout: Duration::from_millis(1500),
            port_mapping: true,
        }
    }
}

/// Longest wait for the port mapper to finish its probe and mapping request (UPnP discovery
/// plus AddPortMapping on a slow router).
pub const PORTMAP_SETTLE: Duration = Duration::from_secs(6);

/// Sends a Binding request to `server` (retransmitting) and waits for the answer from any
/// source. Returns the response and the RTT of the first transmission that got an answer.
async fn transact(
    sock: &UdpSocket,
    server: SocketAddr,
    change: Option<(bool, bool)>,
    timeout: Duration,
) -> Option<(stun::BindingResponse, Duration)> {
    let tx: [u8; 12] = rand::random();
    let (ip, port) = change.unwrap_or((false, false));
    let req = stun::binding_request(tx, ip, port);
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    let mut sent = Instant::now();
    let dest = to_family(sock, server);
    let _ = sock.send_to(&req, dest).await;
    let mut next_rtx = sent + Duration::from_millis(500);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let wait = next_rtx.min(deadline).saturating_duration_since(now);
        match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _from))) => {
                if let Ok(r) = stun::parse_binding_response(&buf[..n]) {
                    if r.transaction_id == tx {
                        return Some((r, sent.elapsed()));
                    }
                }
            }
            Ok(Err(_)) => {}
            Err(_) => {
                if Instant::now() >= next_rtx {
                    sent = Instant::now();
                    let _ = sock.send_to(&req, dest).await;
                    next_rtx = sent + Duration::from_millis(500);
                }
            }
        }
    }
}

fn to_family(sock: &UdpSocket, a: SocketAddr) -> SocketAddr {
    let dual_stack = sock.local_addr().map(|l| l.is_ipv6()).unwrap_or(false);
    meshpunch_proto::addr::for_socket(dual_stack, a)
}

/// Outcome of a CHANGE-REQUEST test: an answer = passes the filter, none = filtered, error 420
/// = the server cannot do it (unknown).
fn change_result(r: Option<(stun::BindingResponse, Duration)>) -> Option<bool> {
    match r {
        Some((r, _)) if r.error_code == Some(420) => None,
        Some((r, _)) => Some(r.error_code.is_none()),
        None => Some(false),
    }
}

/// Whether a Binding request sent to our own public address comes back to us.
async fn hairpin(sock: &UdpSocket, public: SocketAddr, timeout: Duration) -> bool {
    let tx: [u8; 12] = rand::random();
    let req = stun::binding_request(tx, false, false);
    let _ = sock.send_to(&req, to_family(sock, public)).await;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                if stun::peek_binding_request_tx(&buf[..n]) == Some(tx) {
                    return true;
                }
            }
            Ok(Err(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Runs every test and builds the report.
pub async fn run(targets: &Targets, opts: &Options) -> std::io::Result<NetcheckReport> {
    // QUIC vs TLS/TCP to the rendezvous, while the STUN tests run.
    let fallback = targets.rendezvous.clone().map(|(cs, ca)| {
        tokio::spawn(async move { crate::rendezvous::probe_transports(&cs, &ca).await })
    });
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
    let local_port = sock.local_addr()?.port();
    // Port mapping runs beside the STUN tests; its probe is short, its mapping is deleted below.
    // Only when something beyond this host is tested: with every server on loopback no
    // gateway is involved (and nothing is sent to the real one).
    let beyond_host = targets
        .stun
        .iter()
        .copied()
        .chain(targets.relays.iter().filter_map(|r| r.2))
        .any(|a| !meshpunch_proto::addr::unmap(a).ip().is_loopback());
    let mapper = if opts.port_mapping && beyond_host {
        match crate::portmap::PortMapper::start_default(local_port, Default::default()) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "port mapping not tried");
                None
            }
        }
    } else {
        None
    };
    let mut local: Vec<SocketAddr> = Vec::new();
    // The source address the kernel picks towards the first server comes first.
    if let Some(first) = targets.stun.iter().find(|a| a.is_ipv4()) {
        if let Ok(probe) = std::net::UdpSocket::bind("0.0.0.0:0") {
            if probe.connect(first).is_ok() {
                if let Ok(a) = probe.local_addr() {
                    local.push(SocketAddr::new(a.ip(), local_port));
                }
            }
        }
    }
    local.extend(
        crate::daemon::interface_addrs()
            .into_iter()
            .map(|ip| SocketAddr::new(ip, local_port)),
    );
    local.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local_port));
    local.dedup();
    let mut obs = Vec::new();
    let mut change_ip_port = None;
    let mut change_port = None;
    let mut rfc5780_done = false;
    let v4_stun: Vec<SocketAddr> = targets
        .stun
        .iter()
        .filter(|a| a.is_ipv4())
        .copied()
        .collect();
    let v6_stun: Vec<SocketAddr> = targets
        .stun
        .iter()
        .filter(|a| a.is_ipv6())
        .copied()
        .collect();
    let mut primary: Option<(SocketAddr, SocketAddr)> = None;
    for server in &v4_stun {
        if obs.iter().any(|o: &MappingObservation| o.server == *server) {
            continue;
        }
        let Some((r, _)) = transact(&sock, *server, None, opts.timeout).await else {
            continue;
        };
        let Some(mapped) = r.mapped.map(meshpunch_proto::addr::unmap) else {
            continue;
        };
        obs.push(MappingObservation {
            server: *server,
            mapped,
        });
        if primary.is_none() {
            primary = Some((*server, mapped));
        }
        if let (Some(other), false) = (r.other_address, rfc5780_done) {
            rfc5780_done = true;
            let other = meshpunch_proto::addr::unmap(other);
            // RFC 5780 §4.3 tests II and III.
            let alt_ip_same_port = SocketAddr::new(other.ip(), server.port());
            for dest in [alt_ip_same_port, other] {
                if let Some((r2, _)) = transact(&sock, dest, None, opts.timeout).await {
                    if let Some(m) = r2.mapped {
                        obs.push(MappingObservation {
                            server: dest,
                            mapped: meshpunch_proto::addr::unmap(m),
                        });
                    }
                }
            }
            // RFC 5780 §4.4 tests II and III, from a fresh socket that has only talked to the
            // primary address: the mapping tests above opened filter holes towards the
            // alternate address and port on the first socket.
            let fsock =
                UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
            if transact(&fsock, *server, None, opts.timeout)
                .await
                .is_some()
            {
                change_ip_port = change_result(
                    transact(&fsock, *server, Some((true, true)), opts.timeout).await,
                );
                change_port = change_result(
                    transact(&fsock, *server, Some((false, true)), opts.timeout).await,
                );
            }
        }
    }
    let mut relays = Vec::new();
    for (region, display, addr) in &targets.relays {
        let mut latency_ms = None;
        if let Some(a) = addr.filter(|a| a.is_ipv4()) {
            if let Some((r, rtt)) = transact(&sock, a, None, opts.timeout).await {
                latency_ms = Some(rtt.as_secs_f64() * 1000.0);
                if let Some(m) = r.mapped {
                    obs.push(MappingObservation {
                        server: a,
                        mapped: meshpunch_proto::addr::unmap(m),
                    });
                }
            }
        }
        relays.push(RelayLatency {
            region: region.clone(),
            addr: display.clone(),
            latency_ms,
        });
    }
    if !v6_stun.is_empty() {
        if let Ok(s6) = UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)).await
        {
            for server in &v6_stun {
                if let Some((r, _)) = transact(&s6, *server, None, opts.timeout).await {
                    if let Some(m) = r.mapped {
                        obs.push(MappingObservation {
                            server: *server,
                            mapped: m,
                        });
                    }
                }
            }
        }
    }
    let hair = match primary {
        Some((_, mapped)) if !local.contains(&mapped) => {
            Some(hairpin(&sock, mapped, Duration::from_millis(800)).await)
        }
        _ => None,
    };
    let mut lifetime = None;
    if opts.long {
        if let Some((server, _)) = primary {
            // RFC 5780 §4.6 (RESPONSE-PORT from a second socket) sees expiries that re-asking
            // from the mapped socket cannot: a port-preserving NAT re-creates the same mapping.
            let steps: Vec<Duration> = LIFETIME_STEPS_S
                .iter()
                .map(|s| Duration::from_secs(*s))
                .filter(|s| *s <= opts.long_max)
                .collect();
            if rfc5780_done {
                eprintln!(
                    "netcheck --long: measuring how long the NAT keeps an idle mapping (idle periods {:?} s in parallel, up to {} s)…",
                    steps.iter().map(|d| d.as_secs()).collect::<Vec<_>>(),
                    opts.long_max.as_secs()
                );
                if let Outcome::Measured(l) = crate::lifetime::measure(server, &steps).await {
                    lifetime = Some(l);
                }
            }
        }
        if let (None, Some((server, mapped))) = (lifetime, primary) {
            let mut search = LifetimeSearch::new(opts.long_max);
            while let Some(idle) = search.next_idle() {
                eprintln!(
                    "netcheck --long: idle {} s, then asking {server} whether the mapping {mapped} is still there…",
                    idle.as_secs()
                );
                tokio::time::sleep(idle).await;
                match transact(&sock, server, None, opts.timeout).await {
                    Some((r, _)) => {
                        search.record(r.mapped.map(meshpunch_proto::addr::unmap) == Some(mapped))
                    }
                    None => search.record(false),
                }
                if search.result().at_most_s.is_some() {
                    break;
                }
            }
            lifetime = Some(search.result());
        }
    }
    let mut report = NetcheckReport::from_results(
        &local,
        local_port,
        &obs,
        change_ip_port,
        change_port,
        hair,
        relays,
        lifetime,
    );
    if let Some(m) = mapper {
        report.portmap = Some(m.settled(PORTMAP_SETTLE).await.report);
        m.stop().await;
    }
    report.ipv6_host_addrs = crate::daemon::interface_addrs()
        .into_iter()
        .filter(|ip| ip.is_ipv6() && !meshpunch_proto::nat::is_lan_ip(*ip))
        .collect();
    if let Some(h) = fallback {
        report.tcp_fallback = h.await.ok();
    }
    report.verdict = report.verdict_line();
    Ok(report)
}
